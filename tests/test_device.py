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


def _step_gradients(device: str, dense: bool, arch: str) -> tuple[float, dict]:
    """Loss and gradients of one training step of a fresh trainer on `device`, on a batch other than the one its
    thresholds were set from (on that batch one pre-activation per feature sits exactly on θ, so rounding alone
    decides whether it fires: 1e-7 relative noise there moves the loss by 2% and the gradients by 5–11%)."""
    from saescope.sae import SAEConfig
    from saescope.train import SAETrainer, TrainConfig

    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(24, 24, generator=gen)
    x0, x1 = (torch.randn(1024, 24, generator=gen) @ mix for _ in range(2))
    cfg = SAEConfig(d_in=24, width=512, architecture=arch, l0=6, site="resid_post", layer=0)
    t = SAETrainer(cfg, TrainConfig(tokens=10**6, batch_size=1024, bf16_matmuls=False), device=device, dense=dense)
    t._first_batch(x0.to(device), 1024)
    xn = x1.to(device) / t.scale
    fwd = (t._forward_dense if dense else t._forward_sparse)(xn, t._log_lambda.exp().float(), (0, 1024))
    fwd.loss.backward()
    grads = {n: getattr(t.sae, n).grad for n in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")}
    return float(fwd.loss.detach()), {n: g.detach().cpu() for n, g in grads.items() if g is not None}


def _assert_same_step(a: tuple[float, dict], b: tuple[float, dict], tol: float) -> None:
    assert a[1].keys() == b[1].keys()
    assert abs(a[0] - b[0]) <= tol * abs(a[0]), (a[0], b[0])
    for name, g in a[1].items():
        rel = float((g - b[1][name]).norm() / g.norm().clamp_min(1e-30))
        assert rel <= tol, (name, rel)


@pytest.mark.parametrize("arch", ["jump_relu", "batchtopk", "topk"])
def test_one_step_dense_and_sparse_give_the_same_gradients(arch):
    """The comparison the CUDA test below makes, here on the CPU: the dense step's gradients are the sparse step's."""
    _assert_same_step(_step_gradients("cpu", False, arch), _step_gradients("cpu", True, arch), tol=1e-5)


@cuda
@pytest.mark.parametrize("arch", ["jump_relu", "batchtopk", "topk"])
def test_cuda_step_gives_the_cpu_gradients(arch):
    """The GPU's step (dense, fused, TF32 off) gives the CPU's loss and gradients (sparse kernels) on the same
    activations. (It replaces a comparison of SAEs after 16 steps from the threshold-setting batch, which failed on
    both H100 machines of 2026-11-26: rounding noise of 1e-7 in the pre-activations fails it on the CPU too.)"""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _assert_same_step(_step_gradients("cpu", False, arch), _step_gradients("cuda", True, arch), tol=1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


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


def test_dense_kernels_match_autograd_through_the_reference_functions():
    """kernels.dense_pre_acts / dense_jump_relu / dense_gate: the same values and gradients as autograd through
    addmm, JumpReLUFn + StepFn and relu × mask (the GPU runs them fused by torch.compile; here eagerly)."""
    from saescope.kernels import dense_gate, dense_jump_relu, dense_pre_acts
    from saescope.sae import JumpReLUFn, StepFn

    torch.manual_seed(1)
    B, d, W, eps = 32, 12, 96, 0.5
    xn = torch.randn(B, d)
    leaves = [torch.randn(d, dtype=torch.float32).mul_(0.1), torch.randn(d, W) * 0.5, torch.randn(W) * 0.1,
              torch.rand(W) * 0.8 + 0.05]
    g_f, g_n = torch.randn(B, W), 0.7
    keep = torch.rand(B, W) < 0.3

    def grads(fn):
        ps = [p.clone().requires_grad_() for p in leaves]
        f, n, per_feature = fn(*ps)
        ((f * g_f).sum() + g_n * n).backward()
        return [f.detach(), n.detach(), per_feature] + [p.grad for p in ps]

    def reference_jump(b_dec, w_enc, b_enc, theta):
        z = torch.addmm(b_enc, xn - b_dec, w_enc)
        return JumpReLUFn.apply(z, theta, eps), StepFn.apply(z, theta, eps).sum(), (z > theta).sum(0)

    def fused_jump(b_dec, w_enc, b_enc, theta):
        return dense_jump_relu(dense_pre_acts(xn, b_dec, w_enc, b_enc), theta, eps)

    def reference_gate(b_dec, w_enc, b_enc, theta):
        z = torch.addmm(b_enc, xn - b_dec, w_enc)
        f = z.relu() * keep
        return f, (f * theta).sum(), ((z > 0) & keep).sum(0)  # theta here: a stand-in leaf that sees f

    def fused_gate(b_dec, w_enc, b_enc, theta):
        f, per_feature = dense_gate(dense_pre_acts(xn, b_dec, w_enc, b_enc), keep)
        return f, (f * theta).sum(), per_feature

    for ref, new in ((reference_jump, fused_jump), (reference_gate, fused_gate)):
        for a, b in zip(grads(ref), grads(new)):
            assert a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-5), \
                (ref.__name__, float((a.float() - b.float()).abs().max()))
        z = torch.addmm(leaves[2], xn - leaves[0], leaves[1])
        window = int(((z - leaves[3]).abs() < eps / 2).sum())
        assert window > 0  # the θ gradient's STE window is not empty, so it was compared


@cuda
def test_fused_kernels_on_cuda_give_the_eager_values():
    """On a GPU the gates run compiled by torch.compile (kernels._fuse): the same outputs as the eager functions."""
    from saescope import kernels

    torch.manual_seed(2)
    z, g = torch.randn(512, 2048, device="cuda"), torch.randn(512, 2048, device="cuda")
    theta, keep = torch.rand(2048, device="cuda"), torch.rand(512, 2048, device="cuda") < 0.1
    eps, g_n = torch.tensor(0.5, device="cuda"), torch.tensor(0.3, device="cuda")
    for fn, args in ((kernels._jump_forward, (z, theta)), (kernels._jump_backward, (z, theta, g, g_n, eps)),
                     (kernels._gate_forward, (z, keep)), (kernels._gate_backward, (z, keep, g))):
        fused, eager = fn(*args), fn.eager(*args)
        for a, b in zip(fused if isinstance(fused, tuple) else (fused,), eager if isinstance(eager, tuple) else (eager,)):
            assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-5), fn.__name__


