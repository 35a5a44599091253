import pytest

from symram_vllm.keys import KEY_BYTES, BlockKey, ModelSignature, chain_key, chain_keys


def sig(**overrides):
    base = dict(
        model="m", dtype="bfloat16", block_size=128, kv_layout="L", tp_size=1,
        codec="none", hash_algo="sha256_cbor", num_layers=2,
    )
    base.update(overrides)
    return ModelSignature(**base)


def test_signature_changes_with_every_field():
    digests = {sig().digest()}
    for field, value in [
        ("model", "other"), ("dtype", "float16"), ("block_size", 16), ("kv_layout", "X"),
        ("tp_size", 2), ("codec", "fp8"), ("hash_algo", "sha256"), ("num_layers", 3),
    ]:
        digests.add(sig(**{field: value}).digest())
    assert len(digests) == 9


def test_chain_key_is_deterministic_and_signature_scoped():
    h = b"\x01" * 32
    a = chain_key(sig().digest(), h)
    assert a == chain_key(sig().digest(), h)
    assert len(a) == KEY_BYTES
    assert a != chain_key(sig(codec="int8").digest(), h)
    assert a != chain_key(sig().digest(), b"\x02" * 32)
    assert chain_keys(sig().digest(), [h, h]) == [a, a]


def test_block_key_hex_round_trip_and_validation():
    key = BlockKey(b"\xab" * 32, rank=3)
    assert BlockKey.from_hex(key.hex) == key
    assert key.for_rank(0) != key
    with pytest.raises(ValueError, match="32 bytes"):
        BlockKey(b"short")
    with pytest.raises(ValueError, match="rank"):
        BlockKey(b"\x00" * 32, rank=-1)
    with pytest.raises(ValueError, match="not a symram block key"):
        BlockKey.from_hex("zz.r1")
