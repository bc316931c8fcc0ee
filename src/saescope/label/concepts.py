"""Offline concept labels: name what a feature means from both sides of its evidence.

A feature has an input side (the text around the tokens it fires on) and an
output side (the tokens its decoder direction promotes through the unembedding).
Both are turned into vectors in one space, the local MiniLM's (vectors.py):

    word vector     MiniLM embedding of a vocabulary word ("venus")
    window vector   mean of the window's word vectors, weighted by rarity (idf, from
                    the run's random windows) and, for firing windows, by activation;
                    minus the mean window of the run's text (centring)
    input vector    weighted mean of the feature's labelling windows
    output vector   mean of its promoted words (weighted by logit), minus the mean
                    vocabulary word
    concept vector  MiniLM embedding of a concept name (vectors.ConceptVocab), centred

Each concept gets z(cos(input, concept)) + z(cos(output, concept)), each side
standardised by that concept's similarity to ordinary text (random windows of
the run, random vocabulary words: a concept close to everything says nothing),
plus a small bonus for general subjects ("Planet" beats "Venus"). The
best concept names the feature when it separates the feature's labelling windows
from background windows (random windows of the run, never this feature's
held-out ones): balanced accuracy ≥ `min_fit` with a threshold fitted there.

    label: "Planet (venus, mars, pluto) · "Venus" / "Mars" (tokens)"

The concept comes first with the evidence words closest to it; the token rule
(offline.py) follows as detail. Where the input side names no concept, the output
side alone may (`find_output_concepts`): the concept closest to the promoted English
words, when those words sit closer to its name than random words do (AUC ≥
`min_output_only`): "Planet (promotes planets, mars, venus) · fires on "the", ",""
(late-layer features often fire on function words but write one topic). Without a
concept the rule is the label, and without either the feature is "unclear".

Two scores per label, both in [0, 1] with 0.5 = chance (scoring.py stores them):

- detection-offline: on held-out windows, "fires" is predicted from the label alone
  (similarity of the window to the label vector above the threshold fitted on the
  labelling side, or the token rule, whichever fitted the labelling side better);
- output-offline: AUC of the label vector's similarity to the promoted words
  against random vocabulary words: do the label's words rise among what the
  feature promotes?
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..featuredb import FeatureDB
from .evidence import Context, Evidence, display_token
from .rules import Rule
from .vectors import ConceptVocab, WordVectors, concept_vocab, word_key


@dataclass(frozen=True)
class ConceptConfig:
    """Knobs of the concept explainer (defaults measured on the default run, bench/RESULTS.md)."""

    context_weight: float = 0.3  # weight of a firing window's other words, relative to its peak token
    general_bonus: float = 0.5  # added to general subjects' scores (z units: "Planet" over "Venus")
    min_fit: float = 0.75  # balanced accuracy a concept must reach on labelling vs background windows
    min_output_agreement: float = 0.75  # ... and output AUC on the promoted words: both sides must agree
    min_promoted: int = 2  # promoted words needed for an output vector
    n_promoted: int = 10
    n_background: int = 512  # background windows for fitting thresholds and context words
    max_context_words: int = 5  # words of a "context: ..." rule
    min_context_support: float = 0.2  # a context word must occur in this share of the firing windows
    max_context_background: float = 0.05  # ... and in at most this share of background windows
    simpler_margin: float = 0.05  # a predictor with more parts must fit this much better
    min_label_fit: float = 0.65  # below this on the labelling side (every predictor), the feature is unclear
    n_vocab: int = 256  # random vocabulary words for the output score
    n_examples: int = 3  # evidence words shown after the concept
    min_output_words: int = 4  # promoted English words needed to name a concept from the output side alone
    min_output_only: float = 0.9  # output AUC of the concept's name alone (output_agreement) to name it so
    seed: int = 0


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norm, 1e-9)


@dataclass(frozen=True)
class _Window:
    """One window's tokens as the explainer reads them."""

    keep: np.ndarray  # positions that are words
    rows: np.ndarray  # their word rows
    idf: np.ndarray  # their idf weights
    stems: np.ndarray  # sorted stem indices in the window
    stem_set: frozenset[int]  # the same, as a set


