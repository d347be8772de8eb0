"""What the session and the hub need from a protocol flavour, so they never ask which one a connection speaks.

A flavour (JSON: `json_frames.JSON`; protobuf: `protobuf_frames.PROTOBUF`) turns a client's frame into
commands and the session's replies and pushes into frames. Frames queued for one connection are sent
as one WebSocket message: joined with `separator`, as a binary message when `binary` is set.

Commands come out as dicts in the shape of the JSON protocol (`{"id": 1, "publish": {"channel": ...,
"data": ...}}`), with one difference: payloads (`data`) are whatever the flavour carries (a parsed JSON
value, or bytes), so the session hands them back to the codec (`payload`, `rpc_data`) instead of
reading them itself.

Results given to `reply` are dicts of plain values named as the protocol names them, except that
`publications` hold `Publication`s, the `presence` map holds `ClientInfo`s, and the `rpc` result's
`data` is a JSON value: each flavour renders those its own way.

Payload interop: the broker stores a publication's data as bytes. JSON clients publish JSON text;
protobuf clients publish any bytes. A protobuf client gets the bytes as they are. A JSON client gets
them embedded as JSON when they are valid JSON, and otherwise as a JSON string holding their standard
base64 (docs/protocol.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from tsunagu_core.broker import ClientInfo, Publication

from tsunagu_ws_gateway.protocol.codes import ErrorCode


class Codec(Protocol):
    name: str
    # Frames queued together are joined with this into one WebSocket message...
    separator: bytes
    # ...which is a binary message, or else a text one.
    binary: bool
    # The server's ping: an empty reply.
    ping_frame: bytes

    def decode_commands(self, frame: bytes | str, max_commands: int) -> list[dict[str, Any]]:
        """The commands of one client frame; raises ProtocolError when the frame is malformed."""
        ...

    def payload(self, data: Any) -> bytes:
        """A publish command's `data` as the bytes the broker stores and subscribers receive."""
        ...

    def rpc_data(self, data: Any) -> Any:
        """An rpc command's `data` as the JSON value RPC backends receive."""
        ...

    def reply(self, command_id: int, method: str, result: Mapping[str, Any]) -> bytes: ...

    def error_reply(self, command_id: int, error: ErrorCode, temporary: bool = False) -> bytes: ...

    def publication_push(self, channel: str, pub: Publication) -> bytes: ...

    def join_push(self, channel: str, info: ClientInfo) -> bytes: ...

    def leave_push(self, channel: str, info: ClientInfo) -> bytes: ...

    def unsubscribe_push(self, channel: str, code: int, reason: str) -> bytes: ...

    def subscribe_push(self, channel: str, result: Mapping[str, Any]) -> bytes: ...

    def message_push(self, data: bytes) -> bytes: ...
