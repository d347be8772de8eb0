"""The workers' merged metrics, as Prometheus's own text parser reads them, and the CPU count of `auto`."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tsunagu_core.workers import WorkerSlot, merge_expositions

from tsunagu.workers import cgroup_cpu_quota


def worker_registry(connections: float, deliveries: float) -> bytes:
    registry = CollectorRegistry()
    Gauge("demo_connections", "Open connections", registry=registry).set(connections)
    Counter("demo_deliveries", "Deliveries", ["kind"], registry=registry).labels("push").inc(deliveries)
    Histogram("demo_lag_seconds", "Lag", buckets=(0.1, 1.0), registry=registry).observe(0.5)
    return generate_latest(registry)


def test_merged_metrics_keep_each_workers_series_apart() -> None:
    merged = merge_expositions(
        {"0": worker_registry(3, 10), "1": worker_registry(5, 7)}, {"0": True, "1": True, "2": False}
    ).decode()
    families = {family.name: family for family in text_string_to_metric_families(merged)}
    connections = {s.labels["worker"]: s.value for s in families["demo_connections"].samples}
    assert connections == {"0": 3.0, "1": 5.0}
    deliveries = {
        (s.labels["worker"], s.labels["kind"]): s.value
        for s in families["demo_deliveries"].samples
        if s.name == "demo_deliveries_total"
    }
    assert deliveries == {("0", "push"): 10.0, ("1", "push"): 7.0}
    buckets = [s for s in families["demo_lag_seconds"].samples if s.name == "demo_lag_seconds_bucket"]
    assert {s.labels["worker"] for s in buckets} == {"0", "1"} and len(buckets) == 2 * 3
    up = {s.labels["worker"]: s.value for s in families["tsunagu_worker_up"].samples}
    assert up == {"0": 1.0, "1": 1.0, "2": 0.0}
    # One HELP and TYPE per family, as the format requires (Prometheus rejects a repeated TYPE).
    assert merged.count("# TYPE demo_connections gauge") == 1


def test_slot_round_trips_through_its_variable(tmp_path: Path) -> None:
    slot = WorkerSlot.parse(WorkerSlot(1, 3, tmp_path).encode())
    assert (slot.index, slot.count, slot.directory, slot.siblings) == (1, 3, tmp_path, [0, 2])
    assert slot.control_path(2) == tmp_path / "worker-2.sock"


def test_cpu_quota_from_cgroup_v2_and_v1(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 1.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1) is None
    assert cgroup_cpu_quota(tmp_path / "none") is None
