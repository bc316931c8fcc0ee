"""The activation cache: roundtrip, shuffling, bounded memory, kill-and-resume, refusals."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from saescope import store
from saescope.errors import SaescopeError
from saescope.store import ActivationCache, CacheWriter

SITES = {"resid_post/0": 8, "resid_post/1": 8, "attn_out/1": 6}
CTX_LEN = 16
CONTEXTS_PER_BATCH = 2
N_BATCHES = 12
META = {"identity": {"model": "tiny", "corpus": "fake", "seed": 0}, "note": "test"}


class FakeBatch(NamedTuple):
    acts: dict[str, torch.Tensor]
    token_ids: torch.Tensor
    ctx: torch.Tensor
    pos: torch.Tensor
    n_contexts: int


def make_batch(b: int) -> FakeBatch:
    """Batch number `b` of a deterministic harvest: a few positions per context are dropped."""
    gen = torch.Generator().manual_seed(1000 + b)
    ctx_ids, pos_ids = [], []
    for c in range(b * CONTEXTS_PER_BATCH, (b + 1) * CONTEXTS_PER_BATCH):
        keep = torch.rand(CTX_LEN, generator=gen) > 0.2
        keep[0] = False  # BOS dropped
        p = torch.nonzero(keep).flatten()
        ctx_ids.append(torch.full_like(p, c))
        pos_ids.append(p)
    ctx = torch.cat(ctx_ids)
    pos = torch.cat(pos_ids)
    n = len(ctx)
    token_ids = ctx * CTX_LEN + pos  # unique per row: identifies it after shuffling
    acts = {s: torch.randn(n, w, generator=gen) * 3 for s, w in SITES.items()}
    return FakeBatch(acts, token_ids, ctx, pos, CONTEXTS_PER_BATCH)


def stream(start_context: int = 0, n_batches: int = N_BATCHES):
    assert start_context % CONTEXTS_PER_BATCH == 0, "resume must land on a batch boundary"
    for b in range(start_context // CONTEXTS_PER_BATCH, n_batches):
        yield make_batch(b)


def write_cache(folder: Path, dtype: str = "float32", shard_tokens: int = 40, n_batches: int = N_BATCHES) -> Path:
    with CacheWriter(folder, SITES, dtype=dtype, shard_tokens=shard_tokens, meta=META) as w:
        assert w.contexts_done == 0
        for batch in stream(0, n_batches):
            w.add(batch)
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def resume(folder: Path, dtype: str = "float32", shard_tokens: int = 40) -> None:
    with CacheWriter(folder, SITES, dtype=dtype, shard_tokens=shard_tokens, meta=META) as w:
        for batch in stream(w.contexts_done):
            w.add(batch)


def all_rows(n_batches: int = N_BATCHES) -> FakeBatch:
    batches = list(stream(0, n_batches))
    return FakeBatch(
        {s: torch.cat([b.acts[s] for b in batches]) for s in SITES},
        torch.cat([b.token_ids for b in batches]),
        torch.cat([b.ctx for b in batches]),
        torch.cat([b.pos for b in batches]),
        sum(b.n_contexts for b in batches),
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """The folder an uninterrupted run writes, byte for byte."""
    return folder_bytes(write_cache(tmp_path_factory.mktemp("ref") / "cache"))


# -- roundtrip --------------------------------------------------------------------------------------


def test_roundtrip_float32_is_exact(tmp_path):
    cache = ActivationCache.open(write_cache(tmp_path / "c"))
    ref = all_rows()
    assert cache.complete and cache.dtype == "float32" and cache.sites == SITES
    assert cache.meta == META
    assert cache.n_tokens == len(ref.token_ids) == len(cache)
    assert cache.contexts_done == N_BATCHES * CONTEXTS_PER_BATCH
    for site in SITES:
        assert torch.equal(torch.from_numpy(cache.read(site)), ref.acts[site])
    for name in ("token_ids", "ctx", "pos"):
        assert torch.equal(torch.from_numpy(cache.read(name)), getattr(ref, name))
    # a window across shard boundaries
    lo, hi = 30, cache.n_tokens - 25
    assert torch.equal(torch.from_numpy(cache.read("attn_out/1", lo, hi)), ref.acts["attn_out/1"][lo:hi])
    assert cache.read("attn_out/1", hi, hi).shape == (0, 6)

    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    shards = manifest["shards"]
    assert len(shards) > 3
    assert all(s["tokens"] >= 40 for s in shards[:-1]) and 0 < shards[-1]["tokens"]
    # shards hold whole batches only: each one ends on a batch boundary
    assert all(s["contexts"] % CONTEXTS_PER_BATCH == 0 for s in shards)
    ends = np.cumsum([s["contexts"] for s in shards]) // CONTEXTS_PER_BATCH
    batch_rows = [len(b.token_ids) for b in stream()]
    assert [s["tokens"] for s in shards] == np.diff(np.concatenate([[0], np.cumsum(batch_rows)[ends - 1]])).tolist()
    assert (tmp_path / "c" / shards[0]["name"] / "resid_post__0.npy").is_file()
    assert np.load(tmp_path / "c" / shards[0]["name"] / "resid_post__0.npy").shape == (shards[0]["tokens"], 8)


def test_roundtrip_float16_within_tolerance(tmp_path):
    cache = ActivationCache.open(write_cache(tmp_path / "c", dtype="float16"))
    ref = all_rows()
    got = list(cache.batches(batch_size=50, shuffle=False))
    assert [len(b["token_ids"]) for b in got[:-1]] == [50] * (len(got) - 1)
    for site in SITES:
        x = torch.cat([b[site] for b in got])
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, ref.acts[site], rtol=1e-3, atol=1e-3)
        assert not torch.equal(x, ref.acts[site])  # it really went through fp16
    assert torch.equal(torch.cat([b["token_ids"] for b in got]), ref.token_ids)


# -- shuffled reading -------------------------------------------------------------------------------


def test_shuffled_epoch_covers_every_row_once_and_keeps_sites_aligned(tmp_path):
    cache = ActivationCache.open(write_cache(tmp_path / "c"))
    ref = all_rows()
    row_of = {int(t): i for i, t in enumerate(ref.token_ids)}
    got = list(cache.batches(batch_size=32, seed=3, pool_shards=2))
    assert [len(b["token_ids"]) for b in got[:-1]] == [32] * (len(got) - 1)
    ids = torch.cat([b["token_ids"] for b in got])
    assert sorted(ids.tolist()) == sorted(ref.token_ids.tolist())  # each row exactly once
    assert not torch.equal(ids, ref.token_ids)  # not the stored order
    rows = torch.tensor([row_of[int(t)] for t in ids])
    for site in SITES:
        assert torch.equal(torch.cat([b[site] for b in got]), ref.acts[site][rows])
    # the first batch mixes rows from far apart in the cache, not one contiguous run
    first = torch.tensor([row_of[int(t)] for t in got[0]["token_ids"]])
    assert first.max() - first.min() > 64
    # and its rows are interleaved, not one sorted run per shard
    assert int((first[1:] < first[:-1]).sum()) > 8


def test_shuffle_is_deterministic_per_seed(tmp_path):
    cache = ActivationCache.open(write_cache(tmp_path / "c"))

    def order(seed):
        return torch.cat([b["token_ids"] for b in cache.batches(16, sites=["attn_out/1"], seed=seed)])

    assert torch.equal(order(7), order(7))
    assert not torch.equal(order(7), order(8))
    batch = next(cache.batches(16, sites=["attn_out/1"]))
    assert set(batch) == {"attn_out/1", "token_ids"}
    with pytest.raises(SaescopeError, match="not in the activation cache"):
        next(cache.batches(16, sites=["mlp_out/9"]))


def test_shuffled_reading_holds_at_most_pool_shards_open(tmp_path, monkeypatch):
    cache = ActivationCache.open(write_cache(tmp_path / "c", shard_tokens=20))
    n_shards = len(cache.shards)
    assert n_shards >= 8
    opened = []
    real_open = ActivationCache._open_shard

    def spy(self, index, names):
        shard = real_open(self, index, names)
        opened.append(shard)
        return shard

    monkeypatch.setattr(ActivationCache, "_open_shard", spy)
    peak = 0
    for _ in cache.batches(batch_size=8, pool_shards=3, seed=1):
        live = [s for s in opened if not s.closed]
        assert all(s.arrays for s in live) and all(not s.arrays for s in opened if s.closed)
        peak = max(peak, len(live))
        assert peak <= 3
    assert peak == 3  # the pool did fill up, so the bound above was really exercised
    assert sorted(s.index for s in opened) == list(range(n_shards))  # each shard mapped once per epoch
    assert all(s.closed for s in opened)


# -- kill and resume --------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands in for SIGKILL: nothing the library catches on purpose."""


