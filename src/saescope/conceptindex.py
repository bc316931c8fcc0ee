"""What each feature is about, as words a query can be matched against: its contexts and its output.

A feature has two sides (DESIGN.md §7): the text around the tokens it fires on, and the
tokens its decoder direction promotes through the unembedding (`logits_pos`, stored by
the analysis). The index keeps both as *words*, embedded once each with the local MiniLM
model of `embed.encode`:

    ctx_words  (features, N_CONTEXTS, window)  word ids of the feature's top contexts (-1: none)
    out_words  (features, n_logits)            word ids of its promoted tokens, best first (-1: not a word)
    words, word_vecs                           the word list and its unit-norm embeddings

In a context, sub-word pieces are joined into the word they spell (`context_words`: '▁fil' +
'med' is 'filmed', not the piece 'med', which would match "medicine"). A word counts when it
(stripped, lower-cased) is at least 3 letters and not a stop word; numbers, punctuation, other
scripts and a piece the window cut from its word are left out, so they count as evidence for
nothing. Promoted tokens count
only when they are whole words of the embedding model's vocabulary (its English words): a
feature's top-10 promoted tokens over a 262k multilingual vocabulary hold ~50k distinct
strings on the default run, mostly pieces and other languages, which would take minutes to
embed; the ~15k kept take seconds.

At query time (`match`) each word gets its cosine similarity to the query. A context is about
the query when its best word is close to it (cosine ≥ `CLOSE`, soft: a sigmoid of width
`CLOSE_WIDTH`); the context side of a feature is the share of its top contexts that are about
the query (what a person checks: do most of its contexts talk about it?). The output side is
the mean similarity of its `OUT_TOP` best promoted words (a feature that writes several of
the concept's words). On the default run, ranking by the share found a feature whose top 10
contexts are mostly about the concept for 16 of 18 test concepts, the mean of the best-word
similarities for 11 (bench/RESULTS.md, 2026-11-26).

The index is cached in run/concept_index.npz with a key made from the analysis state of
every SAE (id, status, tokens, time), so a re-analysed SAE rebuilds it; word vectors of an
older index are reused, and so are those of the offline labeller's word cache (the same
model; after labelling, nearly every word is there), so only new words are embedded.
Written atomically.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from .featuredb import FeatureDB
from .fsio import atomic_path
from .runs import Run

INDEX_FILE = "concept_index.npz"
N_CONTEXTS = 10  # top contexts per feature that count as its input-side evidence
OUT_TOP = 5  # promoted words averaged for the output side
CLOSE, CLOSE_WIDTH = 0.6, 0.03  # a word this similar to the query makes a context about it
VERSION = 3  # 3: context words are whole words (sub-word pieces joined)
_WORD = re.compile(r"^[a-z][a-z'\-]{2,}$")
STOP_WORDS = frozenset("""
the and for are but not you all any can had her was one our out has him his how its may new now old see two way
who did get let put say she too use that with have this will your from they know want been good much some time very
when come here just like long make many more only over such take than them well were what into also then there
their would could should which about after again because before being between both during each few further most
other same these those through under until while where whom why yes yet off own once upon onto per via
""".split())


@dataclass
class ConceptIndex:
    key: str
    sae_ids: list[str]
    feat_sae: np.ndarray  # (F,) index into sae_ids
    feat_idx: np.ndarray  # (F,) feature index in its SAE
    words: list[str]
    word_vecs: np.ndarray  # (W, 384) unit norm
    ctx_words: np.ndarray  # (F, N_CONTEXTS, window) int32, -1 = no word
    out_words: np.ndarray  # (F, n_logits) int32, -1 = not a word

    def __len__(self) -> int:
        return len(self.feat_idx)

    def position(self, sae_id: str, idx: int) -> int | None:
        """Row of feature (sae_id, idx) in the index, or None."""
        if sae_id not in self.sae_ids:
            return None
        rows = np.flatnonzero((self.feat_sae == self.sae_ids.index(sae_id)) & (self.feat_idx == int(idx)))
        return int(rows[0]) if len(rows) else None

    def word_similarity(self, qvec: np.ndarray) -> np.ndarray:
        """(W + 1,) cosine of every word with the unit query vector; the last entry (id -1) is 0."""
        return np.append(self.word_vecs @ qvec, np.float32(0.0)).astype(np.float32)

    def match(self, qvec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(context side, output side) similarity of every feature to the unit query vector, each (F,)."""
        sims = np.maximum(self.word_similarity(qvec), 0.0)
        if not len(self):
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        best = sims[self.ctx_words].max(-1)  # (F, C): each context's best word
        about = 1.0 / (1.0 + np.exp(-(best - CLOSE) / CLOSE_WIDTH))  # (F, C): soft "this context is about it"
        has = (self.ctx_words >= 0).any(-1)  # (F, C): contexts that hold any word
        ctx_side = (about * has).sum(-1) / np.maximum(has.sum(-1), 3)  # fewer than 3 contexts: weak evidence
        out = np.sort(sims[self.out_words], axis=-1)[:, ::-1][:, :OUT_TOP]  # non-words count as 0
        return ctx_side.astype(np.float32), out.mean(-1).astype(np.float32)

    def related_words(self, qvec: np.ndarray, min_similarity: float = 0.5, limit: int = 30) -> list[str]:
        """Words of the index most similar to the query (concept words to count in generated text)."""
        sims = self.word_vecs @ qvec
        order = np.argsort(-sims)[:limit]
        return [self.words[i] for i in order if sims[i] >= min_similarity]


