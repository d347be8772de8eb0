from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClientInfo(_message.Message):
    __slots__ = ("user", "client", "conn_info", "chan_info")
    USER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    CONN_INFO_FIELD_NUMBER: _ClassVar[int]
    CHAN_INFO_FIELD_NUMBER: _ClassVar[int]
    user: str
    client: str
    conn_info: bytes
    chan_info: bytes
    def __init__(self, user: _Optional[str] = ..., client: _Optional[str] = ..., conn_info: _Optional[bytes] = ..., chan_info: _Optional[bytes] = ...) -> None: ...

class BrokerPublication(_message.Message):
    __slots__ = ("offset", "epoch", "data", "info", "tags", "time_unix_ms")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    epoch: str
    data: bytes
    info: ClientInfo
    tags: _containers.ScalarMap[str, str]
    time_unix_ms: int
    def __init__(self, offset: _Optional[int] = ..., epoch: _Optional[str] = ..., data: _Optional[bytes] = ..., info: _Optional[_Union[ClientInfo, _Mapping]] = ..., tags: _Optional[_Mapping[str, str]] = ..., time_unix_ms: _Optional[int] = ...) -> None: ...

class BrokerPresenceEvent(_message.Message):
    __slots__ = ("join", "info")
    JOIN_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    join: bool
    info: ClientInfo
    def __init__(self, join: _Optional[bool] = ..., info: _Optional[_Union[ClientInfo, _Mapping]] = ...) -> None: ...
