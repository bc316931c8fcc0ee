"""Many processes (torch.distributed, gloo on CPU): data parallel = a single process on the same rows, layer
parallel = each layer trained alone on the same rows, and ranks killed mid-training resume to the same result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saescope.distributed import World
from saescope.errors import SaescopeError
from saescope.formats import load_sae
from saescope.sae import SAEConfig
from saescope.train import Chunk, MultiTrainer, TrainConfig

TESTS = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
WORDS = ("the a an of to in is was and on for with as by at it he she they paris france tower city river king queen "
         "war peace music art science water fire earth one two three . , ! ?").split()
# gloo's teardown (torch 2.13, CPU) now and then aborts a rank after its work is done and written: "terminate called
# without an active exception" (SIGABRT) from destroy_process_group or interpreter exit; seen in about 1 of 8 runs
# of this file under load. The tests accept that abort only when every output was written, and then check the outputs.
TEARDOWN = "terminate called without an active exception"
TRAIN = ["--layers", "0-2", "--widths", "64", "--l0", "4", "--tokens", "3000", "--batch-size", "128",
         "--ctx-len", "32", "--checkpoint-every", "8"]


# --------------------------------------------------------------------------- data parallel, in-process ranks

def _synthetic_chunks(n=6000, d=32, per_chunk=1000):
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(64, d, generator=g), dim=1)
    codes = torch.zeros(n, 64).scatter(1, torch.randint(0, 64, (n, 3), generator=g), torch.rand(n, 3, generator=g) + 1)
    x = codes @ dirs * 5 + 3
    return [Chunk({"resid_post/0": x[i:i + per_chunk]}, 1) for i in range(0, n, per_chunk)]


CFGS = [SAEConfig(d_in=32, width=w, architecture=a, l0=3.0, site="resid_post", layer=0)
        for a, w in (("jump_relu", 128), ("topk", 64), ("batchtopk", 64), ("relu", 64))]
TC = dict(tokens=6000, batch_size=250, seed=3, dead_tokens=250)  # dead after one step: the aux-k loss is on


def _data_rank(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # a rank left waiting fails instead of hanging
    try:
        mt = MultiTrainer(CFGS, TrainConfig(**TC), world=World(rank, 2, "data"))
        mt.fit(_synthetic_chunks(), progress=False)  # the same chunks on both ranks, as from a cache
        torch.save([t.export().state_dict() for t in mt.trainers], f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_steps_equal_a_single_process_on_the_same_rows(tmp_path):
    """Every architecture, with the first-batch init, dead-feature mask, aux-k rows, L0 controller and
    batchtopk threshold made global: 2 ranks, each half of every step, = 1 process on whole steps."""
    _spawn(_data_rank, tmp_path, ["rank0.pt", "rank1.pt"])
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.set_num_threads(1)
    ref = MultiTrainer(CFGS, TrainConfig(**TC))
    ref.fit(_synthetic_chunks(), progress=False)
    for t, got, other in zip(ref.trainers, *ranks):
        for name, p in t.export().state_dict().items():
            assert torch.equal(got[name], other[name]), (t.key, name)  # the ranks hold the same SAE
            torch.testing.assert_close(got[name], p, rtol=1e-4, atol=1e-4, msg=lambda m, k=f"{t.key} {name}": f"{k}: {m}")


def _uneven_rank(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # a rank left waiting fails instead of hanging
    try:
        from saescope.distributed import synced

        mine = _synthetic_chunks()[rank::2][: 3 - rank]  # rank 0: 3 chunks of its own, rank 1: 2
        mt = MultiTrainer(CFGS[:1], TrainConfig(**{**TC, "tokens": 100_000}), world=World(rank, 2, "data"))
        try:
            mt.fit(synced(mine, World(rank, 2, "data")), progress=False)
            outcome = "finished"
        except SaescopeError as err:
            outcome = str(err)
        (Path(folder) / f"rank{rank}.txt").write_text(f"{outcome}|{mt.tokens_done}")
    finally:
        dist.destroy_process_group()


def test_data_parallel_shards_that_end_apart_stop_every_rank_together(tmp_path):
    """From a live harvest each rank steps through its own rows; when one shard runs out, every rank stops
    (instead of the others waiting for it forever), having counted both ranks' rows."""
    _spawn(_uneven_rank, tmp_path, ["rank0.txt", "rank1.txt"])
    outcomes = [(tmp_path / f"rank{r}.txt").read_text().split("|") for r in range(2)]
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0].startswith("the corpus ran out after 4,000 training tokens")  # 2 chunks × 2 ranks


