"""features.sqlite: schema, round trips, labels + FTS, migrations, concurrency, crash safety."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import FaultyConnection

from saescope.errors import SaescopeError
from saescope.featuredb import MIGRATIONS, Example, FeatureDB, FeatureStats, applied_migrations, migrate

SAE = "resid_post/layer_3_width_64_l0_8"


def _add_sae(db: FeatureDB, sae_id: str = SAE, width: int = 64) -> None:
    db.upsert_sae(sae_id, site="resid_post", layer=3, width=width, d_in=16, hook_name="model.layers.3.output",
                  path=f"saes/{sae_id}", config={"architecture": "jump_relu", "l0": 8})


def _stats(idx: int, sae_id: str = SAE) -> FeatureStats:
    return FeatureStats(sae_id, idx, frequency=0.01 * (idx + 1), n_fired=idx + 1, max_act=float(idx) + 0.5,
                        mean_act=0.25, hist={"edges": [0.0, 1.0, 2.0], "counts": [3, idx]},
                        logits_pos=[["Paris", np.float32(1.5)]], logits_neg=[["<script>", -2.0]])


@pytest.fixture
def db(tmp_path):
    with FeatureDB.open(tmp_path / "features.sqlite") as db:
        _add_sae(db)
        yield db


def _run_writer(code: str, path, *args) -> subprocess.Popen:
    """Run `code` in another Python process (a real second SQLite connection)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(path), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_schema_and_pragmas(tmp_path):
    path = tmp_path / "sub" / "features.sqlite"
    with FeatureDB.open(path) as db:
        conn = db._conn
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
        assert {"saes", "features", "examples", "labels", "scores", "labels_fts", "meta", "vocab",
                "_migrations", "labels_one_current"} <= names
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        assert applied_migrations(conn) == [name for name, _ in MIGRATIONS]
        cols = {r["name"] for r in conn.execute("PRAGMA table_info(examples)")}
        assert cols >= {"sae_id", "idx", "kind", "rank", "quantile", "max_act", "tokens", "acts", "ctx", "pos"}
    # Opening again applies nothing new and keeps the original record.
    before = sqlite3.connect(path).execute("SELECT name, applied FROM _migrations").fetchall()
    FeatureDB.open(path).close()
    assert sqlite3.connect(path).execute("SELECT name, applied FROM _migrations").fetchall() == before


def test_features_and_examples_round_trip(db):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 262_144, size=32).astype(np.int64)
    acts = (rng.standard_normal(32) * 20).astype(np.float32)
    db.begin_sae(SAE)
    db.write_features(SAE, [_stats(i) for i in range(10)])
    db.write_examples(SAE, [
        Example(SAE, 3, "random", 0, None, 1.0, [5, 6], [0.0, 1.0], ctx=9, pos=1),
        Example(SAE, 3, "top", 1, None, 7.0, tokens.tolist(), acts.tolist(), ctx=4, pos=2),
        Example(SAE, 3, "top", 0, None, float(acts.max()), tokens, acts, ctx=11, pos=int(acts.argmax())),
        Example(SAE, 3, "quantile", 0, 2, 0.5, [1], [0.5], ctx=0, pos=0),
    ])
    db.finish_sae(SAE, n_tokens=1000)
    assert db.sae_status(SAE) == "done"
    assert db.sae_status("nope") is None

    [sae] = db.saes()
    assert sae["id"] == SAE and sae["n_tokens"] == 1000 and sae["config"] == {"architecture": "jump_relu", "l0": 8}

    ex = db.examples(SAE, 3)
    assert [(e.kind, e.rank) for e in ex] == [("top", 0), ("top", 1), ("quantile", 0), ("random", 0)]
    top = ex[0]
    assert top.tokens == tokens.tolist()
    assert top.acts == acts.astype(np.float16).astype(np.float32).tolist()  # exact to fp16
    assert (top.ctx, top.pos) == (11, int(acts.argmax()))
    assert [e.rank for e in db.examples(SAE, 3, kind="top")] == [0, 1]
    assert db.examples(SAE, 4) == []

    feat = db.feature(SAE, 3)
    assert feat["frequency"] == pytest.approx(0.04) and feat["n_fired"] == 4
    assert feat["hist"] == {"edges": [0.0, 1.0, 2.0], "counts": [3, 3]}
    assert feat["logits_pos"] == [["Paris", 1.5]] and feat["logits_neg"] == [["<script>", -2.0]]
    assert feat["examples"][0]["tokens"] == tokens.tolist()
    assert feat["labels"] == []
    assert db.feature(SAE, 63) is None

    assert [f["idx"] for f in db.top_features(SAE, limit=3)] == [9, 8, 7]
    assert [f["idx"] for f in db.top_features(SAE, order_by="idx", limit=2)] == [0, 1]
    with pytest.raises(SaescopeError, match="cannot order"):
        db.top_features(SAE, order_by="frequency; DROP TABLE features")


