"""Atomic file writes: a file is either the old version or the complete new one; and one
writing process per folder (`exclusive`).

Every single-file writer in saescope goes through here, so a killed process or a full
disk never leaves a half-written file under a real name. Folders written as a whole (an
SAE by `SAE.save`, an activation-store shard, a converted model) are filled under a
temporary name and renamed into place instead.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import SaescopeError

LOCK = ".lock"
_HELD: set[str] = set()  # the folders this process holds (`exclusive` is re-entrant within a process)


@contextlib.contextmanager
def exclusive(folder: str | os.PathLike, what: str, kind: str = "folder") -> Iterator[None]:
    """Hold `folder` (a run, an activation cache) for writing while the block runs; `what` (the verb) is shown to
    a process that is refused, `kind` names the folder in that message. One process at a time: two analyses of
    one run deleted and inserted each other's rows, two harvests into one cache would number their shards alike.
    An OS lock (flock) on FOLDER/.lock: a killed holder releases it with its last file descriptor, so no stale
    lock is ever left behind. Re-entrant within a process. Where no lock can be taken (a read-only folder; no
    fcntl, as on Windows) the block runs unguarded, and the write that follows says why it fails, if it does."""
    folder = Path(folder)
    key = str((folder / LOCK).resolve())
    if key in _HELD:
        yield
        return
    created = not folder.exists()
    try:
        import fcntl

        folder.mkdir(exist_ok=True)  # (not its parents: a refused command must leave no new folder)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode("utf-8", "replace").strip() or "another saescope process"
            raise SaescopeError(f"{kind} {folder} is busy: {holder} is writing it; wait for it to finish (or stop "
                                "it), then try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"saescope {what} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)  # (releases the lock)
        if created and [p.name for p in folder.iterdir()] == [LOCK]:  # a refused command leaves no new folder
            with contextlib.suppress(OSError):
                (folder / LOCK).unlink()
                folder.rmdir()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` on success.

    On any exception the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise SaescopeError(f"no space left on device while writing {path}: free some disk and re-run") from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    """Read a JSON object, turning a missing or corrupt file into a clear error."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise SaescopeError(f"{what} not found: {path}") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SaescopeError(f"{what} {path} is not valid JSON ({err}): restore or delete it") from err
    if not isinstance(obj, dict):
        raise SaescopeError(f"{what} {path} must hold a JSON object, not {type(obj).__name__}")
    return obj


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
