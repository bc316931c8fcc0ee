"""features.sqlite: what each SAE feature responds to, and what people call it.

analyze.py writes feature statistics and example contexts here; labellers add
labels and scores; the web app and search read it, often while an analysis is
still writing (WAL mode lets readers and one writer work at the same time).

Invariants the code keeps:
- An SAE whose `status` is 'done' has all of its features and examples. An
  analysis that is killed leaves it 'running'; `begin_sae` clears its rows so
  a re-run starts that SAE cleanly. Every write is one transaction.
- Labels are never overwritten: a new label for (sae_id, idx, source) marks the
  old one not current and points back to it (`prev_id`). Re-analysing an SAE
  keeps its labels.
- When an SAE's weights are replaced (`weights_replaced`), its analysis is
  cleared (status 'pending') and its `weights_version` goes up; its labels stay,
  each read back with `stale` = written for older weights than the SAE's now.
- The schema changes only through named migrations (see `MIGRATIONS`), recorded
  in `_migrations`. A file written by a newer saescope is refused untouched.
- Only SQLite opens the file (never Python's `open()`: closing such a descriptor
  drops the process's locks, and another process may then delete the WAL under
  a live connection). A failed transaction is rolled back, never committed; after
  a fault of the file the connection is reopened. Errors never advise moving
  aside or re-analysing a database, which would lose its labels.

Example tokens are stored as int32 little-endian bytes and activations as
float16 bytes (values beyond ±65504 are clipped; `max_act` keeps full precision).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import SaescopeError

ExampleKind = Literal["top", "quantile", "random"]
LabelSource = Literal["human", "llm", "offline"]
KINDS = ("top", "quantile", "random")
SOURCES = ("human", "llm", "offline")
ORDERS = {"frequency": "frequency DESC", "max_act": "max_act DESC", "mean_act": "mean_act DESC",
          "n_fired": "n_fired DESC", "idx": "idx ASC"}
PAGE_ORDERS = ("frequency", "max_act", "mean_act", "n_fired", "idx", "score")
STATES = ("all", "alive", "dead", "dense", "sparse")
DENSE_FREQUENCY = 0.1
"""A feature that fires on more than this fraction of tokens is dense (DESIGN.md §5)."""
MAX_LABEL_CHARS = 500
BUSY_TIMEOUT_MS = 5000
_FP16_MAX = float(np.finfo(np.float16).max)
# SQLite primary result codes (https://sqlite.org/rescode.html)
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CORRUPT = 5, 6, 8, 10, 11
_SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 13, 14, 26
_REOPEN = {_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_CANTOPEN, _SQLITE_NOTADB}  # file faults
_FAULTS = _REOPEN | {_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_FULL}  # shown as one line
_MIN_DB_BYTES = 512  # the smallest page size: any SQLite database file is at least this long


@dataclass(frozen=True)
class FeatureStats:
    """Density and activation statistics of one feature (a row of `features`)."""

    sae_id: str
    idx: int
    frequency: float  # fraction of analysed tokens where the feature fires
    n_fired: int
    max_act: float
    mean_act: float  # over the tokens where it fires
    hist: dict | None = None  # {"edges": [...], "counts": [...]}
    logits_pos: list | None = None  # [[token_str, value], ...] most promoted tokens
    logits_neg: list | None = None  # most suppressed tokens


@dataclass(frozen=True, eq=False)
class Example:
    """One context window where a feature fires (a row of `examples`).

    `rank` orders examples within (kind, quantile); `pos` is the position of the
    maximum inside the window; `ctx` is the index of the context in the analysis.
    Read back, `tokens` is a list[int] and `acts` a list[float] (fp16 values).
    """

    sae_id: str
    idx: int
    kind: ExampleKind
    rank: int
    quantile: int | None
    max_act: float
    tokens: Sequence[int] | np.ndarray
    acts: Sequence[float] | np.ndarray
    ctx: int
    pos: int


# --------------------------------------------------------------------------- migrations
# Append new migrations at the end; never edit or rename one that has shipped.


def _m001_initial(conn: sqlite3.Connection) -> None:
    _execute_script(conn, """
        CREATE TABLE saes (
            id TEXT PRIMARY KEY,            -- e.g. "resid_post/layer_3_width_4096_l0_32"
            site TEXT, layer INT, width INT, d_in INT, hook_name TEXT, path TEXT,
            status TEXT NOT NULL DEFAULT 'pending',   -- pending | running | done
            n_tokens INT,
            config_json TEXT,
            updated REAL
        );
        CREATE TABLE features (
            sae_id TEXT NOT NULL REFERENCES saes(id) ON DELETE CASCADE,
            idx INT NOT NULL,
            frequency REAL, n_fired INT, max_act REAL, mean_act REAL,
            hist_json TEXT, logits_pos_json TEXT, logits_neg_json TEXT,
            PRIMARY KEY (sae_id, idx)
        );
        CREATE TABLE examples (
            sae_id TEXT NOT NULL REFERENCES saes(id) ON DELETE CASCADE,
            idx INT NOT NULL,
            kind TEXT NOT NULL,             -- top | quantile | random
            rank INT NOT NULL,
            quantile INT,
            max_act REAL,
            tokens BLOB,                    -- int32 little-endian
            acts BLOB,                      -- float16 little-endian
            ctx INT, pos INT
        );
        CREATE TABLE labels (
            id INTEGER PRIMARY KEY,
            sae_id TEXT NOT NULL REFERENCES saes(id),
            idx INT NOT NULL,
            text TEXT NOT NULL,
            source TEXT NOT NULL,           -- human | llm | offline
            model TEXT, author TEXT,
            created REAL NOT NULL,
            is_current INT NOT NULL DEFAULT 1,
            prev_id INT REFERENCES labels(id)
        );
        CREATE TABLE scores (
            id INTEGER PRIMARY KEY,
            label_id INT NOT NULL REFERENCES labels(id),
            method TEXT NOT NULL,           -- e.g. detection-offline, detection-llm
            value REAL,
            details_json TEXT,
            created REAL NOT NULL
        );
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
        CREATE TABLE vocab (id INTEGER PRIMARY KEY, token TEXT NOT NULL);
    """)


def _m002_indexes(conn: sqlite3.Connection) -> None:
    _execute_script(conn, """
        CREATE INDEX examples_feature ON examples(sae_id, idx, kind, quantile, rank);
        CREATE INDEX labels_feature ON labels(sae_id, idx, source);
        CREATE UNIQUE INDEX labels_one_current ON labels(sae_id, idx, source) WHERE is_current = 1;
        CREATE INDEX scores_label ON scores(label_id);
    """)


def _m003_labels_fts(conn: sqlite3.Connection) -> None:
    # rowid = labels.id; only current labels are indexed. Triggers keep it in sync
    # whatever code writes `labels`.
    _execute_script(conn, """
        CREATE VIRTUAL TABLE labels_fts USING fts5(
            text, tokenize = 'porter unicode61 remove_diacritics 2'
        );
        INSERT INTO labels_fts(rowid, text) SELECT id, text FROM labels WHERE is_current = 1;
        CREATE TRIGGER labels_fts_insert AFTER INSERT ON labels WHEN new.is_current = 1 BEGIN
            INSERT INTO labels_fts(rowid, text) VALUES (new.id, new.text);
        END;
        CREATE TRIGGER labels_fts_update AFTER UPDATE OF text, is_current ON labels BEGIN
            DELETE FROM labels_fts WHERE rowid = old.id;
            INSERT INTO labels_fts(rowid, text) SELECT new.id, new.text WHERE new.is_current = 1;
        END;
        CREATE TRIGGER labels_fts_delete AFTER DELETE ON labels BEGIN
            DELETE FROM labels_fts WHERE rowid = old.id;
        END;
    """)


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    """Run `;`-separated statements inside the current transaction.

    (`Connection.executescript` would COMMIT first, breaking a migration's atomicity.)
    """
    statement = ""
    for part in script.split(";"):
        statement += part + ";"
        if sqlite3.complete_statement(statement):
            if statement.strip(" \n;"):
                conn.execute(statement)
            statement = ""
    if statement.strip(" \n;"):
        raise ValueError(f"incomplete SQL statement in migration: {statement!r}")


def _m004_weights_version(conn: sqlite3.Connection) -> None:
    # Which weights an SAE row describes (bumped when its folder is overwritten, e.g. by
    # `saescope import --overwrite`) and which weights each label was written for: a label
    # whose version is below its SAE's is stale (kept, and shown as written for old weights).
    _execute_script(conn, """
        ALTER TABLE saes ADD COLUMN weights_version INT NOT NULL DEFAULT 1;
        ALTER TABLE labels ADD COLUMN weights_version INT NOT NULL DEFAULT 1;
    """)


Migration = tuple[str, Callable[[sqlite3.Connection], None]]
MIGRATIONS: list[Migration] = [
    ("m001_initial", _m001_initial),
    ("m002_indexes", _m002_indexes),
    ("m003_labels_fts", _m003_labels_fts),
    ("m004_weights_version", _m004_weights_version),
]


def applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """Names recorded in `_migrations`, oldest first ([] for a new database)."""
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'").fetchone()
    if not has_table:
        return []
    return [row[0] for row in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
    """Apply the migrations not yet recorded, each in its own transaction; return their names.

    `conn` must be in autocommit mode (``isolation_level=None``). Safe to call
    again, and safe against another process migrating the same file at once.
    """
    applied_now = []
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied REAL NOT NULL)")
    for name, fn in migrations:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("SELECT 1 FROM _migrations WHERE name = ?", (name,)).fetchone() is None:
                fn(conn)
                conn.execute("INSERT INTO _migrations(name, applied) VALUES (?, ?)", (name, time.time()))
                applied_now.append(name)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return applied_now


# --------------------------------------------------------------------------- the database


class FeatureDB:
    """features.sqlite. Open with `FeatureDB.open(path)`; use as a context manager.

    One object may be shared between threads (calls are serialised); readers in
    other connections or processes see only committed writes.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool):
        self._conn = conn
        self.path = path
        self.readonly = readonly
        self._lock = threading.RLock()
        self._broken = False  # a fault left the connection unusable: reopen before the next transaction

    # ---------------------------------------------------------------- open / close

    @classmethod
    def open(cls, path: str | Path, readonly: bool = False) -> FeatureDB:
        """Open `path`; when writable, create it if missing and apply pending migrations.

        The file is checked read-only first, so a corrupt file or one written by a
        newer saescope is refused without being modified. The file is only ever
        touched through SQLite (see `_check_existing`).
        """
        path = Path(path)
        if path.is_dir():
            raise SaescopeError(f"{path} is a folder: give the path of features.sqlite inside it")
        exists = path.exists() and path.stat().st_size > 0
        if readonly and not exists:
            raise SaescopeError(f"no feature database at {path}: run the analysis first")
        if not readonly and not can_write(path):
            raise _read_only(path)
        if exists:
            applied = _check_existing(path)
            if readonly:
                pending = [name for name, _ in MIGRATIONS if name not in applied]
                if pending:
                    raise SaescopeError(
                        f"{path.name} needs upgrading (pending migrations: {', '.join(pending)}): "
                        "open it once writable, e.g. with `saescope label set` or by analysing a new SAE")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        return cls(_open_connection(path, readonly), path, readonly)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> FeatureDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FeatureDB({str(self.path)!r}, readonly={self.readonly})"

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction. BEGIN IMMEDIATE takes the write lock up front, so a
        busy writer waits (busy_timeout) instead of failing half-way."""
        if self.readonly:
            raise SaescopeError(f"{self.path.name} was opened read-only: open it without readonly=True to write")
        with self._transaction("BEGIN IMMEDIATE") as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: several queries see the same snapshot."""
        with self._lock:
            if not self._broken and self._conn.in_transaction:  # nested inside another read: same snapshot
                yield self._conn
                return
            with self._transaction("BEGIN") as conn:
                yield conn

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        """BEGIN … COMMIT. On any error: ROLLBACK (never COMMIT), and when SQLite reports a fault
        of the file (I/O error, corruption, a moved file), reopen the connection before the next
        transaction; such faults reach the caller as one SaescopeError line."""
        with self._lock:
            try:
                if self._broken:
                    self._reopen()
                self._conn.execute(begin)
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException as err:
                self._roll_back(err)
                if isinstance(err, sqlite3.DatabaseError) and _code(err) in _FAULTS:
                    raise _db_error(self.path, err) from err
                raise

    def _roll_back(self, err: BaseException) -> None:
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._broken = True
        if isinstance(err, sqlite3.DatabaseError) and _code(err) in _REOPEN:
            self._broken = True

    def _reopen(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        self._conn = _open_connection(self.path, self.readonly)
        self._broken = False

    # ---------------------------------------------------------------- writing (analysis)

    def upsert_sae(self, sae_id: str, *, site: str, layer: int, width: int, d_in: int, hook_name: str,
                   path: str | Path, config: dict) -> None:
        """Add an SAE (status 'pending') or update its description; its rows and status are kept."""
        with self._write() as conn:
            conn.execute(
                """INSERT INTO saes(id, site, layer, width, d_in, hook_name, path, config_json, updated)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET site = excluded.site, layer = excluded.layer,
                       width = excluded.width, d_in = excluded.d_in, hook_name = excluded.hook_name,
                       path = excluded.path, config_json = excluded.config_json, updated = excluded.updated""",
                (sae_id, site, int(layer), int(width), int(d_in), hook_name, str(path), _dumps(config),
                 time.time()))

    def begin_sae(self, sae_id: str) -> None:
        """Start (or restart) analysing an SAE: status 'running', its old features/examples deleted, and the
        scores of its offline labels (measured on the old examples' text: the next `label auto` scores them
        again; human and LLM labels keep theirs)."""
        with self._write() as conn:
            self._require_sae(conn, sae_id)
            conn.execute("DELETE FROM scores WHERE label_id IN (SELECT id FROM labels WHERE sae_id = ? AND "
                         "source = 'offline')", (sae_id,))
            conn.execute("DELETE FROM examples WHERE sae_id = ?", (sae_id,))
            conn.execute("DELETE FROM features WHERE sae_id = ?", (sae_id,))
            conn.execute("UPDATE saes SET status = 'running', n_tokens = NULL, updated = ? WHERE id = ?",
                         (time.time(), sae_id))

    def write_features(self, sae_id: str, rows: Sequence[FeatureStats]) -> None:
        """Insert a batch of feature statistics in one transaction (after `begin_sae`)."""
        values = []
        for r in rows:
            _check_row_sae(sae_id, r)
            values.append((sae_id, int(r.idx), float(r.frequency), int(r.n_fired), float(r.max_act),
                           float(r.mean_act), _dumps(r.hist), _dumps(r.logits_pos), _dumps(r.logits_neg)))
        with self._write() as conn:
            self._require_running(conn, sae_id)
            conn.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)

    def write_examples(self, sae_id: str, rows: Sequence[Example]) -> None:
        """Insert a batch of example contexts in one transaction (after `begin_sae`)."""
        values = []
        for r in rows:
            _check_row_sae(sae_id, r)
            if r.kind not in KINDS:
                raise ValueError(f"example kind must be one of {KINDS}, got {r.kind!r}")
            tokens, acts = _encode_tokens(r.tokens), _encode_acts(r.acts)
            if len(tokens) // 4 != len(acts) // 2:
                raise ValueError(f"example of feature {r.idx}: {len(tokens) // 4} tokens but "
                                 f"{len(acts) // 2} activations")
            values.append((sae_id, int(r.idx), r.kind, int(r.rank),
                           None if r.quantile is None else int(r.quantile), float(r.max_act),
                           tokens, acts, int(r.ctx), int(r.pos)))
        with self._write() as conn:
            self._require_running(conn, sae_id)
            conn.executemany("""INSERT INTO examples(sae_id, idx, kind, rank, quantile, max_act, tokens, acts,
                                ctx, pos) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""", values)

    def finish_sae(self, sae_id: str, n_tokens: int) -> None:
        """Mark an SAE's analysis complete ('done') after `n_tokens` analysed tokens."""
        with self._write() as conn:
            self._require_running(conn, sae_id)
            conn.execute("UPDATE saes SET status = 'done', n_tokens = ?, updated = ? WHERE id = ?",
                         (int(n_tokens), time.time(), sae_id))

    def weights_replaced(self, sae_id: str) -> int | None:
        """The SAE's weights were replaced: clear its features and examples, set it 'pending' and bump
        its weights version (its labels and their scores stay, now stale). Returns the new version,
        or None when the SAE is not in the database (nothing to clear)."""
        with self._write() as conn:
            row = conn.execute("SELECT weights_version FROM saes WHERE id = ?", (sae_id,)).fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM examples WHERE sae_id = ?", (sae_id,))
            conn.execute("DELETE FROM features WHERE sae_id = ?", (sae_id,))
            conn.execute("UPDATE saes SET status = 'pending', n_tokens = NULL, weights_version = ?, updated = ? "
                         "WHERE id = ?", (row[0] + 1, time.time(), sae_id))
            return row[0] + 1

    def sae_status(self, sae_id: str) -> str | None:
        """'pending', 'running' (started, or killed before finishing), 'done'; None if unknown."""
        with self._read() as conn:
            row = conn.execute("SELECT status FROM saes WHERE id = ?", (sae_id,)).fetchone()
        return None if row is None else row[0]

    def set_vocab(self, tokens: Sequence[str]) -> None:
        """Store the tokenizer's token strings (index = token id) so readers can show
        examples without loading the tokenizer."""
        with self._write() as conn:
            conn.execute("DELETE FROM vocab")
            conn.executemany("INSERT INTO vocab(id, token) VALUES (?, ?)", enumerate(map(str, tokens)))

    def vocab(self, ids: Sequence[int] | np.ndarray) -> list[str | None]:
        """Token strings for `ids` from the stored vocabulary (None where unknown)."""
        ids = [int(i) for i in ids]
        found: dict[int, str] = {}
        with self._read() as conn:
            unique = sorted(set(ids))
            for start in range(0, len(unique), 500):
                chunk = unique[start:start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(conn.execute(f"SELECT id, token FROM vocab WHERE id IN ({marks})", chunk))
        return [found.get(i) for i in ids]

    # ---------------------------------------------------------------- reading

    def saes(self) -> list[dict]:
        """Every SAE, ordered by site then layer; `config` decoded."""
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM saes ORDER BY site, layer, width, id").fetchall()
        return [_sae_dict(r) for r in rows]

    def feature_stats(self, sae_id: str, idx: int) -> dict | None:
        """One feature's statistics row (frequency, activations, histogram, logit effects); None if absent."""
        with self._read() as conn:
            row = conn.execute("SELECT * FROM features WHERE sae_id = ? AND idx = ?",
                               (sae_id, int(idx))).fetchone()
        return None if row is None else _feature_dict(row)

    def feature(self, sae_id: str, idx: int) -> dict | None:
        """Stats, examples, current labels (each with its scores) of one feature; None if absent."""
        with self._read():  # one snapshot for stats, examples and labels
            out = self.feature_stats(sae_id, idx)
            if out is None:
                return None
            out["examples"] = [asdict(e) for e in self.examples(sae_id, idx)]
            out["labels"] = self.labels(sae_id, idx)
            for label in out["labels"]:
                label["scores"] = self.scores(label["id"])
        return out

    def examples(self, sae_id: str, idx: int, kind: ExampleKind | None = None) -> list[Example]:
        """Examples of one feature ordered by kind (top, quantile, random), quantile, rank."""
        if kind is not None and kind not in KINDS:
            raise SaescopeError(f"unknown example kind {kind!r}: use one of {', '.join(KINDS)}")
        sql = "SELECT * FROM examples WHERE sae_id = ? AND idx = ?"
        args: list[Any] = [sae_id, int(idx)]
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += (" ORDER BY CASE kind WHEN 'top' THEN 0 WHEN 'quantile' THEN 1 ELSE 2 END,"
                " quantile, rank")
        with self._read() as conn:
            rows = conn.execute(sql, args).fetchall()
        return [_example(r) for r in rows]

    def example_windows(self, kind: ExampleKind | None = None) -> list[np.ndarray]:
        """The token ids of every example window of every feature (of one `kind`), in table order."""
        if kind is not None and kind not in KINDS:
            raise SaescopeError(f"unknown example kind {kind!r}: use one of {', '.join(KINDS)}")
        sql, args = "SELECT tokens FROM examples", tuple[str, ...]()
        if kind is not None:
            sql, args = sql + " WHERE kind = ?", (kind,)
        with self._read() as conn:
            return [np.frombuffer(blob, dtype="<i4") for (blob,) in conn.execute(sql, args)]

    def promoted_tokens(self) -> set[str]:
        """The token strings that any feature promotes (its positive logit effects)."""
        out: set[str] = set()
        with self._read() as conn:
            for (blob,) in conn.execute("SELECT logits_pos_json FROM features WHERE logits_pos_json IS NOT NULL"):
                out.update(str(p[0]) for p in json.loads(blob))
        return out

    def top_tokens(self, sae_id: str, n: int) -> dict[int, list[np.ndarray]]:
        """Token ids of the `n` best top examples of every feature of one SAE (idx → arrays, best first),
        in one query: what the search index reads for tens of thousands of features."""
        with self._read() as conn:
            rows = conn.execute("SELECT idx, tokens FROM examples WHERE sae_id = ? AND kind = 'top' AND rank < ? "
                                "ORDER BY idx, rank", (sae_id, _positive(n))).fetchall()
        out: dict[int, list[np.ndarray]] = {}
        for r in rows:
            out.setdefault(r["idx"], []).append(np.frombuffer(r["tokens"], dtype="<i4"))
        return out

    def top_features(self, sae_id: str, order_by: str = "frequency", limit: int = 50) -> list[dict]:
        """Feature stats of one SAE, largest `order_by` first ('idx' sorts ascending)."""
        if order_by not in ORDERS:
            raise SaescopeError(f"cannot order features by {order_by!r}: use one of {', '.join(ORDERS)}")
        with self._read() as conn:
            rows = conn.execute(f"SELECT * FROM features WHERE sae_id = ? ORDER BY {ORDERS[order_by]}, idx "
                                "LIMIT ?", (sae_id, _positive(limit))).fetchall()
        return [_feature_dict(r) for r in rows]

    def feature_page(self, sae_id: str, *, order_by: str = "frequency", descending: bool = True, offset: int = 0,
                     limit: int = 50, state: str = "all", min_frequency: float | None = None,
                     max_frequency: float | None = None, min_score: float | None = None,
                     max_score: float | None = None) -> tuple[list[dict], int]:
        """One page of an SAE's features and how many match the filters.

        Rows: idx, frequency, n_fired, max_act, mean_act, score (the best detection score among the
        feature's current labels; None when unscored). `state`: all, alive (fired), dead (never fired),
        dense (fires on more than DENSE_FREQUENCY of tokens) or sparse (alive and not dense). A score filter drops unscored features.
        Unscored features sort last in both directions; ties by idx.
        """
        if order_by not in PAGE_ORDERS:
            raise SaescopeError(f"cannot order features by {order_by!r}: use one of {', '.join(PAGE_ORDERS)}")
        if state not in STATES:
            raise SaescopeError(f"unknown feature state {state!r}: use one of {', '.join(STATES)}")
        where: list[str] = ["f.sae_id = ?"]
        args: list[Any] = [sae_id, sae_id]
        where += {"all": [], "alive": ["f.n_fired > 0"], "dead": ["COALESCE(f.n_fired, 0) = 0"],
                  "dense": [f"f.frequency > {DENSE_FREQUENCY}"],
                  "sparse": ["f.n_fired > 0", f"f.frequency <= {DENSE_FREQUENCY}"]}[state]
        for column, op, value in (("f.frequency", ">=", min_frequency), ("f.frequency", "<=", max_frequency),
                                  ("s.score", ">=", min_score), ("s.score", "<=", max_score)):
            if value is not None:
                where.append(f"{column} {op} ?")
                args.append(float(value))
        sql = ("SELECT f.idx, f.frequency, f.n_fired, f.max_act, f.mean_act, s.score FROM features f LEFT JOIN "
               "(SELECT l.idx, MAX(sc.value) AS score FROM labels l JOIN scores sc ON sc.label_id = l.id "
               "WHERE l.sae_id = ? AND l.is_current = 1 AND sc.method LIKE 'detection%' GROUP BY l.idx) s "
               "ON s.idx = f.idx WHERE " + " AND ".join(where))
        column = "s.score" if order_by == "score" else f"f.{order_by}"
        order = f" ORDER BY {column} IS NULL, {column} {'DESC' if descending else 'ASC'}, f.idx LIMIT ? OFFSET ?"
        with self._read() as conn:
            total = conn.execute(f"SELECT COUNT(*) FROM ({sql})", args).fetchone()[0]
            rows = conn.execute(sql + order, [*args, _positive(limit), max(0, int(offset))]).fetchall()
        return [dict(r) for r in rows], int(total)

    def max_acts(self, sae_id: str) -> dict[int, float]:
        """idx → max activation over the analysed tokens, for every analysed feature of one SAE."""
        with self._read() as conn:
            rows = conn.execute("SELECT idx, max_act FROM features WHERE sae_id = ?", (sae_id,)).fetchall()
        return {int(i): float(m or 0.0) for i, m in rows}

    # ---------------------------------------------------------------- labels and scores

    def set_label(self, sae_id: str, idx: int, text: str, source: LabelSource = "human",
                  model: str | None = None, author: str | None = None) -> int:
        """Make `text` the current label of a feature for `source`; return the label id.

        The previous current label (same source) stays in the history. Setting the
        same text, model and author again changes nothing and returns the current id.
        Text is stored as given (stripped); escaping is the renderer's job.
        """
        text = _clean_label(text)
        if source not in SOURCES:
            raise SaescopeError(f"unknown label source {source!r}: use one of {', '.join(SOURCES)}")
        idx = int(idx)
        with self._write() as conn:
            sae = self._require_sae(conn, sae_id)
            width, version = sae["width"], sae["weights_version"]
            if idx < 0 or (width is not None and idx >= width):
                raise SaescopeError(f"feature {idx} is out of range for SAE {sae_id!r} (width {width}): "
                                    f"use 0..{width - 1 if width else 0}")
            old = conn.execute("SELECT id, text, model, author, weights_version FROM labels WHERE sae_id = ? "
                               "AND idx = ? AND source = ? AND is_current = 1", (sae_id, idx, source)).fetchone()
            same = old is not None and (old["text"], old["model"], old["author"]) == (text, model, author)
            if same and old["weights_version"] == version:  # the same text for older weights is new
                return old["id"]
            if old is not None:
                conn.execute("UPDATE labels SET is_current = 0 WHERE id = ?", (old["id"],))
            cur = conn.execute(
                """INSERT INTO labels(sae_id, idx, text, source, model, author, created, is_current, prev_id,
                                      weights_version) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?)""",
                (sae_id, idx, text, source, model, author, time.time(), None if old is None else old["id"],
                 version))
            return _row_id(cur)

    def labels(self, sae_id: str, idx: int, history: bool = False) -> list[dict]:
        """Current labels of a feature (all sources), newest first; with history, old ones too."""
        sql = f"SELECT {_LABEL_COLUMNS} FROM labels WHERE sae_id = ? AND idx = ?"
        if not history:
            sql += " AND is_current = 1"
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY id DESC", (sae_id, int(idx))).fetchall()
        return [_label_dict(r) for r in rows]

    def labels_of(self, sae_id: str, idxs: Sequence[int]) -> dict[int, list[dict]]:
        """Current labels of several features of one SAE: idx → labels (all sources), newest first."""
        out: dict[int, list[dict]] = {int(i): [] for i in idxs}
        ids = sorted(out)
        with self._read() as conn:
            for k in range(0, len(ids), 500):  # SQLite's default limit on bound parameters is 999
                chunk = ids[k:k + 500]
                rows = conn.execute(f"SELECT {_LABEL_COLUMNS} FROM labels WHERE sae_id = ? AND is_current = 1 "
                                    f"AND idx IN ({','.join('?' * len(chunk))}) ORDER BY id DESC",
                                    (sae_id, *chunk)).fetchall()
                for r in rows:
                    out[r["idx"]].append(_label_dict(r))
        return out

    def current_labels(self, source: LabelSource | None = None) -> list[dict]:
        """Every current label (optionally of one source), ordered by SAE and feature."""
        sql = f"SELECT {_LABEL_COLUMNS} FROM labels WHERE is_current = 1"
        args: tuple = ()
        if source is not None:
            sql += " AND source = ?"
            args = (source,)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY sae_id, idx, source", args).fetchall()
        return [_label_dict(r) for r in rows]

    def add_score(self, label_id: int, method: str, value: float, details: dict | None = None) -> int:
        """Record a score of a label (e.g. method 'detection-offline'); return the score id."""
        return self.add_scores(label_id, [(method, value, details)])[0]

    def add_scores(self, label_id: int, scores: Sequence[tuple[str, float, dict | None]]) -> list[int]:
        """Record several scores of a label in one transaction (all or none: a labeller killed between
        two scores must not leave a label that looks scored); return the score ids."""
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM labels WHERE id = ?", (int(label_id),)).fetchone() is None:
                raise SaescopeError(f"no label with id {label_id} in {self.path.name}: score an existing label")
            return [_row_id(conn.execute(
                "INSERT INTO scores(label_id, method, value, details_json, created) VALUES (?, ?, ?, ?, ?)",
                (int(label_id), method, float(value), _dumps(details), time.time())))
                for method, value, details in scores]

    def scores(self, label_id: int) -> list[dict]:
        """Scores of one label, newest first; `details` decoded."""
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM scores WHERE label_id = ? ORDER BY id DESC",
                                (int(label_id),)).fetchall()
        return [_score_dict(r) for r in rows]

    def search_fts(self, query: str, limit: int = 20) -> list[dict]:
        """Full-text search over current labels, best match first (each dict has `rank`, lower = better).

        Every whitespace-separated word of `query` must match (porter stemming;
        the last word also matches as a prefix). FTS5 syntax in the query is taken
        literally, so no user query can make the search fail.
        """
        if not isinstance(query, str):
            raise SaescopeError(f"search query must be text, not {type(query).__name__}")
        # NUL ends a string inside SQLite's FTS parser, lone surrogates cannot be encoded: drop both.
        query = query.replace("\x00", " ").encode("utf-8", "ignore").decode("utf-8")
        words = query.split()
        if not words:
            raise SaescopeError("empty search query: type a word to search the labels for")
        match = " ".join('"' + w.replace('"', '""') + '"' for w in words) + "*"
        with self._read() as conn:
            rows = conn.execute(
                f"""SELECT {_LABEL_COLUMNS}, labels_fts.rank AS rank FROM labels_fts
                   JOIN labels ON labels.id = labels_fts.rowid
                   WHERE labels_fts MATCH ? ORDER BY labels_fts.rank, labels.id LIMIT ?""",
                (match, _positive(limit))).fetchall()
        return [_label_dict(r) | {"rank": r["rank"]} for r in rows]

    # ---------------------------------------------------------------- run-level facts

    def set_meta(self, key: str, value: Any) -> None:
        """Store a run-level fact (any JSON value), e.g. model name or tokens analysed."""
        with self._write() as conn:
            conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, _dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    # ---------------------------------------------------------------- helpers

    def _require_sae(self, conn: sqlite3.Connection, sae_id: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM saes WHERE id = ?", (sae_id,)).fetchone()
        if row is None:
            raise SaescopeError(f"no SAE {sae_id!r} in {self.path.name}: add it with upsert_sae first")
        return row

    def _require_running(self, conn: sqlite3.Connection, sae_id: str) -> None:
        status = self._require_sae(conn, sae_id)["status"]
        if status != "running":
            raise SaescopeError(f"SAE {sae_id!r} is not being analysed (status {status!r}): "
                                "call begin_sae before writing its features")


# --------------------------------------------------------------------------- module helpers


def _check_existing(path: Path) -> list[str]:
    """Open an existing file read-only: refuse a non-database or a newer schema; return applied names.

    Only SQLite touches the file. Never `open()` a database file in a process that may hold a
    connection to it: closing any descriptor of the file drops every POSIX lock the process
    holds on it (SQLite's "How To Corrupt", 2.2), and another process may then delete the
    WAL under a live connection.
    """
    if path.stat().st_size < _MIN_DB_BYTES:  # SQLite would take it for an empty database and write over it
        raise SaescopeError(f"{path} is not a saescope feature database ({path.stat().st_size} bytes, smaller "
                            "than any SQLite database): give the path of a run's features.sqlite")
    try:
        conn = _connect(path, readonly=True)
        try:
            applied = applied_migrations(conn)
            if not applied and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise SaescopeError(f"{path} is a SQLite database but not a saescope feature database (it has "
                                    "tables but no _migrations record): give the path of a run's features.sqlite")
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        raise _db_error(path, err) from err
    _refuse_unknown(path, applied)
    return applied


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    """A bare connection (mode=ro or rwc). A read-only WAL database whose -shm index is absent and
    cannot be created (the folder is not writable) is opened immutable when it has no -wal file:
    the database file then holds every committed write."""
    conn = _connect_uri(path, "ro" if readonly else "rwc")
    if not readonly:
        return conn
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError as err:
        conn.close()
        shm, wal = Path(f"{path}-shm"), Path(f"{path}-wal")
        if _code(err) not in (_SQLITE_CANTOPEN, _SQLITE_READONLY) or shm.exists() or os.access(path.parent, os.W_OK):
            raise
        if wal.exists():
            raise SaescopeError(f"cannot read {path}: its {wal.name} holds writes but {shm.name} is missing and "
                                f"this user cannot create it in {path.parent}: make that folder writable, "
                                "or ask its owner to open the run once") from err
    return _connect_uri(path, "ro", immutable=True)


def _connect_uri(path: Path, mode: str, immutable: bool = False) -> sqlite3.Connection:
    uri = f"{path.absolute().as_uri()}?mode={mode}" + ("&immutable=1" if immutable else "")
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                           timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _open_connection(path: Path, readonly: bool) -> sqlite3.Connection:
    """The connection a FeatureDB uses: WAL mode and migrations applied when writable."""
    conn = None
    try:
        conn = _connect(path, readonly)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        if readonly:
            conn.execute("PRAGMA query_only = ON")
        else:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            _refuse_unknown(path, applied_migrations(conn))  # another process may have upgraded it
            migrate(conn)
        return conn
    except BaseException as err:
        if conn is not None:
            conn.close()
        if isinstance(err, sqlite3.DatabaseError):
            raise _db_error(path, err) from err
        raise


def can_write(path: str | Path) -> bool:
    """Whether this user may write `path` (or create it) and its folder: SQLite's WAL mode needs
    to create -wal and -shm files beside the database."""
    path = Path(path)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


def _refuse_unknown(path: Path, applied: Sequence[str]) -> None:
    known = {name for name, _ in MIGRATIONS}
    unknown = [name for name in applied if name not in known]
    if unknown:
        raise SaescopeError(f"{path.name} was written by a newer saescope (unknown migrations: "
                            f"{', '.join(unknown)}): upgrade saescope")


def _code(err: sqlite3.Error) -> int | None:
    """SQLite's primary result code of an error (None when Python raised it itself)."""
    code = getattr(err, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _read_only(path: Path) -> SaescopeError:
    return SaescopeError(f"{path} is read-only for this user (writing labels or an analysis needs it and its "
                         f"folder writable): make them writable (`chmod -R u+w {path.parent}`) or work on a copy "
                         "of the run; nothing was written")


def _db_error(path: Path, err: sqlite3.Error) -> SaescopeError:
    """One line for a database error: what happened and how to recover, never advice that loses labels."""
    code = _code(err)
    if code == _SQLITE_READONLY:
        return _read_only(path)
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return SaescopeError(f"{path.name} is busy ({err}): another saescope process is writing it; "
                             "try again in a moment (nothing was written)")
    if code == _SQLITE_NOTADB:
        return SaescopeError(f"{path} is not a saescope feature database ({err}): give the path of a run's "
                             "features.sqlite; if this is one, keep a copy of the file and restore it from a backup")
    if code == _SQLITE_CORRUPT:
        return SaescopeError(f"{path} is damaged ({err}): stop the saescope processes using it, make a backup copy "
                             "of it and any -wal file beside it, then recover its labels with "
                             f"`sqlite3 {path} .recover`; do not re-run the analysis over it")
    if code == _SQLITE_FULL:
        return SaescopeError(f"no space left on the device of {path}: free some disk and try again "
                             "(the last change was not saved)")
    return SaescopeError(f"{path} could not be read or written ({err}): check that it and its folder are "
                         "readable and writable, then try again (the last change was not saved)")


def _check_row_sae(sae_id: str, row: FeatureStats | Example) -> None:
    if row.sae_id != sae_id:
        raise ValueError(f"row of SAE {row.sae_id!r} passed to a write for SAE {sae_id!r}")


def _clean_label(text: object) -> str:
    if not isinstance(text, str):
        raise SaescopeError(f"a label must be text, not {type(text).__name__}")
    text = text.strip()
    if not text:
        raise SaescopeError("empty label: write a few words describing what the feature responds to")
    if len(text) > MAX_LABEL_CHARS:
        raise SaescopeError(f"label is {len(text)} characters long: keep it to {MAX_LABEL_CHARS}")
    if "\x00" in text:
        raise SaescopeError("label contains a NUL character: remove it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SaescopeError(f"label is not valid Unicode text ({err.reason}): retype it") from err
    return text


def _positive(limit: int) -> int:
    limit = int(limit)
    if limit < 1:
        raise SaescopeError(f"limit must be at least 1, got {limit}")
    return limit


def _encode_tokens(tokens) -> bytes:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"example tokens must be 1-D, got shape {arr.shape}")
    if arr.dtype == np.int32:  # already the stored type (what analyze passes): no range check needed
        return arr.astype("<i4", copy=False).tobytes()
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError("example token ids do not fit in int32")
    return arr.astype("<i4").tobytes()


def stored_acts(acts) -> np.ndarray:
    """Example activations as the database stores them: float16, clipped to its finite range.
    Writers with many examples convert once with this and pass float16 arrays (no per-row work)."""
    return np.clip(np.asarray(acts, dtype=np.float32), -_FP16_MAX, _FP16_MAX).astype("<f2")


def _encode_acts(acts) -> bytes:
    arr = np.asarray(acts)
    if arr.ndim != 1:
        raise ValueError(f"example activations must be 1-D, got shape {arr.shape}")
    return (arr if arr.dtype == np.float16 else stored_acts(arr)).astype("<f2", copy=False).tobytes()


def _json_default(obj):
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _row_id(cur: sqlite3.Cursor) -> int:
    """The id of the row an INSERT just wrote (sqlite3 types `lastrowid` as optional)."""
    assert cur.lastrowid is not None
    return cur.lastrowid


def _dumps(obj) -> str | None:
    return None if obj is None else json.dumps(obj, default=_json_default)


def _loads(text: str | None):
    return None if text is None else json.loads(text)


def _example(row: sqlite3.Row) -> Example:
    return Example(
        sae_id=row["sae_id"], idx=row["idx"], kind=row["kind"], rank=row["rank"], quantile=row["quantile"],
        max_act=row["max_act"],
        tokens=np.frombuffer(row["tokens"], dtype="<i4").tolist(),
        acts=np.frombuffer(row["acts"], dtype="<f2").astype(np.float32).tolist(),
        ctx=row["ctx"], pos=row["pos"])


def _sae_dict(row: sqlite3.Row) -> dict:
    out = dict(row)
    out["config"] = _loads(out.pop("config_json"))
    return out


def _feature_dict(row: sqlite3.Row) -> dict:
    out = dict(row)
    for name in ("hist", "logits_pos", "logits_neg"):
        out[name] = _loads(out.pop(f"{name}_json"))
    return out


# a label row with `stale`: written for older weights than its SAE has now (see weights_replaced)
_LABEL_COLUMNS = ("labels.*, labels.weights_version < "
                  "(SELECT saes.weights_version FROM saes WHERE saes.id = labels.sae_id) AS stale")


def _label_dict(row: sqlite3.Row) -> dict:
    out = {k: row[k] for k in ("id", "sae_id", "idx", "text", "source", "model", "author", "created",
                               "prev_id", "weights_version")}
    out["is_current"] = bool(row["is_current"])
    out["stale"] = bool(row["stale"])
    return out


def _score_dict(row: sqlite3.Row) -> dict:
    out = dict(row)
    out["details"] = _loads(out.pop("details_json"))
    return out
