"""Tsunagu / Overview: the gateway's connections and traffic, the event bus, the Redis fan-out and every
service's process, one row each."""

from __future__ import annotations

from grafana.panels import (
    BROKER_P99_SECONDS,
    DELIVERY_P99_SECONDS,
    RATE,
    SLOW_CLIENTS_PER_SECOND,
    Json,
    Section,
    dashboard,
    datasource_variable,
    gateway,
    highlight,
    job,
    layout,
    query,
    query_variable,
    services,
    stat,
    timeseries,
)

PER_SECOND = "suffix:/s"
SLOW = gateway('code="3008"')  # the gateway's slow-client disconnects
NOT_SLOW = gateway('code!="3008"')


def summary_row() -> Section:
    """Headline numbers: connections, subscriptions, traffic, slow clients, targets down."""
    return (
        "Overview",
        [
            (
                stat(
                    "Connections",
                    "Open WebSocket connections, all gateway replicas.",
                    [query(f"sum(tsunagu_gateway_connections{gateway()})", "connections")],
                ),
                4,
                4,
            ),
            (
                stat(
                    "Subscriptions",
                    "Client subscriptions, all gateway replicas.",
                    [query(f"sum(tsunagu_gateway_subscriptions{gateway()})", "subscriptions")],
                ),
                4,
                4,
            ),
            (
                stat(
                    "Deliveries",
                    "Publications queued to client connections per second.",
                    [query(f"sum(rate(tsunagu_gateway_deliveries_total{gateway()}[{RATE}]))", "deliveries")],
                    PER_SECOND,
                ),
                4,
                4,
            ),
            (
                stat(
                    "Commands",
                    "Client commands handled per second.",
                    [query(f"sum(rate(tsunagu_gateway_commands_total{gateway()}[{RATE}]))", "commands")],
                    PER_SECOND,
                ),
                4,
                4,
            ),
            (
                stat(
                    "Slow-client disconnects",
                    "Connections closed with 3008 (the client did not read fast enough), per second. "
                    f"TsunaguSlowClientDisconnects fires above {SLOW_CLIENTS_PER_SECOND}/s for 10 minutes.",
                    [
                        query(
                            f"sum(rate(tsunagu_gateway_disconnects_total{SLOW}[{RATE}]))",
                            "slow clients",
                        )
                    ],
                    PER_SECOND,
                    steps=(("green", None), ("orange", 0.1), ("red", SLOW_CLIENTS_PER_SECOND)),
                ),
                4,
                4,
            ),
            (
                stat(
                    "Targets down",
                    "Service replicas Prometheus cannot scrape (TsunaguTargetDown after 5 minutes).",
                    [query(f"count({'up' + services()} == 0) or vector(0)", "down")],
                    steps=(("green", None), ("red", 1)),
                ),
                4,
                4,
            ),
        ],
    )


