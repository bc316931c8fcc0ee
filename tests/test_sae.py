"""SAE modules: STE gradients, folding, save/load, the sparse kernels vs naive references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saescope.errors import SaescopeError
from saescope.formats import load_sae
from saescope.kernels import Active, code_grad_probe, gather_pre_acts, sparse_decode
from saescope.sae import SAE, JumpReLUFn, SAEConfig, StepFn


def _sae(arch="jump_relu", d=16, w=64, pre_bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = SAE.init(SAEConfig(d_in=d, width=w, architecture=arch, l0=4, pre_bias=pre_bias, layer=1, site="resid_post"), g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=g)
        sae.b_dec.normal_(0, 0.1, generator=g)
        sae.threshold.uniform_(0.05, 0.3, generator=g)
    return sae


def _smoothed(z, theta, eps):
    """Step H(z−θ) convolved with the rectangle kernel of width eps (what the STE differentiates)."""
    return ((z - theta) / eps + 0.5).clamp(0, 1)


def test_step_ste_matches_finite_difference_of_smoothed_l0():
    torch.manual_seed(0)
    eps = 0.01
    z = torch.rand(4000, 3, dtype=torch.float64)  # many pre-activations around the thresholds
    theta = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64, requires_grad=True)
    StepFn.apply(z, theta, eps).sum().backward()
    h = 1e-7  # much smaller than eps, so few points sit within h of the window's edges
    for j in range(3):
        tp, tm = theta.detach().clone(), theta.detach().clone()
        tp[j] += h
        tm[j] -= h
        fd = (_smoothed(z, tp, eps).sum() - _smoothed(z, tm, eps).sum()) / (2 * h)
        assert theta.grad[j].item() == pytest.approx(fd.item(), rel=1e-3)


def test_jumprelu_ste_matches_finite_difference_of_smoothed_output():
    """∂/∂θ z·H(z−θ) ≈ −(θ/ε)K: equals the smoothed derivative −(z/ε)K up to O(ε/θ)."""
    torch.manual_seed(0)
    eps = 0.002
    z = torch.rand(20000, 2, dtype=torch.float64)
    theta = torch.tensor([0.4, 0.6], dtype=torch.float64, requires_grad=True)
    JumpReLUFn.apply(z, theta, eps).sum().backward()
    h = 1e-8
    for j in range(2):
        tp, tm = theta.detach().clone(), theta.detach().clone()
        tp[j] += h
        tm[j] -= h
        fd = ((z * _smoothed(z, tp, eps)).sum() - (z * _smoothed(z, tm, eps)).sum()) / (2 * h)
        assert theta.grad[j].item() == pytest.approx(fd.item(), rel=2 * eps / theta[j].item())
    # and the gradient w.r.t. z is the gate H(z − θ)
    z2 = torch.tensor([0.1, 0.9], dtype=torch.float64, requires_grad=True)
    JumpReLUFn.apply(z2, torch.tensor([0.5, 0.5], dtype=torch.float64), eps).sum().backward()
    assert z2.grad.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("arch", ["jump_relu", "topk", "relu"])
def test_folding_leaves_reconstructions_unchanged(arch):
    sae = _sae(arch, pre_bias=True)
    x = torch.randn(50, 16) * 7.0
    scale = 7.0
    ref = sae(x / scale).x_hat * scale
    folded = sae.folded(scale)
    assert folded.cfg.pre_bias is False
    torch.testing.assert_close(folded(x).x_hat, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x).f, sae(x / scale).f * scale, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip_bit_exact(tmp_path):
    sae = _sae()
    folder = sae.save(tmp_path / "resid_post" / sae.cfg.folder_name)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "jump_relu" and cfg["width"] == 64 and cfg["hf_hook_point_in"] == ""
    loaded = load_sae(folder)
    for name in ("w_enc", "b_enc", "w_dec", "b_dec", "threshold"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    x = torch.randn(8, 16)
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)
    # saving again over an existing folder replaces it atomically
    sae2 = _sae(seed=1)
    sae2.save(folder)
    assert torch.equal(load_sae(folder).w_enc, sae2.w_enc)


def test_load_gemma_scope_1_npz(tmp_path):
    sae = _sae()
    folder = tmp_path / "layer_5" / "width_16k" / "average_l0_4"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{n: getattr(sae, n).detach().numpy() for n in ("w_enc", "b_enc", "w_dec", "b_dec", "threshold")})
    loaded = load_sae(folder)
    assert loaded.cfg.layer == 5 and loaded.cfg.l0 == 4 and loaded.cfg.architecture == "jump_relu"
    x = torch.randn(8, 16)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)


def test_hostile_and_bad_files(tmp_path):
    sae = _sae()
    folder = sae.save(tmp_path / "s")
    # wrong shape in config vs tensors
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "width": 999}))
    with pytest.raises(SaescopeError, match="width 999"):
        load_sae(folder)
    # corrupt config
    (folder / "config.json").write_text("{not json")
    with pytest.raises(SaescopeError, match="not valid JSON"):
        load_sae(folder)
    # oversized safetensors header
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "params.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(SaescopeError, match="header"):
        load_sae(folder)
    # pickles are never loaded
    pk = tmp_path / "layer_1" / "p"
    pk.mkdir(parents=True)
    np.save(pk / "x.npy", np.array([object()], dtype=object), allow_pickle=True)
    (pk / "params.npz").write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(SaescopeError, match="safely"):
        load_sae(pk)
    with pytest.raises(SaescopeError, match="not found"):
        load_sae(tmp_path / "missing")


def test_nan_params_rejected(tmp_path):
    sae = _sae()
    with torch.no_grad():
        sae.w_dec[0, 0] = float("nan")
    folder = sae.save(tmp_path / "nan")
    with pytest.raises(SaescopeError, match="NaN"):
        load_sae(folder)


@pytest.mark.parametrize("bad", [dict(width=0), dict(l0=64), dict(l0=100), dict(architecture="gated2")])
def test_bad_configs(bad):
    with pytest.raises(SaescopeError):
        SAEConfig(**{**dict(d_in=16, width=64, l0=4), **bad})


@pytest.mark.parametrize("layout", ["topk", "mask"])
def test_sparse_kernels_match_dense_reference(layout):
    torch.manual_seed(0)
    b, d, w, k = 32, 16, 64, 5
    x = torch.randn(b, d)
    w_enc = torch.randn(d, w, requires_grad=True)
    b_enc = torch.randn(w, requires_grad=True)
    b_dec = torch.randn(d, requires_grad=True)
    w_dec = torch.randn(w, d, requires_grad=True)
    if layout == "topk":
        mask = torch.zeros(b, w, dtype=torch.bool).scatter(1, torch.stack([torch.randperm(w)[:k] for _ in range(b)]), True)
        act = Active.from_topk(mask.nonzero()[:, 1].view(b, k))
    else:  # ragged rows, including an empty one
        mask = torch.rand(b, w) < 0.1
        mask[3] = False
        act = Active.from_mask(mask)
    coef = torch.randn(b, w)

    def run(sparse: bool):
        for p in (w_enc, b_enc, b_dec, w_dec):
            p.grad = None
        if sparse:
            x_in = x - b_dec.detach()
            z = (x_in @ w_enc + b_enc).detach()
            z_sel = gather_pre_acts(z[act.rows, act.cols], x_in, w_enc, b_enc, b_dec, act)
            out = sparse_decode(z_sel * coef[act.rows, act.cols], act, w_dec)
        else:
            z = (x - b_dec) @ w_enc + b_enc
            out = (z * coef * mask) @ w_dec
        out.pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in (w_enc, b_enc, b_dec, w_dec)]

    out_s, grads_s = run(True)
    out_d, grads_d = run(False)
    torch.testing.assert_close(out_s, out_d)
    for gs, gd in zip(grads_s, grads_d):
        torch.testing.assert_close(gs, gd, rtol=1e-4, atol=1e-4)


def test_code_grad_probe_gives_the_decoders_code_gradient():
    torch.manual_seed(0)
    b, d, w = 16, 8, 32
    mask = torch.rand(b, w) < 0.2
    mask[5] = False
    act = Active.from_mask(mask)
    w_dec, r = torch.randn(w, d), torch.randn(b, d)
    grads = []
    for probe in (True, False):
        vals = torch.zeros(act.cols.numel(), requires_grad=True)
        out = code_grad_probe(vals, act, w_dec) if probe else sparse_decode(vals, act, w_dec)
        assert torch.equal(out, torch.zeros(b, d))
        (out * r).sum().backward()
        grads.append(vals.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().min() > 0


def test_active_offsets():
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    act = Active.from_mask(mask)
    assert act.offsets.tolist() == [0, 2, 2]
    assert act.rows.tolist() == [0, 0, 2, 2, 2, 2]
    assert act.cols.tolist() == [0, 2, 0, 1, 2, 3]
    sub = act.subset(torch.tensor([True, False, False, True, False, True]))
    assert sub.rows.tolist() == [0, 2, 2] and sub.cols.tolist() == [0, 1, 3] and sub.offsets.tolist() == [0, 1, 1]
    m = torch.arange(12.0).view(3, 4)
    assert act.read(m).tolist() == [0.0, 2.0, 8.0, 9.0, 10.0, 11.0]
    both = act.cat(sub)  # sub's rows follow act's three
    assert both.rows.tolist() == [0, 0, 2, 2, 2, 2, 3, 5, 5] and both.cols.tolist() == [0, 2, 0, 1, 2, 3, 0, 1, 3]
    assert both.offsets.tolist() == [0, 2, 2, 6, 7, 7]