@dataclass
class Space:
    """The vectors shared by every feature of a run (built once by `build_space`)."""

    config: ConceptConfig
    id2row: np.ndarray  # (vocab_size,) row in `words` of each token id, -1 for no word
    words: np.ndarray  # (n_words, d) unit word vectors
    names: list[str]  # word of each row
    idf: np.ndarray  # (n_words,) rarity weight
    mu: np.ndarray  # (d,) mean window vector of the run's text
    mu_vocab: np.ndarray  # (d,) mean vocabulary word
    concepts: ConceptVocab
    centred: np.ndarray  # (n_concepts, d) unit concept vectors after centring
    background: list[tuple[tuple[int, ...], tuple[str, ...]]]  # (ids, display tokens) per window
    bg_vectors: np.ndarray  # (n_background, d) unit window vectors
    vocab_rows: np.ndarray  # rows of random vocabulary words
    common: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (n_words,) a whole word of MiniLM's vocabulary
    id2stem: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # stem index per token id, or -1
    stems: tuple[str, ...] = ()  # stem of each index ("militar")
    bg_stems: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))  # (n_background, n_stems)
    base_in: tuple[np.ndarray, np.ndarray] = (np.zeros(1), np.ones(1))  # per concept: mean, std over windows
    base_out: tuple[np.ndarray, np.ndarray] = (np.zeros(1), np.ones(1))  # per concept: over vocabulary words

    def window_stems(self, ctx: Context) -> np.ndarray:
        """Sorted stem indices in a window."""
        return self._window(ctx.ids).stems

    def window_stem_set(self, ctx: Context) -> frozenset[int]:
        """The same stems as a set: "does this window hold any of these stems" without numpy per window."""
        return self._window(ctx.ids).stem_set

    def _window(self, ids: tuple[int, ...]) -> _Window:
        """What the explainer reads of a window's tokens, worked out once per window (windows recur across features)."""
        found = self._windows.get(ids)
        if found is None:
            arr = np.asarray(ids, np.int64)
            rows = self.id2row[np.clip(arr, 0, len(self.id2row) - 1)]
            keep = rows >= 0
            st = self.id2stem[np.clip(arr, 0, len(self.id2stem) - 1)] if len(self.id2stem) else arr[:0]
            stems = np.unique(st[st >= 0])
            found = self._windows[ids] = _Window(keep, rows[keep], self.idf[rows[keep]], stems,
                                                 frozenset(stems.tolist()))
        return found

    @functools.cached_property
    def id2stem_list(self) -> list[int]:
        return self.id2stem.tolist()

    def keep_mask(self, ev: Evidence) -> np.ndarray:
        """Background windows usable for this feature: all but its own held-out windows."""
        keep = np.ones(len(self.background), bool)
        for ctx in ev.held_out:
            j = self._bg_index.get(ctx.ids)
            if j is not None:
                keep[j] = False
        return keep

    def row(self, token_id: int) -> int:
        return int(self.id2row[token_id]) if 0 <= token_id < len(self.id2row) else -1

    def word_row(self, token: str) -> int:
        """Row of a raw vocabulary string ("▁Venus"), -1 if it is no known word."""
        row = self._word_rows.get(token)
        if row is None:
            key = _whole_word(token)
            row = self._word_rows[token] = self._by_name.get(key, -1) if key else -1
        return row

    def __post_init__(self):
        self._by_name = {w: i for i, w in enumerate(self.names)}
        self._bg_attrs: dict[str, list[frozenset[str]]] = {}
        self._windows: dict[tuple[int, ...], _Window] = {}
        self._word_rows: dict[str, int] = {}
        self._vec_cache: dict[tuple[int, ...], np.ndarray] = {}

    @property
    def _bg_index(self) -> dict[tuple[int, ...], int]:
        if not hasattr(self, "_bg_index_map"):
            self._bg_index_map = {ids: j for j, (ids, _) in enumerate(self.background)}
        return self._bg_index_map

    def background_attributes(self, kind: str) -> list[frozenset[str]]:
        """Per background window, the values of one rule attribute anywhere in it (cached)."""
        if kind not in self._bg_attrs:
            from .rules import window_values

            self._bg_attrs[kind] = [window_values(tuple(toks), kind) for _, toks in self.background]
        return self._bg_attrs[kind]

    # ---------------------------------------------------------------- vectors

    def window_vectors(self, contexts: Sequence[Context], context_weight: float | None = None) -> np.ndarray:
        """(n, d) unit centred vectors; context_weight None = every word alike (no activations used;
        cached per window, as windows recur across features)."""
        if context_weight is None and len(self._vec_cache) < 200_000:
            missing = [c for c in contexts if c.ids not in self._vec_cache]
            if missing:
                self._vec_cache.update(zip((c.ids for c in missing), self._window_vectors(missing, None)))
            return np.stack([self._vec_cache[c.ids] for c in contexts]) if contexts else \
                np.zeros((0, self.words.shape[1]), np.float32)
        return self._window_vectors(contexts, context_weight)

    def _window_vectors(self, contexts: Sequence[Context], context_weight: float | None) -> np.ndarray:
        out = np.zeros((len(contexts), self.words.shape[1]), np.float32)
        for i, ctx in enumerate(contexts):
            win = self._window(ctx.ids)
            keep, rows, w = win.keep, win.rows, win.idf
            if not len(rows):
                continue
            if context_weight is not None:
                acts = np.maximum(np.asarray(ctx.acts, np.float32)[keep], 0)
                w = w * (context_weight + acts / max(max(ctx.acts), 1e-9))
            out[i] = (w @ self.words[rows]) / w.sum() - self.mu
        return _unit(out)

    def input_vector(self, evidence: Evidence) -> np.ndarray | None:
        firing = [c for c in evidence.labelling if c.fires]
        if not firing:
            return None
        vecs = self.window_vectors(firing, self.config.context_weight)
        weights = np.array([c.max_act for c in firing], np.float32)
        v = weights @ vecs
        return None if not v.any() else _unit(v)

    def promoted_rows(self, evidence: Evidence) -> tuple[np.ndarray, np.ndarray]:
        """Rows and logit values of the promoted tokens that are words."""
        pairs = [(self.word_row(str(t)), float(v)) for t, v in evidence.logits_pos[: self.config.n_promoted]]
        pairs = [(r, v) for r, v in pairs if r >= 0 and v > 0 and self.common[r]]
        return np.array([r for r, _ in pairs], np.int64), np.array([v for _, v in pairs], np.float32)

    def output_vector(self, evidence: Evidence) -> np.ndarray | None:
        rows, values = self.promoted_rows(evidence)
        if len(rows) < self.config.min_promoted:
            return None
        return _unit(values @ self.words[rows] / values.sum() - self.mu_vocab)

    def text_vector(self, vector: np.ndarray) -> np.ndarray:
        """A MiniLM phrase embedding (a concept name, an LLM label) moved into the centred space."""
        return _unit(vector - self._concept_mean)

    @property
    def _concept_mean(self) -> np.ndarray:
        return self.concepts.vectors.mean(0)


