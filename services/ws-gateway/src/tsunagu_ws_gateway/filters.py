"""Publication tags filters, as Centrifugo v6 evaluates them (a subscriber's `tf`, a backend's
`server_tags_filter`): a tree of leaves comparing one tag (`eq`, `neq`, `in`, `nin`, `ex`, `nex`, `sw`,
`ew`, `ct`, and the decimal comparisons `lt`, `lte`, `gt`, `gte`) joined by `and`, `or` and `not`.

A filter is checked once, when the subscription is made (a malformed one is error 107), and compiled into
a predicate over a publication's tags; the hub keeps filtering subscribers apart from the others, so a
channel nobody filters pays nothing for the feature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from tsunagu_ws_gateway.protocol import codes
from tsunagu_ws_gateway.protocol.codes import ReplyError

Tags = Mapping[str, str]
Predicate = Callable[[Tags], bool]

# A filter comes from a client: bounded, so evaluating it per publication stays cheap and its recursion shallow.
MAX_DEPTH = 16
MAX_NODES = 256

_VALUE_COMPARISONS = ("eq", "neq", "sw", "ew", "ct", "lt", "lte", "gt", "gte")
_SET_COMPARISONS = ("in", "nin")
_PRESENCE_COMPARISONS = ("ex", "nex")


@dataclass(frozen=True, slots=True)
class TagsFilter:
    """A validated filter: the tree as the client sent it (for backends) and its compiled predicate."""

    tree: Mapping[str, Any]
    matches: Predicate


def _bad(detail: str) -> ReplyError:
    return ReplyError(codes.BAD_REQUEST, f"tags filter: {detail}")


def _decimal(text: str) -> Decimal | None:
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _leaf(node: Mapping[str, Any]) -> Predicate:
    key, cmp = node.get("key", ""), node.get("cmp", "")
    val, vals = node.get("val", ""), node.get("vals") or []
    if not isinstance(key, str) or not isinstance(cmp, str) or not isinstance(val, str):
        raise _bad("key, cmp and val must be strings")
    if not isinstance(vals, list) or not all(isinstance(v, str) for v in vals):
        raise _bad("vals must be a list of strings")
    if not cmp:
        raise _bad("a leaf needs cmp")
    if cmp in _VALUE_COMPARISONS:
        if not val or vals:
            raise _bad(f"{cmp} takes val, not vals")
    elif cmp in _SET_COMPARISONS:
        if not vals or val:
            raise _bad(f"{cmp} takes a non-empty vals, not val")
    elif cmp in _PRESENCE_COMPARISONS:
        if val or vals:
            raise _bad(f"{cmp} takes neither val nor vals")
    else:
        raise _bad(f"unknown comparison {cmp[:16]!r}")
    if not key and cmp not in _PRESENCE_COMPARISONS:
        raise _bad("a leaf needs key")
    match cmp:
        case "eq":
            return lambda tags: tags.get(key) == val
        case "neq":
            return lambda tags: tags.get(key) != val
        case "in":
            allowed = frozenset(vals)
            # As Centrifugo: a missing tag is the empty string for set comparisons.
            return lambda tags: tags.get(key, "") in allowed
        case "nin":
            refused = frozenset(vals)
            return lambda tags: tags.get(key, "") not in refused
        case "ex":
            return lambda tags: key in tags
        case "nex":
            return lambda tags: key not in tags
        case "sw":
            return lambda tags: key in tags and tags[key].startswith(val)
        case "ew":
            return lambda tags: key in tags and tags[key].endswith(val)
        case "ct":
            return lambda tags: key in tags and val in tags[key]
    bound = _decimal(val)
    order: Callable[[Decimal], bool] = {
        "lt": lambda v: bound is not None and v < bound,
        "lte": lambda v: bound is not None and v <= bound,
        "gt": lambda v: bound is not None and v > bound,
        "gte": lambda v: bound is not None and v >= bound,
    }[cmp]

    def compare(tags: Tags) -> bool:
        text = tags.get(key)
        number = _decimal(text) if text is not None else None
        return number is not None and order(number)

    return compare


def _compile(node: Any, depth: int, count: list[int]) -> Predicate:
    if not isinstance(node, Mapping):
        raise _bad("a node must be an object")
    count[0] += 1
    if depth > MAX_DEPTH or count[0] > MAX_NODES:
        raise _bad(f"at most {MAX_NODES} nodes, {MAX_DEPTH} deep")
    op = node.get("op", "")
    if op == "":
        return _leaf(node)
    children = node.get("nodes") or []
    if not isinstance(children, list):
        raise _bad("nodes must be a list")
    if op in ("and", "or"):
        if not children:
            raise _bad(f"{op} needs at least one node")
        compiled = tuple(_compile(child, depth + 1, count) for child in children)
        if op == "and":
            return lambda tags: all(p(tags) for p in compiled)
        return lambda tags: any(p(tags) for p in compiled)
    if op == "not":
        if len(children) != 1:
            raise _bad("not needs exactly one node")
        inner = _compile(children[0], depth + 1, count)
        return lambda tags: not inner(tags)
    raise _bad(f"unknown op {str(op)[:16]!r}")


def compile_filter(tree: Any) -> TagsFilter:
    """The filter of a subscribe request's `tf` (JSON, or the protobuf FilterNode as a dict); 107 when
    it is not a well-formed one."""
    return TagsFilter(tree, _compile(tree, 1, [0]))