def test_exception_inside_writer_then_resume_is_byte_identical(tmp_path, reference):
    folder = tmp_path / "c"
    with pytest.raises(RuntimeError):
        with CacheWriter(folder, SITES, dtype="float32", shard_tokens=40, meta=META) as w:
            for i, batch in enumerate(stream()):
                w.add(batch)
                if i == 6:
                    raise RuntimeError("harvest crashed")
    # only whole committed shards remain; the open shard was dropped
    manifest = json.loads((folder / "manifest.json").read_text())
    assert not manifest["complete"] and 0 < manifest["contexts_done"] < 14
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"] + [s["name"] for s in manifest["shards"]]
    with pytest.raises(SaescopeError, match="unfinished"):
        ActivationCache.open(folder)
    partial = ActivationCache.open(folder, allow_incomplete=True)
    assert partial.n_tokens == manifest["tokens_done"]

    resume(folder)
    assert folder_bytes(folder) == reference


def test_hard_kill_mid_shard_write_then_resume_is_byte_identical(tmp_path, reference, monkeypatch):
    folder = tmp_path / "c"
    calls = {"n": 0}
    real_append = store._append

    def dying_append(f, arr):
        calls["n"] += 1
        if calls["n"] == 9 * 6 + 2:  # inside batch 10, between two site files
            raise Killed
        real_append(f, arr)

    monkeypatch.setattr(store, "_append", dying_append)
    w = CacheWriter(folder, SITES, dtype="float32", shard_tokens=40, meta=META)
    with pytest.raises(Killed):
        for batch in stream():
            w.add(batch)
    monkeypatch.setattr(store, "_append", real_append)
    # what a SIGKILL leaves: a half-written temporary shard (re-created here, as no cleanup would run)
    junk = folder / ".tmp_shard_00042"
    junk.mkdir()
    (junk / "resid_post__0.npy").write_bytes(b"\x93NUMPY half")

    resume(folder)
    assert folder_bytes(folder) == reference