# --------------------------------------------------------------------------- building the space


def build_space(db: FeatureDB, config: ConceptConfig | None = None, concepts=None,
                words: WordVectors | None = None) -> Space:
    """Embed every word the run's evidence uses (cached) and set up the shared vectors.

    concepts: (name, general) pairs; None = the Wikipedia titles (vectors.wiki_concepts).
    """
    config = config or ConceptConfig()
    words = words or WordVectors()
    rng = np.random.default_rng(config.seed)
    windows = db.example_windows()
    random_windows = db.example_windows("random")
    ids = np.unique(np.concatenate(windows)) if windows else np.zeros(0, np.int64)
    keys = [_whole_word(s) for s in db.vocab(ids)]
    promoted = {_whole_word(s) for s in db.promoted_tokens()}
    words.ensure({k for k in keys if k} | {k for k in promoted if k})
    vocab_size = int(ids.max()) + 1 if len(ids) else 1
    id2word = np.full(vocab_size, -1, np.int64)
    id2word[ids] = words.rows(keys)
    used = np.unique(np.concatenate([id2word[id2word >= 0], words.rows(sorted(k for k in promoted if k))]))
    used = used[used >= 0]
    index_names = sorted(words.index, key=words.index.__getitem__)
    # the space's rows in word order, not in the shared cache's (which depends on what embedded words before:
    # other runs, tests): the seeded samples over rows (`_set_background`) then pick the same words on every
    # machine and cache, and so do the labels (4.5% of the default run's differed between a fresh and a used cache)
    used = used[np.argsort(np.array([index_names[i] for i in used], dtype=object), kind="stable")]
    remap = np.full(len(words.matrix), -1, np.int64)
    remap[used] = np.arange(len(used))
    id2row = np.where(id2word >= 0, remap[np.maximum(id2word, 0)], -1)
    names = [index_names[i] for i in used]
    idf = _idf(id2row, random_windows, len(used))
    id2stem, stems = _stem_table(ids, db.vocab(ids), vocab_size)
    vocab = concept_vocab(concepts)
    space = Space(config=config, id2row=id2row, words=words.matrix[used], names=names, idf=idf,
                  mu=np.zeros(words.matrix.shape[1], np.float32), mu_vocab=np.zeros(words.matrix.shape[1], np.float32),
                  concepts=vocab, centred=np.zeros((0,)), background=[], bg_vectors=np.zeros((0,)),
                  vocab_rows=np.zeros(0, np.int64), id2stem=id2stem, stems=stems, common=_common(names))
    space.centred = _unit(vocab.vectors - vocab.vectors.mean(0))
    _set_background(space, db, random_windows, rng)
    return space


