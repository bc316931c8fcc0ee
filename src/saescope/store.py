"""On-disk activation cache: sharded, memory-mapped, resumable.

Layout of a cache folder::

    folder/
      manifest.json             format, version, sites {key: width}, site_files {key: file name},
                                dtype, shard_tokens, shards [{name, tokens, contexts}],
                                tokens_done, contexts_done, complete, meta
      shard_00000/
        resid_post__3.npy       (tokens, width) float16/float32, one plain .npy per site
        token_ids.npy           (tokens,) int64
        ctx.npy                 (tokens,) int64   global context index
        pos.npy                 (tokens,) int64   position within the context
      shard_00001/ ...

How a shard is committed (`CacheWriter`):

1. Rows stream into ``.tmp_shard_NNNNN/``: each ``.npy`` gets a header with a
   placeholder row count, and every added batch is appended to it, so the writer
   holds one batch in memory, not a whole shard.
2. A shard ends at a batch boundary: after a batch is added, if the open shard
   holds ``>= shard_tokens`` rows, it is closed. Shards therefore hold whole
   batches only (``shard_tokens`` up to ``shard_tokens + batch rows - 1`` rows),
   so ``contexts_done`` counts exactly the contexts whose rows are committed.
3. Closing a shard rewrites each header with the real row count (numpy reserves
   room for this, so the header length never changes), fsyncs the files,
   renames the directory to ``shard_NNNNN``, and only then rewrites
   ``manifest.json`` atomically. A shard that is not in the manifest does not exist.

Resume: opening a folder that holds a cache with the same sites, dtype,
shard_tokens and ``meta["identity"]`` deletes every ``.tmp_shard_*`` and every
``shard_*`` not listed in the manifest (a kill between rename and manifest
write), and continues at shard ``len(shards)``. The harvester skips
``contexts_done`` contexts and feeds the same deterministic batch stream, so a
killed-then-resumed cache is byte-identical to an uninterrupted one. Rows that
were buffered in the open shard when the process died are simply harvested again.

Reading (`ActivationCache.batches`): shuffled reading keeps a pool of at most
``pool_shards`` shards memory-mapped. Shards enter the pool in a seeded random
order; each shard gets a random row permutation; every batch draws its rows
from the pool's remaining rows without replacement (a multivariate
hypergeometric split, so each shard contributes in proportion to what it has
left) and is then permuted once more. An exhausted shard is unmapped and
replaced by the next one. Every row is read exactly once per epoch, and memory
(mapped shards + permutations) is bounded by the pool, not the cache size.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from .errors import SaescopeError
from .fsio import LOCK, read_json, write_json

log = logging.getLogger(__name__)

FORMAT = "saescope-activation-cache"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
INDEX_ARRAYS = ("token_ids", "ctx", "pos")  # int64 per-row metadata stored in every shard
_INDEX_DTYPE = np.dtype("<i8")
_SHARD_RE = re.compile(r"^shard_\d+$")
_TMP_PREFIX = ".tmp_shard_"
_MANIFEST_KEYS = (
    "format", "version", "sites", "site_files", "dtype", "shard_tokens",
    "shards", "tokens_done", "contexts_done", "complete", "meta",
)


def site_file_name(site: str) -> str:
    """File name of a site's array in a shard: ``"resid_post/3"`` -> ``"resid_post__3.npy"``."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", site.replace("/", "__"))
    return f"{stem}.npy"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


# --------------------------------------------------------------------------------------------------
# writing


