"""FHIR subscriptions without sockets: versions, notification bundles in and out (validated with
fhir.resources, R5 and R4B), $events bundles, binding tokens and the websocket commands."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from fhir.resources.bundle import Bundle
from fhir.resources.parameters import Parameters
from fhir.resources.R4B.bundle import Bundle as BundleR4B
from fhir.resources.R4B.parameters import Parameters as ParametersR4B
from fhir.resources.R4B.subscriptionstatus import SubscriptionStatus as SubscriptionStatusR4B
from fhir.resources.subscriptionstatus import SubscriptionStatus
from tsunagu_core.broker import MemoryBroker
from tsunagu_ws_gateway.protocols.fhir import model
from tsunagu_ws_gateway.protocols.fhir.binding import BindingRecord, BindingTokens, expiry, record_channel
from tsunagu_ws_gateway.protocols.fhir.commands import Command, CommandError, parse_command
from tsunagu_ws_gateway.protocols.fhir.model import R4B, R5, FhirError

TOPIC = "http://example.org/fhir/SubscriptionTopic/vitals"


def observation(n: int) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": f"obs-{n}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
        "subject": {"reference": "Patient/p1"},
        "valueQuantity": {"value": 60 + n, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    }


def r5_notification(numbers: list[int], subscription: str = "s1", *, as_ints: bool = False) -> dict[str, Any]:
    """What an R5 server POSTs: a subscription-notification with full resources."""

    def number(n: int) -> int | str:
        return n if as_ints else str(n)

    return {
        "resourceType": "Bundle",
        "id": "n-" + "-".join(map(str, numbers)),
        "type": "subscription-notification",
        "timestamp": "2025-01-02T03:04:05Z",
        "entry": [
            {
                "fullUrl": "urn:uuid:9d1b7b4e-0000-4000-8000-000000000001",
                "resource": {
                    "resourceType": "SubscriptionStatus",
                    "status": "active",
                    "type": "event-notification",
                    "eventsSinceSubscriptionStart": number(max(numbers)),
                    "subscription": {"reference": f"https://ehr.example.org/fhir/Subscription/{subscription}"},
                    "topic": TOPIC,
                    "notificationEvent": [
                        {
                            "eventNumber": number(n),
                            "timestamp": "2025-01-02T03:04:05Z",
                            "focus": {"reference": f"Observation/obs-{n}"},
                        }
                        for n in numbers
                    ],
                },
            },
            *(
                {"fullUrl": f"https://ehr.example.org/fhir/Observation/obs-{n}", "resource": observation(n)}
                for n in numbers
            ),
        ],
    }


def r4b_notification(numbers: list[int], subscription: str = "s1", kind: str = "event-notification") -> dict[str, Any]:
    """What a backport (R4B) server POSTs: a history bundle with request/response on every entry."""
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "timestamp": "2025-01-02T03:04:05Z",
        "entry": [
            {
                "fullUrl": "urn:uuid:9d1b7b4e-0000-4000-8000-000000000002",
                "resource": {
                    "resourceType": "SubscriptionStatus",
                    "status": "active",
                    "type": kind,
                    "eventsSinceSubscriptionStart": str(max(numbers, default=0)),
                    "subscription": {"reference": f"Subscription/{subscription}"},
                    "topic": TOPIC,
                    "notificationEvent": [
                        {"eventNumber": str(n), "focus": {"reference": f"Observation/obs-{n}"}} for n in numbers
                    ],
                },
                "request": {"method": "GET", "url": f"Subscription/{subscription}/$status"},
                "response": {"status": "200"},
            },
            *(
                {
                    "fullUrl": f"https://ehr.example.org/fhir/Observation/obs-{n}",
                    "resource": observation(n),
                    "request": {"method": "POST", "url": "Observation"},
                    "response": {"status": "201"},
                }
                for n in numbers
            ),
        ],
    }
    if not numbers:  # FHIR's JSON has no empty arrays
        del bundle["entry"][0]["resource"]["notificationEvent"]
    return bundle


# versions


def test_versions_by_name_query_and_headers() -> None:
    assert model.version_named("5.0") == model.version_named("5.0.0") == model.version_named("R5") == R5
    assert model.version_named("4.3") == model.version_named("4.3.0") == model.version_named("r4b") == R4B
    with pytest.raises(FhirError) as refused:
        model.version_named("4.0", status=406)
    assert refused.value.status == 406 and refused.value.code == "not-supported"
    assert model.negotiate(None) is None
    assert model.negotiate(None, "application/fhir+json") is None
    assert model.negotiate(None, 'application/fhir+json; charset=utf-8; fhirVersion="4.3"') == R4B
    assert model.negotiate(None, "text/html, application/fhir+json;fhirversion=4.3") == R4B
    # The query parameter wins over the headers, the first header that says wins over the next.
    assert model.negotiate("5.0", "application/fhir+json; fhirVersion=4.3") == R5
    assert model.negotiate(None, None, "application/fhir+json; fhirVersion=4.3") == R4B
    with pytest.raises(FhirError) as refused:
        model.negotiate(None, "application/fhir+json; fhirVersion=3.0", status=415)
    assert refused.value.status == 415
    assert model.media_type(R4B) == "application/fhir+json; fhirVersion=4.3"


def test_the_bundle_type_tells_the_version() -> None:
    assert model.detect_version(r5_notification([1])) == R5
    assert model.detect_version(r4b_notification([1])) == R4B
    with pytest.raises(FhirError, match=r"Bundle.type"):
        model.detect_version({"resourceType": "Bundle", "type": "collection"})


# parsing what FHIR servers send


def test_parse_an_r5_notification_with_numbers_as_strings_or_ints() -> None:
    for as_ints in (False, True):
        notification = model.parse_notification(r5_notification([3, 4], "abc-1", as_ints=as_ints))
        assert notification.subscription_id == "abc-1"
        assert notification.version == R5 and notification.type == model.EVENT_NOTIFICATION
        assert notification.event_numbers == [3, 4] and notification.last_event == 4
        assert notification.events_since == 4 and notification.topic == TOPIC and notification.status == "active"
        assert [entry["resource"]["id"] for entry in notification.other_entries] == ["obs-3", "obs-4"]
        # Kept and relayed with R5's JSON for integer64: strings.
        kept = model.canonical(notification)
        status = kept["entry"][0]["resource"]
        assert status["eventsSinceSubscriptionStart"] == "4"
        assert [e["eventNumber"] for e in status["notificationEvent"]] == ["3", "4"]
        Bundle.model_validate(kept)
    # canonical() does not touch what it was given.
    given = r5_notification([5], as_ints=True)
    model.canonical(model.parse_notification(given))
    assert given["entry"][0]["resource"]["eventsSinceSubscriptionStart"] == 5


def test_parse_an_r4b_history_notification() -> None:
    notification = model.parse_notification(r4b_notification([7]))
    assert notification.version == R4B and notification.subscription_id == "s1"
    assert notification.event_numbers == [7] and notification.last_event == 7
    heartbeat = model.parse_notification(r4b_notification([], kind="heartbeat"))
    assert heartbeat.type == model.HEARTBEAT and list(heartbeat.events) == [] and heartbeat.last_event == 0


def test_subscription_references() -> None:
    assert model.subscription_id_of("Subscription/a.b-1") == "a.b-1"
    assert model.subscription_id_of("https://ehr/fhir/Subscription/x/_history/3") == "x"
    for bad in (None, "Patient/1", "Subscription/", "Subscription/a b", "Subscription/" + "x" * 65):
        with pytest.raises(FhirError):
            model.subscription_id_of(bad)


def _broken(change: str) -> dict[str, Any]:
    bundle = r5_notification([1, 2])
    status = bundle["entry"][0]["resource"]
    match change:
        case "not a bundle":
            return {"resourceType": "Parameters"}
        case "bundle type":
            bundle["type"] = "collection"
        case "first entry":
            bundle["entry"] = bundle["entry"][1:]
        case "no entries":
            bundle["entry"] = []
        case "notification type":
            status["type"] = "event-notify"
        case "subscription status":
            status["status"] = "on"
        case "no events":
            del status["notificationEvent"]
        case "event number":
            status["notificationEvent"][0]["eventNumber"] = "²"
        case "negative number":
            status["notificationEvent"][0]["eventNumber"] = -1
        case "boolean number":
            status["notificationEvent"][0]["eventNumber"] = True
        case "huge number":
            status["notificationEvent"][0]["eventNumber"] = "9" * 20
        case "twice":
            status["notificationEvent"][1]["eventNumber"] = "1"
        case "no reference":
            status["subscription"] = {"display": "mine"}
        case "not a subscription":
            status["subscription"] = {"reference": "Patient/p1"}
    return bundle


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ("not a bundle", "must be a Bundle"),
        ("bundle type", "Bundle.type must be"),
        ("first entry", "first entry of a notification must be a SubscriptionStatus"),
        ("no entries", "first entry of a notification must be a SubscriptionStatus"),
        ("notification type", "is not a notification type"),
        ("subscription status", "SubscriptionStatus.status 'on' is unknown"),
        ("no events", "needs at least one notificationEvent"),
        ("event number", "eventNumber must be a non-negative integer"),
        ("negative number", "eventNumber must not|eventNumber must be a non-negative"),
        ("boolean number", "eventNumber must be a number"),
        ("huge number", "eventNumber must be a non-negative integer"),
        ("twice", "names an event number twice"),
        ("no reference", "subscription.reference is missing"),
        ("not a subscription", "is no Subscription"),
    ],
)
def test_malformed_notifications_are_refused_with_what_is_wrong(change: str, complaint: str) -> None:
    with pytest.raises(FhirError, match=complaint) as refused:
        model.parse_notification(_broken(change), check=False)
    assert refused.value.status == 400
    assert refused.value.outcome()["issue"][0]["severity"] == "error"


@pytest.mark.parametrize(
    ("path", "value", "complaint"),
    [
        (("timestamp",), "yesterday", "timestamp"),
        (("entry", 0, "resource", "colour"), "red", "colour"),
        (("entry", 0, "resource", "notificationEvent", 0, "timestamp"), "noon", "timestamp"),
        (("entry", 0, "resource", "notificationEvent", 0, "focus"), "Observation/obs-1", "focus"),
        (("entry", 1, "resource", "status"), None, "status"),  # a focus Observation needs a status
    ],
)
def test_fhir_resources_catches_invalid_bundles(path: tuple[Any, ...], value: Any, complaint: str) -> None:
    bundle = r5_notification([1, 2])
    target: Any = bundle
    for step in path[:-1]:
        target = target[step]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    model.parse_notification(bundle, check=False)  # what the parser alone lets through...
    with pytest.raises(FhirError, match=f"not a valid FHIR 5.0 Bundle.*{complaint}") as refused:
        model.parse_notification(bundle)  # ...the model library does not
    assert refused.value.code == "structure"


def test_validation_is_by_version() -> None:
    # R4B's event numbers are strings: a number there is invalid R4B, though R5 takes it.
    bundle = r4b_notification([1])
    bundle["entry"][0]["resource"]["eventsSinceSubscriptionStart"] = 1
    with pytest.raises(FhirError, match=r"not a valid FHIR 4.3 Bundle"):
        model.parse_notification(bundle)
    # A sender that says R4B but sends R5's bundle type (or the other way round) is refused.
    with pytest.raises(FhirError, match=r"the request says fhirVersion=4.3"):
        model.parse_notification(r5_notification([1]), R4B)
    with pytest.raises(FhirError, match=r"the request says fhirVersion=5.0"):
        model.parse_notification(r4b_notification([1]), R5)
    with pytest.raises(FhirError, match="expected a Bundle, Parameters or OperationOutcome"):
        model.validate({"resourceType": "Patient"}, R5)


def test_last_event_of_kept_data() -> None:
    assert model.last_event_of(orjson.dumps(r5_notification([8, 9]))) == 9
    assert model.last_event_of(b"not json") is None
    assert model.last_event_of(b'{"resourceType": "Patient"}') is None


# building what clients get


def test_status_bundles_in_both_versions_validate() -> None:
    spec = model.StatusSpec("s1", model.HANDSHAKE, 12, topic=TOPIC)
    r5 = model.status_bundle(spec, R5)
    model.validate(r5, R5)
    parsed = Bundle.model_validate(r5)
    assert parsed.type == "subscription-notification"
    status = parsed.entry[0].resource
    assert isinstance(status, SubscriptionStatus)
    assert status.type == "handshake" and status.eventsSinceSubscriptionStart == 12
    assert status.subscription.reference == "Subscription/s1" and status.topic == TOPIC
    assert r5["entry"][0]["resource"]["eventsSinceSubscriptionStart"] == "12"  # integer64: a JSON string
    assert "request" not in r5["entry"][0]

    r4b = model.status_bundle(spec, R4B)
    model.validate(r4b, R4B)
    parsed_r4b = BundleR4B.model_validate(r4b)
    assert parsed_r4b.type == "history"
    assert isinstance(parsed_r4b.entry[0].resource, SubscriptionStatusR4B)
    assert parsed_r4b.entry[0].resource.eventsSinceSubscriptionStart == "12"
    assert r4b["entry"][0]["request"] == {"method": "GET", "url": "Subscription/s1/$status"}
    assert r4b["entry"][0]["response"] == {"status": "200"}


def test_rewrite_r5_to_r4b_gives_every_entry_a_request_and_response() -> None:
    notification = model.parse_notification(r5_notification([1, 2], as_ints=True))
    assert model.rewrite(notification, R5) is notification.bundle  # same version: as it came
    r4b = dict(model.rewrite(notification, R4B))
    model.validate(r4b, R4B)
    assert r4b["type"] == "history"
    status = r4b["entry"][0]["resource"]
    assert status["type"] == "event-notification" and status["eventsSinceSubscriptionStart"] == "2"
    assert [e["eventNumber"] for e in status["notificationEvent"]] == ["1", "2"]
    assert status["notificationEvent"][0]["focus"] == {"reference": "Observation/obs-1"}
    assert status["subscription"] == {"reference": "Subscription/s1"} and status["topic"] == TOPIC
    for entry in r4b["entry"]:  # bdl-3 and bdl-4 of history bundles
        assert "request" in entry and "response" in entry
    assert r4b["entry"][1]["request"] == {"method": "GET", "url": "Observation/obs-1"}
    assert r4b["entry"][1]["resource"] == observation(1)
    again = model.parse_notification(r4b)
    assert again.version == R4B and again.event_numbers == [1, 2]


def test_rewrite_r4b_to_r5() -> None:
    notification = model.parse_notification(r4b_notification([5]))
    r5 = dict(model.rewrite(notification, R5))
    model.validate(r5, R5)
    assert r5["type"] == "subscription-notification"
    assert "request" not in r5["entry"][0]
    assert r5["entry"][1]["request"] == {"method": "POST", "url": "Observation"}  # kept as it came
    assert model.parse_notification(r5).event_numbers == [5]


def encounter(n: int) -> dict[str, Any]:
    """An R5 Encounter: its `class` is a list of CodeableConcepts (R4B's is one Coding)."""
    coding = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"}
    return {
        "resourceType": "Encounter",
        "id": f"enc-{n}",
        "status": "in-progress",
        "class": [{"coding": [coding]}],
        "subject": {"reference": "Patient/p1"},
    }


def test_resources_not_valid_in_the_other_version_are_left_out_not_the_event() -> None:
    bundle = r5_notification([1, 2])
    bundle["entry"][2] = {"fullUrl": "https://ehr.example.org/fhir/Encounter/enc-2", "resource": encounter(2)}
    bundle["entry"][0]["resource"]["notificationEvent"][1]["focus"] = {"reference": "Encounter/enc-2"}
    notification = model.parse_notification(bundle)
    with pytest.raises(FhirError, match=r"Encounter|class"):
        model.validate(model.rewrite(notification, R4B), R4B)
    assert model.translate(notification, R5) is notification.bundle
    r4b = dict(model.translate(notification, R4B))  # validated: id-only
    status = r4b["entry"][0]["resource"]
    assert [e["focus"]["reference"] for e in status["notificationEvent"]] == ["Observation/obs-1", "Encounter/enc-2"]
    assert [e["request"]["url"] for e in r4b["entry"][1:]] == ["Observation/obs-1", "Encounter/enc-2"]
    assert all("resource" not in e for e in r4b["entry"][1:])
    # An Observation alone is valid in both: it stays.
    full = dict(model.translate(model.parse_notification(r5_notification([3])), R4B))
    assert full["entry"][1]["resource"] == observation(3)


def kept(*batches: list[int]) -> list[model.Notification]:
    return [model.parse_notification(model.canonical(model.parse_notification(r5_notification(b)))) for b in batches]


def test_events_bundle_since_and_until_are_inclusive() -> None:
    history = kept([1], [2, 3], [4], [5])
    bundle = model.events_bundle("s1", history, R5, since=2, until=4)
    model.validate(bundle, R5)
    status = bundle["entry"][0]["resource"]
    assert status["type"] == "query-event"
    assert [e["eventNumber"] for e in status["notificationEvent"]] == ["2", "3", "4"]
    assert status["eventsSinceSubscriptionStart"] == "5"  # the highest number known, whatever was asked
    assert [e["resource"]["id"] for e in bundle["entry"][1:]] == ["obs-2", "obs-3", "obs-4"]
    everything = model.events_bundle("s1", history, R5)
    assert [e["eventNumber"] for e in everything["entry"][0]["resource"]["notificationEvent"]] == list("12345")
    assert model.events_bundle("s1", history, R5, since=5)["entry"][0]["resource"]["notificationEvent"] == [
        {"eventNumber": "5", "timestamp": "2025-01-02T03:04:05Z", "focus": {"reference": "Observation/obs-5"}}
    ]
    nothing = model.events_bundle("s1", history, R5, since=6)
    assert "notificationEvent" not in nothing["entry"][0]["resource"] and len(nothing["entry"]) == 1
    model.validate(nothing, R5)


def test_events_bundle_dedupes_sorts_and_speaks_r4b() -> None:
    history = kept([3], [1, 2], [2])  # a redelivered event 2, kept twice
    bundle = model.events_bundle("s1", history, R4B, since=1)
    model.validate(bundle, R4B)
    assert bundle["type"] == "history"
    assert [e["eventNumber"] for e in bundle["entry"][0]["resource"]["notificationEvent"]] == ["1", "2", "3"]
    assert [e["fullUrl"].rsplit("/", 1)[1] for e in bundle["entry"][1:]] == ["obs-3", "obs-1", "obs-2"]
    assert all("request" in e and "response" in e for e in bundle["entry"])


def test_events_bundle_content_hint() -> None:
    history = kept([1, 2])
    empty = model.events_bundle("s1", history, R5, content="empty")
    model.validate(empty, R5)
    assert len(empty["entry"]) == 1
    assert all("focus" not in e for e in empty["entry"][0]["resource"]["notificationEvent"])
    id_only = model.events_bundle("s1", history, R5, content="id-only")
    model.validate(id_only, R5)
    assert len(id_only["entry"]) == 1  # R5 entries without resource, request or response would break bdl-5
    assert id_only["entry"][0]["resource"]["notificationEvent"][0]["focus"] == {"reference": "Observation/obs-1"}
    id_only_r4b = model.events_bundle("s1", history, R4B, content="id-only")
    model.validate(id_only_r4b, R4B)
    assert [("resource" in e, e["request"]["url"]) for e in id_only_r4b["entry"][1:]] == [
        (False, "Observation/obs-1"),
        (False, "Observation/obs-2"),
    ]


def test_binding_parameters_in_both_versions() -> None:
    expires = 1_767_225_600.9  # 2026-01-01T00:00:00.9Z: the expiration is never later than the token's end
    for version, parameters_model in ((R5, Parameters), (R4B, ParametersR4B)):
        parameters = model.binding_parameters(version, "tok-123456", expires, ["a", "b"], "wss://gw/fhir/ws")
        model.validate(parameters, version)
        parsed = parameters_model.model_validate(parameters)
        values = [(p.name, p.valueString or p.valueUrl or p.valueDateTime) for p in parsed.parameter]
        assert [name for name, _ in values] == ["token", "expiration", "subscription", "subscription", "websocket-url"]
        assert parameters["parameter"][1]["valueDateTime"] == "2026-01-01T00:00:00Z"
        assert values[2][1] == "a" and values[3][1] == "b" and values[4][1] == "wss://gw/fhir/ws"


def test_operation_parameters() -> None:
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "eventsSinceNumber", "valueString": "3"},
            {"name": "eventsUntilNumber", "valueInteger64": "9"},
            {"name": "content", "valueCode": "id-only"},
        ],
    }
    # The values as the JSON has them (validated by the model library first).
    assert model.parameter_values(body, R5) == [
        ("eventsSinceNumber", "3"),
        ("eventsUntilNumber", "9"),
        ("content", "id-only"),
    ]
    with pytest.raises(FhirError, match="Parameters resource"):
        model.parameter_values({"resourceType": "Bundle"}, R5)
    with pytest.raises(FhirError, match="not a valid FHIR"):
        model.parameter_values({"resourceType": "Parameters", "parameter": [{"valueString": 1}]}, R5)