def test_kill_between_shard_rename_and_manifest_then_resume_is_byte_identical(tmp_path, reference, monkeypatch):
    folder = tmp_path / "c"
    calls = {"n": 0}
    real_write_json = store.write_json

    def dying_write_json(path, obj):
        calls["n"] += 1
        if calls["n"] == 4:  # initial manifest, shard 0, shard 1, then die recording shard 2
            raise Killed
        real_write_json(path, obj)

    monkeypatch.setattr(store, "write_json", dying_write_json)
    w = CacheWriter(folder, SITES, dtype="float32", shard_tokens=40, meta=META)
    with pytest.raises(Killed):
        for batch in stream():
            w.add(batch)
    monkeypatch.setattr(store, "write_json", real_write_json)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard_00000", "shard_00001"]
    assert (folder / "shard_00002").is_dir()  # renamed into place but never recorded
    assert w.contexts_done == manifest["contexts_done"]  # the writer does not count it either

    with CacheWriter(folder, SITES, dtype="float32", shard_tokens=40, meta=META) as w:
        assert w.contexts_done == manifest["contexts_done"] and w.tokens_done == manifest["tokens_done"]
        assert not (folder / "shard_00002").exists()  # the orphan is gone before anything is written
        for batch in stream(w.contexts_done):
            w.add(batch)
    assert folder_bytes(folder) == reference


def test_disk_full_keeps_committed_shards_and_resumes(tmp_path, reference, monkeypatch):
    folder = tmp_path / "c"
    real_append = store._append
    calls = {"n": 0}

    def full_disk(f, arr):
        calls["n"] += 1
        if calls["n"] > 8 * 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(f, arr)

    monkeypatch.setattr(store, "_append", full_disk)
    with pytest.raises(SaescopeError, match="no space left"):
        with CacheWriter(folder, SITES, dtype="float32", shard_tokens=40, meta=META) as w:
            for batch in stream():
                w.add(batch)
    monkeypatch.setattr(store, "_append", real_append)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["shards"] and not manifest["complete"]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"] + [s["name"] for s in manifest["shards"]]
    for s in manifest["shards"]:  # committed shards still match the reference
        for name in ("resid_post__0.npy", "token_ids.npy"):
            assert (folder / s["name"] / name).read_bytes() == reference[f"{s['name']}/{name}"]
    with pytest.raises(SaescopeError, match="stopped after an error"):
        w.add(make_batch(0))

    resume(folder)
    assert folder_bytes(folder) == reference