class CacheWriter:
    """Append HarvestBatches to a cache folder as whole-batch shards; resumable.

    ``sites`` maps site key -> width. A batch is any object with ``acts``
    (site -> (n, width) tensor), ``token_ids``/``ctx``/``pos`` ((n,) integer
    tensors) and ``n_contexts``. Use it as a context manager: a normal exit
    closes the cache as complete; an exception keeps only committed shards,
    leaving the folder resumable. On resume, skip ``contexts_done`` contexts.

    ``meta`` is stored in the manifest; ``meta["identity"]`` (anything JSON, e.g.
    model + corpus + harvest settings) decides whether an existing cache is this
    run's (resume) or another's (refused). On resume a given ``meta`` replaces
    the stored one; with none, the stored one is kept.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        sites: dict[str, int],
        dtype: str = "float16",
        shard_tokens: int = 65536,
        meta: dict | None = None,
    ):
        if dtype not in DTYPES:
            raise SaescopeError(f"cache dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
        if not sites:
            raise SaescopeError("an activation cache needs at least one site: pass sites={key: width}")
        if int(shard_tokens) < 1:
            raise SaescopeError(f"shard_tokens must be a positive integer, got {shard_tokens}")
        self.folder = Path(folder)
        self.sites = {str(k): int(v) for k, v in sites.items()}
        self.dtype = dtype
        self.shard_tokens = int(shard_tokens)
        self.meta = dict(meta or {})
        self.site_files = _site_files(self.sites)
        self._np_dtype = np.dtype(dtype).newbyteorder("<")
        self._torch_dtype = DTYPES[dtype]

        self.shards: list[dict] = []
        self.complete = False
        self._open: _OpenShard | None = None
        self._closed = False
        self._failed: str | None = None

        manifest_path = self.folder / MANIFEST
        if manifest_path.exists():
            self._resume(read_json(manifest_path, "activation cache manifest"))
        else:
            if self.folder.exists() and not self.folder.is_dir():
                raise SaescopeError(f"{self.folder} is a file, not a cache folder: choose another --out")
            if self.folder.exists() and any(p.name != LOCK for p in self.folder.iterdir()):  # (.lock: its holder)
                raise SaescopeError(
                    f"{self.folder} holds another run (files, but no activation cache {MANIFEST}): "
                    "choose a new --out or delete it"
                )
            self.folder.mkdir(parents=True, exist_ok=True)
            self._write_manifest()  # from now on the folder is recognisably a cache

    # -- state ------------------------------------------------------------------------------------

    @property
    def contexts_done(self) -> int:
        """Contexts whose rows are all committed to shards (the harvester skips this many)."""
        return sum(s["contexts"] for s in self.shards)

    @property
    def tokens_done(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def _resume(self, manifest: dict) -> None:
        _check_manifest(manifest, self.folder)
        reasons = []
        if manifest["sites"] != self.sites:
            reasons.append("different sites")
        if manifest["dtype"] != self.dtype:
            reasons.append(f"dtype {manifest['dtype']} vs {self.dtype}")
        if manifest["shard_tokens"] != self.shard_tokens:
            reasons.append(f"shard_tokens {manifest['shard_tokens']} vs {self.shard_tokens}")
        if manifest["meta"].get("identity") != self.meta.get("identity"):
            reasons.append("different identity")
        if reasons:
            raise SaescopeError(
                f"{self.folder} holds another run's activation cache ({'; '.join(reasons)}): "
                "choose a new --out or delete it"
            )
        self.sites = dict(manifest["sites"])  # keep the stored order so the manifest stays byte-stable
        self.site_files = dict(manifest["site_files"])
        self.shards = [dict(s) for s in manifest["shards"]]
        self.complete = bool(manifest["complete"])
        if not self.meta:
            self.meta = dict(manifest["meta"])
        committed = {s["name"] for s in self.shards}
        for entry in sorted(self.folder.iterdir()):
            if entry.name.startswith(_TMP_PREFIX) or (_SHARD_RE.match(entry.name) and entry.name not in committed):
                log.info("removing uncommitted shard %s", entry)
                _remove(entry)
        for name in committed:
            if not (self.folder / name).is_dir():
                raise SaescopeError(
                    f"activation cache {self.folder} lists {name} but it is missing: delete the folder and re-harvest"
                )
        log.info("resuming activation cache %s: %d shards, %d tokens, %d contexts",
                 self.folder, len(self.shards), self.tokens_done, self.contexts_done)

    # -- adding rows ------------------------------------------------------------------------------

    def add(self, batch) -> None:
        """Validate a batch and append it to the open shard; commit the shard once it is full.

        Any error (bad batch, NaN, full disk) discards the open shard and stops the
        writer; committed shards stay, and a new CacheWriter on the folder resumes.
        """
        self._check_usable()
        if self.complete:
            raise SaescopeError(
                f"activation cache {self.folder} is already complete: check writer.complete before "
                "harvesting, or choose a new --out"
            )
        try:
            arrays, n = self._convert(batch)
            n_contexts = int(batch.n_contexts)
            if n_contexts < 0:
                raise SaescopeError(f"batch has n_contexts={n_contexts}: it must be >= 0")
            if self._open is None:
                self._open = _OpenShard(self.folder / f"{_TMP_PREFIX}{len(self.shards):05d}", self._files_dtypes())
            self._open.append(arrays, n, n_contexts)
            if self._open.tokens >= self.shard_tokens:
                self._commit()
        except BaseException as err:
            self._fail(str(err) if isinstance(err, SaescopeError) else type(err).__name__)
            self._reraise(err)

    def _reraise(self, err: BaseException) -> None:
        """Raise ENOSPC as the user-facing error, anything else as it is."""
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise SaescopeError(
                f"no space left on device while writing the activation cache {self.folder}: free some "
                f"disk and re-run to resume (from {self.contexts_done} stored contexts)"
            ) from err
        raise err

    def _convert(self, batch) -> tuple[dict[str, np.ndarray], int]:
        """Check a batch and turn it into numpy arrays keyed by file name."""
        acts = batch.acts
        if set(acts) != set(self.sites):
            missing = sorted(set(self.sites) - set(acts))
            extra = sorted(set(acts) - set(self.sites))
            raise SaescopeError(
                f"batch sites do not match the cache (missing {missing}, unexpected {extra}): "
                "harvest the same sites the cache was created with"
            )
        n = int(batch.token_ids.shape[0])
        out: dict[str, np.ndarray] = {}
        for name in INDEX_ARRAYS:
            t = getattr(batch, name)
            if tuple(t.shape) != (n,):
                raise SaescopeError(f"batch {name} has shape {tuple(t.shape)}, expected ({n},)")
            out[f"{name}.npy"] = t.detach().to("cpu", torch.int64).contiguous().numpy()
        for site, width in self.sites.items():
            t = acts[site]
            if tuple(t.shape) != (n, width):
                raise SaescopeError(
                    f"batch site {site!r} has shape {tuple(t.shape)}, expected ({n}, {width}): "
                    "harvest the same model and sites the cache was created with"
                )
            x = t.detach().to("cpu", self._torch_dtype).contiguous()
            if n and not _all_finite(x):
                if bool(torch.isfinite(t).all()):
                    raise SaescopeError(
                        f"activations of site {site!r} overflow {self.dtype}: use a float32 cache"
                    )
                raise SaescopeError(
                    f"activations of site {site!r} contain NaN or Inf: check the model's dtype "
                    "(use float32 on CPU) and its inputs"
                )
            out[self.site_files[site]] = x.numpy()
        return out, n

    def _files_dtypes(self) -> dict[str, tuple[np.dtype, int | None]]:
        files: dict[str, tuple[np.dtype, int | None]] = {f"{name}.npy": (_INDEX_DTYPE, None) for name in INDEX_ARRAYS}
        for site, width in self.sites.items():
            files[self.site_files[site]] = (self._np_dtype, width)
        return files

    def _commit(self) -> None:
        """Finish the open shard, rename it into place, then record it in the manifest."""
        shard = self._open
        assert shard is not None, "_commit called with no open shard"
        name = shard_name(len(self.shards))
        shard.finish()
        os.replace(shard.path, self.folder / name)
        _fsync_dir(self.folder)
        self._open = None
        self.shards.append({"name": name, "tokens": shard.tokens, "contexts": shard.contexts})
        try:
            self._write_manifest()
        except BaseException:
            self.shards.pop()  # on disk but not in the manifest: deleted on resume
            raise

    def _write_manifest(self) -> None:
        write_json(self.folder / MANIFEST, {
            "format": FORMAT,
            "version": VERSION,
            "sites": self.sites,
            "site_files": self.site_files,
            "dtype": self.dtype,
            "shard_tokens": self.shard_tokens,
            "shards": self.shards,
            "tokens_done": self.tokens_done,
            "contexts_done": self.contexts_done,
            "complete": self.complete,
            "meta": self.meta,
        })

    # -- closing ----------------------------------------------------------------------------------

    def close(self, complete: bool = True) -> None:
        """Finish the cache.

        ``complete=True`` commits the buffered rows as a last (smaller) shard and
        marks the cache complete. ``complete=False`` discards the buffered rows
        (they are re-harvested on resume, so the final cache stays byte-identical
        to an uninterrupted run) and leaves the cache resumable.
        """
        if self._closed:
            return
        if not complete or self._failed:
            self._discard_open()
            self._closed = True
            return
        try:
            if self._open is not None:
                self._commit()
            if not self.complete:
                self.complete = True
                try:
                    self._write_manifest()
                except BaseException:
                    self.complete = False
                    raise
        except BaseException as err:
            self._fail(type(err).__name__)
            self._closed = True
            self._reraise(err)
        self._closed = True

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(complete=exc_type is None)

    def _discard_open(self) -> None:
        if self._open is not None:
            self._open.abandon()
            self._open = None

    def _fail(self, why: str) -> None:
        self._failed = why
        self._discard_open()

    def _check_usable(self) -> None:
        if self._failed:
            raise SaescopeError(
                f"activation cache writer for {self.folder} stopped after an error ({self._failed}): "
                "open a new CacheWriter on the folder to resume"
            )
        if self._closed:
            raise SaescopeError(f"activation cache writer for {self.folder} is closed: open a new CacheWriter")


class _OpenShard:
    """A shard being written: one growing .npy per array in a temporary directory."""

    def __init__(self, path: Path, files: dict[str, tuple[np.dtype, int | None]]):
        if path.exists():
            _remove(path)
        path.mkdir(parents=True)
        self.path = path
        self.tokens = 0
        self.contexts = 0
        self._files: dict[str, tuple[BinaryIO, np.dtype, int | None, int]] = {}
        try:
            for name, (dtype, width) in files.items():
                f = open(path / name, "wb")
                _write_header(f, dtype, 0, width)
                self._files[name] = (f, dtype, width, f.tell())
        except BaseException:
            self.abandon()
            raise

    def append(self, arrays: dict[str, np.ndarray], n: int, n_contexts: int) -> None:
        for name, (f, dtype, _, _) in self._files.items():
            _append(f, arrays[name].astype(dtype, copy=False))
        self.tokens += n
        self.contexts += n_contexts

    def finish(self) -> None:
        """Write the real row counts into the headers, fsync and close every file."""
        for f, dtype, width, data_offset in self._files.values():
            f.seek(0)
            _write_header(f, dtype, self.tokens, width)
            if f.tell() != data_offset:  # numpy reserves header room for growth; never expected
                raise SaescopeError(f"internal error: .npy header size changed in {self.path}")
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._files = {}
        _fsync_dir(self.path)

    def abandon(self) -> None:
        for f, *_ in self._files.values():
            f.close()
        self._files = {}
        _remove(self.path)


def _all_finite(x: torch.Tensor) -> bool:
    """True when no NaN/Inf: min and max propagate both, and are ~10x faster than isfinite on CPU."""
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _write_header(f: BinaryIO, dtype: np.dtype, n: int, width: int | None) -> None:
    shape = (n,) if width is None else (n, width)
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )


def _append(f: BinaryIO, arr: np.ndarray) -> None:
    f.write(np.ascontiguousarray(arr).data.cast("B"))


def _site_files(sites: dict[str, int]) -> dict[str, str]:
    files: dict[str, str] = {}
    taken = {f"{name}.npy" for name in INDEX_ARRAYS}
    for site in sites:
        fname = site_file_name(site)
        if fname in taken:
            raise SaescopeError(
                f"site {site!r} maps to the file name {fname} which another site or array already uses: rename the site"
            )
        taken.add(fname)
        files[site] = fname
    return files


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_manifest(manifest: dict, folder: Path) -> None:
    path = folder / MANIFEST
    if manifest.get("format") != FORMAT:
        raise SaescopeError(f"{path} is not a saescope activation cache manifest: choose a new --out or delete it")
    if manifest.get("version") != VERSION:
        raise SaescopeError(
            f"activation cache {folder} has format version {manifest.get('version')}, this saescope reads "
            f"version {VERSION}: re-harvest the cache or use a matching saescope"
        )
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise SaescopeError(f"activation cache manifest {path} is incomplete (missing {missing}): delete the cache and re-harvest")
    if not _manifest_well_formed(manifest):
        raise SaescopeError(f"activation cache manifest {path} is corrupt: delete the cache and re-harvest")


def _manifest_well_formed(m: dict) -> bool:
    sites, files, shards = m["sites"], m["site_files"], m["shards"]
    if not (isinstance(sites, dict) and isinstance(files, dict) and isinstance(shards, list)):
        return False
    if set(sites) != set(files) or m["dtype"] not in DTYPES or not isinstance(m["meta"], dict):
        return False
    if not all(isinstance(w, int) and w > 0 for w in sites.values()):
        return False
    if not all(isinstance(f, str) and re.fullmatch(r"[A-Za-z0-9._-]+\.npy", f) for f in files.values()):
        return False
    return all(
        isinstance(sh, dict)
        and isinstance(sh.get("name"), str) and _SHARD_RE.match(sh["name"])
        and isinstance(sh.get("tokens"), int) and sh["tokens"] >= 0
        and isinstance(sh.get("contexts"), int) and sh["contexts"] >= 0
        for sh in shards
    )


# --------------------------------------------------------------------------------------------------
# reading


class ActivationCache:
    """A cache folder opened for reading. Attributes mirror the manifest."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder = folder
        self.sites: dict[str, int] = dict(manifest["sites"])
        self.site_files: dict[str, str] = dict(manifest["site_files"])
        self.dtype: str = manifest["dtype"]
        self.shards: list[dict] = list(manifest["shards"])
        self.n_tokens: int = sum(int(s["tokens"]) for s in self.shards)
        self.contexts_done: int = sum(int(s["contexts"]) for s in self.shards)
        self.complete: bool = bool(manifest["complete"])
        self.meta: dict = dict(manifest["meta"])
        self._starts = np.concatenate([[0], np.cumsum([int(s["tokens"]) for s in self.shards], dtype=np.int64)])

    @classmethod
    def open(cls, folder: str | os.PathLike, allow_incomplete: bool = False) -> ActivationCache:
        """Open a cache folder. An unfinished cache is refused unless ``allow_incomplete``."""
        folder = Path(folder)
        if not folder.is_dir():
            raise SaescopeError(f"no activation cache at {folder}: harvest one first or check the path")
        if not (folder / MANIFEST).is_file():
            raise SaescopeError(f"{folder} is not an activation cache (no {MANIFEST}): harvest one first or check the path")
        manifest = read_json(folder / MANIFEST, "activation cache manifest")
        _check_manifest(manifest, folder)
        cache = cls(folder, manifest)
        if not cache.complete and not allow_incomplete:
            raise SaescopeError(
                f"activation cache {folder} is unfinished ({cache.n_tokens} tokens stored): re-run the harvest "
                "to resume it, or pass allow_incomplete=True to read what is there"
            )
        for s in cache.shards:
            if not (folder / s["name"]).is_dir():
                raise SaescopeError(f"activation cache {folder} lists {s['name']} but it is missing: delete the cache and re-harvest")
        return cache

    def __len__(self) -> int:
        return self.n_tokens

    # -- sequential access ------------------------------------------------------------------------

    def read(self, site: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` (global, across shards) of a site or of ``token_ids``/``ctx``/``pos``."""
        stop = self.n_tokens if stop is None else min(int(stop), self.n_tokens)
        start = max(0, int(start))
        self._file_of(site)
        parts = []
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for i in range(max(first, 0), len(self.shards)):
            lo, hi = int(self._starts[i]), int(self._starts[i + 1])
            if lo >= stop:
                break
            if hi <= start:
                continue
            arr = self._open_shard(i, [site]).arrays[site]
            parts.append(np.array(arr[max(start, lo) - lo:min(stop, hi) - lo]))
        if not parts:
            width = self.sites.get(site)
            shape = (0,) if width is None else (0, width)
            return np.empty(shape, _INDEX_DTYPE if width is None else np.dtype(self.dtype))
        return np.concatenate(parts)

    # -- batches ----------------------------------------------------------------------------------

    def batches(
        self,
        batch_size: int,
        sites: list[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        as_dtype: torch.dtype | None = torch.float32,
        pool_shards: int = 4,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of batches: ``{site: (batch_size, width) as_dtype, "token_ids": (batch_size,) int64}``
        (``as_dtype=None``: as stored, e.g. float16 to be converted after a copy to the GPU).

        Every row appears exactly once; the last batch may be smaller. With
        ``shuffle`` the order is random across the whole cache (seeded), reading
        through a pool of at most ``pool_shards`` memory-mapped shards (see the
        module docstring). Use a different ``seed`` per epoch.
        """
        if int(batch_size) < 1:
            raise SaescopeError(f"batch_size must be a positive integer, got {batch_size}")
        if int(pool_shards) < 1:
            raise SaescopeError(f"pool_shards must be a positive integer, got {pool_shards}")
        sites = list(self.sites) if sites is None else list(sites)
        for site in sites:
            if site not in self.sites:
                raise SaescopeError(f"site {site!r} is not in the activation cache: choose from {sorted(self.sites)}")
        names = [*sites, "token_ids"]
        pieces = self._shuffled_pieces if shuffle else self._sequential_pieces
        for batch in pieces(int(batch_size), names, seed, int(pool_shards)):
            out = {name: torch.from_numpy(arr) for name, arr in batch.items()}
            yield {name: t.to(torch.int64 if name == "token_ids" else (as_dtype or t.dtype)) for name, t in out.items()}

    def _sequential_pieces(self, batch_size: int, names: list[str], seed: int, pool: int) -> Iterator[dict]:
        pending: list[dict[str, np.ndarray]] = []
        have = 0
        for i in range(len(self.shards)):
            shard = self._open_shard(i, names)
            n, pos = shard.tokens, 0
            while pos < n:
                take = min(batch_size - have, n - pos)
                pending.append({k: a[pos:pos + take] for k, a in shard.arrays.items()})
                have += take
                pos += take
                if have == batch_size:
                    yield _concat(pending, names)
                    pending, have = [], 0
            shard.close()
        if have:
            yield _concat(pending, names)

    def _shuffled_pieces(self, batch_size: int, names: list[str], seed: int, pool_size: int) -> Iterator[dict]:
        rng = np.random.default_rng(seed)
        order = [int(i) for i in rng.permutation(len(self.shards))]
        order.reverse()  # pop() from the end takes them in permutation order
        pool: list[_ShardReader] = []
        perms: list[np.ndarray] = []
        cursors: list[int] = []
        while True:
            pending: list[dict[str, np.ndarray]] = []
            need = batch_size
            while need:
                while len(pool) < pool_size and order:
                    shard = self._open_shard(order.pop(), names)
                    if shard.tokens == 0:
                        shard.close()
                        continue
                    pool.append(shard)
                    perms.append(rng.permutation(shard.tokens))
                    cursors.append(0)
                if not pool:
                    break
                left = np.array([len(p) - c for p, c in zip(perms, cursors)], dtype=np.int64)
                take = min(need, int(left.sum()))
                counts = rng.multivariate_hypergeometric(left, take, method="marginals")
                for j, c in enumerate(counts):
                    if c:
                        idx = np.sort(perms[j][cursors[j]:cursors[j] + c])
                        pending.append({k: a[idx] for k, a in pool[j].arrays.items()})
                        cursors[j] += int(c)
                need -= take
                for j in reversed(range(len(pool))):
                    if cursors[j] == len(perms[j]):
                        pool.pop(j).close()
                        perms.pop(j)
                        cursors.pop(j)
            if not pending:
                return
            batch = _concat(pending, names)
            mix = rng.permutation(len(batch["token_ids"]))
            yield {k: a[mix] for k, a in batch.items()}

    # -- shards -----------------------------------------------------------------------------------

    def _file_of(self, name: str) -> str:
        if name in INDEX_ARRAYS:
            return f"{name}.npy"
        if name in self.site_files:
            return self.site_files[name]
        raise SaescopeError(f"site {name!r} is not in the activation cache: choose from {sorted(self.sites)}")

    def _open_shard(self, index: int, names: list[str]) -> _ShardReader:
        info = self.shards[index]
        path = self.folder / info["name"]
        tokens = int(info["tokens"])
        arrays = {}
        for name in names:
            file = path / self._file_of(name)
            width = self.sites.get(name)
            shape = (tokens,) if width is None else (tokens, width)
            dtype = _INDEX_DTYPE if width is None else np.dtype(self.dtype).newbyteorder("<")
            try:
                arr = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise SaescopeError(
                    f"activation cache file {file} is missing or corrupt ({err}): delete the cache and re-harvest"
                ) from err
            if arr.shape != shape or arr.dtype != dtype:
                raise SaescopeError(
                    f"activation cache file {file} holds {arr.dtype}{arr.shape}, the manifest says {dtype}{shape}: "
                    "delete the cache and re-harvest"
                )
            arrays[name] = arr
        return _ShardReader(index, tokens, arrays)


class _ShardReader:
    """The memory-mapped arrays of one shard; `close()` drops the maps."""

    def __init__(self, index: int, tokens: int, arrays: dict[str, np.ndarray]):
        self.index = index
        self.tokens = tokens
        self.arrays = arrays
        self.closed = False

    def close(self) -> None:
        self.arrays = {}
        self.closed = True


def _concat(pending: list[dict[str, np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    if len(pending) == 1:
        return {k: np.array(pending[0][k]) for k in names}
    return {k: np.concatenate([p[k] for p in pending]) for k in names}