def gateway_row() -> Section:
    """Each gateway replica: connections, subscriptions, deliveries, commands, errors, disconnects, latency."""
    return (
        "Gateway",
        [
            (
                timeseries(
                    "Connections per replica",
                    "Open WebSocket connections on each gateway replica.",
                    [query(f"sum by (instance) (tsunagu_gateway_connections{gateway()})", "{{instance}}")],
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Subscriptions and channels per replica",
                    "Client subscriptions, and channels with at least one subscriber, on each replica.",
                    [
                        query(
                            f"sum by (instance) (tsunagu_gateway_subscriptions{gateway()})",
                            "subscriptions {{instance}}",
                        ),
                        query(
                            f"sum by (instance) (tsunagu_gateway_channels{gateway()})",
                            "channels {{instance}}",
                            ref="B",
                        ),
                    ],
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Deliveries per replica",
                    "Publications queued to client connections per second, on each replica.",
                    [
                        query(
                            f"sum by (instance) (rate(tsunagu_gateway_deliveries_total{gateway()}[{RATE}]))",
                            "{{instance}}",
                        )
                    ],
                    PER_SECOND,
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Commands by method",
                    "Client commands handled per second, by method.",
                    [
                        query(
                            f"sum by (method) (rate(tsunagu_gateway_commands_total{gateway()}[{RATE}]))",
                            "{{method}}",
                        )
                    ],
                    PER_SECOND,
                    stack=True,
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Command errors by code",
                    "Commands answered with an error, per second, by code: 100 internal (TsunaguCommandErrorsHigh "
                    "above 5% of commands), 101 unauthorized, 102 unknown channel, 103 permission denied, "
                    "106 limit exceeded, 107 bad request, 108 not available, 109 token expired, "
                    "111 too many requests, 112 unrecoverable position.",
                    [
                        query(
                            f"sum by (code) (rate(tsunagu_gateway_command_errors_total{gateway()}[{RATE}]))",
                            "{{code}}",
                        )
                    ],
                    PER_SECOND,
                    overrides=[highlight("100", "red")],
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Disconnects by code",
                    "Connections closed by the server, per second, by close code. 3008 (red) is a slow client "
                    "cut off for not reading; 3000 connection closed, 3001 shutdown, 3005 connection expired, "
                    "3011 force reconnect, 3012 no pong, 3500 invalid or revoked token.",
                    [
                        query(
                            f"sum by (code) (rate(tsunagu_gateway_disconnects_total{NOT_SLOW}[{RATE}]))",
                            "{{code}}",
                        ),
                        query(
                            f"sum(rate(tsunagu_gateway_disconnects_total{SLOW}[{RATE}]))",
                            "3008 slow client",
                            ref="B",
                        ),
                    ],
                    PER_SECOND,
                    overrides=[highlight("3008 slow client", "red")],
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Revocations applied",
                    "Revocations received from auth (forced logouts), per second, by scope.",
                    [
                        query(
                            f"sum by (scope) (rate(tsunagu_gateway_revocations_total{gateway()}[{RATE}]))",
                            "{{scope}}",
                        )
                    ],
                    PER_SECOND,
                ),
                12,
                7,
            ),
            (
                timeseries(
                    "Connection events dropped",
                    "Connection events that did not reach the bus, per replica (TsunaguGatewayEventsDropped).",
                    [
                        query(
                            f"sum by (instance) (increase(tsunagu_gateway_events_dropped_total{gateway()}[{RATE}]))",
                            "{{instance}}",
                        )
                    ],
                    bars=True,
                ),
                12,
                7,
            ),
            (
                timeseries(
                    "Delivery latency",
                    "From the publish accepted by the broker to the publication queued for a replica's "
                    "subscribers (Redis fan-out plus the replica's backlog), p50 and p99 over all replicas "
                    f"(TsunaguDeliveryLatencyHigh above {DELIVERY_P99_SECONDS * 1000:.0f} ms p99 for 10 minutes).",
                    [
                        query(
                            "histogram_quantile(0.5, sum by (le) "
                            f"(rate(tsunagu_gateway_delivery_lag_seconds_bucket{gateway()}[{RATE}])))",
                            "p50",
                        ),
                        query(
                            "histogram_quantile(0.99, sum by (le) "
                            f"(rate(tsunagu_gateway_delivery_lag_seconds_bucket{gateway()}[{RATE}])))",
                            "p99",
                            ref="B",
                        ),
                    ],
                    "s",
                    alert_threshold=DELIVERY_P99_SECONDS,
                ),
                24,
                8,
            ),
        ],
    )


def bus_row() -> Section:
    """The event bus (Kafka): published, errors, handled, handler errors, dead letters, lag."""
    return (
        "Event bus (Kafka)",
        [
            (
                timeseries(
                    "Published by topic",
                    "Events published to the bus per second, by topic.",
                    [
                        query(
                            f"sum by (topic) (rate(tsunagu_bus_published_total{services()}[{RATE}]))",
                            "{{topic}}",
                        )
                    ],
                    PER_SECOND,
                    stack=True,
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Publish errors",
                    "Bus publishes that failed, per second, by service and topic (TsunaguBusPublishErrors).",
                    [
                        query(
                            f"sum by (job, topic) (rate(tsunagu_bus_publish_errors_total{services()}[{RATE}]))",
                            "{{job}} {{topic}}",
                        )
                    ],
                    PER_SECOND,
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Consumed by group",
                    "Events handled from the bus per second, by consumer group and topic.",
                    [
                        query(
                            f"sum by (group, topic) (rate(tsunagu_bus_consumed_total{services()}[{RATE}]))",
                            "{{group}} <- {{topic}}",
                        )
                    ],
                    PER_SECOND,
                    stack=True,
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Handler errors",
                    "Handler attempts that raised, per second, by consumer group and topic (they are retried, "
                    "then dead-lettered).",
                    [
                        query(
                            f"sum by (group, topic) (rate(tsunagu_bus_handler_errors_total{services()}[{RATE}]))",
                            "{{group}} <- {{topic}}",
                        )
                    ],
                    PER_SECOND,
                ),
                12,
                8,
            ),
            (
                timeseries(
                    "Dead letters",
                    "Events given up on and sent to <topic>.dlq, by consumer group and topic "
                    "(TsunaguDeadLetters). The first one of a group and topic is not shown here: its series "
                    "starts at 1. The alert catches it.",
                    [
                        query(
                            f"sum by (group, topic) (increase(tsunagu_bus_dead_letters_total{services()}[{RATE}]))",
                            "{{group}} <- {{topic}}",
                        )
                    ],
                    bars=True,
                ),
                12,
                8,
            ),
            (
                timeseries(
                    "Consumer lag",
                    "Events in Kafka not yet handled, by consumer group and topic (TsunaguKafkaLagGrowing: "
                    "above 1000 and growing for 15 minutes).",
                    [
                        query(
                            f"sum by (group, topic) (tsunagu_bus_consumer_lag{services()})",
                            "{{group}} <- {{topic}}",
                        )
                    ],
                ),
                24,
                8,
            ),
        ],
    )


