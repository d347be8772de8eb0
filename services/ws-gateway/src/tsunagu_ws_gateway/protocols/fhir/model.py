"""FHIR subscription notifications, sans I/O: versions, bundles in and out, validation.

Two FHIR versions are spoken, chosen per request (`_fhirVersion`, or `fhirVersion=` in Accept or
Content-Type; default R5):

- R5 (`5.0`): a notification is a Bundle of type `subscription-notification` whose first entry is a
  `SubscriptionStatus`. `eventsSinceSubscriptionStart` and `notificationEvent.eventNumber` are
  integer64, which R5's JSON writes as strings (`"3"`); numbers are accepted on the way in.
- R4B (`4.3`, the Subscriptions R5 Backport IG): a Bundle of type `history` whose first entry is the
  R4B `SubscriptionStatus` (event numbers are strings), with `request` (`GET Subscription/{id}/$status`)
  and `response` (`200`) on that entry, and a request and response on every other entry too
  (invariants bdl-3/bdl-4 of history bundles).

What version a bundle is in is told by its type. Every bundle built here is validated with
`fhir.resources` (R5 default, `fhir.resources.R4B`), which is imported on first use only: it takes
about a second to load and the gateway starts without it. `fhir.resources` does not check code values,
so the codes that matter are checked here.
"""

from __future__ import annotations

import copy
import importlib
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson

R5: Final = "5.0"
R4B: Final = "4.3"
VERSIONS: Final = (R5, R4B)
_VERSION_NAMES: Final = {
    "5.0": R5, "5.0.0": R5, "r5": R5, "5": R5,
    "4.3": R4B, "4.3.0": R4B, "r4b": R4B,
}  # fmt: skip

# SubscriptionStatus.type (R5 and the backport IG share the codes).
HANDSHAKE = "handshake"
HEARTBEAT = "heartbeat"
EVENT_NOTIFICATION = "event-notification"
QUERY_STATUS = "query-status"
QUERY_EVENT = "query-event"
NOTIFICATION_TYPES: Final = frozenset({HANDSHAKE, HEARTBEAT, EVENT_NOTIFICATION, QUERY_STATUS, QUERY_EVENT})
SUBSCRIPTION_STATUSES: Final = frozenset({"requested", "active", "error", "off", "entered-in-error"})
BUNDLE_TYPE: Final = {R5: "subscription-notification", R4B: "history"}
VERSION_OF_BUNDLE_TYPE: Final = {bundle_type: version for version, bundle_type in BUNDLE_TYPE.items()}
# Subscription.content: how much of the resources a notification carries ($events' `content`).
CONTENTS: Final = ("empty", "id-only", "full-resource")

FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_SUBSCRIPTION_REFERENCE = re.compile(r"(?:^|/)Subscription/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
# integer64 without sign: at most 19 digits (ASCII only: str.isdigit() takes '²' too).
_UNSIGNED = re.compile(r"^[0-9]{1,19}$")
MAX_INTEGER64 = 2**63 - 1

MEDIA_TYPE = "application/fhir+json"


class FhirError(Exception):
    """A request or bundle FHIR refuses: answered as an OperationOutcome with `status`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.message, code=self.code)


def operation_outcome(diagnostics: str, *, code: str = "processing", severity: str = "error") -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    }


def media_type(version: str) -> str:
    return f"{MEDIA_TYPE}; fhirVersion={version}"


# versions


def version_named(name: str, status: int = 400) -> str:
    """`5.0`, `4.3.0`, `R4B`... as one of VERSIONS; FhirError(`status`) for any other version."""
    version = _VERSION_NAMES.get(name.strip().lower())
    if version is None:
        raise FhirError(status, "not-supported", f"unsupported FHIR version {name[:32]!r}: use 5.0 (R5) or 4.3 (R4B)")
    return version


def version_in_header(header: str | None, status: int = 400) -> str | None:
    """The `fhirVersion` parameter of an Accept or Content-Type header, if it has one."""
    if not header:
        return None
    for media in header.split(","):
        for parameter in media.split(";")[1:]:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "fhirversion":
                return version_named(value.strip().strip('"'), status)
    return None


def negotiate(query: str | None, *headers: str | None, status: int = 400) -> str | None:
    """The version a request asks for: `_fhirVersion` first, then the headers in order; None: not said.
    A version not spoken here is FhirError(`status`): 406 for what to answer in, 415 for a body."""
    if query:
        return version_named(query, status)
    for header in headers:
        found = version_in_header(header, status)
        if found is not None:
            return found
    return None


def detect_version(bundle: Mapping[str, Any]) -> str:
    """The version a notification bundle is written in, told by its type: R5's
    `subscription-notification` or the backport's `history` (R4B)."""
    kind = bundle.get("type")
    version = VERSION_OF_BUNDLE_TYPE.get(kind) if isinstance(kind, str) else None
    if version is None:
        raise FhirError(
            400, "invalid", f"Bundle.type must be subscription-notification (R5) or history (R4B), not {kind!r}"
        )
    return version


# validation with fhir.resources (imported lazily)


def _module(version: str, name: str) -> Any:
    package = "fhir.resources" if version == R5 else "fhir.resources.R4B"
    return importlib.import_module(f"{package}.{name}")


def load() -> None:
    """Import the fhir.resources models now (about a second), e.g. in a thread before the first use."""
    for version in VERSIONS:
        for name in ("bundle", "subscriptionstatus", "parameters", "operationoutcome"):
            _module(version, name)


def validate(resource: Mapping[str, Any], version: str) -> None:
    """Raise FhirError(400) unless `resource` is a valid Bundle, Parameters or OperationOutcome."""
    kind = resource.get("resourceType")
    models = {"Bundle": "bundle", "Parameters": "parameters", "OperationOutcome": "operationoutcome"}
    module_name = models.get(kind) if isinstance(kind, str) else None
    if module_name is None:
        raise FhirError(400, "invalid", f"expected a Bundle, Parameters or OperationOutcome, not {kind!r}")
    model = getattr(_module(version, module_name), str(kind))
    try:
        model.model_validate(dict(resource))
    except Exception as exc:  # pydantic's ValidationError, or fhir.resources' own errors
        raise FhirError(400, "structure", f"not a valid FHIR {version} {kind}: {_short(exc)}") from None


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:600] + "..."


