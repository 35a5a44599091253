"""Settings the worker half reads when it opens its tiers and control endpoint: the
Redis page tier's URL and queue, and the control endpoint's limits. The Redis tier and
the HTTP server are faked: the test checks what each is given."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from symram_vllm import control
from symram_vllm.config import SymramConfig
from symram_vllm.connectors import worker_tiers
from symram_vllm.tiers import peer_redis, redis_tier

TOKEN = "a-control-token-of-32-characters"


@pytest.fixture
def fake_redis_pages(monkeypatch):
    made: dict[str, object] = {}

    def tier(url, **kwargs):
        made["url"] = url
        return SimpleNamespace(url=url, **kwargs)

    def pages(tier, queue_pages):
        made["queue_pages"] = queue_pages
        return SimpleNamespace(tier=tier, queue_pages=queue_pages)

    monkeypatch.setattr(redis_tier, "RedisPageTier", tier)
    monkeypatch.setattr(peer_redis, "RedisPages", pages)
    return made


def test_redis_pages_url_wins_over_the_directory_and_sets_the_queue(fake_redis_pages):
    config = SymramConfig(
        redis_pages_bytes=1 << 20, redis_pages_url="redis://pages:6379/1",
        directory_url="redis://directory:6379/0", redis_pages_queue=7, encryption="off",
    )
    _, pages = worker_tiers.open_remote_tiers(config, b"ns", 0, None)
    assert pages is not None
    assert fake_redis_pages == {"url": "redis://pages:6379/1", "queue_pages": 7}


def test_redis_pages_fall_back_to_the_directory_url(fake_redis_pages):
    config = SymramConfig(redis_pages_bytes=1 << 20, directory_url="redis://directory:6379/0",
                          encryption="off")
    worker_tiers.open_remote_tiers(config, b"ns", 0, None)
    assert fake_redis_pages["url"] == "redis://directory:6379/0"
    assert fake_redis_pages["queue_pages"] == SymramConfig().redis_pages_queue


def test_control_endpoint_gets_the_configured_limits(monkeypatch):
    started: dict[str, object] = {}

    class FakeServer:
        child_pid, nice = 4242, 10  # what the real one reports once its child runs

        def __init__(self, stack, *, token, rank, info, limits):
            started.update(token=token, rank=rank, limits=limits)

        def start(self, host, port):
            started.update(host=host, port=port)

    monkeypatch.setattr(control, "ControlServer", FakeServer)
    config = SymramConfig(control_port=9100, control_token=TOKEN,
                          control_rate_per_client=5.0, control_cpu_share=0.2)
    server = worker_tiers.start_control_server(config, SimpleNamespace(stack=None), 1, {})
    assert server is not None
    limits = started["limits"]
    assert (limits.rate_per_client, limits.burst_per_client, limits.cpu_share) == (5.0, 10.0, 0.2)
    assert started["port"] == 9101 and started["token"] == TOKEN


def test_the_one_lease_ttl_reaches_the_directory_without_redis_too():
    # redis.lease_ttl_s is the only lease TTL (the connector's LEASE_TTL_S is gone): the
    # scheduler's directory takes it from the config, embedded directory included.
    from symram_vllm.connectors.symram_connector import _open_directory

    config = SymramConfig(redis={"lease_ttl_s": 7, "fleet_answer_ttl_s": 1})
    directory = _open_directory(config, b"ns", frozenset())
    try:
        assert directory.options.lease_ttl_s == 7
        assert directory.options.answer_ttl_s == 1
    finally:
        directory.close()


def test_the_disk_tier_records_the_top_level_codec_given_as_an_argument(tmp_path):
    # The page codec is the engine's top-level `codec`, handed to the tier's constructor;
    # the disk section has no codec field to smuggle it through (nor to mistype).
    import torch

    from symram_vllm.keys import BlockKey
    from symram_vllm.tiers.disk_config import DiskTierConfig
    from symram_vllm.tiers.page_format import HEADER_BYTES, unpack_header

    assert "codec" not in DiskTierConfig.model_fields
    config = SymramConfig(disk_path=tmp_path, disk_bytes=1 << 20, codec="int8",
                          encryption="off")
    tier = worker_tiers.open_disk_tier(config, b"\x07" * 32, 0)
    assert tier is not None
    try:
        assert tier.codec == "int8" and tier.config == config.disk
        key = BlockKey(b"\x01" * 32, 0)
        assert tier.set(key, torch.zeros(4096, dtype=torch.uint8))
        header = unpack_header(tier.path_of(key).read_bytes()[:HEADER_BYTES])
        assert header.codec == "int8"
    finally:
        tier.close()
