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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tsunagu_core.broker import ClientInfo, Publication

from tsunagu_ws_gateway.protocol.codes import ErrorCode


@dataclass(slots=True, repr=False, eq=False)
class Codec:
    """One flavour's functions; `json_frames.JSON` and `protobuf_frames.PROTOBUF` are the two instances."""

    name: str
    # Frames queued together are joined with this into one WebSocket message...
    separator: bytes
    # ...which is a binary message, or else a text one.
    binary: bool
    # The server's ping: an empty reply.
    ping_frame: bytes
    # The commands of one client frame (at most the given number); raises ProtocolError when malformed.
    decode_commands: Callable[[bytes | str, int], list[dict[str, Any]]]
    # A publish command's `data` as the bytes the broker stores and subscribers receive.
    payload: Callable[[Any], bytes]
    # An rpc command's `data` as the JSON value RPC backends receive.
    rpc_data: Callable[[Any], Any]
    # (command id, method, result)
    reply: Callable[[int, str, Mapping[str, Any]], bytes]
    # (command id, error, temporary)
    error_reply: Callable[[int, ErrorCode, bool], bytes]
    publication_push: Callable[[str, Publication], bytes]
    join_push: Callable[[str, ClientInfo], bytes]
    leave_push: Callable[[str, ClientInfo], bytes]
    # (channel, code, reason)
    unsubscribe_push: Callable[[str, int, str], bytes]
    subscribe_push: Callable[[str, Mapping[str, Any]], bytes]
    message_push: Callable[[bytes], bytes]
    # Delta subscriptions (`delta: "fossil"`): the payload bytes a client holds of a publication, which the
    # next delta applies to (JSON: the JSON text; protobuf: the data itself)...
    delta_base: Callable[[bytes], bytes]
    # ...and a publication push for such a subscriber: (channel, publication, payload, is_delta), the
    # payload being the delta when is_delta, otherwise the full `delta_base`.
    delta_publication_push: Callable[[str, Publication, bytes, bool], bytes]

    def __repr__(self) -> str:
        return f"<codec {self.name}>"