def _common(names: list[str]) -> np.ndarray:
    """Which words are whole entries of the embedding model's (English) vocabulary: a proxy for
    real English words, so that pieces and foreign words among promoted tokens name no concept."""
    from ..embed import _embedding_model

    vocab = _embedding_model()[0].get_vocab()
    return np.array([w in vocab for w in names], bool)


def _whole_word(token: str | None) -> str | None:
    """The word a vocabulary token stands for when it starts a word (" Venus"), else None: pieces
    inside a word ("ocene" of "Pliocene") carry no concept."""
    display = display_token(token) if token is not None else ""
    return word_key(display) if display.startswith(" ") else None


def _stem_table(ids: np.ndarray, strings: list, vocab_size: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Token id → index of its crude stem (offline.stem of the lowercase word), for alphabetic tokens."""
    from .rules import normalise, stem

    id2stem = np.full(vocab_size, -1, np.int64)
    index: dict[str, int] = {}
    for i, tok in zip(ids.tolist(), strings):
        key = normalise(tok) if tok is not None else ""
        if len(key) >= 2 and key.isalpha():
            id2stem[i] = index.setdefault(stem(key), len(index))
    return id2stem, tuple(sorted(index, key=index.__getitem__))


def _idf(id2row: np.ndarray, random_windows: list[np.ndarray], n_rows: int) -> np.ndarray:
    """log(N / (1 + count)) over the run's random windows (a sample of its text), at least 0.1."""
    counts = np.zeros(n_rows, np.float64)
    if random_windows:
        flat = np.concatenate(random_windows)
        rows = id2row[np.clip(flat, 0, len(id2row) - 1)]
        counts = np.bincount(rows[rows >= 0], minlength=n_rows).astype(np.float64)
    total = max(sum(len(w) for w in random_windows), 1)
    return np.maximum(np.log(total / (1.0 + counts)), 0.1).astype(np.float32)


def _set_background(space: Space, db: FeatureDB, random_windows: list[np.ndarray], rng) -> None:
    """Centring means, background windows and the random vocabulary sample."""
    distinct = list({tuple(w.tolist()) for w in random_windows})
    distinct.sort()
    rng.shuffle(distinct)
    sample = distinct[: max(space.config.n_background, 1024)]
    contexts = [_plain_context(ids) for ids in sample]
    if contexts:
        space.mu = _mean_window(space, contexts)
    bg = sample[: space.config.n_background]
    table = db.vocab(sorted({i for w in bg for i in w}))
    strings = dict(zip(sorted({i for w in bg for i in w}), table))
    space.background = [(w, tuple(display_token(strings.get(i), i) for i in w)) for w in bg]
    space.bg_vectors = space.window_vectors([_plain_context(w) for w in bg])
    space.bg_stems = np.zeros((len(bg), len(space.stems)), bool)
    for j, w in enumerate(bg):
        st = space.id2stem[np.asarray(w, np.int64)]
        space.bg_stems[j, st[st >= 0]] = True
    in_text = np.unique(space.id2row[space.id2row >= 0])
    space.vocab_rows = rng.permutation(in_text)[: space.config.n_vocab] if len(in_text) else in_text
    space.mu_vocab = space.words[space.vocab_rows].mean(0) if len(space.vocab_rows) else space.mu_vocab
    space.base_in = _baseline(space.window_vectors(contexts) @ space.centred.T)
    space.base_out = _baseline(_unit(space.words[space.vocab_rows] - space.mu_vocab) @ space.centred.T)


def _baseline(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per concept, the mean and spread of its similarity to ordinary text (hubs score high on everything)."""
    sims = sims[np.abs(sims).sum(1) > 0]
    if len(sims) < 2:
        return np.zeros(sims.shape[1], np.float32), np.ones(sims.shape[1], np.float32)
    return sims.mean(0), np.maximum(sims.std(0), 1e-3)


def _mean_window(space: Space, contexts: list[Context]) -> np.ndarray:
    total = np.zeros(space.words.shape[1], np.float64)
    n = 0
    for ctx in contexts:
        rows = space.id2row[np.clip(np.asarray(ctx.ids, np.int64), 0, len(space.id2row) - 1)]
        rows = rows[rows >= 0]
        if len(rows):
            w = space.idf[rows]
            total += (w @ space.words[rows]) / w.sum()
            n += 1
    return (total / max(n, 1)).astype(np.float32)


def _plain_context(ids: Sequence[int]) -> Context:
    n = len(ids)
    return Context(kind="random", rank=0, quantile=None, max_act=0.0, ids=tuple(ids), tokens=("",) * n,
                   acts=(0.0,) * n)


# --------------------------------------------------------------------------- explaining


@dataclass(frozen=True)
class Concept:
    """The concept found for one feature (before deciding whether it names it)."""

    name: str
    examples: tuple[str, ...]  # evidence words closest to the concept
    score: float  # input + output similarity, hubness-corrected
    vector: np.ndarray  # label vector (concept and examples), unit, centred space
    threshold: float  # similarity above which a window is predicted to fire
    fit: float  # balanced accuracy of that prediction on labelling vs background windows
    index: int | None = None  # row in the concept vocabulary (None for a free text, e.g. an LLM label)


def find_concepts(space: Space, evidences: Sequence[Evidence]) -> list[Concept | None]:
    """The best concept of each feature of one SAE (None without any word evidence)."""
    if not evidences:
        return []
    d = space.words.shape[1]
    f_in = np.zeros((len(evidences), d), np.float32)
    f_out = np.zeros((len(evidences), d), np.float32)
    for i, ev in enumerate(evidences):
        v_in, v_out = space.input_vector(ev), space.output_vector(ev)
        f_in[i] = 0 if v_in is None else v_in
        f_out[i] = 0 if v_out is None else v_out
    z_in = (f_in @ space.centred.T - space.base_in[0]) / space.base_in[1]  # (n, n_concepts)
    z_out = (f_out @ space.centred.T - space.base_out[0]) / space.base_out[1]
    z_in[~f_in.any(1)] = 0
    z_out[~f_out.any(1)] = 0
    scores = z_in + z_out + space.config.general_bonus * space.concepts.general
    out: list[Concept | None] = []
    for i, ev in enumerate(evidences):
        if not f_in[i].any() and not f_out[i].any():
            out.append(None)
            continue
        c = int(np.argmax(scores[i]))
        out.append(_concept(space, ev, c, float(scores[i, c])))
    return out


def find_output_concepts(space: Space, evidences: Sequence[Evidence]) -> list[Concept | None]:
    """The best concept of each feature's output side alone (the words its decoder direction
    promotes), or None when too few promoted tokens are English words (`min_output_words`).
    Late-layer features often fire on function words across unrelated texts yet write one
    topic ("of", "the" → Venus, Mars, planets): what such a feature means is what it writes."""
    cfg = space.config
    out: list[Concept | None] = [None] * len(evidences)
    rows_of = [space.promoted_rows(ev)[0] for ev in evidences]
    vectors = [(i, space.output_vector(evidences[i])) for i, rows in enumerate(rows_of)
               if len(rows) >= cfg.min_output_words]
    found = [(i, v) for i, v in vectors if v is not None]
    keep = [i for i, _ in found]
    if not keep:
        return out
    f_out = np.stack([v for _, v in found])
    z_out = (f_out @ space.centred.T - space.base_out[0]) / space.base_out[1]
    scores = z_out + cfg.general_bonus * space.concepts.general
    for k, i in enumerate(keep):
        c = int(np.argmax(scores[k]))
        examples = _output_examples(space, rows_of[i], c)
        vector = space.centred[c]
        if examples:
            vector = _unit(vector + _unit(space.words[[space._by_name[w] for w in examples]].mean(0) - space.mu_vocab))
        threshold, fit = fit_threshold(space, evidences[i], vector)
        out[i] = Concept(space.concepts.names[c], tuple(examples), float(scores[k, c]), vector, threshold, fit, c)
    return out


def _output_examples(space: Space, rows: np.ndarray, c: int) -> list[str]:
    """Up to n_examples promoted words closest to concept c (cosine > 0.3), best first; function
    words ("your", "its") show no concept, so they are never examples."""
    from ..conceptindex import STOP_WORDS

    rows = np.array([r for r in dict.fromkeys(rows.tolist()) if space.names[r] not in STOP_WORDS], np.int64)
    if not len(rows):
        return []
    sims = space.words[rows] @ space.concepts.vectors[c]
    order = np.argsort(-sims, kind="stable")
    return [space.names[int(rows[j])] for j in order[: space.config.n_examples] if sims[j] > 0.3]


def output_agreement(space: Space, ev: Evidence, concept: Concept) -> float:
    """Output AUC of the concept's *name* alone (not its example words, which are promoted words
    themselves): do the feature's promoted words sit closer to the name than random words?"""
    found = output_auc(space, ev, space.centred[concept.index]) if concept.index is not None else None
    return found[0] if found else 0.5