def test_writes_need_begin_and_a_known_sae(db):
    with pytest.raises(SaescopeError, match="begin_sae"):
        db.write_features(SAE, [_stats(0)])
    with pytest.raises(SaescopeError, match="upsert_sae"):
        db.begin_sae("missing")
    db.begin_sae(SAE)
    with pytest.raises(ValueError, match="SAE"):
        db.write_features(SAE, [_stats(0, sae_id="other")])
    with pytest.raises(ValueError, match="tokens but"):
        db.write_examples(SAE, [Example(SAE, 0, "top", 0, None, 1.0, [1, 2, 3], [1.0], 0, 0)])


def test_failed_batch_writes_nothing(db):
    db.begin_sae(SAE)
    db.write_features(SAE, [_stats(0)])
    with pytest.raises(sqlite3.IntegrityError):  # idx 5 twice: the whole batch rolls back
        db.write_features(SAE, [_stats(4), _stats(5), _stats(5)])
    assert [f["idx"] for f in db.top_features(SAE, order_by="idx")] == [0]


def test_killed_analysis_restarts_cleanly(tmp_path):
    path = tmp_path / "features.sqlite"
    with FeatureDB.open(path) as db:
        _add_sae(db)
    proc = _run_writer(f"""
        import sys, time
        from saescope.featuredb import FeatureDB, FeatureStats
        db = FeatureDB.open(sys.argv[1])
        db.begin_sae({SAE!r})
        db.write_features({SAE!r}, [FeatureStats({SAE!r}, i, 0.1, 1, 1.0, 1.0) for i in range(20)])
        print("half", flush=True)
        time.sleep(60)
    """, path)
    try:
        assert proc.stdout.readline().strip() == "half", proc.stderr.read()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with FeatureDB.open(path) as db:
        assert db.sae_status(SAE) == "running"  # never looks finished
        assert len(db.top_features(SAE, limit=100)) == 20
        db.begin_sae(SAE)
        assert db.top_features(SAE) == [] and db.examples(SAE, 0) == []
        db.write_features(SAE, [_stats(i) for i in range(64)])
        db.finish_sae(SAE, 500)
        assert db.sae_status(SAE) == "done" and len(db.top_features(SAE, limit=100)) == 64


def test_label_history_and_current_flag(db):
    first = db.set_label(SAE, 7, "  French cities  ")
    assert db.labels(SAE, 7)[0]["text"] == "French cities"
    assert db.set_label(SAE, 7, "French cities") == first  # same text: no new history entry
    second = db.set_label(SAE, 7, "Paris and Lyon", author="ana")
    llm = db.set_label(SAE, 7, "European capitals", source="llm", model="mock")

    current = db.labels(SAE, 7)
    assert {(lab["id"], lab["source"]) for lab in current} == {(second, "human"), (llm, "llm")}
    assert all(lab["is_current"] for lab in current)
    history = db.labels(SAE, 7, history=True)
    assert [lab["id"] for lab in history] == [llm, second, first]
    old = next(lab for lab in history if lab["id"] == first)
    assert old["is_current"] is False
    assert next(lab for lab in history if lab["id"] == second)["prev_id"] == first
    assert [lab["id"] for lab in db.current_labels(source="human")] == [second]
    assert len(db.current_labels()) == 2

    # Labels survive re-analysis of their SAE.
    db.begin_sae(SAE)
    assert len(db.labels(SAE, 7, history=True)) == 3


