"""The directory's Redis timeout (``redis.socket_timeout_s``, default 2 s) against real
redis-servers: a Redis that answers slowly (a busy host) is not an outage, and one that
does not answer at all (SIGSTOP) never stalls the scheduler loop, which only reads
memory, while the background thread waits out one timeout and opens the breaker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from redis_fixtures import keys, wait_until
from test_connector_halves import BS, FakeRequest, sched_output

from loadtest.delay_proxy import DelayProxy
from symram_vllm.config import SymramConfig
from symram_vllm.connectors.scheduler import FLEET_WAIT_S, SchedulerSide
from symram_vllm.directory import open_fleet_directory
from symram_vllm.directory.async_directory import AsyncDirectory
from symram_vllm.directory.redis_directory import RedisDirectory
from symram_vllm.directory.redis_settings import RedisSettings

pytestmark = pytest.mark.timeout(120)

SIG = b"\x0b" * 32
# Batches go out at once; everything else (the socket timeout above all) is the default.
SETTINGS = RedisSettings(batch_interval_s=0.001)
TIMEOUT_S = SETTINGS.socket_timeout_s


@pytest.fixture
def fleet(redis_server) -> Iterator[list[AsyncDirectory]]:
    made: list[AsyncDirectory] = []
    yield made
    for d in made:
        d.close()


def test_a_slow_redis_is_not_an_outage(redis_server, fleet):
    """Round trips of 0.4 s (a loaded host: the old 0.25 s default opened the breaker
    on them and withheld every fleet answer) are answered, and the link stays up."""
    doc = keys(8, "slow")
    other = RedisDirectory(redis_server.url, namespace=SIG, instance_id="other")
    try:
        other.add(doc, "redis")
    finally:
        other.close()
    with DelayProxy("127.0.0.1", redis_server.port, delay_s=0.2) as proxy:
        d = open_fleet_directory(f"redis://127.0.0.1:{proxy.port}/0", namespace=SIG,
                                 instance_id="slow", settings=SETTINGS)
        fleet.append(d)
        assert d.inner.link.available  # its first PING took 0.4 s too
        assert d.lookup("r", doc).pending
        d.end_step()
        assert wait_until(lambda: d.lookup("r", doc).held == len(doc), timeout=30)
        stats = d.stats()
        assert stats["available"] == 1.0 and stats["last_batch_s"] >= 0.35


def _pause(redis_server, sig: signal.Signals) -> None:
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, sig)


def test_a_stopped_redis_never_stalls_the_scheduler_loop(redis_server, fleet):
    d = open_fleet_directory(redis_server.url, namespace=SIG, instance_id="sched",
                             settings=SETTINGS)
    fleet.append(d)
    side = SchedulerSide(SIG, BS, SymramConfig(), d, shared_tiers=frozenset({"redis"}))
    # The fleet is asked: one warm round trip, the connection open.
    assert side.get_num_new_matched_tokens(FakeRequest("warm-1", 4 * BS + 1), 0)[0] is None
    side.build_connector_meta(sched_output())
    assert wait_until(lambda: d.stats()["fleet_answers"] >= 1, timeout=30)

    _pause(redis_server, signal.SIGSTOP)  # alive, connected, silent
    try:
        stopped = time.monotonic()
        first = FakeRequest("first-1", 4 * BS + 1)
        went_ahead_s: float | None = None
        slowest_s = 0.0
        step = 0
        while d.inner.link.available:  # until the background thread's call times out
            assert time.monotonic() - stopped < TIMEOUT_S + 30, "the breaker never opened"
            step += 1
            t0 = time.perf_counter()
            # A scheduler step: a new waiting request, the first one asked again, the
            # step's metadata (which hands the directory its batch).
            side.get_num_new_matched_tokens(FakeRequest(f"s{step}-1", 4 * BS + 1), 0)
            tokens, _ = side.get_num_new_matched_tokens(first, 0)
            side.build_connector_meta(sched_output())
            slowest_s = max(slowest_s, time.perf_counter() - t0)
            if tokens is not None and went_ahead_s is None:
                went_ahead_s = time.monotonic() - stopped
            time.sleep(0.01)
        opened_s = time.monotonic() - stopped
        print(f"slowest step {slowest_s * 1e3:.1f} ms over {step} steps; the first request "
              f"went ahead at {went_ahead_s} s; breaker open at {opened_s:.2f} s")
        # One timeout opened the breaker; no scheduler call waited on it, and the request
        # waiting for its fleet answer went ahead after FLEET_WAIT_S, not after it.
        assert opened_s >= TIMEOUT_S * 0.9
        assert slowest_s < TIMEOUT_S / 4, slowest_s
        assert went_ahead_s is not None and went_ahead_s < FLEET_WAIT_S + 1.0 < TIMEOUT_S
        # Open, the breaker answers the next batches at once: one timeout per outage.
        trips = d.stats()["round_trips"]
        for i in range(3):
            side.get_num_new_matched_tokens(FakeRequest(f"open{i}-1", 4 * BS + 1), 0)
            side.build_connector_meta(sched_output())
            assert wait_until(lambda n=i: d.stats()["round_trips"] >= trips + n + 1,
                              timeout=TIMEOUT_S / 2)
        assert d.stats()["last_batch_s"] < TIMEOUT_S / 4
    finally:
        _pause(redis_server, signal.SIGCONT)
    assert wait_until(lambda: d.inner.link.available, timeout=30)  # the probe got through