def _concept(space: Space, ev: Evidence, c: int, score: float) -> Concept:
    examples = _examples(space, ev, c)
    vector = space.centred[c]
    if examples:
        rows = [space._by_name[w] for w in examples]
        vector = _unit(vector + _unit(space.words[rows].mean(0) - space.mu_vocab))
    threshold, fit = fit_threshold(space, ev, vector)
    return Concept(space.concepts.names[c], tuple(examples), score, vector, threshold, fit, c)


def _examples(space: Space, ev: Evidence, c: int) -> list[str]:
    """Up to n_examples evidence words (firing tokens, then promoted tokens) closest to concept c."""
    mass: dict[int, float] = {}
    for ctx in ev.labelling:
        for tid, act in zip(ctx.ids, ctx.acts):
            r = space.row(tid) if act > 0 else -1
            if r >= 0:
                mass[r] = mass.get(r, 0.0) + act
    rows, _ = space.promoted_rows(ev)
    candidates = sorted(mass, key=lambda r: -mass[r])[:10] + [int(r) for r in rows]
    candidates = [r for r in dict.fromkeys(candidates) if space.common[r]]
    if not candidates:
        return []
    sims = space.words[candidates] @ space.concepts.vectors[c]
    order = np.argsort(-sims, kind="stable")
    return [space.names[candidates[j]] for j in order[: space.config.n_examples] if sims[j] > 0.3]


