"""Centrifugo's proxy messages as its HTTP proxy writes and reads them in JSON: Go's encoding/json of the
generated structs, which is not protobuf's JSON mapping. Field names are the proto names (`expire_at`,
`b64data`), zero values are left out, 64-bit integers are numbers, and every `bytes` field (`data`,
`info`, `meta`) is raw JSON embedded as it is (the `b64...` string fields carry what is not JSON)."""

from __future__ import annotations

from typing import Any

import orjson
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_BYTES = FieldDescriptor.TYPE_BYTES
_MESSAGE = FieldDescriptor.TYPE_MESSAGE


def _value_out(field: FieldDescriptor, value: Any) -> Any:
    if field.type == _MESSAGE:
        return to_json(value)
    if field.type == _BYTES:
        return orjson.Fragment(value)
    return value


def to_json(message: Message) -> dict[str, Any]:
    """The message as Centrifugo's HTTP proxy sends it; bytes fields must hold JSON (the caller's duty)."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            out[field.name] = {key: _value_out(value_field, item) for key, item in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value_out(field, item) for item in value]
        else:
            out[field.name] = _value_out(field, value)
    return out


def dumps(message: Message) -> bytes:
    return orjson.dumps(to_json(message))


class NotAnAnswer(ValueError):
    """JSON that does not fit the expected message."""


def _value_in(field: FieldDescriptor, value: Any, into: Message | None = None) -> Any:
    if field.type == _MESSAGE:
        if not isinstance(value, dict):
            raise NotAnAnswer(f"{field.name} must be an object")
        assert into is not None
        from_json(value, into)
        return into
    if field.type == _BYTES:
        return b"" if value is None else orjson.dumps(value)
    if field.type == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise NotAnAnswer(f"{field.name} must be a string")
        return value
    if field.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise NotAnAnswer(f"{field.name} must be a boolean")
        return value
    if field.cpp_type in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise NotAnAnswer(f"{field.name} must be a number")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise NotAnAnswer(f"{field.name} must be an integer")
    return value


def from_json(body: dict[str, Any], message: Message) -> Message:
    """Fill `message` from a backend's JSON answer; unknown keys are ignored (newer backends), values of
    the wrong type are NotAnAnswer."""
    descriptor: Any = message.DESCRIPTOR
    for name, value in body.items():
        field = descriptor.fields_by_name.get(name)
        if field is None or value is None:
            continue
        entry = field.message_type
        try:
            if entry is not None and entry.GetOptions().map_entry:
                if not isinstance(value, dict):
                    raise NotAnAnswer(f"{name} must be an object")
                target = getattr(message, name)
                value_field = entry.fields_by_name["value"]
                for key, item in value.items():
                    if value_field.type == _MESSAGE:
                        _value_in(value_field, item, target[key])
                    else:
                        target[key] = _value_in(value_field, item)
            elif field.is_repeated:
                if not isinstance(value, list):
                    raise NotAnAnswer(f"{name} must be a list")
                target = getattr(message, name)
                for item in value:
                    if field.type == _MESSAGE:
                        _value_in(field, item, target.add())
                    else:
                        target.append(_value_in(field, item))
            elif field.type == _MESSAGE:
                _value_in(field, value, getattr(message, name))
                getattr(message, name).SetInParent()
            else:
                setattr(message, name, _value_in(field, value))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, NotAnAnswer):
                raise
            raise NotAnAnswer(f"{name}: {exc}") from None
    return message
