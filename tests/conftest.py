import os
import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from symram_vllm.demo_model import build_demo_model

    return build_demo_model(None, "tiny")


def pytest_configure(config):
    # vLLM's CPU engine picks up these; keep test engines small and quiet.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


@pytest.fixture
def redis_server(tmp_path):
    """A real redis-server on a free port (tests/redis_fixtures.py), killed at teardown.
    Skipped only when the redis-server binary is not installed."""
    from redis_fixtures import RedisServer, redis_server_binary

    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path, binary).start()
    try:
        yield server
    finally:
        server.kill()