def test_complete_cache_reopens_as_complete(tmp_path):
    folder = write_cache(tmp_path / "c")
    before = folder_bytes(folder)
    with CacheWriter(folder, SITES, dtype="float32", shard_tokens=40, meta=META) as w:
        assert w.complete and w.contexts_done == N_BATCHES * CONTEXTS_PER_BATCH
        with pytest.raises(SaescopeError, match="already complete"):
            w.add(make_batch(0))
    assert folder_bytes(folder) == before


# -- refusals ---------------------------------------------------------------------------------------


def test_another_runs_folder_is_refused(tmp_path):
    folder = write_cache(tmp_path / "c", n_batches=3)
    with pytest.raises(SaescopeError, match="another run.*choose a new --out or delete it"):
        CacheWriter(folder, {"resid_post/0": 8}, dtype="float32", shard_tokens=40, meta=META)
    with pytest.raises(SaescopeError, match="another run"):
        CacheWriter(folder, SITES, dtype="float16", shard_tokens=40, meta=META)
    with pytest.raises(SaescopeError, match="another run"):
        CacheWriter(folder, SITES, dtype="float32", shard_tokens=40, meta={"identity": {"model": "other"}})
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(SaescopeError, match="another run.*choose a new --out or delete it"):
        CacheWriter(other, SITES)
    assert (other / "todo.txt").read_text() == "mine"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"model": "x", "stages": {}}))
    with pytest.raises(SaescopeError, match="not a saescope activation cache"):
        CacheWriter(run_dir, SITES)


def test_nan_and_inf_are_rejected_naming_the_site(tmp_path):
    batch = make_batch(0)
    bad = dict(batch.acts)
    bad["resid_post/1"] = bad["resid_post/1"].clone()
    bad["resid_post/1"][3, 2] = float("nan")
    with CacheWriter(tmp_path / "a", SITES, dtype="float32", meta=META) as w:
        with pytest.raises(SaescopeError, match="'resid_post/1'.*NaN or Inf"):
            w.add(batch._replace(acts=bad))
    bad["resid_post/1"][3, 2] = float("inf")
    with pytest.raises(SaescopeError, match="'resid_post/1'.*NaN or Inf"):
        with CacheWriter(tmp_path / "b", SITES, dtype="float16", meta=META) as w:
            w.add(batch._replace(acts=bad))
    big = dict(batch.acts)
    big["attn_out/1"] = big["attn_out/1"] * 1e6
    with pytest.raises(SaescopeError, match="'attn_out/1' overflow float16: use a float32 cache"):
        with CacheWriter(tmp_path / "c", SITES, dtype="float16", meta=META) as w:
            w.add(batch._replace(acts=big))
    with pytest.raises(SaescopeError, match="sites do not match"):
        with CacheWriter(tmp_path / "d", SITES, meta=META) as w:
            w.add(batch._replace(acts={"resid_post/0": batch.acts["resid_post/0"]}))
    # nothing was committed anywhere
    for name in "abcd":
        assert json.loads((tmp_path / name / "manifest.json").read_text())["shards"] == []


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(SaescopeError, match="no activation cache at"):
        ActivationCache.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaescopeError, match="not an activation cache"):
        ActivationCache.open(tmp_path / "empty")

    folder = write_cache(tmp_path / "c", n_batches=3)
    manifest_path = folder / "manifest.json"
    good = manifest_path.read_text()
    manifest_path.write_text(good[: len(good) // 2])
    with pytest.raises(SaescopeError, match="not valid JSON"):
        ActivationCache.open(folder)
    with pytest.raises(SaescopeError, match="not valid JSON"):
        CacheWriter(folder, SITES, dtype="float32", shard_tokens=40, meta=META)

    m = json.loads(good)
    del m["shards"]
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(SaescopeError, match=r"incomplete \(missing \['shards'\]\)"):
        ActivationCache.open(folder)

    m = json.loads(good)
    m["shards"][0]["name"] = "../../etc"
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(SaescopeError, match="is corrupt"):
        ActivationCache.open(folder)

    manifest_path.write_text(good)
    shard = json.loads(good)["shards"][0]["name"]
    (folder / shard / "attn_out__1.npy").write_bytes(b"garbage")
    cache = ActivationCache.open(folder)
    with pytest.raises(SaescopeError, match="attn_out__1.npy is missing or corrupt"):
        cache.read("attn_out/1")
    with pytest.raises(SaescopeError, match="not in the activation cache"):
        cache.read("mlp_out/0")