def fit_threshold(space: Space, ev: Evidence, vector: np.ndarray) -> tuple[float, float]:
    """(threshold, balanced accuracy) of "fires where similarity ≥ threshold", fitted on the
    labelling windows (fire) against background windows (do not), never on held-out ones."""
    pos = space.window_vectors([c for c in ev.labelling if c.fires]) @ vector
    neg = background_vectors(space, ev) @ vector
    return best_threshold(pos, neg)


def input_auc(space: Space, ev: Evidence, vector: np.ndarray) -> float:
    """AUC of the similarity to `vector`: labelling windows against background windows (0.5 = chance)."""
    pos = space.window_vectors([c for c in ev.labelling if c.fires]) @ vector
    neg = background_vectors(space, ev) @ vector
    return _auc(pos, neg)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    if not len(pos) or not len(neg):
        return 0.5
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def background_vectors(space: Space, ev: Evidence) -> np.ndarray:
    """Background window vectors, minus any window that is one of this feature's held-out ones."""
    return space.bg_vectors[space.keep_mask(ev)]


def best_threshold(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """The cut that best separates `pos` (above) from `neg` (below), by balanced accuracy."""
    if not len(pos) or not len(neg):
        return float("inf"), 0.5
    values = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-values, kind="stable")
    tpr = np.cumsum(labels[order]) / len(pos)  # predicting "fires" for the top k+1 values
    fpr = np.cumsum(1 - labels[order]) / len(neg)
    ba = 0.5 * (tpr + 1 - fpr)
    k = int(np.argmax(ba))
    below = values[order[k + 1]] if k + 1 < len(values) else values[order[k]] - 1e-3
    return float(0.5 * (values[order[k]] + below)), float(max(ba[k], 0.5))


# --------------------------------------------------------------------------- the label


@dataclass(frozen=True)
class ContextWords:
    """A rule "fires in windows that hold one of these words", fitted on the labelling side."""

    stems: frozenset[int]
    words: tuple[str, ...]  # a surface form of each stem, for the label


@dataclass(frozen=True)
class Explanation:
    """What the offline explainer says about one feature."""

    text: str
    certain: bool  # False for "unclear (...)"
    rule: Rule
    concept: Concept | None  # the concept the label names, None if it names none
    predictor: str  # how the label predicts firing: parts joined by "|" (concept, rule, context)
    vector: np.ndarray | None  # the label's words as one vector (output score), None without words
    context: ContextWords | None = None
    fit: float = 0.5  # the predictor's balanced accuracy on labelling vs background windows
    side: str = ""  # which side named the concept: "input" (both sides agree), "output" (promoted words), ""


PREDICTORS = ("concept", "rule", "context", "rule|context", "concept|rule", "concept|context")