# --------------------------------------------------------------------------- torchrun end to end

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Random words: a repeated text gives the tiny model's sliding-window layers many exactly equal rows, whose
    tied pre-activations sit on the JumpReLU thresholds; there a last-bit difference (another split of the
    batch) flips features and the runs part (measured: 0.04 on w_enc, where distinct rows give 1e-7)."""
    import random

    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(60 + i % 4 * 20)))
    return folder


def _torchrun(*args, script=("-m", "saescope"), env=None, wait=True):
    cmd = [*TORCHRUN, *script, "train", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=300)
    finished = "trained " in out and TEARDOWN in out  # the SAEs were written, then gloo's teardown aborted
    assert proc.returncode == 0 or finished, out[-3000:]
    return out


def _spawn(fn, folder: Path, outputs: list[str]) -> None:
    """mp.spawn 2 ranks of `fn`; a SIGABRT at teardown is accepted once every rank wrote its output."""
    try:
        mp.spawn(fn, args=(str(folder),), nprocs=2)
    except mp.ProcessExitedException as err:
        if err.signal_name != "SIGABRT" or not all((folder / name).is_file() for name in outputs):
            raise


def _saes(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    folders = sorted((run / "saes").glob("*/*"))
    return {p.name: load_sae(p).state_dict() for p in folders}


@pytest.fixture(scope="module")
def cache(tiny_gemma_dir, corpus, tmp_path_factory):
    from saescope.pipeline import harvest_to_cache

    out = tmp_path_factory.mktemp("cache") / "c"
    harvest_to_cache(out, model=str(tiny_gemma_dir), corpus=str(corpus), layers="all", tokens=3200, ctx_len=32,
                     progress=False)
    return out


@pytest.fixture(scope="module")
def data_run(tiny_gemma_dir, corpus, cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("data") / "run"
    _torchrun("--model", tiny_gemma_dir, "--corpus", corpus, "--cache", cache, *TRAIN, "--out", run)
    return run


@pytest.fixture(scope="module")
def layers_run(tiny_gemma_dir, corpus, tmp_path_factory):
    run = tmp_path_factory.mktemp("layers") / "run"
    _torchrun("--model", tiny_gemma_dir, "--corpus", corpus, *TRAIN, "--parallel", "layers", "--out", run)
    return run


def test_torchrun_data_parallel_from_a_cache_equals_a_single_process(data_run, tiny_gemma_dir, corpus, cache,
                                                                     tmp_path):
    from saescope.pipeline import train_run
    from saescope.runs import Run

    manifest = Run.open(data_run).manifest
    assert manifest["config"]["parallel"] == {"world_size": 2, "mode": "data"}
    assert manifest["stages"]["train"]["status"] == "done"
    tc = TrainConfig(tokens=3000, batch_size=128, checkpoint_every=8)
    train_run(tmp_path / "single", model=str(tiny_gemma_dir), corpus=str(corpus), layers="0-2", widths=(64,),
              l0s=(4.0,), train=tc, ctx_len=32, cache=cache, progress=False)
    got, ref = _saes(data_run), _saes(tmp_path / "single")
    assert sorted(got) == sorted(ref) and len(ref) == 3
    for sae, params in ref.items():
        for name, p in params.items():
            torch.testing.assert_close(got[sae][name], p, rtol=1e-4, atol=1e-4,
                                       msg=lambda m, k=f"{sae} {name}": f"{k}: {m}")


def _sharded_chunks(lm, corpus, site_keys, rank_of_key):
    """What each rank of a 2-process layer-parallel run trains on, rebuilt in one process: rank r harvests
    contexts r, r+2, ...; each chunk is rank 0's rows then rank 1's."""
    from saescope.corpus import Corpus
    from saescope.harvest import harvest

    sites = [s for s in lm.sites(kinds=["resid_post"], layers=[0, 1, 2])]
    streams = [list(Corpus(str(corpus), heldout_fraction=0.05, seed=0).contexts(lm.tokenizer, ctx_len=32))[r::2]
               for r in range(2)]
    for pair in zip(*(harvest(lm, s, sites, progress=False) for s in streams)):
        acts = {k: torch.cat([b.acts[k] for b in pair]) for k in site_keys}
        yield Chunk(acts, pair[rank_of_key].n_contexts)


def test_torchrun_layer_parallel_trains_each_layer_as_if_alone(layers_run, tiny_gemma_dir, corpus):
    from saescope.models import load_model
    from saescope.pipeline import sae_configs
    from saescope.runs import Run

    assert Run.open(layers_run).manifest["config"]["parallel"] == {"world_size": 2, "mode": "layers"}
    lm = load_model(str(tiny_gemma_dir))
    got = _saes(layers_run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks (OMP_NUM_THREADS=1): the same sums in the same order
    try:
        for cfg in sae_configs(lm, str(tiny_gemma_dir), ["resid_post"], [0, 1, 2], [64], [4.0], "jump_relu"):
            alone = MultiTrainer([cfg], TrainConfig(tokens=3000, batch_size=128, checkpoint_every=8))
            alone.fit(_sharded_chunks(lm, corpus, [f"resid_post/{cfg.layer}"], cfg.layer % 2), progress=False)
            for name, p in alone.trainers[0].export().state_dict().items():
                assert torch.equal(got[cfg.folder_name][name], p), (cfg.folder_name, name)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["data", "layers"])
def test_ranks_killed_after_a_checkpoint_resume_to_the_same_result(mode, request, tiny_gemma_dir, corpus, cache,
                                                                   tmp_path):
    uninterrupted = request.getfixturevalue(f"{mode}_run")
    run, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    args = ["--model", tiny_gemma_dir, "--corpus", corpus, *TRAIN, "--out", run,
            *(["--cache", cache] if mode == "data" else ["--parallel", "layers"])]
    proc = _torchrun(*args, script=[str(TESTS / "dist_slow_train.py")], env={"SAESCOPE_TEST_PIDS": str(pids)},
                     wait=False)
    try:
        deadline = time.time() + 240
        while len(list(pids.glob("*.pid"))) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        ranks = [int(p.read_text()) for p in pids.glob("*.pid")]
        assert len(ranks) == 2, proc.communicate(timeout=60)[0][-3000:] if proc.poll() is not None else "no pids"
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)  # both ranks, mid-training, after their first checkpoint
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    state = torch.load(run / "checkpoints" / "state.pt", weights_only=True)
    assert 0 < state["tokens_done"] < 3000 and not _saes(run)  # killed before the end
    out = _torchrun(*args)  # the same command again resumes
    assert "resuming training from" in out
    got, ref = _saes(run), _saes(uninterrupted)
    assert sorted(got) == sorted(ref) and len(ref) == 3
    for sae, params in ref.items():
        for name, p in params.items():
            assert torch.equal(got[sae][name], p), (sae, name)


def test_a_checkpoint_resumes_only_under_the_world_that_wrote_it(tmp_path):
    single = MultiTrainer(CFGS[:1], TrainConfig(**TC), checkpoint_dir=tmp_path)
    single.checkpoint()
    with pytest.raises(SaescopeError, match="written by 1 process.* single mode, not 2 in data mode"):
        MultiTrainer(CFGS[:1], TrainConfig(**TC), checkpoint_dir=tmp_path, world=World(0, 2, "data")).resume()
    assert MultiTrainer(CFGS[:1], TrainConfig(**TC), checkpoint_dir=tmp_path).resume()


@pytest.mark.parametrize("world,batch,layers,message", [
    (World(0, 4, "layers"), 128, [0, 1, 2], "--parallel layers with 4 processes needs at least 4 layers"),
    (World(0, 4, "data"), 6, [0], "--batch-size 6 is too small for 4 processes"),
])
def test_worlds_that_cannot_work_are_refused(world, batch, layers, message):
    from saescope.pipeline import _check_world

    with pytest.raises(SaescopeError, match=message):
        _check_world(world, TrainConfig(batch_size=batch), layers)
    _check_world(World(0, 2, world.mode), TrainConfig(batch_size=batch), layers)  # 2 processes can


def test_run_and_harvest_under_torchrun_are_refused(monkeypatch, tmp_path):
    from saescope.pipeline import harvest_to_cache, run_all

    monkeypatch.setenv("WORLD_SIZE", "2")
    for verb, call in (("run", run_all), ("harvest", harvest_to_cache)):
        with pytest.raises(SaescopeError, match=f"`saescope {verb}` is one process: under torchrun use"):
            call(tmp_path / "out")
    assert not (tmp_path / "out").exists()
