"""Steering: interventions change exactly what they claim, never leak hooks, and are measured honestly."""

from __future__ import annotations

import math

import pytest
import torch

from saescope import steer as st
from saescope.errors import SaescopeError
from saescope.featuredb import FeatureDB, FeatureStats
from saescope.harvest import capture
from saescope.models import load_model
from saescope.runs import Run
from saescope.sae import SAE, SAEConfig
from saescope.steer import Intervention, parse_feature_spec, steering


@pytest.fixture(scope="module")
def lm_any(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def lm(tiny_gemma_dir):
    return load_model(str(tiny_gemma_dir))


def _ids(lm, seq=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(lm.tokenizer), (2, seq), generator=g)
    ids[:, 0] = lm.bos_id
    return ids


def _site_acts(lm, ids, site):
    """The activation at `site` as the model sees it (hooks registered now run after any steering hook)."""
    with capture(lm, [site], stop_early=False) as store, torch.no_grad():
        logits = lm.model(input_ids=ids, use_cache=False).logits
        return store[site.key].detach().clone(), logits


def make_sae(lm, layer=1, site="resid_post", seed=0, arch="jump_relu"):
    """A random SAE whose thresholds let ~20% of features fire on this model's activations;
    feature 0 fires everywhere, feature 1 never fires."""
    s = lm.site(site, layer)
    g = torch.Generator().manual_seed(seed)
    sae = SAE.init(SAEConfig(d_in=s.width, width=64, l0=4, site=site, layer=layer, architecture=arch), g)
    with torch.no_grad():
        x, _ = _site_acts(lm, _ids(lm, seq=16, seed=seed + 7), s)
        z = sae.pre_acts(x[:, 1:].reshape(-1, s.width))
        sae.threshold.copy_(z.quantile(0.8, dim=0).clamp_min(1e-3))
        sae.b_enc[0] = 1.0 - z[:, 0].min()  # z_0 >= 1 on typical tokens
        sae.threshold[0] = 0.5
        sae.threshold[1] = 1e6
    return sae


def _no_hooks(lm):
    """No hooks but the one `load_model` puts on the LM head for good (its input made contiguous)."""
    head = lm.model.get_output_embeddings()
    return all(not m._forward_hooks and len(m._forward_pre_hooks) == (m is head) for m in lm.model.modules())


# ---------------------------------------------------------------------------- mechanics (all families)


@pytest.mark.parametrize("site_kind", ["resid_post", "attn_out", "mlp_out"])
def test_add_changes_the_site_by_exactly_the_vector(lm_any, site_kind):
    lm = lm_any
    site = lm.site(site_kind, 1)
    sae = make_sae(lm, 1, site_kind)
    ids = _ids(lm)
    clean, _ = _site_acts(lm, ids, site)
    earlier, _ = _site_acts(lm, ids, lm.site("resid_post", 0))
    strength, typ = 3.0, 2.5
    with steering(lm, {"s": sae}, [Intervention("s", 5, "add", strength)], typical={("s", 5): typ}):
        steered, _ = _site_acts(lm, ids, site)
        earlier_steered, _ = _site_acts(lm, ids, lm.site("resid_post", 0))
    delta = steered - clean
    expect = (strength * typ * sae.w_dec[5]).detach().expand_as(delta[:, 1:])
    torch.testing.assert_close(delta[:, 1:], expect, atol=1e-5, rtol=1e-5)
    assert torch.equal(steered[:, 0], clean[:, 0])  # BOS untouched
    assert torch.equal(earlier_steered, earlier)  # nothing upstream moved
    assert _no_hooks(lm)


def test_clamp_sets_the_code_and_keeps_the_error(lm_any):
    lm = lm_any
    site = lm.site("resid_post", 1)
    sae = make_sae(lm, 1)
    ids = _ids(lm)
    clean, _ = _site_acts(lm, ids, site)
    with steering(lm, {"s": sae}, [Intervention("s", 0, "clamp", 7.5)]):
        steered, _ = _site_acts(lm, ids, site)
    x, x2 = clean[:, 1:], steered[:, 1:]
    with torch.no_grad():
        f = sae.encode(x)
        assert bool((f[..., 0] > 0).all())  # the feature is active, so re-encoding is exact
        f_clamped = f.clone()
        f_clamped[..., 0] = 7.5
        # x' = decode(f') + (x − decode(f)): the reconstruction error is kept
        torch.testing.assert_close(x2, sae.decode(f_clamped) + (x - sae.decode(f)), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(sae.encode(x2)[..., 0], torch.full_like(f[..., 0], 7.5), atol=1e-4, rtol=1e-5)
    assert torch.equal(steered[:, 0], clean[:, 0])


def test_ablate_inactive_is_a_no_op_and_active_is_not(lm_any):
    lm = lm_any
    sae = make_sae(lm, 1)
    ids = _ids(lm)
    _, clean = _site_acts(lm, ids, lm.site("resid_post", 1))
    with steering(lm, {"s": sae}, [Intervention("s", 1, "ablate")]):  # feature 1 never fires
        _, same = _site_acts(lm, ids, lm.site("resid_post", 1))
    assert torch.equal(same, clean)
    with steering(lm, {"s": sae}, [Intervention("s", 0, "ablate")]):  # feature 0 always fires
        x, changed = _site_acts(lm, ids, lm.site("resid_post", 1))
    assert not torch.allclose(changed, clean)
    torch.testing.assert_close(sae.encode(x[:, 1:])[..., 0], torch.zeros(2, 9), atol=1e-5, rtol=0)


def test_hooks_removed_after_an_exception(lm_any):
    lm = lm_any
    sae = make_sae(lm, 1, "attn_out")  # an input site: a pre-hook
    sae2 = make_sae(lm, 2)
    ivs = [Intervention("a", 2, "add", 1.0), Intervention("b", 0, "clamp", 1.0)]
    with pytest.raises(RuntimeError, match="boom"):
        with steering(lm, {"a": sae, "b": sae2}, ivs):
            assert not _no_hooks(lm)
            lm.model(input_ids=_ids(lm))
            raise RuntimeError("boom")
    assert _no_hooks(lm)


def test_features_across_layers_compose(lm_any):
    lm = lm_any
    sae0, sae1 = make_sae(lm, 0, seed=1), make_sae(lm, 2, "mlp_out", seed=2)
    saes = {"a": sae0, "b": sae1}
    ivs = [Intervention("a", 4, "add", 5.0), Intervention("a", 9, "add", -2.0), Intervention("b", 0, "clamp", 3.0)]
    ids = _ids(lm)
    with steering(lm, saes, ivs):
        site0 = lm.site("resid_post", 0)
        assert len(site0.module._forward_hooks) == 1  # one hook per site, however many features
        _, both = _site_acts(lm, ids, site0)
    with steering(lm, saes, ivs[:2]), steering(lm, saes, ivs[2:]):
        _, nested = _site_acts(lm, ids, site0)
    with steering(lm, saes, ivs[:1]):
        _, first_only = _site_acts(lm, ids, site0)
    torch.testing.assert_close(both, nested)
    assert not torch.allclose(both, first_only)


def test_feature_code_matches_encode():
    g = torch.Generator().manual_seed(3)
    for arch in ("jump_relu", "relu", "topk"):
        sae = SAE.init(SAEConfig(d_in=16, width=32, l0=4, architecture=arch, pre_bias=True), g)
        with torch.no_grad():
            sae.b_dec.normal_(generator=g)
            sae.b_enc.normal_(generator=g)
            sae.threshold.fill_(0.3)
        x = torch.randn(2, 5, 16, generator=g)
        for idx in (0, 7, 31):
            torch.testing.assert_close(sae.feature_code(x, idx), sae.encode(x)[..., idx])


# ---------------------------------------------------------------------------- bad input


def test_bad_input_is_refused(lm):
    sae = make_sae(lm, 1)
    with pytest.raises(SaescopeError, match="finite"):
        Intervention("s", 0, "add", float("nan"))
    with pytest.raises(SaescopeError, match="mode"):
        Intervention("s", 0, "boost", 1.0)
    with pytest.raises(SaescopeError, match="out of range"):
        with steering(lm, {"s": sae}, [Intervention("s", 64, "add", 1.0)]):
            pass
    with pytest.raises(SaescopeError, match="beyond ±1000"):
        Intervention("s", 3, "add", 1e30)
    with pytest.raises(SaescopeError, match="NaN/Inf"):
        with steering(lm, {"s": sae}, [Intervention("s", 3, "add", 1000.0)], typical={("s", 3): 1e36}):
            pass
    with pytest.raises(SaescopeError, match="no SAE 'x'"):
        with steering(lm, {"s": sae}, [Intervention("x", 3, "add", 1.0)]):
            pass
    assert _no_hooks(lm)
    with torch.no_grad():  # finite vectors whose sum overflows inside the forward
        sae.w_dec[3:5] = 3e38
        sae.threshold[3] = 1e6
    with pytest.raises(SaescopeError, match="NaN or Inf"):
        with steering(lm, {"s": sae}, [Intervention("s", 4, "add", 1.0), Intervention("s", 3, "clamp", 1.0)]):
            st.generate(lm, "the king", 3)
    assert _no_hooks(lm)
    with pytest.raises(SaescopeError, match="empty"):
        st.generate(lm, "   ", 3)


def test_prompt_longer_than_the_context(lm, monkeypatch):
    monkeypatch.setattr(lm.model.config, "max_position_embeddings", 12)
    st.generate(lm, "the king of france", 8)  # 4 + 8 tokens fit exactly
    with pytest.raises(SaescopeError, match="context of 12"):
        st.generate(lm, "the king of france", 9)


@pytest.mark.parametrize("spec, expect", [
    ("5:123=4", ("5", 123, "add", 4.0)),
    ("resid_post/5:7=-2.5", ("resid_post/5", 7, "add", -2.5)),
    ("mlp_out/12:3@clamp=10", ("mlp_out/12", 3, "clamp", 10.0)),
    ("5:3@ablate", ("5", 3, "ablate", 0.0)),
    ("resid_post/layer_3_width_64_l0_4:9=1e1", ("resid_post/layer_3_width_64_l0_4", 9, "add", 10.0)),
    (" 5:1 = 2 ", ("5", 1, "add", 2.0)),
])
def test_parse_feature_spec(spec, expect):
    assert parse_feature_spec(spec) == expect


@pytest.mark.parametrize("spec", ["5", "5:abc=1", "5:3", "5:3=x", "5:3@boost=1", "5:3@ablate=2", "5:3=nan",
                                  "5:-1=2", "5:3=inf", ""])
def test_parse_feature_spec_refuses(spec):
    with pytest.raises(SaescopeError):
        parse_feature_spec(spec)


# ---------------------------------------------------------------------------- generation and measurement


def test_generation_is_steered_and_seeded(lm):
    sae = make_sae(lm, 1)
    plain = st.generate(lm, "the king of france", 8)
    assert plain == st.generate(lm, "the king of france", 8)
    with steering(lm, {"s": sae}, [Intervention("s", 5, "add", 60.0)]):
        steered = st.generate(lm, "the king of france", 8)
    assert steered != plain
    assert st.generate(lm, "the king of france", 8) == plain  # nothing leaked
    a = st.generate(lm, "the king", 8, greedy=False, seed=3)
    assert a == st.generate(lm, "the king", 8, greedy=False, seed=3)
    state = torch.get_rng_state()
    st.generate(lm, "the king", 4, greedy=False, seed=4)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


def test_one_batched_generate_gives_each_row_what_it_would_get_alone(lm):
    """steer() generates steered and unsteered text in one batch (shared sampling noise); streaming generates
    them one after the other. Both give the same texts, sampled or greedy."""
    sae = make_sae(lm, 1)
    ivs = [Intervention("s", 5, "add", 60.0)]
    for greedy in (True, False):
        kw = dict(saes={"s": sae}, max_new_tokens=10, greedy=greedy, seed=7)
        batched = st.steer(lm, "the king of france", ivs, **kw)
        streamed = st.steer(lm, "the king of france", ivs, on_token=lambda which, t: None, **kw)
        assert (batched.steered, batched.unsteered) == (streamed.steered, streamed.unsteered)
        assert batched.steered != batched.unsteered or not greedy  # (this random model's sampling is near-uniform)
        assert (batched.ce_steered, batched.ce_unsteered) == pytest.approx((streamed.ce_steered, streamed.ce_unsteered),
                                                                         abs=1e-4)
        b, s = batched.effect, streamed.effect  # measured in one padded forward vs one forward each
        assert (b.act_unsteered, b.act_steered_text, b.act_during, b.prob_unsteered, b.prob_steered) == pytest.approx(
            (s.act_unsteered, s.act_steered_text, s.act_during, s.prob_unsteered, s.prob_steered), abs=1e-4)


def test_shared_noise_sampling_draws_from_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    for temperature in (1.0, 0.5):
        sampler = st.SharedNoiseSampling(temperature, seed=0, device=torch.device("cpu"))
        draws = torch.tensor([int(sampler(None, logits).argmax()) for _ in range(4000)])
        freq = torch.bincount(draws, minlength=4).float() / len(draws)
        torch.testing.assert_close(freq, (logits[0] / temperature).softmax(-1), atol=0.03, rtol=0)
    rows = st.SharedNoiseSampling(1.0, seed=3, device=torch.device("cpu"))(None, logits.repeat(3, 1))
    assert torch.equal(rows[0], rows[2])  # one noise vector for every row


def test_hooks_act_on_cached_incremental_forwards(lm):
    """Greedy steered generation (KV cache, one-token forwards) equals the argmax of one full steered forward."""
    sae = make_sae(lm, 1)
    with steering(lm, {"s": sae}, [Intervention("s", 5, "add", 30.0)]):
        prompt = st._encode_prompt(lm, "the king of france", 8)
        new = st.generate_ids(lm, prompt, 8)
        with torch.no_grad():
            logits = lm.model(input_ids=torch.cat([prompt[0], new])[None], use_cache=False).logits
    p = prompt.shape[1]
    assert logits[0, p - 1:-1].argmax(-1).tolist() == new.tolist()
    assert new.tolist() != st.generate_ids(lm, prompt, 8).tolist()


def test_zero_strength_measures_no_effect(lm):
    sae = make_sae(lm, 1)
    r = st.steer(lm, "the king of france", [Intervention("s", 0, "add", 0.0)], saes={"s": sae}, max_new_tokens=6)
    assert r.steered == r.unsteered
    e = r.effect
    assert r.ppl_cost == pytest.approx(0.0, abs=1e-5)
    assert e.act_steered_text == pytest.approx(e.act_unsteered, abs=1e-5)
    assert e.act_during == pytest.approx(e.act_unsteered, abs=1e-5)
    assert e.prob_steered == pytest.approx(e.prob_unsteered, abs=1e-6)
    assert len(e.promoted_tokens) == st.TOP_TOKENS


def test_add_effect_is_measured(lm):
    sae = make_sae(lm, 1)
    r = st.steer(lm, "the king of france", [Intervention("s", 0, "add", 8.0)], saes={"s": sae},
                 typical={("s", 0): 2.0}, max_new_tokens=6)
    e = r.effect
    assert e.typical == 2.0
    # feature 0 is active everywhere, w_enc = w_decᵀ with unit rows: adding 16·w_dec raises its code by 16
    assert e.act_during == pytest.approx(e.act_steered_text + 16.0, rel=1e-4)
    assert math.isfinite(r.ce_unsteered) and math.isfinite(r.ce_steered)
    assert r.ppl_cost == pytest.approx(r.ce_steered - r.ce_unsteered)


def test_promoted_tokens_follow_the_direct_logit_effect(lm):
    sae = make_sae(lm, lm.n_layers - 1)
    ids = st.promoted_token_ids(lm, sae, 3, k=5)
    d = sae.w_dec[3].detach()
    with torch.no_grad():
        ref = lm.logits_from_resid(torch.stack([d, torch.zeros_like(d)]))
    assert ids == (ref[0] - ref[1]).topk(5).indices.tolist()
    tokens = lm.tokenizer.convert_ids_to_tokens([10, 11])
    assert st.promoted_token_ids(lm, sae, 3, db_tokens=[[tokens[0], 2.0], [tokens[1], 1.0]]) == [10, 11]


def test_sweep_writes_a_plot(lm, tmp_path):
    sae = make_sae(lm, 1)
    png = tmp_path / "sweep" / "s.png"
    results = st.sweep(lm, "the king", Intervention("s", 5, "add", 0.0), [0.0, 10.0, 60.0], saes={"s": sae},
                       max_new_tokens=4, png=png)
    assert [r.effect.value for r in results] == [0.0, 10.0, 60.0]
    assert len({r.unsteered for r in results}) == 1
    assert results[0].steered == results[0].unsteered
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SaescopeError, match="finite"):
        st.sweep(lm, "the king", Intervention("s", 5, "add", 0.0), [float("inf")], saes={"s": sae})


# ---------------------------------------------------------------------------- runs and concepts


@pytest.fixture()
def run(tiny_gemma_dir, lm, tmp_path):
    run = Run.create(tmp_path / "run", model=str(tiny_gemma_dir), corpus={}, config={})
    sae = make_sae(lm, 1)
    sae.save(run.saes_dir / "resid_post" / sae.cfg.folder_name)
    sae_id = run.sae_ids()[0]
    tokens = lm.tokenizer.convert_ids_to_tokens([20, 21, 22])
    with FeatureDB.open(run.db_path) as db:
        db.upsert_sae(sae_id, site="resid_post", layer=1, width=64, d_in=lm.d_model, hook_name="h", path="p",
                      config={})
        db.begin_sae(sae_id)
        db.write_features(sae_id, [FeatureStats(sae_id, 7, 0.1, 5, 4.0, 1.5, logits_pos=[[t, 1.0] for t in tokens])])
        db.finish_sae(sae_id, 100)
    run.__dict__["model"] = lm  # share the loaded tiny model (Run.model is a cached property)
    return run


def test_steer_a_run_with_specs(run):
    sae_id = run.sae_ids()[0]
    r = st.steer(run, "the king", ["1:7=2", "resid_post/1:8@clamp=3", "1:9@ablate"], max_new_tokens=3)
    assert r.interventions == [Intervention(sae_id, 7, "add", 2.0), Intervention(sae_id, 8, "clamp", 3.0),
                               Intervention(sae_id, 9, "ablate", 0.0)]
    assert r.effect.typical == 4.0  # max_act from features.sqlite
    assert r.effects[1].typical == 1.0  # no statistics: strength in activation units
    assert r.effect.promoted_tokens == run.model.tokenizer.convert_ids_to_tokens([20, 21, 22])
    with pytest.raises(SaescopeError, match="no SAE '2'"):
        st.steer(run, "the king", ["2:7=2"])
    with pytest.raises(SaescopeError, match="out of range"):
        st.steer(run, "the king", ["1:64=2"])
    with pytest.raises(SaescopeError, match="nothing to steer"):
        st.steer(run, "the king", [])


def test_steer_by_concept(run, monkeypatch):
    from saescope import conceptsteer as cs

    sae_id = run.sae_ids()[0]
    asked = []

    def fake_choose(r, concept, cfg, lm=None):
        asked.append(concept)
        if concept != "water":
            raise SaescopeError(f"no feature writes '{concept}'")
        return cs.ConceptChoice(concept, [(sae_id, 7)], 3.0, "because", [], ["water"], calibrated=True)

    monkeypatch.setattr(cs, "choose", fake_choose)
    monkeypatch.setattr(cs, "measure_effect", lambda choice, a, b: cs.ConceptEffect(choice, 0, 1, 0.1, 0.2))
    r = st.steer(run, "the king", concept="water", max_new_tokens=3)
    assert asked == ["water"]
    assert r.interventions == [Intervention(sae_id, 7, "add", 3.0)]
    assert r.effect.typical == 4.0
    assert r.concept.choice.reason == "because" and r.concept.words_steered == 1
    with pytest.raises(SaescopeError, match="no feature writes 'french'"):
        st.steer(run, "the king", concept="french")
    with pytest.raises(SaescopeError, match="finite"):
        st.steer(run, "the king", concept="water", concept_strength=float("nan"))


def test_generation_model_is_the_run_model_in_the_generation_dtype(tiny_gemma_dir, tmp_path, monkeypatch):
    """Steering generates in `generation_dtype`: a bf16 copy of a loaded fp32 model (same tokenizer, the fp32
    model untouched), or the model itself when it is in that dtype already; a bad override is one line."""
    from saescope.models import GENERATION_DTYPE_ENV, generation_dtype

    monkeypatch.setenv(GENERATION_DTYPE_ENV, "bfloat16")
    assert Run.create(tmp_path / "a", model=str(tiny_gemma_dir), corpus={}, config={}).generation_model.dtype \
        == torch.bfloat16  # loaded in bf16 when nothing is loaded yet
    run = Run.create(tmp_path / "b", model=str(tiny_gemma_dir), corpus={}, config={})
    fp32 = run.model
    gen = run.generation_model
    assert gen.dtype == torch.bfloat16 and next(gen.model.parameters()).dtype == torch.bfloat16
    assert gen.tokenizer is fp32.tokenizer and next(fp32.model.parameters()).dtype == torch.float32
    assert gen.site("resid_post", 1).hook_name == fp32.site("resid_post", 1).hook_name
    prompt = gen.tokenizer("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert gen.model(input_ids=prompt).logits.dtype == torch.bfloat16
    monkeypatch.setenv(GENERATION_DTYPE_ENV, "float32")
    again = Run.open(run.root)
    again.use_model(fp32)
    assert again.generation_model is fp32
    monkeypatch.setenv(GENERATION_DTYPE_ENV, "int3")
    with pytest.raises(SaescopeError, match="unknown dtype 'int3'"):
        generation_dtype()


def test_the_lm_head_reads_a_contiguous_input(tiny_gemma_dir):
    """generate's first step hands the head every prompt's last position as a strided view, on which torch's
    CPU linear is up to ~850× slower in bf16: load_model makes the head's input contiguous (same logits)."""
    lm = load_model(str(tiny_gemma_dir))
    head = lm.model.get_output_embeddings()
    seen = []
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    try:
        hidden = torch.randn(4, 5, lm.d_model)
        last = hidden[:, -1:, :]
        assert not last.is_contiguous()
        with torch.no_grad():
            out = head(last)
    finally:
        handle.remove()
    assert seen == [True]
    torch.testing.assert_close(out, torch.nn.functional.linear(last.contiguous(), head.weight))