# notifications


@dataclass(frozen=True, slots=True)
class Notification:
    """What a notification bundle says, in version-neutral terms (event numbers as ints)."""

    subscription_id: str
    type: str
    version: str
    bundle: Mapping[str, Any]
    status: str = "active"
    events_since: int | None = None
    # notificationEvent items as they came, with their event number.
    events: Sequence[tuple[int, Mapping[str, Any]]] = ()
    topic: str | None = None

    @property
    def event_numbers(self) -> list[int]:
        return [number for number, _ in self.events]

    @property
    def last_event(self) -> int:
        """The highest event number it tells of: its events', or eventsSinceSubscriptionStart."""
        numbers = [*self.event_numbers, *([self.events_since] if self.events_since is not None else [])]
        return max(numbers) if numbers else 0

    @property
    def other_entries(self) -> list[Mapping[str, Any]]:
        return list(self.bundle.get("entry") or ())[1:]


def _first_resource(bundle: Mapping[str, Any]) -> Mapping[str, Any] | None:
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], Mapping):
        return None
    resource = entries[0].get("resource")
    return resource if isinstance(resource, Mapping) else None


def parse_number(value: Any, what: str) -> int:
    """An unsigned integer64 as JSON gives it: a number or (R5's JSON, R4B's string) a string of digits."""
    if isinstance(value, bool):
        raise FhirError(400, "invalid", f"{what} must be a number")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _UNSIGNED.match(value.strip()):
        number = int(value)
    else:
        raise FhirError(400, "invalid", f"{what} must be a non-negative integer, not {str(value)[:40]!r}")
    if not 0 <= number <= MAX_INTEGER64:
        raise FhirError(400, "invalid", f"{what} must be a non-negative integer64")
    return number


def subscription_id_of(reference: Any) -> str:
    """`Subscription/abc`, `https://server/fhir/Subscription/abc/_history/2` -> `abc`."""
    if not isinstance(reference, str):
        raise FhirError(400, "required", "SubscriptionStatus.subscription.reference is missing")
    match = _SUBSCRIPTION_REFERENCE.search(reference)
    if match is None:
        raise FhirError(400, "invalid", f"SubscriptionStatus.subscription {reference[:80]!r} is no Subscription")
    return match.group(1)


