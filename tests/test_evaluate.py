"""Evaluation: ΔLM loss is zero for an identity SAE and large for zero-ablation; metrics count correctly."""

from __future__ import annotations

import pytest
import torch

from saescope.evaluate import delta_lm_loss, fidelity
from saescope.models import load_model
from saescope.sae import SAE, SAEConfig


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    """A tiny random model whose weights are scaled up so that its predictions are far from uniform
    (at the default init every site matters little and zero-ablation barely moves the loss)."""
    lm = load_model(str(tiny_model_dir))
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return lm


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
