"""Publications and presence events on the wire between nodes (tsunagu.v1 broker.proto)."""

from __future__ import annotations

from collections.abc import Mapping

from tsunagu_core.broker.base import ClientInfo, Publication
from tsunagu_core.wire import broker_pb2


def info_to_wire(info: ClientInfo) -> broker_pb2.ClientInfo:
    return broker_pb2.ClientInfo(user=info.user, client=info.client, conn_info=info.conn_info, chan_info=info.chan_info)


def info_from_wire(wire: broker_pb2.ClientInfo) -> ClientInfo:
    return ClientInfo(user=wire.user, client=wire.client, conn_info=wire.conn_info, chan_info=wire.chan_info)


# A node decodes the same few publishers' infos over and over (a history read, a busy channel):
# ClientInfo is immutable, so one instance per distinct info is shared.
_INFOS: dict[tuple[str, str, bytes, bytes], ClientInfo] = {}
_INFOS_KEPT = 4096


def _shared_info(wire: broker_pb2.ClientInfo) -> ClientInfo:
    key = (wire.user, wire.client, wire.conn_info, wire.chan_info)
    info = _INFOS.get(key)
    if info is None:
        if len(_INFOS) >= _INFOS_KEPT:
            _INFOS.clear()
        info = _INFOS[key] = ClientInfo(*key)
    return info


def encode_publication_body(publication: Publication) -> bytes:
    """Everything but offset and epoch, which the engine assigns while storing."""
    return encode_body(publication.data, publication.info, publication.tags, publication.time_ms)


def encode_body(data: bytes, info: ClientInfo | None, tags: Mapping[str, str], time_ms: int) -> bytes:
    """`encode_publication_body` without building a Publication first (a publish's hot path)."""
    wire = broker_pb2.BrokerPublication(data=data, time_unix_ms=time_ms)
    if info is not None:
        wire.info.CopyFrom(info_to_wire(info))
    if tags:
        wire.tags.update(tags)
    return wire.SerializeToString()


def decode_publication_body(body: bytes, offset: int, epoch: str) -> Publication:
    wire = broker_pb2.BrokerPublication.FromString(body)
    return Publication(
        data=wire.data,
        offset=offset,
        epoch=epoch,
        info=_shared_info(wire.info) if wire.HasField("info") else None,
        tags=dict(wire.tags) if wire.tags else {},
        time_ms=wire.time_unix_ms,
    )


def encode_presence_event(join: bool, info: ClientInfo) -> bytes:
    wire = broker_pb2.BrokerPresenceEvent(join=join, info=info_to_wire(info))
    return wire.SerializeToString()


def decode_presence_event(body: bytes) -> tuple[bool, ClientInfo]:
    wire = broker_pb2.BrokerPresenceEvent.FromString(body)
    return wire.join, info_from_wire(wire.info)


def encode_client_info(info: ClientInfo) -> bytes:
    return info_to_wire(info).SerializeToString()


def decode_client_info(raw: bytes) -> ClientInfo:
    return info_from_wire(broker_pb2.ClientInfo.FromString(raw))
