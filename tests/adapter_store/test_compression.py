"""The library in MoS shard form inside real Redis: round trips against the dense float64 oracle,
over-budget skills kept exact, uploads after compression, interrupted refreshes, concurrent uploads."""

from __future__ import annotations

import threading

import pytest

from adapter_store.compression import CompressOptions, compress_library
from lora.errors import ConflictError
from tests.helpers import SHARD_SHAPES, dense_rel_error, structured_library
from tests.helpers import random_adapter

OPTIONS = CompressOptions(shard_width=4, pool_size=24, error_budget=0.05, max_private=0.5)


def _fill(registry, n=6, seed=0):
    library = structured_library(n, seed=seed)
    for i, adapter in enumerate(library):
        registry.add(f"skill{i}", adapter, description=f"skill {i}")
    return {f"skill{i}": a for i, a in enumerate(library)}


def test_compressed_library_round_trips_within_budget_and_shrinks(registry):
    originals = _fill(registry)
    before = {name: registry.info(name) for name in originals}
    report = compress_library(registry, OPTIONS)
    assert report.ratio >= 3, report
    assert {row["stored"] for row in report.versions} == {"shards"}
    for name, adapter in originals.items():
        info, served = registry.load(name)
        true_error = dense_rel_error(adapter, served)  # the oracle: dense ΔW in float64
        assert true_error <= OPTIONS.error_budget + 0.005
        assert abs(info.mos["error"] - true_error) < 0.005  # the recorded error is the real one
        assert info.sha256 == before[name].sha256  # the upload's identity is kept ...
        assert info.content_id != before[name].content_id  # ... but what is served is named anew
        # and the content index follows: compositions cached from the old content can go when it is deleted
        assert registry.unused([before[name].content_id, info.content_id]) == [before[name].content_id]
        assert registry.original(name) is None  # originals are not kept by default
        sizes = registry.storage_bytes()["versions"][info.ref]
        assert sizes["weights"] == 0 and 0 < sizes["shards"] < len(adapter.weights_bytes()) / 3


def test_keep_originals_returns_the_upload_bit_for_bit(registry):
    originals = _fill(registry, n=3)
    compress_library(registry, OPTIONS.model_copy(update={"keep_originals": True}))
    for name, adapter in originals.items():
        assert registry.original(name).weights_bytes() == adapter.weights_bytes()
        assert registry.storage_bytes()["versions"][f"{name}@1"]["shards"] > 0


def test_skill_over_budget_is_stored_exact(registry):
    _fill(registry, n=4)
    noise = random_adapter(SHARD_SHAPES, 8, seed=7)  # no shared structure: the pools cannot describe it
    registry.add("noise", noise)
    report = compress_library(registry, OPTIONS.model_copy(update={"max_private": 0.2}))
    row = next(r for r in report.versions if r["ref"] == "noise@1")
    assert row["stored"] == "exact"
    info, served = registry.load("noise")
    assert served.weights_bytes() == noise.weights_bytes()  # bit-exact, as uploaded
    assert info.mos["pool_version"] is None and "over the error budget" in info.mos["note"]
    assert info.content_id == noise.content_id()  # what is served is the upload


def test_uploads_after_compression_are_encoded_against_the_pools(registry):
    _fill(registry, n=4)
    report = compress_library(registry, OPTIONS)
    new = structured_library(1, seed=0)[0]  # same shard bank as the library
    info = registry.add("late", new)
    assert info.mos["pool_version"] == report.pool_version
    assert registry.storage_bytes()["versions"]["late@1"]["shards"] > 0
    _, served = registry.load("late")
    assert dense_rel_error(new, served) <= OPTIONS.error_budget + 0.005
    registry.shards.stop()
    exact = registry.add("later", new)
    assert exact.mos is None and registry.load("later")[1].weights_bytes() == new.weights_bytes()


def test_interrupted_refresh_leaves_old_pools_and_every_skill_readable(registry):
    originals = _fill(registry)
    first = compress_library(registry, OPTIONS.model_copy(update={"keep_originals": True}))
    with pytest.raises(RuntimeError, match="fail_after"):
        compress_library(registry, OPTIONS.model_copy(update={"keep_originals": True, "seed": 1}), fail_after=2)
    pools_now = {info.mos["pool_version"] for info in registry.list()}
    assert pools_now == {first.pool_version, first.pool_version + 1}  # half moved, half not
    assert registry.r.exists(registry._k("mos", "pool", first.pool_version))  # old pools still there
    for name, adapter in originals.items():
        registry._pool_cache.clear()  # read the pools from Redis, as a fresh replica would
        _, served = registry.load(name)
        assert dense_rel_error(adapter, served) <= OPTIONS.error_budget + 0.005
    # running it again finishes the job and collects the pools nobody names
    again = compress_library(registry, OPTIONS.model_copy(update={"keep_originals": True}))
    assert {info.mos["pool_version"] for info in registry.list()} == {again.pool_version}
    assert set(again.collected_pools) == {first.pool_version, first.pool_version + 1}
    assert not registry.r.exists(registry._k("mos", "pool", first.pool_version))