def parse_notification(bundle: Any, version: str | None = None, *, check: bool = True) -> Notification:
    """Read a notification bundle; `check` also validates it with fhir.resources. `version`, when
    given, is the version the sender said it speaks, which must be the one the bundle's type tells.
    Raises FhirError(400) with what is wrong."""
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        raise FhirError(400, "invalid", "a subscription notification must be a Bundle")
    written_in = detect_version(bundle)
    if version is not None and version != written_in:
        raise FhirError(
            400,
            "invalid",
            f"Bundle.type {bundle.get('type')} is FHIR {written_in}'s, but the request says fhirVersion={version}",
        )
    status = _first_resource(bundle)
    if status is None or status.get("resourceType") != "SubscriptionStatus":
        raise FhirError(400, "invalid", "the first entry of a notification must be a SubscriptionStatus")
    if check:
        validate(bundle, written_in)
    kind = status.get("type")
    if kind not in NOTIFICATION_TYPES:
        raise FhirError(400, "code-invalid", f"SubscriptionStatus.type {kind!r} is not a notification type")
    state = status.get("status", "active")
    if state not in SUBSCRIPTION_STATUSES:
        raise FhirError(400, "code-invalid", f"SubscriptionStatus.status {state!r} is unknown")
    subscription = status.get("subscription")
    reference = subscription.get("reference") if isinstance(subscription, Mapping) else None
    events: list[tuple[int, Mapping[str, Any]]] = []
    for index, event in enumerate(status.get("notificationEvent") or ()):
        if not isinstance(event, Mapping):
            raise FhirError(400, "invalid", "notificationEvent items must be objects")
        events.append((parse_number(event.get("eventNumber"), f"notificationEvent[{index}].eventNumber"), event))
    if len({number for number, _ in events}) != len(events):
        raise FhirError(400, "invalid", "a notification names an event number twice")
    since = status.get("eventsSinceSubscriptionStart")
    if kind == EVENT_NOTIFICATION and not events:
        raise FhirError(400, "required", "an event-notification needs at least one notificationEvent")
    topic = status.get("topic")
    return Notification(
        subscription_id=subscription_id_of(reference),
        type=str(kind),
        version=written_in,
        bundle=bundle,
        status=str(state),
        events_since=parse_number(since, "eventsSinceSubscriptionStart") if since is not None else None,
        events=events,
        topic=topic if isinstance(topic, str) else None,
    )


def canonical(notification: Notification) -> dict[str, Any]:
    """The bundle as it is kept and relayed: as it came, except that the SubscriptionStatus' integer64
    values are JSON strings, as both R5's JSON and R4B write them (an R5 sender may have sent numbers)."""
    bundle = copy.deepcopy(dict(notification.bundle))
    status = bundle["entry"][0]["resource"]
    if "eventsSinceSubscriptionStart" in status:
        status["eventsSinceSubscriptionStart"] = str(notification.events_since)
    for event, (number, _) in zip(status.get("notificationEvent") or (), notification.events, strict=True):
        event["eventNumber"] = str(number)
    return bundle


def last_event_of(data: bytes) -> int | None:
    """The highest event number a kept publication tells of, read cheaply (no validation); None when
    it is no notification."""
    try:
        return parse_notification(orjson.loads(data), check=False).last_event
    except (FhirError, orjson.JSONDecodeError):
        return None


# building


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(slots=True)
class StatusSpec:
    """A SubscriptionStatus to build."""

    subscription_id: str
    type: str
    events_since: int
    events: Sequence[tuple[int, Mapping[str, Any]]] = ()
    topic: str | None = None
    status: str = "active"
    extra_entries: Iterable[Mapping[str, Any]] = field(default_factory=tuple)