# the websocket's commands


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("bind-with-token: abcdefgh123", Command("bind-with-token", "abcdefgh123")),
        ("bind-with-token abcdefgh123", Command("bind-with-token", "abcdefgh123")),
        ("  BIND-WITH-TOKEN:abcdefgh123\n", Command("bind-with-token", "abcdefgh123")),
        (b"unbind-with-token: abc_DEF-123=", Command("unbind-with-token", "abc_DEF-123=")),
        ('{"type": "bind-with-token", "payload": {"token": "abcdefgh"}}', Command("bind-with-token", "abcdefgh", True)),
        ('{"type":"unbind-from-token","payload":{"token":"abcdefgh"}}', Command("unbind-with-token", "abcdefgh", True)),
        ('{"type": "ping"}', Command("ping", json=True)),
    ],
)
def test_commands(message: str | bytes, expected: Command) -> None:
    assert parse_command(message) == expected


@pytest.mark.parametrize(
    ("message", "complaint"),
    [
        ("hello", "expected 'bind-with-token: <token>'"),
        ("bind-with-token:", "expected"),
        ("bind-with-token: short", "malformed"),
        ("bind-with-token: abc def ghi", "expected"),
        ("bind-with-token: abcdefgh<script>", "malformed"),
        (b"\xff\xfe", "UTF-8"),
        ("bind-with-token: " + "a" * 2000, "at most"),
        ("{not json", "not JSON"),
        ('{"type": "subscribe"}', "type must be"),
        ('{"type": "bind-with-token"}', "payload.token"),
        ('["bind-with-token"]', "expected"),
    ],
)
def test_malformed_commands(message: str | bytes, complaint: str) -> None:
    with pytest.raises(CommandError, match=complaint):
        parse_command(message)


