"""Pages-at-rest modes for the tier suites, which run once with plaintext pages and once
with pages sealed by AES-256-GCM (``symram_vllm/tiers/crypto.py``).

Each suite has an autouse fixture, parametrized over MODES, that puts the mode's cipher
in its module-level ``CIPHER`` and ``ENV_KEY`` in the environment (for the subprocess
scripts of the fault tests, which build the same cipher with ``script_cipher``)."""

from __future__ import annotations

import os

from symram_vllm.tiers.crypto import PageCipher

MODES = ["plain", "sealed"]
MASTER_KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NAMESPACE = b"\x5a" * 32
ENV_KEY = "SYMRAM_TEST_AT_REST_KEY"


def cipher_for(mode: str, *, required: bool = False, key: bytes = MASTER_KEY) -> PageCipher | None:
    return None if mode == "plain" else PageCipher(key, NAMESPACE, required=required)


def set_mode_env(monkeypatch, mode: str) -> None:
    if mode == "plain":
        monkeypatch.delenv(ENV_KEY, raising=False)
    else:
        monkeypatch.setenv(ENV_KEY, MASTER_KEY.hex())


def script_cipher() -> PageCipher | None:
    """The cipher a test's subprocess uses: the parent's mode, read from the environment."""
    value = os.environ.get(ENV_KEY)
    return PageCipher(bytes.fromhex(value), NAMESPACE) if value else None
