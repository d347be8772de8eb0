"""The broker engine over TLS (`rediss-cluster://`, `rediss-sentinel://`) to a private Redis Cluster and a
Sentinel-watched primary whose servers (and sentinels) listen only for TLS clients on the ports the URL
names, certificates from the development CA, client certificates required (mTLS)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from tsunagu_core.broker import Publication, PublishOptions, PublishRequest
from tsunagu_core.broker.redis import RedisBroker
from tsunagu_core.testing import eventually

from tsunagu.devpki import DevPki, ensure_dev_pki
from tsunagu.stack.redis import redis_server
from tsunagu.stack.redis_sets import PrivateRedisCluster, PrivateRedisSentinel

KEEP = PublishOptions(history_size=100, history_ttl=60)

pytestmark = pytest.mark.skipif(redis_server() is None, reason="redis-server is not installed")


class Collect:
    def __init__(self) -> None:
        self.got: dict[str, list[bytes]] = {}

    async def on_publication(self, channel: str, publication: Publication) -> None:
        self.got.setdefault(channel, []).append(publication.data)

    async def on_presence(self, channel: str, join: bool, info: object) -> None:
        return None

    async def on_resubscribed(self) -> None:
        return None


@pytest.fixture
def pki(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DevPki:
    pki, _ = ensure_dev_pki(tmp_path / "tls")
    monkeypatch.setenv("TSUNAGU_TLS_CA_FILE", str(pki.ca_cert))
    monkeypatch.setenv("TSUNAGU_TLS_CERT_FILE", str(pki.client_cert))
    monkeypatch.setenv("TSUNAGU_TLS_KEY_FILE", str(pki.client_key))
    return pki


async def fan_out_and_history(url: str) -> None:
    prefix = f"test-tls-{uuid.uuid4().hex[:8]}"
    channels = [f"tls-{n}" for n in range(6)]  # spread over the shards
    publisher, subscriber = RedisBroker(url, prefix=prefix), RedisBroker(url, prefix=prefix)
    collect = Collect()
    subscriber.set_handler(collect)
    await publisher.start()
    await subscriber.start()
    try:
        for channel in channels:
            await subscriber.subscribe(channel)
        sent = {channel: [f"{channel}#{i}".encode() for i in range(20)] for channel in channels}
        await publisher.publish_many([PublishRequest(c, data, KEEP) for c in channels for data in sent[c]])
        await eventually(lambda: all(collect.got.get(c) == sent[c] for c in channels), timeout=10)
        for channel in channels:
            history = await publisher.history(channel, limit=100)
            assert [p.data for p in history.publications] == sent[channel]
    finally:
        await subscriber.close()
        await publisher.close()


async def test_the_broker_works_over_tls_on_a_redis_cluster(tmp_path: Path, pki: DevPki) -> None:
    with PrivateRedisCluster(tmp_path / "cluster", tls=pki) as cluster:
        assert cluster.url.startswith("rediss-cluster://")
        await fan_out_and_history(cluster.url)


async def test_the_broker_works_over_tls_behind_sentinel_and_across_a_failover(tmp_path: Path, pki: DevPki) -> None:
    with PrivateRedisSentinel(tmp_path / "sentinel", tls=pki) as sentinel:
        assert sentinel.url.startswith("rediss-sentinel://")
        await fan_out_and_history(sentinel.url)
        # the sentinels promote a replica over TLS and name its TLS port: the broker follows
        killed = sentinel.kill_primary()
        await asyncio.to_thread(sentinel.wait_failover, killed)
        await fan_out_and_history(sentinel.url)