def test_label_validation(db):
    for bad in ["", "   ", "x" * 501, "a\x00b", "\ud800", None]:
        with pytest.raises(SaescopeError):
            db.set_label(SAE, 1, bad)
    assert db.set_label(SAE, 1, "x" * 500)
    with pytest.raises(SaescopeError, match="source"):
        db.set_label(SAE, 1, "ok", source="robot")
    with pytest.raises(SaescopeError, match="out of range"):
        db.set_label(SAE, 64, "ok")
    with pytest.raises(SaescopeError, match="upsert_sae"):
        db.set_label("missing", 1, "ok")
    # Stored verbatim: escaping is the renderer's job.
    lid = db.set_label(SAE, 2, "<script>alert(1)</script>")
    assert db.labels(SAE, 2)[0]["text"] == "<script>alert(1)</script>"
    assert lid


def test_scores_and_feature_view(db):
    db.begin_sae(SAE)
    db.write_features(SAE, [_stats(5)])
    db.finish_sae(SAE, 10)
    lid = db.set_label(SAE, 5, "numbers")
    sid = db.add_score(lid, "detection-offline", 0.75, {"n": np.int64(40), "f1": 0.7})
    feat = db.feature(SAE, 5)
    [label] = feat["labels"]
    assert label["id"] == lid
    assert [(s["id"], s["method"], s["value"], s["details"]) for s in label["scores"]] == [
        (sid, "detection-offline", 0.75, {"n": 40, "f1": 0.7})]
    with pytest.raises(SaescopeError, match="no label"):
        db.add_score(9999, "detection-llm", 0.1)


def test_fts_search(db):
    a = db.set_label(SAE, 1, "French cities such as Paris")
    b = db.set_label(SAE, 2, "dogs and other pets")
    db.set_label(SAE, 3, "the word 'and' in legal text", source="llm")
    assert [r["id"] for r in db.search_fts("paris")] == [a]
    assert [r["id"] for r in db.search_fts("dog")] == [b]  # porter stemming
    assert [r["id"] for r in db.search_fts("Par")] == [a]  # last word as a prefix
    assert [r["id"] for r in db.search_fts("cities paris")] == [a]
    assert db.search_fts("paris dogs") == []

    # A relabel replaces the indexed text; the old text is no longer found.
    c = db.set_label(SAE, 1, "river names")
    assert db.search_fts("paris") == []
    assert [r["id"] for r in db.search_fts("river")] == [c]
    assert db.search_fts("river")[0]["sae_id"] == SAE and db.search_fts("river")[0]["idx"] == 1

    hostile = ['"', '""', "'", "AND", "dogs AND", "OR OR", "NOT", "*", "dog*", "(", ")", "(dogs",
               "NEAR(dogs pets)", "text:dogs", "^dogs", "-dogs", "<script>alert(1)</script>", "a\"b'c",
               "{text}: x", "\\", "%", "dogs\x00", "\ud800 dogs", "dogs\x01\x1f"]
    for query in hostile:
        assert isinstance(db.search_fts(query), list), query
    assert [r["id"] for r in db.search_fts("(dogs")] == [b]
    for empty in ["", "   ", "\n\t", "\x00"]:
        with pytest.raises(SaescopeError, match="empty"):
            db.search_fts(empty)


def test_meta_and_vocab(db):
    db.set_meta("model", "gemma-3-270m")
    db.set_meta("n_tokens", 12345)
    db.set_meta("model", "tiny")
    assert db.get_meta("model") == "tiny" and db.get_meta("n_tokens") == 12345
    assert db.get_meta("missing", default=3) == 3
    db.set_vocab(["<pad>", "the", " Paris"])
    assert db.vocab(np.array([2, 1, 2, 99])) == [" Paris", "the", " Paris", None]


