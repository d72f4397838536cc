"""MoS shard encoding, checked against dense float64 ΔW (the oracle), never against itself."""

from __future__ import annotations

from adapter_store.mos import Encoded, Pools, build_pools, decode, encode
from tests.helpers import SHARD_SHAPES, dense_rel_error, random_adapter, structured_library


def test_round_trip_within_budget_and_smaller():
    library = structured_library(6)
    pools = build_pools(library, shard_width=4, pool_size=24, seed=0)
    raw = sum(t.numel() * 2 for a in library for t in a.tensors.values())  # as bf16
    stored = 0
    for adapter in library:
        enc = encode(adapter, pools, error_budget=0.05)
        assert enc is not None and enc.error <= 0.05
        decoded = decode(enc, pools)
        # the recorded error is the true one: checked against dense float64 ΔW
        assert abs(dense_rel_error(adapter, decoded) - enc.error) < 0.01
        stored += len(enc.to_bytes(pool_size=24))
        # the stored bytes decode to the same adapter
        again = decode(Encoded.from_bytes(enc.to_bytes(pool_size=24)), Pools.from_bytes(pools.to_bytes()))
        assert again.weights_bytes() == decoded.weights_bytes()
    stored += len(pools.to_bytes())
    assert raw / stored >= 4, (raw, stored)


def test_shards_per_vector_sets_the_width_per_projection():
    library = structured_library(2)
    pools = build_pools(library, shards_per_vector=8, pool_size=16)
    # q_proj.B and v_proj.B vectors are 192 long, the A vectors 128: l = 8 shards each
    assert pools.codewords["q_proj.B"].shape[1] == 24 and pools.codewords["q_proj.A"].shape[1] == 16
    enc = encode(library[0], pools, error_budget=0.9)
    assert enc is not None and all(m.index[s].shape[1] == 8 for m in enc.modules.values() for s in "AB")


def test_over_budget_stays_exact_and_full_private_is_exact():
    adapter = random_adapter(SHARD_SHAPES, 4, seed=3)  # no shared structure at all
    pools = build_pools([adapter], shards_per_vector=4, pool_size=2, seed=0)
    assert encode(adapter, pools, error_budget=0.01, max_private=0.3) is None
    enc = encode(adapter, pools, error_budget=0.005, max_private=1.0)  # may privatise every shard
    assert enc is not None and enc.error <= 0.005
    assert dense_rel_error(adapter, decode(enc, pools)) <= 0.005


def test_decode_refuses_other_pool_version():
    library = structured_library(2)
    pools = build_pools(library, pool_size=8)
    enc = encode(library[0], pools, error_budget=0.5)
    newer = build_pools(library, pool_size=8, version=2)
    try:
        decode(enc, newer)
    except ValueError as exc:
        assert "v1" in str(exc)
    else:
        raise AssertionError("decoding against other pools must fail")


def test_shard_width_that_does_not_divide_the_vectors_round_trips_with_private_shards():
    library = structured_library(3)
    pools = build_pools(library, shard_width=50, pool_size=8)  # 128 -> 3 shards, 192 -> 4, zero-padded
    enc = encode(library[0], pools, error_budget=0.05, max_private=1.0)
    assert enc is not None and enc.private_fraction() > 0
    again = Encoded.from_bytes(enc.to_bytes(pool_size=8))
    assert decode(again, pools).weights_bytes() == decode(enc, pools).weights_bytes()
    assert abs(dense_rel_error(library[0], decode(again, pools)) - enc.error) < 1e-6