# binding tokens


def test_binding_record_round_trip_and_expiry() -> None:
    record = BindingRecord(("a", "b"), "alice", "jwt.value.sig", R4B, 1234.5)
    assert BindingRecord.decode(record.encode()) == record
    for garbage in (
        b"nope",
        b"{}",
        b'{"subscriptions": [], "user": "a", "jwt": "j", "version": "5.0", "expires_at": 1}',
    ):
        with pytest.raises(FhirError) as refused:
            BindingRecord.decode(garbage)
        assert refused.value.status == 401
    wrong_version = orjson.loads(record.encode()) | {"version": "4.0"}
    with pytest.raises(FhirError):
        BindingRecord.decode(orjson.dumps(wrong_version))
    assert expiry(100.0, 300.0, None) == 400.0
    assert expiry(100.0, 300.0, 250.0) == 250.0  # never longer than the JWT it came from
    assert expiry(100.0, 300.0, 1000.0) == 400.0


async def test_binding_tokens_in_the_broker() -> None:
    broker = MemoryBroker()
    tokens = BindingTokens(broker, ttl=60)
    record = BindingRecord(("s1",), "alice", "jwt", R5, time.time() + 60)
    token = await tokens.issue(record)
    assert len(token) >= 43 and token not in record_channel(token)
    assert await tokens.resolve(token) == record
    # Another gateway sharing the broker accepts it.
    assert await BindingTokens(broker, ttl=60).resolve(token) == record
    with pytest.raises(FhirError) as unknown:
        await tokens.resolve("x" * 43)
    assert unknown.value.status == 401 and unknown.value.code == "security"
    expired = await tokens.issue(BindingRecord(("s1",), "alice", "jwt", R5, time.time() - 1))
    with pytest.raises(FhirError) as late:
        await tokens.resolve(expired)
    assert late.value.code == "expired"
    await tokens.revoke(token)
    with pytest.raises(FhirError):
        await tokens.resolve(token)


def test_fixtures_are_what_fhir_servers_send() -> None:
    # The test bundles themselves are valid for the model library, so the tests above test the gateway.
    Bundle.model_validate(r5_notification([1, 2]))
    Bundle.model_validate(r5_notification([1, 2], as_ints=True))
    BundleR4B.model_validate(r4b_notification([1, 2]))
