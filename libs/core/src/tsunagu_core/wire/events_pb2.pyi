from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GatewayEvent(_message.Message):
    __slots__ = ("kind", "node", "client_id", "user_id", "session_id", "channel", "conn_info", "code", "reason", "transport", "client_ip", "client_closed")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[GatewayEvent.Kind]
        CONNECTED: _ClassVar[GatewayEvent.Kind]
        DISCONNECTED: _ClassVar[GatewayEvent.Kind]
        SUBSCRIBED: _ClassVar[GatewayEvent.Kind]
        UNSUBSCRIBED: _ClassVar[GatewayEvent.Kind]
        NODE_HEARTBEAT: _ClassVar[GatewayEvent.Kind]
    KIND_UNSPECIFIED: GatewayEvent.Kind
    CONNECTED: GatewayEvent.Kind
    DISCONNECTED: GatewayEvent.Kind
    SUBSCRIBED: GatewayEvent.Kind
    UNSUBSCRIBED: GatewayEvent.Kind
    NODE_HEARTBEAT: GatewayEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    CONN_INFO_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CLOSED_FIELD_NUMBER: _ClassVar[int]
    kind: GatewayEvent.Kind
    node: str
    client_id: str
    user_id: str
    session_id: str
    channel: str
    conn_info: bytes
    code: int
    reason: str
    transport: str
    client_ip: str
    client_closed: bool
    def __init__(self, kind: _Optional[_Union[GatewayEvent.Kind, str]] = ..., node: _Optional[str] = ..., client_id: _Optional[str] = ..., user_id: _Optional[str] = ..., session_id: _Optional[str] = ..., channel: _Optional[str] = ..., conn_info: _Optional[bytes] = ..., code: _Optional[int] = ..., reason: _Optional[str] = ..., transport: _Optional[str] = ..., client_ip: _Optional[str] = ..., client_closed: _Optional[bool] = ...) -> None: ...

class CollabUpdate(_message.Message):
    __slots__ = ("doc", "update", "client_id", "user_id", "node")
    DOC_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    doc: str
    update: bytes
    client_id: str
    user_id: str
    node: str
    def __init__(self, doc: _Optional[str] = ..., update: _Optional[bytes] = ..., client_id: _Optional[str] = ..., user_id: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class SimInput(_message.Message):
    __slots__ = ("room", "user_id", "client_id", "client_seq", "input", "content_type")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SEQ_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    room: str
    user_id: str
    client_id: str
    client_seq: int
    input: bytes
    content_type: str
    def __init__(self, room: _Optional[str] = ..., user_id: _Optional[str] = ..., client_id: _Optional[str] = ..., client_seq: _Optional[int] = ..., input: _Optional[bytes] = ..., content_type: _Optional[str] = ...) -> None: ...

class MqttCommand(_message.Message):
    __slots__ = ("command_id", "topic", "payload", "qos", "retain", "reply_channel", "user_id", "deadline_unix_ms")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    QOS_FIELD_NUMBER: _ClassVar[int]
    RETAIN_FIELD_NUMBER: _ClassVar[int]
    REPLY_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    reply_channel: str
    user_id: str
    deadline_unix_ms: int
    def __init__(self, command_id: _Optional[str] = ..., topic: _Optional[str] = ..., payload: _Optional[bytes] = ..., qos: _Optional[int] = ..., retain: _Optional[bool] = ..., reply_channel: _Optional[str] = ..., user_id: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class Revocation(_message.Message):
    __slots__ = ("scope", "value", "issued_before_unix_ms", "expires_unix_ms", "reason", "actor")
    class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SCOPE_UNSPECIFIED: _ClassVar[Revocation.Scope]
        SESSION: _ClassVar[Revocation.Scope]
        USER: _ClassVar[Revocation.Scope]
        TOKEN: _ClassVar[Revocation.Scope]
    SCOPE_UNSPECIFIED: Revocation.Scope
    SESSION: Revocation.Scope
    USER: Revocation.Scope
    TOKEN: Revocation.Scope
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_BEFORE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    scope: Revocation.Scope
    value: str
    issued_before_unix_ms: int
    expires_unix_ms: int
    reason: str
    actor: str
    def __init__(self, scope: _Optional[_Union[Revocation.Scope, str]] = ..., value: _Optional[str] = ..., issued_before_unix_ms: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ..., reason: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("actor", "action", "subject", "details", "outcome", "client_ip")
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    actor: str
    action: str
    subject: str
    details: bytes
    outcome: str
    client_ip: str
    def __init__(self, actor: _Optional[str] = ..., action: _Optional[str] = ..., subject: _Optional[str] = ..., details: _Optional[bytes] = ..., outcome: _Optional[str] = ..., client_ip: _Optional[str] = ...) -> None: ...
