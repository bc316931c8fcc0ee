"""Token rules name whitespace tokens readably: Gemma's lone "▁" before digits and a no-break space
spelt in byte-fallback pieces ("<0xC2>", "<0xA0>") are named ("space", "no-break space"), never shown
as a stray apostrophe or an empty string (issue 18, item 3)."""

from __future__ import annotations

import numpy as np

from saescope.label.evidence import Context, Evidence
from saescope.label.rules import explain, normalise
from saescope.tokens import texts

WORDS = ["▁the", "▁year", "▁was", "▁of", "▁city", "▁in", "▁and", "▁river"]


def _context(raw: list[str], fire_at: set[int], rank: int) -> Context:
    acts = tuple(5.0 if i in fire_at else 0.0 for i in range(len(raw)))
    return Context(kind="top", rank=rank, quantile=None, max_act=max(acts), ids=tuple(range(len(raw))),
                   tokens=tuple(texts(raw)), acts=acts)


def _evidence(contexts: list[Context]) -> Evidence:
    return Evidence(sae_id="s", idx=0, stats={}, labelling=tuple(contexts), held_out=())


def test_lone_space_before_digits_is_named_not_the_apostrophe():
    """Fires mostly on the lone space before a number and sometimes on the apostrophe of "'s":
    the rule names the space; the old rule gave the lone space no token value and said "'" (token)."""
    rng = np.random.default_rng(0)
    contexts = []
    for k in range(12):
        raw = [str(w) for w in rng.choice(WORDS, 8)]
        if k % 4 == 3:
            raw[4] = "'"
            raw[5] = "s"
            contexts.append(_context(raw, {4}, k))
        else:
            raw[4:7] = ["▁", "1", "9"]
            contexts.append(_context(raw, {4}, k))
    rule = explain(_evidence(contexts))
    assert rule.kind == "tokens" and rule.values[0] == "[space]"
    assert rule.label.startswith("space")
    assert '"\'"' not in rule.label.split(",")[0]
    assert rule.fires_in(texts(["▁in", "▁", "2"])) and not rule.fires_in(texts(["▁in", "▁the"]))


def test_byte_fallback_no_break_space_is_merged_and_named():
    raw = ["▁about", "▁4", "<0xC2>", "<0xA0>", "km"]
    shown = texts(raw)
    assert shown[2:4] == ["", "\xa0"]  # the character at its last byte, nothing at the first
    assert normalise(shown[3]) == "[no-break space]"
    assert normalise(shown[2]).startswith("[first byte")
    rng = np.random.default_rng(1)
    contexts = []
    for k in range(10):
        ctx = [str(w) for w in rng.choice(WORDS, 7)]
        ctx[3:6] = ["▁5", "<0xC2>", "<0xA0>"]
        contexts.append(_context(ctx, {5}, k))
    rule = explain(_evidence(contexts))
    assert rule.label == "no-break space (token)"
    assert "<0x" not in rule.label and "\xa0" not in rule.label


def test_a_firing_whitespace_token_is_marked_visibly():
    ctx = _context(["▁about", "▁", "3", "5", "0", "0"], {1}, 0)
    assert ctx.marked() == " about<<␣>>3500"
    assert _context(["▁the", "▁Paris"], {1}, 0).marked() == " the <<Paris>>"