def test_readonly(tmp_path, db):
    with pytest.raises(SaescopeError, match="no feature database"):
        FeatureDB.open(tmp_path / "missing.sqlite", readonly=True)
    db.set_label(SAE, 1, "hello")
    with FeatureDB.open(db.path, readonly=True) as ro:
        assert ro.labels(SAE, 1)[0]["text"] == "hello"
        with pytest.raises(SaescopeError, match="read-only"):
            ro.set_label(SAE, 1, "changed")


def test_old_database_is_upgraded_and_keeps_its_data(tmp_path):
    path = tmp_path / "features.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, MIGRATIONS[:1]) == ["m001_initial"]
    conn.execute("INSERT INTO saes(id, site, layer, width, status) VALUES (?, 'resid_post', 3, 64, 'done')",
                 (SAE,))
    conn.execute("INSERT INTO features(sae_id, idx, frequency, n_fired, max_act, mean_act) "
                 "VALUES (?, 4, 0.5, 10, 2.0, 1.0)", (SAE,))
    conn.execute("INSERT INTO labels(sae_id, idx, text, source, created, is_current) "
                 "VALUES (?, 4, 'old label about volcanoes', 'human', 0, 1)", (SAE,))
    conn.execute("INSERT INTO labels(sae_id, idx, text, source, created, is_current) "
                 "VALUES (?, 4, 'older label about mountains', 'human', 0, 0)", (SAE,))
    conn.close()

    with pytest.raises(SaescopeError, match="needs upgrading"):
        FeatureDB.open(path, readonly=True)

    with FeatureDB.open(path) as db:
        assert applied_migrations(db._conn) == [name for name, _ in MIGRATIONS]
        assert db.feature(SAE, 4)["n_fired"] == 10
        assert [r["text"] for r in db.search_fts("volcanoes")] == ["old label about volcanoes"]
        assert db.search_fts("mountains") == []  # only current labels are indexed
        new = db.set_label(SAE, 4, "lava")
        assert db.labels(SAE, 4, history=True)[0]["prev_id"] == 1 and new == 3


def test_newer_database_is_refused_untouched(tmp_path):
    path = tmp_path / "features.sqlite"
    with FeatureDB.open(path) as db:
        _add_sae(db)
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, [*MIGRATIONS, ("m999_from_the_future", lambda c: c.execute("CREATE TABLE future (x)"))])
    conn.execute("PRAGMA journal_mode = DELETE")  # so that switching it to WAL would show in the bytes
    conn.close()
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    for readonly in (False, True):
        with pytest.raises(SaescopeError, match=r"newer saescope \(unknown migrations: m999_from_the_future\)"):
            FeatureDB.open(path, readonly=readonly)
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime


def test_not_a_database(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite at all\n" * 100)
    half = tmp_path / "half.sqlite"
    half.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 20)
    tiny = tmp_path / "tiny.sqlite"  # SQLite alone would take these for empty databases and write over them
    tiny.write_bytes(b"x")
    header = tmp_path / "header.sqlite"
    header.write_bytes(b"SQLite format 3\x00")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    for path in (junk, half, tiny, header, other):
        before = path.read_bytes()
        for readonly in (False, True):
            with pytest.raises(SaescopeError, match="not a saescope feature database") as err:
                FeatureDB.open(path, readonly=readonly)
            assert "aside" not in str(err.value) and "re-run" not in str(err.value)
        assert path.read_bytes() == before
    with pytest.raises(SaescopeError, match="is a folder"):
        FeatureDB.open(tmp_path)


def test_damaged_database_says_how_to_recover_labels(tmp_path):
    """A corrupt page is reported as damage with a recovery path, never 'move it aside / re-run the analysis'."""
    path = tmp_path / "features.sqlite"
    with FeatureDB.open(path) as db:
        _add_sae(db)
        for i in range(200):
            db.set_label(SAE, i % 64, f"label number {i} " * 10)
    conn = sqlite3.connect(path)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    n_pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:  # no connection is open in this process
        for page in range(2, n_pages):
            f.seek(page * page_size + 7)
            f.write(b"\xff" * 64)
    before = path.read_bytes()
    with pytest.raises(SaescopeError, match="is damaged") as err:
        with FeatureDB.open(path) as db:
            db.current_labels()
    message = str(err.value)
    assert ".recover" in message and "backup copy" in message and "aside" not in message
    assert path.read_bytes() == before


