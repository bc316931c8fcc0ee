"""Token rendering (saescope.tokens): byte-fallback runs merged, markers gone, whitespace visible,
and the feature card / API mark dead features."""

from __future__ import annotations

import pytest
from atlas_run import build_run

from saescope.tokens import texts, token_text, visible


def test_byte_fallback_runs_merge_into_their_characters():
    # "<0xC2><0xA0>" is U+00A0 (no-break space); "<0xE2><0x80><0x94>" is an em dash
    assert texts(["▁a", "<0xC2>", "<0xA0>", "▁b"]) == [" a", "\xa0", "", " b"]
    assert texts(["<0xE2>", "<0x80>", "<0x94>"]) == ["—", "", ""]
    assert texts(["<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "!"]) == ["😀", "", "", "", "!"]
    # two characters back to back, and ASCII bytes inside a run
    assert texts(["<0xC3>", "<0xA9>", "<0x0A>", "<0xC3>", "<0xA8>"]) == ["é", "", "\n", "è", ""]


def test_incomplete_or_invalid_byte_runs_stay_visible():
    # a context window that starts in the middle of a character, or ends before it is complete
    assert texts(["<0xA0>", "▁x"]) == ["<0xA0>", " x"]
    assert texts(["▁x", "<0xE2>", "<0x80>"]) == [" x", "<0xE2>", "<0x80>"]
    assert texts(["<0xC2>", "▁y"]) == ["<0xC2>", " y"]
    assert texts(["<0xFF>", "<0xC3>", "<0xA9>"]) == ["<0xFF>", "é", ""]
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
