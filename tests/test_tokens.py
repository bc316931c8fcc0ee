"""Token rendering (saescope.tokens): byte-fallback runs merged, markers gone, whitespace visible,
and the feature card / API mark dead features."""

from __future__ import annotations

import pytest
from atlas_run import build_run

from saescope.tokens import texts, token_text, visible


def test_byte_fallback_runs_merge_into_their_characters():
    # "<0xC2><0xA0>" is U+00A0 (no-break space); "<0xE2><0x80><0x94>" is an em dash. The character sits
    # at its last byte, where the model has read all of it.
    assert texts(["▁a", "<0xC2>", "<0xA0>", "▁b"]) == [" a", "", "\xa0", " b"]
    assert texts(["<0xE2>", "<0x80>", "<0x94>"]) == ["", "", "—"]
    assert texts(["<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "!"]) == ["", "", "", "😀", "!"]
    # two characters back to back, and ASCII bytes inside a run
    assert texts(["<0xC3>", "<0xA9>", "<0x0A>", "<0xC3>", "<0xA8>"]) == ["", "é", "\n", "", "è"]


def test_incomplete_or_invalid_byte_runs_stay_visible():
    # a context window that starts in the middle of a character, or ends before it is complete
    assert texts(["<0xA0>", "▁x"]) == ["<0xA0>", " x"]
    assert texts(["▁x", "<0xE2>", "<0x80>"]) == [" x", "<0xE2>", "<0x80>"]
    assert texts(["<0xC2>", "▁y"]) == ["<0xC2>", " y"]
    assert texts(["<0xFF>", "<0xC3>", "<0xA9>"]) == ["<0xFF>", "", "é"]
    assert token_text("<0xc2>") == "<0xC2>"


def test_markers_never_shown():
    assert token_text("▁Paris") == " Paris"
    assert token_text("ĠParis") == " Paris"
    assert token_text("Ċ") == "\n"
    assert "▁" not in "".join(texts(["▁The", "▁▁", "▁tower", "<0x0A>"]))


@pytest.mark.parametrize("text, shown", [
    (" Paris", "␣Paris"), ("Paris", "Paris"), ("  x ", "␣␣x␣"), (" ", "␣"), ("\n", "↵"), ("\t", "⇥"),
    ("", ""), ("a b", "a b"),
])
def test_visible_whitespace(text, shown):
    assert visible(text) == shown


@pytest.mark.parametrize("text, name", [
    ("\xa0", "no-break space"), (" ", "space"), ("  ", "2 spaces"), ("\n\n", "2 newlines"), ("\t", "tab"),
    ("", "first byte(s) of a character"), (" Paris", "␣Paris"), ("\u2009", "thin space"),
])
def test_describe_names_whitespace_tokens_for_labels(text, name):
    from saescope.tokens import describe

    assert describe(text) == name


def test_offline_label_names_a_whitespace_token(tmp_path):
    """A feature firing on the no-break space (bytes <0xC2><0xA0>, fired on the second) is labelled by
    what it is, not by the repr of an empty string."""
    from test_label import SAE, VOCAB

    from saescope.featuredb import Example, FeatureStats
    from saescope.label import label_offline
    from saescope.runs import Run

    vocab = VOCAB + ["<0xC2>", "<0xA0>"]
    lead, cont, the, city = len(VOCAB), len(VOCAB) + 1, VOCAB.index("▁the"), VOCAB.index("▁city")
    run = Run.create(tmp_path / "run", model="tiny", corpus={}, config={})
    with run.db() as db:
        db.upsert_sae(SAE, site="resid_post", layer=3, width=16, d_in=8, hook_name="model.layers.3.output",
                      path=f"saes/{SAE}", config={})
        db.set_vocab(vocab)
        db.begin_sae(SAE)
        examples = []
        for rank in range(16):
            toks = [the, city, lead, cont, the, city, the, city]
            acts = [0, 0, 0, 2.0 + rank / 10, 0, 0, 0, 0]
            examples.append(Example(SAE, 0, "top", rank, None, max(acts), toks, acts, ctx=rank, pos=3))
        for rank in range(8):
            examples.append(Example(SAE, 0, "random", rank, None, 0.0, [the, city] * 4, [0.0] * 8,
                                    ctx=100 + rank, pos=0))
        db.write_features(SAE, [FeatureStats(SAE, 0, frequency=0.01, n_fired=16, max_act=3.5, mean_act=2.7)])
        db.write_examples(SAE, examples)
        db.finish_sae(SAE, n_tokens=1000)
    label_offline(run, progress=False, concepts=False)
    with run.db() as db:
        text = db.labels(SAE, 0)[0]["text"]
    assert text in ('"no-break space" (token)', "no-break space (token)", "whitespace"), text  # was "''" (token)


@pytest.fixture(scope="module")
def atlas(tmp_path_factory, tiny_gemma_dir):
    return build_run(tmp_path_factory.mktemp("atlas-tokens"), tiny_gemma_dir)


def test_feature_card_marks_dead_features(atlas):
    from saescope.scope import Scope, feature_card

    with Scope.open(atlas) as scope:
        sae = scope.run.sae_ids()[0]
        cards = [scope.feature(sae, i) for i in range(scope.sae_info(sae)["width"])]
    assert all(c["dead"] == (c["n_fired"] == 0) for c in cards)
    alive = [c for c in cards if not c["dead"]]
    assert alive and "DEAD" not in feature_card(alive[0])
    dead = dict(alive[0], dead=True, n_fired=0, frequency=0.0, examples=[], labels=[])
    assert "DEAD: never fired" in feature_card(dead).splitlines()[0]