def explain_feature(space: Space, ev: Evidence, rule: Rule, concept: Concept | None,
                    output_concept: Concept | None = None) -> Explanation:
    """Choose the label and how it predicts firing, from the labelling side only: the concept
    heads the label when it separates labelling from background windows (`min_fit`) and the
    promoted words agree (`min_output_agreement`), with two evidence words to show; failing
    that, the output side's concept (`find_output_concepts`) heads it when the promoted words
    sit close to its name (`min_output_only`), as "Planet (promotes venus, mars)". The
    predictor is whichever of concept, token rule and context words (or two of them) fits
    best; below `min_label_fit`, with no token rule and no concept, the feature is unclear."""
    cfg = space.config
    keep = space.keep_mask(ev)
    firing = [c for c in ev.labelling if c.fires]
    context = context_words(space, firing, keep)
    hits = {"rule": _rule_hits(space, firing, keep, rule), "context": _context_hits(space, firing, keep, context)}
    named = (concept is not None and concept.fit >= cfg.min_fit and len(concept.examples) >= 2
             and (output_auc(space, ev, concept.vector) or (0.0,))[0] >= cfg.min_output_agreement)
    side = "input"
    if not named and output_concept is not None and len(output_concept.examples) >= 2 \
            and output_agreement(space, ev, output_concept) >= cfg.min_output_only:
        concept, named, side = output_concept, True, "output"
    if concept is not None:
        hits["concept"] = _concept_hits(space, firing, keep, concept)
    fits = {p: _fit(hits, p) for p in PREDICTORS if all(k in hits for k in p.split("|"))}
    if not named:
        fits = {p: f for p, f in fits.items() if "concept" not in p}
    if rule.certain:  # context words only stand in for a missing token rule: they overfit more
        fits = {p: f for p, f in fits.items() if "context" not in p}
    predictor = max(fits, key=lambda p: fits[p] - cfg.simpler_margin * (p.count("|") + (p != "rule")))
    if fits[predictor] < cfg.min_label_fit and not rule.certain and not named:
        return Explanation(rule.label, False, rule, None, "rule", None, fit=fits["rule"])
    text = " · ".join(_label_parts(concept if named else None, side, rule, predictor, context))
    vector = concept.vector if named and concept is not None else rule_vector(space, rule)
    return Explanation(text, True, rule, concept if named else None, predictor, vector, context,
                       fits[predictor], side if named else "")


def _label_parts(concept: Concept | None, side: str, rule: Rule, predictor: str,
                 context: ContextWords | None) -> list[str]:
    """The label's parts: the concept (with its evidence words), then what the feature fires on."""
    parts = []
    if concept is not None:
        words = ", ".join(concept.examples)
        parts.append(concept.name + (f" (promotes {words})" if side == "output" else f" ({words})" if words else ""))
    fires_on = ("fires on " if side == "output" else "on ") + ", ".join(_top_words(rule))
    if "rule" in predictor or (rule.certain and "context" not in predictor):
        parts.append(rule.label if rule.certain or concept is None else fires_on)
    if "context" in predictor and context is not None:
        parts.append("context: " + ", ".join(context.words))
    if concept is not None and len(parts) == 1:
        parts.append(fires_on)
    return parts


def _fit(hits: dict, predictor: str) -> float:
    pos = np.logical_or.reduce([hits[k][0] for k in predictor.split("|")])
    neg = np.logical_or.reduce([hits[k][1] for k in predictor.split("|")])
    return float(0.5 * (pos.mean() + 1 - neg.mean())) if len(pos) and len(neg) else 0.5


def _rule_hits(space: Space, firing: list[Context], keep: np.ndarray, rule: Rule):
    values, attrs = rule.values_set, space.background_attributes(rule.kind)
    pos = np.array([rule.fires_in(c.tokens) for c in firing], bool)
    neg = np.array([not values.isdisjoint(a) for a in attrs], bool)[keep]
    return pos, neg


def _context_hits(space: Space, firing: list[Context], keep: np.ndarray, context: ContextWords | None):
    if context is None:
        return np.zeros(len(firing), bool), np.zeros(int(keep.sum()), bool)
    stems = np.array(sorted(context.stems), np.int64)
    pos = np.array([not context.stems.isdisjoint(space.window_stem_set(c)) for c in firing], bool)
    return pos, space.bg_stems[:, stems][keep].any(1)


def _concept_hits(space: Space, firing: list[Context], keep: np.ndarray, concept: Concept):
    pos = space.window_vectors(firing) @ concept.vector >= concept.threshold
    return pos, space.bg_vectors[keep] @ concept.vector >= concept.threshold