def test_concurrent_reader_never_sees_half_an_sae(tmp_path):
    path = tmp_path / "features.sqlite"
    n_saes, width, batch = 8, 120, 40
    ids = [f"resid_post/layer_{i}_width_{width}_l0_8" for i in range(n_saes)]
    with FeatureDB.open(path) as db:
        for sae_id in ids:
            _add_sae(db, sae_id, width=width)
    proc = _run_writer("""
        import sys, time
        from saescope.featuredb import Example, FeatureDB, FeatureStats
        path, width, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        with FeatureDB.open(path) as db:
            for sae in db.saes():
                db.begin_sae(sae["id"])
                for start in range(0, width, batch):
                    idxs = range(start, start + batch)
                    db.write_features(sae["id"], [FeatureStats(sae["id"], i, 0.1, 1, 1.0, 1.0) for i in idxs])
                    db.write_examples(sae["id"], [Example(sae["id"], i, "top", 0, None, 1.0, [1] * 64,
                                                          [0.5] * 64, 0, 0) for i in idxs])
                    time.sleep(0.01)
                db.finish_sae(sae["id"], 1000)
    """, path, width, batch)

    seen = set()
    reads = 0
    with FeatureDB.open(path, readonly=True) as reader:
        while True:
            finished = proc.poll() is not None
            with reader._read():  # one snapshot: status and rows must agree
                for sae in reader.saes():
                    n = len(reader.top_features(sae["id"], order_by="idx", limit=10_000))
                    seen.add(sae["status"])
                    if sae["status"] == "done":
                        assert n == width, sae
                    else:
                        assert n % batch == 0, (sae, n)  # whole batches only
                    reads += 1
            if finished:
                break
    assert proc.wait() == 0, proc.stderr.read()
    assert seen >= {"running", "done"} and reads > n_saes
    with FeatureDB.open(path, readonly=True) as reader:
        assert all(s["status"] == "done" for s in reader.saes())


