"""Key layout of symram's data in Redis: every key of a namespace in one hash slot.

    symram:{<ns>}:blk:<chain-hex>          hash   "<instance>|<tier>" -> deadline (ms), "sz"
    symram:{<ns>}:lease:<chain-hex>        hash   "<instance>" -> lease count (key has a TTL)
    symram:{<ns>}:stats                    hash   fleet-wide dedupe counters
    symram:{<ns>}:page:<chain-hex>.r<rank> string one page: header + payload (page tier)
    symram:{<ns>}:lru                      zset   page members by last use (page tier)
    symram:{<ns>}:pagesz                   hash   page member -> bytes charged (page tier)
    symram:{<ns>}:used                     string page bytes held (page tier)

The ``{<ns>}`` hash tag puts a whole namespace in one Redis Cluster slot, so every
multi-key script or pipeline stays on one node. The price: one namespace cannot be
spread over several nodes; a cluster shards by namespace (model signature, tenant).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from symram_vllm.keys import BlockKey

PREFIX = "symram"
# Braces would break the hash tag; the rest keeps keys readable in redis-cli.
_NAMESPACE_RE = re.compile(r"^[0-9A-Za-z_.\-]{1,128}$")
_NAME_RE = re.compile(r"^[0-9A-Za-z_.:\-]{1,64}$")


def namespace_for(signature_digest: bytes, tenant: str | None = None) -> str:
    """The namespace of one model signature (and optionally one tenant): 32 hex chars.

    Tenants are isolated by their keys already (vLLM folds ``cache_salt`` into block
    hashes); a tenant namespace additionally separates their counters, budgets and
    key scans, and lets an operator drop one tenant's data by namespace."""
    h = hashlib.blake2b(digest_size=16, person=b"symram-ns")
    h.update(bytes(signature_digest))
    h.update(b"\x00" if tenant is None else b"\x01" + tenant.encode("utf-8"))
    return h.hexdigest()


def normalize_namespace(namespace: bytes | str) -> str:
    """Bytes are a signature digest (hashed by `namespace_for`); a str is used as is."""
    if isinstance(namespace, (bytes, bytearray, memoryview)):
        return namespace_for(bytes(namespace))
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise ValueError(
            f"bad symram Redis namespace {namespace!r}: use 1-128 characters from "
            "[0-9A-Za-z_.-] or pass the signature digest as bytes"
        )
    return namespace


def check_name(kind: str, value: str) -> str:
    """Instance ids and tier names end up in hash fields as "<instance>|<tier>"."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(
            f"bad symram {kind} {value!r}: use 1-64 characters from [0-9A-Za-z_.:-]"
        )
    return value


@dataclass(frozen=True)
class RedisKeys:
    namespace: str

    @property
    def prefix(self) -> str:
        return f"{PREFIX}:{{{self.namespace}}}:"

    def block(self, chain: bytes) -> str:
        return f"{self.prefix}blk:{chain.hex()}"

    def lease(self, chain: bytes) -> str:
        return f"{self.prefix}lease:{chain.hex()}"

    def page(self, key: BlockKey) -> str:
        return f"{self.prefix}page:{key.hex}"

    @property
    def stats(self) -> str:
        return f"{self.prefix}stats"

    @property
    def lru(self) -> str:
        return f"{self.prefix}lru"

    @property
    def page_sizes(self) -> str:
        return f"{self.prefix}pagesz"

    @property
    def used(self) -> str:
        return f"{self.prefix}used"

    @property
    def block_pattern(self) -> str:
        return f"{self.prefix}blk:*"

    @property
    def hash_tag(self) -> str:
        """The part Redis Cluster hashes: every key above maps to its slot."""
        return self.namespace
