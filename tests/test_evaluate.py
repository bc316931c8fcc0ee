"""Evaluation: ΔLM loss and KL are zero for an identity SAE and large for zero-ablation; the shared clean pass
matches a direct per-SAE computation; standard errors; metrics count correctly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import sharp_model

from saescope.errors import SaescopeError
from saescope.evaluate import _pick_targets, check_eval_args, delta_lm_loss, fidelity, ratio_se
from saescope.harvest import keep_mask, replace_site
from saescope.sae import SAE, SAEConfig


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return sharp_model(tiny_model_dir)


def identity_sae(d: int, site: str, layer: int) -> SAE:
    """ReLU SAE of width 2d with x = relu(x) − relu(−x): an exact reconstruction."""
    sae = SAE(SAEConfig(d_in=d, width=2 * d, architecture="relu", l0=d, site=site, layer=layer))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.w_enc.copy_(torch.cat([eye, -eye], 1))
        sae.w_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def _contexts(lm, n=3, seq=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(lm.tokenizer), (n, seq), generator=g)
    ids[:, 0] = lm.bos_id
    return ids.tolist()


@pytest.mark.parametrize("kind", ["resid_post", "attn_out", "mlp_out", "mlp_in"])
def test_identity_sae_has_zero_delta_and_zero_ablation_is_large(lm, kind):
    site = lm.site(kind, 1)
    saes = {"id": identity_sae(site.width, kind, 1)}
    out = delta_lm_loss(lm, saes, _contexts(lm), progress=False)["id"]
    assert out["delta_lm_loss"] == pytest.approx(0.0, abs=1e-4)
    assert out["ce_sae"] == pytest.approx(out["ce_clean"], abs=1e-4)
    # a random model can even predict better without a site, so "large" here means: the loss moves a lot
    # more than under the identity splice (the real-model integration test checks ce_zero > ce_clean)
    assert abs(out["ce_zero"] - out["ce_clean"]) > 0.01
    assert out["ce_recovered"] == pytest.approx(1.0, abs=1e-2)


def test_clean_ce_matches_the_model_loss(lm):
    """The clean CE over ordinary targets equals the HF loss when no position is special."""
    ctx = _contexts(lm, n=1, seq=12)
    ids = torch.tensor(ctx)
    with torch.no_grad():
        out = lm.model(input_ids=ids, labels=ids)
    site = lm.site("resid_post", 0)
    res = delta_lm_loss(lm, {"id": identity_sae(site.width, "resid_post", 0)}, ctx, progress=False)["id"]
    assert res["ce_clean"] == pytest.approx(float(out.loss), rel=1e-4)


def test_fidelity_counts():
    sae = identity_sae(4, "resid_post", 0)
    x = torch.tensor([[1.0, 0, 0, 0], [0, -2.0, 0, 0], [0, 0, 0, 0], [1.0, 1.0, 0, 0]])
    m = fidelity(sae, x)
    assert m["fvu"] == pytest.approx(0.0, abs=1e-12)
    assert m["l0"] == pytest.approx((1 + 1 + 0 + 2) / 4)
    # features 0 (x0>0), 1 (x1>0) and 5 (x1<0) fire; the other five never do
    assert m["dead_fraction"] == pytest.approx(5 / 8)
    assert m["dense_fraction"] == pytest.approx(3 / 8)


def noisy_sae(d: int, site: str, layer: int, scale: float, seed: int = 1) -> SAE:
    """An identity SAE whose decoder is perturbed: its splice moves the loss by an amount that grows with scale."""
    sae = identity_sae(d, site, layer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.w_dec.add_(scale * torch.randn(sae.w_dec.shape, generator=g))
    return sae


def test_kl_is_zero_for_an_identity_sae_and_positive_for_a_noisy_one(lm):
    site = lm.site("resid_post", 1)
    saes = {"id": identity_sae(site.width, "resid_post", 1), "noisy": noisy_sae(site.width, "resid_post", 1, 0.5)}
    out = delta_lm_loss(lm, saes, _contexts(lm, n=4), batch_size=2, progress=False)
    assert out["id"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert out["id"]["delta_lm_loss_se"] == pytest.approx(0.0, abs=1e-5)
    assert out["noisy"]["kl"] > 0.01 and out["noisy"]["kl_se"] > 0


def _direct(lm, sae, contexts, per_context, seed=0):
    """Reference: a full forward per variant (clean, spliced, zero) with the model's own head, no sharing."""
    ids = torch.tensor(contexts)
    keep = keep_mask(lm, ids)
    tgt = _pick_targets(keep, per_context, torch.Generator().manual_seed(seed))
    site = lm.site(sae.cfg.site, sae.cfg.layer)
    with torch.no_grad():
        lp = {"clean": F.log_softmax(lm.model(input_ids=ids).logits[:, :-1][tgt].float(), -1)}
        for name, fn in (("sae", lambda t: sae(t.float()).x_hat), ("zero", torch.zeros_like)):
            with replace_site(site, fn, keep):
                lp[name] = F.log_softmax(lm.model(input_ids=ids).logits[:, :-1][tgt].float(), -1)
    y = ids[:, 1:][tgt]
    ce = {k: float(-v.gather(1, y[:, None]).mean()) for k, v in lp.items()}
    kl = float((lp["clean"].exp() * (lp["clean"] - lp["sae"])).sum(-1).mean())
    return {"delta_lm_loss": ce["sae"] - ce["clean"], "kl": kl, "ce_zero": ce["zero"],
            "ce_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), "n": int(tgt.sum())}


@pytest.mark.parametrize("per_context", [None, 5])
def test_shared_clean_pass_matches_a_direct_computation_per_sae(lm, per_context):
    """Two SAEs at one site and one at another share the clean pass (and the zero pass per site);
    each SAE's numbers equal a full forward of its own, with the same sampled targets."""
    contexts = _contexts(lm, n=3, seq=12)
    a, b = lm.site("resid_post", 1), lm.site("attn_out", 2)
    saes = {"a1": noisy_sae(a.width, "resid_post", 1, 0.3, seed=1), "a2": noisy_sae(a.width, "resid_post", 1, 0.6, seed=2),
            "b": noisy_sae(b.width, "attn_out", 2, 0.5, seed=3)}
    got = delta_lm_loss(lm, saes, contexts, batch_size=4, per_context=per_context, progress=False)
    for key, sae in saes.items():
        want = _direct(lm, sae, contexts, per_context)
        assert got[key]["n_ce_tokens"] == want["n"]
        for name in ("delta_lm_loss", "kl", "ce_zero", "ce_recovered"):
            assert got[key][name] == pytest.approx(want[name], rel=1e-4, abs=1e-5), (key, name)
    assert got["a1"]["delta_lm_loss"] != pytest.approx(got["a2"]["delta_lm_loss"], abs=1e-3)


def test_ratio_se_is_the_standard_error_of_the_mean_for_unit_weights():
    r, se = ratio_se(torch.tensor([1.0, 2.0, 6.0]), torch.ones(3))
    assert r == pytest.approx(3.0)
    assert se == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2 / 3))
    assert math.isnan(ratio_se(torch.tensor([2.0]), torch.tensor([4.0]))[1])