def test_writers_in_threads_share_one_object(db):
    import threading

    db.begin_sae(SAE)
    errors = []

    def write(start):
        try:
            for i in range(start, start + 16, 4):
                db.write_features(SAE, [_stats(j) for j in range(i, i + 4)])
                db.set_label(SAE, i, f"label {i}")
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(s,)) for s in (0, 16, 32, 48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(db.top_features(SAE, limit=100)) == 64 and len(db.current_labels()) == 16


def test_opening_again_in_a_process_keeps_its_locks(tmp_path):
    """A second open of the file in a process holding a connection must not drop that
    connection's locks: otherwise another process's close deletes the WAL under it
    (SQLite's "How To Corrupt" 2.2), and the next write is lost or fails."""
    path = tmp_path / "features.sqlite"
    with FeatureDB.open(path) as db:
        _add_sae(db)
        db.set_label(SAE, 1, "first")
        FeatureDB.open(path).close()  # e.g. the web app's label route opening the run's database
        FeatureDB.open(path, readonly=True).close()
        other = _run_writer("""
            import sys
            from saescope.featuredb import FeatureDB
            with FeatureDB.open(sys.argv[1]) as db:
                db.set_label("resid_post/layer_3_width_64_l0_8", 2, "from another process")
        """, path)
        assert other.wait(timeout=120) == 0, other.stderr.read()
        assert Path(f"{path}-wal").exists() and Path(f"{path}-shm").exists()
        db.set_label(SAE, 3, "after")
        assert [lab["text"] for i in (1, 2, 3) for lab in db.labels(SAE, i)] == ["first", "from another process",
                                                                                  "after"]
    with FeatureDB.open(path, readonly=True) as db:
        assert db._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert len(db.current_labels()) == 3


@pytest.mark.parametrize("fail_on", ["INSERT INTO labels", "COMMIT", "SELECT labels.*"])
def test_fault_in_a_transaction_rolls_back_and_reconnects(tmp_path, fail_on):
    path = tmp_path / "features.sqlite"
    with FeatureDB.open(path) as db:
        _add_sae(db)
        db.set_label(SAE, 1, "kept")
        real = db._conn
        db._conn = faulty = FaultyConnection(real, fail_on)
        with pytest.raises(SaescopeError, match=r"could not be read or written \(disk I/O error\).*try again"):
            if fail_on.startswith("SELECT"):
                db.labels(SAE, 1)
            else:
                db.set_label(SAE, 2, "lost")
        failed_at = faulty.statements.index(fail_on.split()[0])
        assert "ROLLBACK" in faulty.statements[failed_at:]
        assert "COMMIT" not in faulty.statements[failed_at + 1:]  # never COMMIT after an error
        assert not real.in_transaction
        db.set_label(SAE, 2, "saved")
        assert db._conn is not faulty  # reopened before the next transaction
        assert {lab["text"] for lab in db.current_labels()} == {"kept", "saved"}


def test_error_inside_a_read_is_rolled_back_not_committed(tmp_path):
    path = tmp_path / "features.sqlite"
    with FeatureDB.open(path) as db:
        _add_sae(db)
        db._conn = recorder = FaultyConnection(db._conn, fail_on="")
        with pytest.raises(ValueError):
            with db._read():
                raise ValueError("boom")
        assert recorder.statements == ["BEGIN", "ROLLBACK"]
        db.set_label(SAE, 1, "still works")


def test_busy_database_is_one_line_and_writes_nothing(tmp_path):
    path = tmp_path / "features.sqlite"
    with FeatureDB.open(path) as db:
        _add_sae(db)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the busy timeout
        try:
            with pytest.raises(SaescopeError, match=r"is busy \(database is locked\): another saescope process"):
                db.set_label(SAE, 1, "waits")
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert db.labels(SAE, 1) == []
        db.set_label(SAE, 1, "saved")
        assert [lab["text"] for lab in db.labels(SAE, 1)] == ["saved"]


def test_python_never_opens_the_database_file(tmp_path, monkeypatch):
    """Only SQLite may hold descriptors of the file (DESIGN.md §7): a Python open() and close
    would drop the locks of this process's connections."""
    import builtins
    import io

    path = tmp_path / "features.sqlite"
    with FeatureDB.open(path) as db:
        _add_sae(db)
    opened = []

    def recording(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, str | bytes | os.PathLike) and "features.sqlite" in os.fsdecode(file):
                opened.append((real.__name__, os.fsdecode(file)))
            return real(file, *args, **kwargs)
        return wrapper

    for module, name in ((builtins, "open"), (io, "open"), (os, "open")):
        monkeypatch.setattr(module, name, recording(getattr(module, name)))
    for readonly in (False, True):
        with FeatureDB.open(path, readonly=readonly) as db:
            db.labels(SAE, 1)
    with FeatureDB.open(path) as db:
        db.set_label(SAE, 1, "x")
    assert opened == []


def test_scores_of_a_label_are_written_all_or_none(tmp_path):
    """A labeller killed between a label's detection and output scores must not leave it half scored
    (a resumed run skips labels that have a score): add_scores is one transaction."""
    with FeatureDB.open(tmp_path / "features.sqlite") as db:
        _add_sae(db)
        label_id = db.set_label(SAE, 1, "x")
        with pytest.raises(ValueError):
            db.add_scores(label_id, [("detection-offline", 0.9, None), ("output-offline", "not a number", None)])
        assert db.scores(label_id) == []
        db.add_scores(label_id, [("detection-offline", 0.9, None), ("output-offline", 0.7, None)])
        assert sorted(s["method"] for s in db.scores(label_id)) == ["detection-offline", "output-offline"]