def as_word(token_text: str) -> str | None:
    """A token's display text as an index word, or None (see the module docstring)."""
    w = token_text.strip().lower()
    return w if _WORD.match(w) and w not in STOP_WORDS else None


def index_key(db: FeatureDB) -> str:
    """Changes whenever any SAE is (re-)analysed."""
    state = [(s["id"], s["status"], s["n_tokens"], s["updated"]) for s in db.saes()]
    raw = json.dumps([VERSION, N_CONTEXTS, state], default=str)
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def concept_index(run: Run, db: FeatureDB) -> ConceptIndex:
    """The run's index, from run/concept_index.npz when its key is current, else built and cached."""
    from .embed import EMBEDDING_MODEL, read_embedding_cache

    key = index_key(db)
    path = run.root / INDEX_FILE
    f = read_embedding_cache(path, ("key", "sae_ids", "feat_sae", "feat_idx", "words", "word_vecs", "ctx_words",
                                    "out_words"))
    if f is not None and str(f["key"]) == key:
        return _from_npz(f)
    old_words = dict(zip(f["words"].tolist(), f["word_vecs"])) if f else {}  # word vectors survive a rebuild
    index = _build(db, key, old_words)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        np.savez(out, model=np.array(EMBEDDING_MODEL), key=np.array(key), sae_ids=np.array(index.sae_ids),
                 feat_sae=index.feat_sae, feat_idx=index.feat_idx, words=np.array(index.words, dtype=str),
                 word_vecs=index.word_vecs, ctx_words=index.ctx_words, out_words=index.out_words)
    return index


def _from_npz(f) -> ConceptIndex:
    return ConceptIndex(key=str(f["key"]), sae_ids=f["sae_ids"].tolist(), feat_sae=f["feat_sae"],
                        feat_idx=f["feat_idx"], words=f["words"].tolist(), word_vecs=f["word_vecs"],
                        ctx_words=f["ctx_words"], out_words=f["out_words"])


def _build(db: FeatureDB, key: str, old_words: dict[str, np.ndarray]) -> ConceptIndex:
    from .embed import _embedding_model
    from .label.evidence import display_token

    known = _embedding_model()[0].get_vocab()  # whole words of the embedding model

    saes = [s for s in db.saes() if s["status"] == "done"]
    read = [_read_sae(db, sae) for sae in saes]
    words: dict[str, int] = {}
    used = [r for _, contexts in read for rows in contexts.values() for r in rows]
    ids = np.unique(np.concatenate(used)) if used else np.zeros(0, np.int64)
    shown = {t: display_token(text, t) for t, text in zip(ids.tolist(), db.vocab(ids.tolist()))}
    pieces = any(text[:1].isspace() for text in shown.values())  # the vocabulary marks where words start
    feats, ctx_rows, out_rows = [], [], []
    reader = _WindowReader(shown, words, pieces)
    for si, (stats, contexts) in enumerate(read):
        for idx, logits_pos in stats:
            feats.append((si, idx))
            ctx_rows.append([reader.read_window(r) for r in contexts.get(idx, [])])
            out = [as_word(display_token(str(tok[0]))) for tok in (logits_pos or []) if tok]
            out_rows.append([words.setdefault(w, len(words)) if w is not None and w in known else -1 for w in out])
    return ConceptIndex(key=key, sae_ids=[s["id"] for s in saes],
                        feat_sae=np.array([f[0] for f in feats], np.int32),
                        feat_idx=np.array([f[1] for f in feats], np.int32), words=list(words),
                        word_vecs=_word_vectors(list(words), old_words),
                        ctx_words=_pad3(ctx_rows), out_words=_pad2(out_rows))