def broker_row() -> Section:
    """The broker (Redis fan-out): publications, operation latency, resubscribes."""
    return (
        "Broker (Redis fan-out)",
        [
            (
                timeseries(
                    "Broker publications",
                    "Channel publications accepted by the broker per second, by service.",
                    [
                        query(
                            f"sum by (job) (rate(tsunagu_broker_published_total{services()}[{RATE}]))",
                            "{{job}}",
                        )
                    ],
                    PER_SECOND,
                    stack=True,
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Broker operation latency",
                    "p50 and p99 of broker operations (Redis round trips), by operation. The red line is "
                    "TsunaguBrokerLatencyHigh's p99 threshold (10 minutes above it).",
                    [
                        query(
                            "histogram_quantile(0.5, sum by (operation, le) "
                            f"(rate(tsunagu_broker_operation_seconds_bucket{services()}[{RATE}])))",
                            "p50 {{operation}}",
                        ),
                        query(
                            "histogram_quantile(0.99, sum by (operation, le) "
                            f"(rate(tsunagu_broker_operation_seconds_bucket{services()}[{RATE}])))",
                            "p99 {{operation}}",
                            ref="B",
                        ),
                    ],
                    "s",
                    alert_threshold=BROKER_P99_SECONDS,
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Fan-out resubscribes",
                    "Redis fan-out links lost and re-established, per replica; each one makes clients "
                    "resubscribe and recover (TsunaguBrokerResubscribing above 3 in 10 minutes).",
                    [
                        query(
                            f"sum by (job, instance) (increase(tsunagu_broker_resubscribes_total{services()}[{RATE}]))",
                            "{{job}} {{instance}}",
                        )
                    ],
                    bars=True,
                ),
                8,
                8,
            ),
        ],
    )


def sessions_row() -> Section:
    """Online users, the audit chain, logins and audit events."""
    return (
        "Sessions, presence and audit",
        [
            (
                stat(
                    "Online users",
                    "Users with at least one connection, cluster-wide, as presence tracks them.",
                    [query(f"max(tsunagu_presence_online_users{job('tsunagu-presence')})", "online users")],
                    decimals=0,
                ),
                6,
                6,
            ),
            (
                stat(
                    "Audit chain",
                    "1 when audit-log's last verification found the hash chain and its signed checkpoints "
                    "intact (TsunaguAuditChainBroken fires on 0).",
                    [query(f"min(tsunagu_audit_chain_ok{job('tsunagu-audit-log')})", "chain intact")],
                    steps=(("red", None), ("green", 1)),
                    decimals=0,
                ),
                6,
                6,
            ),
            (
                timeseries(
                    "Logins",
                    "Password and client-credential logins per second by outcome (auth); failures "
                    "include lock-outs and rate limits.",
                    [
                        query(
                            f"sum by (outcome) (rate(tsunagu_auth_logins_total{job('tsunagu-auth')}[{RATE}]))",
                            "{{outcome}}",
                        )
                    ],
                    "suffix:/s",
                ),
                6,
                6,
            ),
            (
                timeseries(
                    "Audit events",
                    "Events appended to the audit chain per second, by type.",
                    [
                        query(
                            f"sum by (type) (rate(tsunagu_audit_events_total{job('tsunagu-audit-log')}[{RATE}]))",
                            "{{type}}",
                        )
                    ],
                    "suffix:/s",
                    stack=True,
                ),
                6,
                6,
            ),
        ],
    )


