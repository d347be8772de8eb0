"""Logs, metrics and traces, set up once per process.

Metrics live in prometheus-client's process registry (one per process, so `tsunagu run` shows
every embedded service on each `/metrics`). Tracing exports over OTLP/HTTP only when an endpoint
is configured; trace context is still created and propagated without one, so logs and Kafka
headers carry trace ids either way.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import Counter, Gauge, Histogram

from tsunagu_core.config import CoreSettings

_setup_lock = threading.Lock()
_tracing_ready = False

BUS_PUBLISHED = Counter("tsunagu_bus_published_total", "Events published to the bus", ["topic"])
BUS_PUBLISH_ERRORS = Counter("tsunagu_bus_publish_errors_total", "Bus publishes that failed", ["topic"])
BUS_CONSUMED = Counter("tsunagu_bus_consumed_total", "Events handled from the bus", ["topic", "group"])
BUS_HANDLER_ERRORS = Counter("tsunagu_bus_handler_errors_total", "Bus handler attempts that raised", ["topic", "group"])
BUS_DEAD_LETTERS = Counter(
    "tsunagu_bus_dead_letters_total", "Events given up on and sent to a dead-letter topic", ["topic", "group"]
)
BUS_CONSUMER_LAG = Gauge(
    "tsunagu_bus_consumer_lag", "Events in Kafka not yet handled by this consumer group member", ["topic", "group"]
)
BROKER_PUBLISHED = Counter("tsunagu_broker_published_total", "Channel publications accepted by the broker")
BROKER_OP_SECONDS = Histogram(
    "tsunagu_broker_operation_seconds",
    "Latency of broker operations",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
BROKER_RESUBSCRIBES = Counter("tsunagu_broker_resubscribes_total", "Fan-out connections lost and re-established")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the current trace and span ids when there is a span."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            entry["trace_id"] = f"{context.trace_id:032x}"
            entry["span_id"] = f"{context.span_id:016x}"
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(settings: CoreSettings, service: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonLogFormatter(service))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # librdkafka and httpx are chatty at info; their warnings still come through.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def setup_tracing(settings: CoreSettings, service: str) -> None:
    """Install the tracer provider once per process; later calls (other embedded services) are no-ops."""
    global _tracing_ready
    with _setup_lock:
        if _tracing_ready:
            return
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if settings.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            endpoint = settings.otlp_endpoint.rstrip("/") + "/v1/traces"
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(provider)
        _tracing_ready = True


def inject_trace_headers(carrier: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """W3C trace context of the current span as headers (`traceparent`, `tracestate`)."""
    headers: dict[str, str] = dict(carrier or {})
    propagate.inject(headers)
    return headers


def context_from_headers(headers: Mapping[str, str]) -> object:
    return propagate.extract(dict(headers))


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)
