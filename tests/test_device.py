"""`--device` on every verb, and the whole pipeline on a CUDA GPU (those tests skip without one).

The CUDA tests run on a GPU machine with `pytest tests/test_device.py`; on this project's CI (no GPU) they
skip with the reason, and the CPU tests check the option, its errors and what the manifest records.
"""

from __future__ import annotations

import json

import click
import pytest
import torch
from test_cli import corpus, run_cli  # noqa: F401  (fixture)

from saescope import devices
from saescope.cli import cli

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")


@pytest.fixture(autouse=True)
def _reset_device():
    yield
    devices.use("auto")


def _verbs(group: click.Group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _verbs(cmd, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), cmd


def test_every_verb_takes_device():
    missing = [name for name, cmd in _verbs(cli) if "--device" not in {o for p in cmd.params for o in p.opts}]
    assert not missing, f"verbs without --device: {missing}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(capsys, tiny_gemma_dir):
    code, _, err = run_cli(capsys, "sites", tiny_gemma_dir, "--device", "cuda")
    assert code == 1 and err.count("\n") == 1 and "no CUDA GPU" in err and "--device cpu" in err


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "cuda:99"])
def test_bad_device_is_one_line(capsys, tiny_gemma_dir, spec):
    code, _, err = run_cli(capsys, "sites", tiny_gemma_dir, "--device", spec)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err and "--device" in err


def test_manifest_records_the_device_of_each_stage(capsys, tiny_gemma_dir, corpus, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", tiny_gemma_dir, "--corpus", corpus, "--layers", "0",
                           "--widths", 32, "--l0", 4, "--tokens", 600, "--ctx-len", 32, "--out", run,
                           "--device", "cpu")
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", run, "--tokens", 200, "--ce-tokens", 64, "--device", "cpu")
    assert code == 0, err
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["train"]["device"] == "cpu" and stages["eval"]["device"] == "cpu"


def test_prefetch_on_the_cpu_gives_the_same_tensors():
    import numpy as np

    batches = [{"a": np.arange(6, dtype=np.float16).reshape(2, 3)}, {"a": torch.ones(2, 3)}]
    out = list(devices.prefetch(iter(batches), torch.device("cpu")))
    assert torch.equal(out[0]["a"], torch.arange(6, dtype=torch.float16).reshape(2, 3))
    assert torch.equal(out[1]["a"], torch.ones(2, 3))


# ------------------------------------------------------------------------------------------- on a GPU


@cuda
def test_prefetch_to_cuda_keeps_values_and_order():
    import numpy as np

    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((64, 8)).astype(np.float16)} for _ in range(7)]
    out = list(devices.prefetch(iter(batches), torch.device("cuda"), depth=2))
    assert len(out) == 7 and all(o["x"].device.type == "cuda" for o in out)
    for b, o in zip(batches, out):
        assert torch.equal(o["x"].cpu(), torch.from_numpy(b["x"]))


@cuda
def test_pipeline_on_cuda(capsys, tiny_gemma_dir, corpus, tmp_path):  # noqa: F811
    """train (live and from a cache) → eval → analyze → inspect → feature → steer, all with --device cuda."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    common = ["--model", tiny_gemma_dir, "--corpus", corpus, "--ctx-len", 32]
    steps = [
        ["train", *common, "--layers", "0,2", "--widths", 64, "--l0", 4, "--tokens", 2000, "--out", run],
        ["harvest", *common, "--layers", "0,2", "--tokens", 1500, "--out", cache],
        ["train", *common, "--layers", "0,2", "--widths", 64, "--l0", 4, "--arch", "batchtopk", "--tokens", 1200,
         "--cache", cache, "--out", tmp_path / "run_cache"],
        ["eval", run, "--tokens", 500, "--ce-tokens", 128],
        ["analyze", run, "--tokens", 500],
        ["inspect", run, "the king of france"],
        ["feature", run, "resid_post/layer_0_width_64_l0_4", 0],
        ["steer", run, "the king", "--feature", "0:3=4", "--max-new-tokens", 5],
    ]
    for args in steps:
        code, _, err = run_cli(capsys, *args, "--device", "cuda")
        assert code == 0, f"{args[0]}: {err}"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["train"]["device"].startswith("cuda")
    metrics = json.loads((run / "eval.json").read_text())["saes"]
    assert all(0 <= m["fvu"] < 2 for m in metrics.values())


@cuda
def test_cuda_training_matches_the_cpu(tiny_gemma_dir):
    """The same activations, trained in fp32 on the CPU and on the GPU (TF32 off), give close SAEs."""
    from saescope.sae import SAEConfig
    from saescope.train import Chunk, MultiTrainer, TrainConfig

    torch.manual_seed(0)
    x = torch.randn(4096, 32) @ torch.randn(32, 32)
    cfg = SAEConfig(d_in=32, width=128, architecture="jump_relu", l0=6, site="resid_post", layer=0)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        saes = {}
        for dev in ("cpu", "cuda"):
            mt = MultiTrainer([cfg], TrainConfig(tokens=4096, batch_size=256), device=dev)
            mt.fit([Chunk({"resid_post/0": x.to(dev)}, 1)], progress=False)
            saes[dev] = mt.trainers[0].export()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    for name in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"):
        a, b = getattr(saes["cpu"], name).detach(), getattr(saes["cuda"], name).detach()
        assert torch.allclose(a, b, rtol=1e-2, atol=1e-3), name


@cuda
def test_nan_input_on_cuda_stops_only_its_sae():
    from saescope.sae import SAEConfig
    from saescope.train import Chunk, MultiTrainer, TrainConfig

    x = torch.randn(2048, 16, device="cuda")
    bad = x.clone()
    bad[100] = float("nan")
    cfgs = [SAEConfig(d_in=16, width=64, architecture="topk", l0=4, site="resid_post", layer=i) for i in (0, 1)]
    mt = MultiTrainer(cfgs, TrainConfig(tokens=2048, batch_size=128), device="cuda")
    mt.fit([Chunk({"resid_post/0": x, "resid_post/1": bad}, 1)], progress=False)
    assert not mt.trainers[0].failed and mt.trainers[1].failed
    assert len(mt.failures) == 1


@pytest.mark.parametrize("arch", ["jump_relu", "topk", "batchtopk", "relu"])
def test_dense_step_is_the_sparse_step(arch):
    """The GPU's dense step and the CPU's sparse-kernel step compute the same update (here both on the CPU),
    with the auxiliary loss on (dead features after 32 tokens)."""
    from saescope.sae import SAEConfig
    from saescope.train import SAETrainer, TrainConfig

    torch.manual_seed(0)
    x = torch.randn(6, 64, 24) @ torch.randn(24, 24)
    cfg = SAEConfig(d_in=24, width=512, architecture=arch, l0=3, site="resid_post", layer=0)
    train = TrainConfig(tokens=6 * 64, batch_size=64, dead_tokens=32, optimizer="adam")
    sparse, dense = SAETrainer(cfg, train, dense=False), SAETrainer(cfg, train, dense=True)
    for step in range(6):
        a, b = sparse.step_on(x[step]), dense.step_on(x[step])
        assert torch.allclose(a.loss, b.loss, rtol=1e-4, atol=1e-6), (step, float(a.loss), float(b.loss))
    assert sparse._n_dead > 0 or arch == "relu"  # the auxiliary loss took part (ReLU fires everywhere here)
    for name in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"):
        p, q = getattr(sparse.sae, name).detach(), getattr(dense.sae, name).detach()
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-5), (name, float((p - q).abs().max()))
    assert sparse.log_lambda == pytest.approx(dense.log_lambda, rel=1e-6)