def _history_entry(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    """An entry of an R4B history bundle: with a request and a response (bdl-3, bdl-4). An entry that
    came without them (from an R5 subscription-notification) reads as the GET of its resource."""
    if "request" in entry and "response" in entry:
        return entry
    out = dict(entry)
    resource = entry.get("resource")
    url = str(entry.get("fullUrl") or "")
    if isinstance(resource, Mapping) and resource.get("resourceType") and resource.get("id"):
        url = f"{resource['resourceType']}/{resource['id']}"
    out.setdefault("request", {"method": "GET", "url": url or "unknown"})
    out.setdefault("response", {"status": "200"})
    return out


def status_bundle(spec: StatusSpec, version: str) -> dict[str, Any]:
    """A notification bundle in `version` (not validated: see `validate`). Event numbers are JSON
    strings in both versions (R5 integer64, R4B string)."""
    status: dict[str, Any] = {
        "resourceType": "SubscriptionStatus",
        "status": spec.status,
        "type": spec.type,
        "eventsSinceSubscriptionStart": str(spec.events_since),
        "subscription": {"reference": f"Subscription/{spec.subscription_id}"},
    }
    if spec.topic:
        status["topic"] = spec.topic
    if spec.events:
        status["notificationEvent"] = [{**event, "eventNumber": str(number)} for number, event in spec.events]
    first: dict[str, Any] = {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": status}
    extra = list(spec.extra_entries)
    if version == R4B:
        # The backport's history bundle: the status entry reads as the result of `$status`.
        first["request"] = {"method": "GET", "url": f"Subscription/{spec.subscription_id}/$status"}
        first["response"] = {"status": "200"}
        extra = [_history_entry(entry) for entry in extra]
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": BUNDLE_TYPE[version],
        "timestamp": now_iso(),
        "entry": [first, *extra],
    }


def rewrite(notification: Notification, version: str, content: str = "full-resource") -> Mapping[str, Any]:
    """The notification as a client of `version` expects it: as it came when it is in that version,
    otherwise rebuilt around a SubscriptionStatus of that version (other entries kept, given a
    request and response for R4B). The resources inside are not converted between versions: see
    `translate`."""
    if notification.version == version and content == "full-resource":
        return notification.bundle
    entries = notification.other_entries
    if version == R4B:
        entries = [_history_entry(entry) for entry in entries]
    events, entries = _with_content(list(notification.events), entries, content)
    spec = StatusSpec(
        subscription_id=notification.subscription_id,
        type=notification.type,
        events_since=notification.last_event,
        events=events,
        topic=notification.topic,
        status=notification.status,
        extra_entries=entries,
    )
    return status_bundle(spec, version)


def translate(notification: Notification, version: str) -> Mapping[str, Any]:
    """`rewrite`, validated in `version`. A resource of the other version that is not valid in this one
    (an R5 Encounter's `class` is a list, R4B's one Coding) is left out, as an `id-only` notification
    would: the focus references stay, the client reads the resource from the FHIR server."""
    bundle = rewrite(notification, version)
    if bundle is notification.bundle:
        return bundle
    try:
        validate(bundle, version)
    except FhirError:
        bundle = rewrite(notification, version, "id-only")
        validate(bundle, version)
    return bundle


def _with_content(
    events: list[tuple[int, Mapping[str, Any]]], entries: list[Mapping[str, Any]], content: str
) -> tuple[list[tuple[int, Mapping[str, Any]]], list[Mapping[str, Any]]]:
    """Events and entries cut down to Subscription.content `content` (a hint clients may give $events)."""
    if content == "empty":
        bare: list[tuple[int, Mapping[str, Any]]] = [
            (n, {k: v for k, v in e.items() if k not in ("focus", "additionalContext")}) for n, e in events
        ]
        return bare, []
    if content == "id-only":
        kept: list[Mapping[str, Any]] = []
        for entry in entries:
            without = {k: v for k, v in entry.items() if k != "resource"}
            if "request" in without or "response" in without:  # an entry needs one of the three (bdl-5)
                kept.append(without)
        return events, kept
    return events, entries


def events_bundle(
    subscription_id: str,
    kept: Iterable[Notification],
    version: str,
    since: int | None = None,
    until: int | None = None,
    content: str = "full-resource",
) -> dict[str, Any]:
    """`$events`: the kept event notifications numbered in [since, until] (both inclusive) as one
    query-event bundle; eventsSinceSubscriptionStart is the highest event number known."""
    events: dict[int, Mapping[str, Any]] = {}
    entries: dict[str, Mapping[str, Any]] = {}
    last = 0
    topic: str | None = None
    for notification in kept:
        last = max(last, notification.last_event)
        topic = notification.topic or topic
        chosen = [
            (n, e) for n, e in notification.events if (since is None or n >= since) and (until is None or n <= until)
        ]
        if not chosen:
            continue
        for number, event in chosen:
            events.setdefault(number, event)
        for entry in notification.other_entries:
            key = str(entry.get("fullUrl") or orjson.dumps(entry, option=orjson.OPT_SORT_KEYS).decode())
            entries.setdefault(key, entry)
    others = list(entries.values())
    if version == R4B:  # history entries keep a request and response even when the resource is left out
        others = [_history_entry(entry) for entry in others]
    chosen_events, chosen_entries = _with_content(sorted(events.items()), others, content)
    spec = StatusSpec(
        subscription_id=subscription_id,
        type=QUERY_EVENT,
        events_since=last,
        events=chosen_events,
        topic=topic,
        extra_entries=chosen_entries,
    )
    return status_bundle(spec, version)


def binding_parameters(
    version: str, token: str, expires_at: float, subscriptions: Sequence[str], url: str
) -> dict[str, Any]:
    """The answer of `$get-ws-binding-token` (the same Parameters in R5 and R4B)."""
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "token", "valueString": token},
            {"name": "expiration", "valueDateTime": iso(expires_at)},
            *({"name": "subscription", "valueString": subscription} for subscription in subscriptions),
            {"name": "websocket-url", "valueUrl": url},
        ],
    }


def parameter_values(parameters: Any, version: str) -> list[tuple[str, Any]]:
    """(name, value) of each parameter of an operation's Parameters body, validated; the value is
    whichever value[x] it has."""
    if not isinstance(parameters, Mapping) or parameters.get("resourceType") != "Parameters":
        raise FhirError(400, "invalid", "the body of an operation must be a Parameters resource")
    validate(parameters, version)
    out = []
    for parameter in parameters.get("parameter") or ():
        value = next((v for k, v in parameter.items() if k.startswith("value")), None)
        out.append((str(parameter.get("name", "")), value))
    return out