def context_words(space: Space, firing: list[Context], keep: np.ndarray) -> ContextWords | None:
    """Greedy: add the word (stem) that most raises balanced accuracy on labelling vs
    background windows, up to `max_context_words`, while it gains at least 0.01."""
    if not firing or not keep.any():
        return None
    per_window = [space.window_stems(c) for c in firing]
    cand = np.unique(np.concatenate(per_window))
    if not len(cand):
        return None
    pos = np.zeros((len(firing), len(cand)), bool)
    for i, st in enumerate(per_window):
        pos[i, np.searchsorted(cand, st)] = True
    supported = pos.mean(0) >= max(space.config.min_context_support, 2 / len(firing))
    cand, pos = cand[supported], pos[:, supported]  # only words in enough firing windows can be chosen
    neg = space.bg_stems[:, cand][keep]
    common = neg.mean(0) > space.config.max_context_background  # function words ("and", "the") say nothing
    cand, pos, neg = cand[~common], pos[:, ~common], neg[:, ~common]
    if not len(cand):
        return None
    cov_p, cov_n = np.zeros(len(firing), bool), np.zeros(len(neg), bool)
    chosen: list[int] = []
    best = 0.5
    for _ in range(space.config.max_context_words):
        ba = 0.5 * ((pos | cov_p[:, None]).mean(0) + 1 - (neg | cov_n[:, None]).mean(0))
        ba[chosen] = -1
        j = int(np.argmax(ba))
        if ba[j] < best + 0.02:
            break
        best, cov_p, cov_n = float(ba[j]), cov_p | pos[:, j], cov_n | neg[:, j]
        chosen.append(j)
    if not chosen:
        return None
    stems = [int(cand[j]) for j in chosen]
    return ContextWords(frozenset(stems), tuple(_surface(space, firing, s) for s in stems))


def _surface(space: Space, firing: list[Context], stem_index: int) -> str:
    """The most common lowercase form of a stem in the firing windows."""
    from .rules import normalise

    counts: dict[str, int] = {}
    id2stem = space.id2stem_list
    for c in firing:
        if stem_index not in space.window_stem_set(c):
            continue
        for tid, tok in zip(c.ids, c.tokens):
            if 0 <= tid < len(id2stem) and id2stem[tid] == stem_index:
                key = normalise(tok)
                counts[key] = counts.get(key, 0) + 1
    return max(counts, key=lambda k: counts[k]) if counts else space.stems[stem_index]


def text_explanation(space: Space, ev: Evidence, text: str) -> Explanation:
    """Any label text (e.g. an LLM's) as an Explanation predicting by its meaning: the text is
    embedded, and the threshold fitted on the labelling side as for a concept."""
    from ..embed import encode

    vector = space.text_vector(encode([text])[0])
    threshold, fit = fit_threshold(space, ev, vector)
    concept = Concept(text, (), 0.0, vector, threshold, fit)
    return Explanation(text, True, Rule("tokens", (), text), concept, "concept", vector, fit=fit)


def _top_words(rule: Rule) -> list[str]:
    words = rule.label.partition("top tokens: ")[2].rstrip(")")
    return [f'"{w}"' for w in words.split(", ") if w] or ["various tokens"]


def rule_vector(space: Space, rule: Rule) -> np.ndarray | None:
    """The words a token rule names ("tokens"/"stems" values that are words) as one vector."""
    if rule.kind not in ("tokens", "stems") or not rule.certain:
        return None
    rows = [space._by_name[v] for v in rule.values if v in space._by_name]
    return _unit(space.words[rows].mean(0) - space.mu_vocab) if rows else None


def predict(space: Space, expl: Explanation, contexts: Sequence[Context]) -> list[bool]:
    """The label's prediction "fires somewhere in here" for each context (no activations used)."""
    out = np.zeros(len(contexts), bool)
    for part in expl.predictor.split("|"):
        if part == "rule":
            out |= np.array([expl.rule.fires_in(c.tokens) for c in contexts], bool)
        elif part == "concept" and expl.concept is not None:
            out |= space.window_vectors(contexts) @ expl.concept.vector >= expl.concept.threshold
        elif part == "context" and expl.context is not None:
            stems = expl.context.stems
            out |= np.array([not stems.isdisjoint(space.window_stem_set(c)) for c in contexts], bool)
    return out.tolist()


def output_auc(space: Space, ev: Evidence, vector: np.ndarray | None) -> tuple[float, int] | None:
    """(AUC, n promoted words): how much closer the label vector is to the feature's promoted
    words than to random vocabulary words (0.5 = no closer). None without enough of either."""
    rows, _ = space.promoted_rows(ev)
    rand = space.vocab_rows[~np.isin(space.vocab_rows, rows)]
    if vector is None or len(rows) < space.config.min_promoted or not len(rand):
        return None
    p = _unit(space.words[rows] - space.mu_vocab) @ vector
    r = _unit(space.words[rand] - space.mu_vocab) @ vector
    return _auc(p, r), len(rows)