def context_words(ids: list[int], text: dict[int, str], words: dict[str, int], pieces: bool = True) -> list[int]:
    """A context's word ids, each at its word's first token (-1 elsewhere), new words added to `words`; `text`
    maps token ids to their display text (tokens.token_text: "▁fil" → " fil"). With `pieces` (a vocabulary whose
    tokens carry the space before a word), sub-word pieces are joined into the word they spell (" fil"+"med" →
    'filmed': the piece 'med' alone would match medicine) and a piece the window cut from the start of its word
    is no word; a word starts at a token with a leading space or after one that is not letters (punctuation,
    digits, bytes). Without `pieces` (a word-level vocabulary) every token is its own word."""
    return _WindowReader(text, words, pieces).read(ids)


class _WindowReader:
    """`context_words` for many windows over one vocabulary: each token id, spelled word and distinct window is
    read once (building the default run's index reads ~7M tokens in 329,550 windows, many of them shared by
    features of one layer; 13.9 s → 7.6 s, bench/RESULTS.md "Label stage on an empty cache")."""

    def __init__(self, text: dict[int, str], words: dict[str, int], pieces: bool):
        self.text, self.words, self.pieces = text, words, pieces
        self.tokens: dict[int, tuple[bool, str, bool]] = {}  # id → (spaced, piece, piece is letters)
        self.spelled: dict[str, str | None] = {}  # joined pieces → `as_word`
        self.windows: dict[bytes, list[int]] = {}

    def read_window(self, window: np.ndarray) -> list[int]:
        """`read` of a stored window, remembered by its tokens (a window's words get the same ids every time)."""
        key = window.tobytes()
        got = self.windows.get(key)
        if got is None:
            got = self.windows[key] = self.read(window.tolist())
        return got

    def read(self, ids: list[int]) -> list[int]:
        words = self.words
        if not self.pieces:
            return [-1 if (w := as_word(self.text.get(t, ""))) is None else words.setdefault(w, len(words))
                    for t in ids]
        out = [-1] * len(ids)
        start, word = None, ""  # first token of the word being read (-1: cut by the window); None: between words

        def flush() -> None:
            if start is None or start < 0:
                return
            w = self.spelled[word] if word in self.spelled else self.spelled.setdefault(word, as_word(word))
            if w is not None:
                out[start] = words.setdefault(w, len(words))

        for i, t in enumerate(ids):
            spaced, piece, alpha = self.tokens.get(t) or self._token(t)
            if alpha and not spaced and start is not None:
                word += piece
                continue
            flush()
            if alpha:
                start, word = (-1 if i == 0 and not spaced else i), piece
            else:
                start, word = None, ""
        flush()
        return out

    def _token(self, t: int) -> tuple[bool, str, bool]:
        shown = self.text.get(t, "")
        spaced = shown[:1].isspace()
        piece = shown.lstrip() if spaced else shown
        got = self.tokens[t] = (spaced, piece, piece.isalpha())
        return got


def _word_vectors(words: list[str], old: dict[str, np.ndarray]) -> np.ndarray:
    """Embeddings of `words`, reusing `old` ones and the offline labeller's word cache (label/vectors.py:
    the same MiniLM, which has embedded the evidence words of this run already); only words in
    neither go through the model (and into that cache)."""
    from .label.vectors import WordVectors

    missing = [w for w in words if w not in old]
    fresh: dict[str, np.ndarray] = {}
    if missing:
        cache = WordVectors()
        cache.ensure(missing)
        fresh = dict(zip(missing, cache.matrix[cache.rows(missing)]))
    if not words:
        return np.zeros((0, 384), np.float32)
    return np.stack([old[w] if w in old else fresh[w] for w in words]).astype(np.float32)


def _read_sae(db: FeatureDB, sae: dict) -> tuple[list[tuple[int, list]], dict[int, list[np.ndarray]]]:
    """Alive features (idx, logits_pos) and each one's top-context token ids."""
    rows = db.top_features(sae["id"], order_by="idx", limit=max(int(sae["width"] or 0), 1))
    stats = [(r["idx"], r["logits_pos"]) for r in rows if (r["n_fired"] or 0) > 0]
    return stats, db.top_tokens(sae["id"], N_CONTEXTS)


def _pad2(rows: list[list[int]]) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), -1, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _pad3(rows: list[list[list[int]]]) -> np.ndarray:
    window = max((len(c) for r in rows for c in r), default=0)
    out = np.full((len(rows), N_CONTEXTS, max(window, 1)), -1, np.int32)
    for i, r in enumerate(rows):
        for j, c in enumerate(r[:N_CONTEXTS]):
            out[i, j, :len(c)] = c
    return out