def test_standard_errors_shrink_with_more_tokens(lm):
    """8 → 64 contexts: the ΔLM and KL standard errors fall by about sqrt(8) (asserted: by more than 1.5×)."""
    site = lm.site("resid_post", 1)
    saes = {"noisy": noisy_sae(site.width, "resid_post", 1, 0.5)}
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, len(lm.tokenizer), (64, 16), generator=g)
    ids[:, 0] = lm.bos_id
    few = delta_lm_loss(lm, saes, ids[:8].tolist(), batch_size=8, progress=False)["noisy"]
    many = delta_lm_loss(lm, saes, ids.tolist(), batch_size=16, progress=False)["noisy"]
    for key in ("delta_lm_loss_se", "kl_se"):
        assert 0 < many[key] < few[key] / 1.5, key
    # CE recovered is a ratio whose denominator (zero − clean) is small on a random model: only sane here
    assert 0 < many["ce_recovered_se"] < math.inf
    assert many["n_ce_contexts"] == 64 and many["n_ce_tokens"] == 64 * 15


def test_zero_pass_every_other_batch_pairs_with_the_same_contexts(lm):
    """With the zero pass on every 2nd batch, CE recovered uses only those contexts, for all three losses."""
    site = lm.site("resid_post", 1)
    saes = {"noisy": noisy_sae(site.width, "resid_post", 1, 0.5)}
    contexts = _contexts(lm, n=4, seq=12)
    half = delta_lm_loss(lm, saes, contexts, batch_size=2, zero_every=2, progress=False)["noisy"]
    first = delta_lm_loss(lm, saes, contexts[:2], batch_size=2, progress=False)["noisy"]
    assert half["n_zero_tokens"] == first["n_ce_tokens"] == 22 and half["n_ce_tokens"] == 44
    assert half["ce_recovered"] == pytest.approx(first["ce_recovered"], rel=1e-6)


def test_no_zero_pass_when_zero_every_is_0(lm):
    """zero_every=0 (recipe comparisons that need only ΔLM and KL): no zero-ablation pass, the same ΔLM."""
    site = lm.site("resid_post", 1)
    saes = {"noisy": noisy_sae(site.width, "resid_post", 1, 0.5)}
    contexts = _contexts(lm, n=4, seq=12)
    none = delta_lm_loss(lm, saes, contexts, batch_size=2, zero_every=0, progress=False)["noisy"]
    every = delta_lm_loss(lm, saes, contexts, batch_size=2, progress=False)["noisy"]
    assert "ce_recovered" not in none and "ce_recovered" in every
    assert none["delta_lm_loss"] == pytest.approx(every["delta_lm_loss"], rel=1e-6)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8"])
def test_bad_ce_tokens_are_refused_in_one_line(bad):
    with pytest.raises(SaescopeError, match=r"^--ce-tokens must be 0 \(skip ΔLM\) or a positive whole number"):
        check_eval_args(8192, bad)