def feeds_row() -> Section:
    """stream-ingest, collab and sim-engine."""
    return (
        "Feeds, documents and simulations",
        [
            (
                timeseries(
                    "Ingested records",
                    "Kafka records relayed to channels by stream-ingest per second, by mapping and outcome.",
                    [
                        query(
                            "sum by (mapping, outcome) "
                            f"(rate(tsunagu_ingest_records_total{job('tsunagu-stream-ingest')}[{RATE}]))",
                            "{{mapping}} {{outcome}}",
                        )
                    ],
                    "suffix:/s",
                ),
                8,
                7,
            ),
            (
                timeseries(
                    "Open documents",
                    "Yjs documents collab holds in memory, by replica.",
                    [
                        query(
                            f"sum by (instance) (tsunagu_collab_open_documents{job('tsunagu-collab')})",
                            "{{instance}}",
                        )
                    ],
                ),
                8,
                7,
            ),
            (
                timeseries(
                    "Simulation ticks",
                    "p99 work per room tick by kind, and the share of ticks that overran their interval "
                    "(TsunaguSimTickOverruns above 10% for 10 minutes).",
                    [
                        query(
                            "histogram_quantile(0.99, sum by (kind, le) "
                            f"(rate(tsunagu_sim_tick_seconds_bucket{job('tsunagu-sim-engine')}[{RATE}])))",
                            "p99 {{kind}}",
                        ),
                    ],
                    "s",
                ),
                8,
                7,
            ),
        ],
    )


def services_row() -> Section:
    """Every service's replicas and process: up, CPU, memory, file descriptors."""
    return (
        "Services",
        [
            (
                stat(
                    "Replicas up",
                    "Targets Prometheus scraped successfully, by service (TsunaguGatewayDown, TsunaguTargetDown).",
                    [query(f"sum by (job) (up{services()})", "{{job}}")],
                    steps=(("red", None), ("green", 1)),
                    text_mode="value_and_name",
                    decimals=0,
                ),
                24,
                4,
            ),
            (
                timeseries(
                    "CPU",
                    "CPU time used per second by each service process (1 = one core).",
                    [
                        query(
                            f"sum by (job, instance) (rate(process_cpu_seconds_total{services()}[{RATE}]))",
                            "{{job}} {{instance}}",
                        )
                    ],
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Resident memory",
                    "Resident set size of each service process.",
                    [
                        query(
                            f"sum by (job, instance) (process_resident_memory_bytes{services()})",
                            "{{job}} {{instance}}",
                        )
                    ],
                    "bytes",
                ),
                8,
                8,
            ),
            (
                timeseries(
                    "Open file descriptors",
                    "Open file descriptors of each service process (each WebSocket connection holds one); "
                    "the dashed limit is the process's maximum.",
                    [
                        query(f"sum by (job, instance) (process_open_fds{services()})", "{{job}} {{instance}}"),
                        query(
                            f"min by (job) (process_max_fds{services()})",
                            "limit {{job}}",
                            ref="B",
                        ),
                    ],
                    overrides=[
                        {
                            "matcher": {"id": "byFrameRefID", "options": "B"},
                            "properties": [
                                {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                                {
                                    "id": "custom.hideFrom",
                                    "value": {"legend": True, "tooltip": False, "viz": False},
                                },
                            ],
                        }
                    ],
                ),
                8,
                8,
            ),
        ],
    )


def overview() -> Json:
    sections = [summary_row(), gateway_row(), bus_row(), broker_row(), sessions_row(), feeds_row(), services_row()]
    variables = [
        datasource_variable(),
        query_variable("namespace", "Namespace", 'label_values(up{job=~"tsunagu-.+"}, namespace)', ".*"),
        query_variable(
            "job", "Service", 'label_values(up{job=~"tsunagu-.+", namespace=~"$namespace"}, job)', "tsunagu-.+"
        ),
    ]
    return dashboard(
        "tsunagu-overview",
        "Tsunagu / Overview",
        "The gateway's connections and traffic, the event bus, the Redis fan-out and every service's process. "
        "Generated by deploy/observability/generate_dashboards.py; do not edit in Grafana.",
        variables,
        layout(sections),
    )