def test_refresh_without_originals_records_an_error_bound(registry):
    originals = _fill(registry, n=4)
    compress_library(registry, OPTIONS)
    compress_library(registry, OPTIONS.model_copy(update={"error_budget": 0.1, "seed": 3}))
    moved = 0
    for name, adapter in originals.items():
        info, served = registry.load(name)
        # re-encoded from the decoded shards: the recorded error bounds the true one and the budget holds
        assert dense_rel_error(adapter, served) <= info.mos["error"] + 1e-3
        assert info.mos["error"] <= 0.1 + 1e-9
        moved += info.mos["pool_version"] == 2
    assert moved  # the budget left room to move these
    # a third run at the first budget cannot re-encode decoded shards within it: they stay where they are,
    # in shard form (not blown up to exact weights), and the pools they name are kept
    third = compress_library(registry, OPTIONS.model_copy(update={"seed": 4}))
    for name in originals:
        info = registry.info(name)
        assert info.mos["pool_version"] in (1, 2, third.pool_version)
        assert dense_rel_error(originals[name], registry.load(name)[1]) <= info.mos["error"] + 1e-3
        assert registry.storage_bytes()["versions"][info.ref]["weights"] == 0
    named = {registry.info(n).mos["pool_version"] for n in originals} | {third.pool_version}
    assert {int(k.decode().rsplit(":", 1)[-1]) for k in registry.r.scan_iter(match=registry._k("mos", "pool", "*"))} == named


def test_concurrent_uploads_during_a_refresh_lose_nothing(registry):
    _fill(registry)
    keep = OPTIONS.model_copy(update={"keep_originals": True})  # so that every version can move
    compress_library(registry, keep)
    extra = structured_library(8, seed=0)
    added, errors = [], []

    def upload_some():
        try:
            for i, adapter in enumerate(extra[:4]):
                added.append(registry.add(f"thread{i}", adapter).ref)
        except Exception as exc:  # the assertion below reports it
            errors.append(exc)

    def on_progress(what, done, total):
        if what == "encoding" and done == 2:  # uploads between the pools switch and the re-encode
            for i, adapter in enumerate(extra[4:]):
                added.append(registry.add(f"hook{i}", adapter).ref)
            worker.start()

    worker = threading.Thread(target=upload_some)
    report = compress_library(registry, keep.model_copy(update={"seed": 5}), progress=on_progress)
    worker.join()
    assert not errors
    assert len(added) == 8 and all(registry.exists(ref) for ref in added)
    for info in registry.list():
        assert info.mos["pool_version"] == report.pool_version  # all on the new pools
        registry.load(info.ref)
    assert registry.gc_pools() == []


def test_one_compression_at_a_time(registry):
    _fill(registry, n=2)
    lock = registry.shards.lock()
    assert lock.acquire()
    try:
        with pytest.raises(ConflictError):
            compress_library(registry, OPTIONS)
    finally:
        lock.release()


def test_back_to_exact_without_originals_serves_the_decoded_shards(registry):
    """--off without originals stores the decoded factors (scaling folded in) with their own config:
    the served ΔW stays the decoded one, never rescaled by the upload's lora_alpha / r."""
    originals = _fill(registry, n=3)
    compress_library(registry, OPTIONS)
    decoded = {name: registry.load(name)[1] for name in originals}
    from adapter_store.compression import decompress_library

    assert decompress_library(registry) == 3
    for name, adapter in originals.items():
        info, served = registry.load(name)
        assert registry.storage_bytes()["versions"][info.ref]["shards"] == 0
        assert dense_rel_error(decoded[name], served) < 1e-6
        assert abs(dense_rel_error(adapter, served) - info.mos["error"]) < 0.005
        assert info.content_id != adapter.content_id() and registry.original(name) is None


def test_upload_racing_a_pool_switch_is_encoded_against_the_new_pools(registry, monkeypatch):
    from adapter_store import mos

    library = list(_fill(registry, n=4).values())
    compress_library(registry, OPTIONS)
    storage, switched = registry._storage, []

    def storage_then_switch(*args, **kwargs):
        stored = storage(*args, **kwargs)
        if not switched:  # a refresh makes new pools current between this encoding and the write
            switched.append(registry.shards.put_pools(mos.build_pools(library, 4, 24, seed=9), OPTIONS.model_dump()))
        return stored

    monkeypatch.setattr(registry, "_storage", storage_then_switch)
    info = registry.add("racer", structured_library(1, seed=0)[0])
    assert info.mos["pool_version"] == switched[0]
    assert registry.load("racer")[0].mos["pool_version"] == switched[0]


def test_empty_library_is_refused_and_changes_nothing(registry):
    from lora.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="empty"):
        compress_library(registry, OPTIONS)
    assert registry.shards.compression() is None and not list(registry.r.scan_iter(match=f"{registry.prefix}:*"))