@cuda
@pytest.mark.parametrize("arch", ["jump_relu", "batchtopk", "topk"])
def test_cuda_graph_steps_are_the_eager_steps(arch):
    """The step replayed as a CUDA graph (TrainConfig.cuda_graphs) gives the eager step's losses and SAE, through
    a capture per variant (auxiliary loss off, then on once features die), lr changes and a revival (step 16)."""
    from saescope.sae import SAEConfig
    from saescope.train import SAETrainer, TrainConfig

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        x = (torch.randn(20, 64, 24) @ torch.randn(24, 24)).cuda()
        cfg = SAEConfig(d_in=24, width=512, architecture=arch, l0=3, site="resid_post", layer=0)
        train = {"tokens": 20 * 64, "batch_size": 64, "dead_tokens": 256, "optimizer": "adam"}  # (auto: sf-adam
        # for topk, which steps eagerly)
        trainers = [SAETrainer(cfg, TrainConfig(**train, cuda_graphs=g), device="cuda") for g in (False, True)]
        for step in range(20):
            losses = []
            for t in trainers:
                losses.append(float(t.step_on(x[step]).loss))  # (a graph's stats: read before its next replay)
                t.poll()
            assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-6), step
        eager, graphed = trainers
        assert not graphed.graph_off and len(graphed._graphs) == 2, (graphed.graph_off, list(graphed._graphs))
        assert not eager._graphs
        for name in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"):
            p, q = getattr(eager.sae, name).detach(), getattr(graphed.sae, name).detach()
            assert torch.allclose(p, q, rtol=1e-3, atol=1e-5), (name, float((p - q).abs().max()))
        assert eager.ema == pytest.approx(graphed.ema, rel=1e-4)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@cuda
@pytest.mark.parametrize("arch", ["jump_relu", "batchtopk"])
def test_bf16_matmuls_train_as_well_as_fp32(arch):
    """bf16 matrix products (TrainConfig.bf16_matmuls) keep fp32 weights and thresholds and reach the fp32 step's
    reconstruction: the same training FVU within 0.03 after 200 steps (fp32 there: 0.76 JumpReLU, 0.50 BatchTopK
    on the CPU)."""
    from saescope.sae import SAEConfig
    from saescope.train import SAETrainer, TrainConfig

    torch.manual_seed(0)
    x = (torch.randn(200, 256, 24) @ torch.randn(24, 24)).cuda()
    cfg = SAEConfig(d_in=24, width=256, architecture=arch, l0=8, site="resid_post", layer=0)
    out = []
    for bf16 in (False, True):
        t = SAETrainer(cfg, TrainConfig(tokens=200 * 256, batch_size=256, bf16_matmuls=bf16), device="cuda")
        for step in range(200):
            t.step_on(x[step])
        t.poll()
        assert t.sae.w_enc.dtype == t.sae.threshold.dtype == torch.float32
        out.append(t.ema)
    assert out[0]["fvu"] < 0.9  # it learned something
    assert out[1]["fvu"] == pytest.approx(out[0]["fvu"], abs=0.03), out


def test_decoding_uses_as_many_cpu_threads_as_cores_are_idle(monkeypatch):
    import os

    assert 0.0 <= devices.idle_cpus(0.05) <= (os.cpu_count() or 1) + 1e-6
    cpu, old = torch.device("cpu"), torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        for idle, inside in ((1.6, 2), (0.3, 1), (9.0, 4)):  # never fewer than one, never more than torch's own
            monkeypatch.setattr(devices, "idle_cpus", lambda sample_s=0.1, idle=idle: idle)
            with devices.decode_threads(cpu):
                assert torch.get_num_threads() == inside
                monkeypatch.setattr(devices, "idle_cpus", lambda sample_s=0.1: 0.0)
                with devices.decode_threads(cpu):  # a nested use keeps the outer count
                    assert torch.get_num_threads() == inside
            assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(old)
