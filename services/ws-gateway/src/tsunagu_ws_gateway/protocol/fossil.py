"""Fossil deltas (the format of Fossil SCM's delta.c, which Centrifugo's `delta: "fossil"` subscriptions
carry and the stock SDKs decode with their own `applyDelta`).

Written here because no maintained Python package makes them: the one on PyPI (`fossil-delta`, 2017) is a C
extension that no longer builds on CPython 3.11. The hub makes one delta per publication per renderer for
all the delta subscribers of a channel on a node, never one per subscriber, so this runs once per
publication; `apply` exists for the tests and for clients written in Python.

A delta is `<target length>\\n`, then commands `<n>@<offset>,` (copy n bytes of the source from offset)
and `<n>:<n bytes>` (insert these bytes), then `<checksum>;`. Numbers are written in the base-64 alphabet
below, most significant digit first.
"""

from __future__ import annotations

_DIGITS = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~"
_VALUES = {digit: value for value, digit in enumerate(_DIGITS)}
# Source blocks of this many bytes are indexed by a rolling hash; a match shorter than a block is not found.
_BLOCK = 16
# Candidates tried per position before giving up on it (delta.c's limit, which bounds the worst case).
_CANDIDATES = 250


class DeltaError(ValueError):
    """A delta that does not apply to the given source."""


def _number(value: int) -> bytes:
    if value == 0:
        return b"0"
    out = bytearray()
    while value > 0:
        out.append(_DIGITS[value & 63])
        value >>= 6
    out.reverse()
    return bytes(out)


def _digit_count(value: int) -> int:
    count = 1
    value >>= 6
    while value > 0:
        count += 1
        value >>= 6
    return count


def checksum(data: bytes) -> int:
    """delta.c's 32-bit checksum: the sum of the data read as big-endian 32-bit words, the tail left-aligned."""
    whole = len(data) - len(data) % 4
    sums = [sum(data[lane:whole:4]) for lane in range(4)]
    total = sums[3] + (sums[2] << 8) + (sums[1] << 16) + (sums[0] << 24)
    tail = data[whole:]
    for position, byte in enumerate(tail):
        total += byte << (24 - 8 * position)
    return total & 0xFFFFFFFF


def create(source: bytes, target: bytes) -> bytes:
    """The delta that turns `source` into `target`."""
    out = bytearray(_number(len(target)))
    out += b"\n"
    length_target = len(target)
    length_source = len(source)
    if length_source <= _BLOCK:
        out += _number(length_target) + b":" + target
        out += _number(checksum(target)) + b";"
        return bytes(out)

    # Index the source: every block's start by the hash of its bytes (delta.c's landmark/collide chains,
    # newest first).
    slots = length_source // _BLOCK
    landmark = [-1] * slots
    collide = [-1] * slots
    for start in range(0, length_source - _BLOCK, _BLOCK):
        block = start // _BLOCK
        slot = _hash(source, start) % slots
        collide[block] = landmark[slot]
        landmark[slot] = block

    base = 0
    while base + _BLOCK < length_target:
        best_count = best_offset = best_literal = 0
        a, b = _sums(target, base)
        i = 0
        while True:
            slot = ((a & 0xFFFF) | ((b & 0xFFFF) << 16)) % slots
            block = landmark[slot]
            tried = 0
            while block >= 0 and tried < _CANDIDATES:
                tried += 1
                source_start = block * _BLOCK
                # Forward from the block, then backward over what the literal would hold.
                forward = 0
                x, y = source_start, base + i
                while x < length_source and y < length_target and source[x] == target[y]:
                    forward += 1
                    x += 1
                    y += 1
                backward = 0
                while (
                    backward < source_start
                    and backward < i
                    and source[source_start - backward - 1] == target[base + i - backward - 1]
                ):
                    backward += 1
                count = forward + backward
                offset = source_start - backward
                literal = i - backward
                cost = _digit_count(literal) + _digit_count(count) + _digit_count(offset) + 3
                if count >= cost and count > best_count:
                    best_count, best_offset, best_literal = count, offset, literal
                block = collide[block]
            if best_count > 0:
                if best_literal > 0:
                    out += _number(best_literal) + b":" + target[base : base + best_literal]
                    base += best_literal
                out += _number(best_count) + b"@" + _number(best_offset) + b","
                base += best_count
                break
            if base + i + _BLOCK >= length_target:
                # No match before the end: the rest goes in as a literal.
                out += _number(length_target - base) + b":" + target[base:]
                base = length_target
                break
            # Roll the hash one byte on.
            old, new = target[base + i], target[base + i + _BLOCK]
            a = (a - old + new) & 0xFFFF
            b = (b - _BLOCK * old + a) & 0xFFFF
            i += 1
    if base < length_target:
        out += _number(length_target - base) + b":" + target[base:]
    out += _number(checksum(target)) + b";"
    return bytes(out)


def _sums(data: bytes, start: int) -> tuple[int, int]:
    a = b = data[start]
    for position in range(start + 1, start + _BLOCK):
        a = (a + data[position]) & 0xFFFF
        b = (b + a) & 0xFFFF
    return a, b


def _hash(data: bytes, start: int) -> int:
    a, b = _sums(data, start)
    return (a & 0xFFFF) | ((b & 0xFFFF) << 16)


def apply(source: bytes, delta: bytes) -> bytes:
    """The target that `delta` makes of `source`; DeltaError when it does not fit."""
    position = 0

    def number() -> int:
        nonlocal position
        value = 0
        start = position
        while position < len(delta) and (digit := _VALUES.get(delta[position])) is not None:
            value = (value << 6) + digit
            position += 1
        if position == start:
            raise DeltaError(f"a number expected at byte {start}")
        return value

    def operator() -> int:
        nonlocal position
        if position >= len(delta):
            raise DeltaError("the delta ends before its checksum")
        position += 1
        return delta[position - 1]

    limit = number()
    if operator() != ord("\n"):
        raise DeltaError("the target length is not followed by a newline")
    out = bytearray()
    while position < len(delta):
        count = number()
        op = operator()
        if op == ord("@"):
            offset = number()
            if operator() != ord(","):
                raise DeltaError("a copy command is not ended by ','")
            if offset + count > len(source):
                raise DeltaError("a copy reaches past the end of the source")
            out += source[offset : offset + count]
        elif op == ord(":"):
            if position + count > len(delta):
                raise DeltaError("an insert reaches past the end of the delta")
            out += delta[position : position + count]
            position += count
        elif op == ord(";"):
            if len(out) != limit:
                raise DeltaError(f"the delta makes {len(out)} bytes, not the {limit} it announced")
            if count != checksum(bytes(out)):
                raise DeltaError("bad checksum")
            return bytes(out)
        else:
            raise DeltaError(f"unknown delta operator {chr(op)!r}")
        if len(out) > limit:
            raise DeltaError("the delta makes more bytes than it announced")
    raise DeltaError("the delta ends before its checksum")
