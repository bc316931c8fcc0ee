"""Harvested activations equal the model's own outputs; special positions are dropped."""

from __future__ import annotations

import pytest
import torch

from saescope.errors import SaescopeError
from saescope.harvest import activations, harvest, keep_mask
from saescope.models import SITE_KINDS, load_model


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _ids(lm, batch=2, seq=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, len(lm.tokenizer), (batch, seq), generator=g)
    ids[:, 0] = lm.bos_id
    return ids


def test_finds_every_site_with_widths(lm):
    sites = lm.sites()
    assert len(sites) == lm.n_layers * len(SITE_KINDS)
    by_kind = {s.kind: s for s in sites if s.layer == 0}
    assert by_kind["resid_post"].width == lm.d_model
    assert by_kind["mlp_out"].width == lm.d_model
    assert by_kind["mlp_in"].width == lm.d_model
    assert by_kind["attn_out"].width > 0
    assert by_kind["resid_post"].hook_name == f"{lm.layers_path}.0.output"


def test_resid_post_equals_hidden_states(lm):
    ids = _ids(lm)
    with torch.no_grad():
        ref = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    sites = lm.sites(kinds=["resid_post"])
    got = activations(lm, ids, sites)
    # hidden_states[L+1] is the output of layer L, except the last, which has the final norm applied
    for layer in range(lm.n_layers - 1):
        torch.testing.assert_close(got[f"resid_post/{layer}"], ref[layer + 1])
    torch.testing.assert_close(lm.final_norm()(got[f"resid_post/{lm.n_layers - 1}"]), ref[-1])


def test_other_sites_equal_module_io(lm):
    ids = _ids(lm)
    sites = [s for s in lm.sites() if s.kind != "resid_post"]
    seen = {}
    handles = []
    for s in sites:
        if s.io == "output":
            handles.append(s.module.register_forward_hook(lambda m, a, o, k=s.key: seen.__setitem__(k, o.clone())))
        else:
            handles.append(s.module.register_forward_pre_hook(lambda m, a, k=s.key: seen.__setitem__(k, a[0].clone())))
    with torch.no_grad():
        lm.model(input_ids=ids)
    for h in handles:
        h.remove()
    got = activations(lm, ids, sites)
    assert set(got) == set(seen)
    for k in seen:
        torch.testing.assert_close(got[k], seen[k])


@pytest.mark.parametrize("kind, io", [("resid_post", "output"), ("attn_out", "input")])
def test_site_hook_reads_and_replaces(lm, kind, io):
    site, ids = lm.site(kind, 0), _ids(lm)
    assert site.io == io
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
    seen, after = [], []
    h = site.hook(lambda t: seen.append(t.clone()))  # returns None: reads only
    try:
        with torch.no_grad():
            torch.testing.assert_close(lm.model(input_ids=ids).logits, ref)
    finally:
        h.remove()
    assert seen[0].shape == (*ids.shape, site.width)
    handles = [site.hook(lambda t: torch.full_like(t, 0.5)), site.hook(lambda t: after.append(t.clone()))]
    try:
        with torch.no_grad():
            replaced = lm.model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    assert bool((after[0] == 0.5).all()) and not torch.allclose(replaced, ref)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=ids).logits, ref)  # handles removed: the model is as before


def test_stops_after_last_needed_layer(lm):
    calls = []
    h = lm.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    try:
        activations(lm, _ids(lm), [lm.site("resid_post", 0)])
    finally:
        h.remove()
    assert calls == []


def test_harvest_drops_special_positions_and_counts_tokens(lm):
    tok = lm.tokenizer
    ids = _ids(lm, batch=3, seq=10)
    ids[0, 5] = tok.eos_token_id
    ids[2, 7:] = tok.pad_token_id
    contexts = ids.tolist()
    batches = list(harvest(lm, contexts, lm.sites(kinds=["resid_post"], layers=[0, 1]), batch_size=2, progress=False))
    n_ordinary = int(keep_mask(lm, ids).sum())
    assert sum(len(b.token_ids) for b in batches) == n_ordinary == 3 * 9 - 1 - 3
    all_tokens = torch.cat([b.token_ids for b in batches])
    assert not torch.isin(all_tokens, torch.tensor(sorted(lm.special_ids))).any()
    full = activations(lm, ids, [lm.site("resid_post", 1)])["resid_post/1"]
    for b in batches:
        torch.testing.assert_close(b.acts["resid_post/1"], full[b.ctx, b.pos])
        assert torch.equal(b.token_ids, ids[b.ctx, b.pos])
    assert [b.n_contexts for b in batches] == [2, 1]


def test_harvest_skip_and_max_tokens(lm):
    contexts = _ids(lm, batch=6, seq=8).tolist()
    sites = [lm.site("resid_post", 0)]
    first = list(harvest(lm, contexts, sites, batch_size=2, max_tokens=10, progress=False))
    assert sum(b.n_contexts for b in first) == 2  # 14 tokens >= 10: stops after a whole batch
    rest = list(harvest(lm, contexts, sites, batch_size=2, skip_contexts=2, progress=False))
    assert int(rest[0].ctx[0]) == 2
    whole = list(harvest(lm, contexts, sites, batch_size=2, progress=False))
    torch.testing.assert_close(torch.cat([b.acts["resid_post/0"] for b in first + rest]),
                               torch.cat([b.acts["resid_post/0"] for b in whole]))


def test_bad_sites_and_layers(lm):
    with pytest.raises(SaescopeError, match="layer 99 does not exist"):
        lm.site("resid_post", 99)
    with pytest.raises(SaescopeError, match="unknown site"):
        lm.site("resid_pre_banana", 0)


def test_missing_model_errors(tmp_path):
    with pytest.raises(SaescopeError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(SaescopeError, match="not found"):
        load_model("definitely-not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaescopeError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(SaescopeError, match="cannot read GGUF"):
        load_model(str(bad))
