"""Block keys: vLLM's chained block hash plus a model/layout signature.

vLLM already chains each block's hash over the whole prefix (and salts it with
`cache_salt`, LoRA and multimodal inputs), so equal keys mean equal prefixes. The
signature adds everything that changes the bytes of a page without changing the
tokens: model, dtype, block size, KV layout, tensor-parallel shape, codec and the
hash algorithm itself, so pages from a different layout can never be mistaken for
ours.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

KEY_BYTES = 32


@dataclass(frozen=True)
class ModelSignature:
    model: str
    dtype: str
    block_size: int
    kv_layout: str
    tp_size: int
    codec: str
    hash_algo: str
    num_layers: int

    def digest(self) -> bytes:
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.blake2b(payload, digest_size=KEY_BYTES, person=b"symram-sig").digest()

    def short(self) -> str:
        return self.digest().hex()[:12]


@dataclass(frozen=True, slots=True)
class BlockKey:
    """Identity of one KV page: the prefix it encodes, the layout, and the TP rank.

    `chain` is shared by all TP ranks of a block (it is what the scheduler and the
    directory reason about); `rank` picks the shard a given worker stores.
    """

    chain: bytes
    rank: int = 0

    def __post_init__(self) -> None:
        if len(self.chain) != KEY_BYTES:
            raise ValueError(f"BlockKey.chain must be {KEY_BYTES} bytes, got {len(self.chain)}")
        if self.rank < 0:
            raise ValueError(f"BlockKey.rank must be >= 0, got {self.rank}")

    @property
    def hex(self) -> str:
        return f"{self.chain.hex()}.r{self.rank}"

    @classmethod
    def from_hex(cls, text: str) -> BlockKey:
        try:
            chain_hex, rank_part = text.split(".r", 1)
            return cls(bytes.fromhex(chain_hex), int(rank_part))
        except ValueError as exc:
            raise ValueError(f"not a symram block key: {text!r} ({exc})") from exc

    def for_rank(self, rank: int) -> BlockKey:
        return BlockKey(self.chain, rank)

    def __repr__(self) -> str:
        return f"BlockKey({self.chain.hex()[:12]}…, r{self.rank})"


def chain_key(signature_digest: bytes, block_hash: bytes) -> bytes:
    """Combine a model signature with one vLLM block hash into a chain key."""
    return hashlib.blake2b(
        block_hash, digest_size=KEY_BYTES, key=signature_digest[:64], person=b"symram-blk"
    ).digest()


def chain_keys(signature_digest: bytes, block_hashes: list[bytes]) -> list[bytes]:
    return [chain_key(signature_digest, h) for h in block_hashes]
