"""One run's features.sqlite shared by several processes, and found in odd states.

The web app keeps features.sqlite open for its whole life while `label set` and `search`
open and close it in other processes (issue 16: a label save in the app plus any CLI
command on the same run used to delete the WAL under the server, losing the next save).
A read-only run (no -wal/-shm files, which cannot be created) is read as it is, and a
write to it is refused in one line.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from atlas_run import build_run  # noqa: E402

# `saescope serve` as the CLI runs it, without the warm-up pass (it inspects "Hello world",
# which the tiny test tokenizer cannot spell).
SERVE = """
import sys
import saescope.server.app as app
app.Atlas.warm_up = lambda self: None
from saescope.cli import main
sys.argv = ["saescope", "serve", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory, tiny_gemma_dir):
    return build_run(tmp_path_factory.mktemp("atlas"), tiny_gemma_dir)


@pytest.fixture
def run_dir(atlas_dir, tmp_path):
    return shutil.copytree(atlas_dir, tmp_path / "run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`saescope serve RUN` in a subprocess on a free local port."""

    def __init__(self, run_dir: Path, log: Path):
        self.port = _free_port()
        self.log = open(log, "w")  # the server's log, not a database
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, str(run_dir), "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.statuses: list[tuple[str, int]] = []
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, f"serve exited early: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "serve did not start listening within 180 s"
            try:
                self.get("/api/run")
                break
            except OSError:
                time.sleep(0.3)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                status, payload = resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            status, payload = err.code, json.loads(err.read() or b"null")
        self.statuses.append((f"{method} {path}", status))
        return status, payload

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        return self.request("POST", path, body)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saescope.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_web_and_cli_processes_on_one_run_lose_no_label(run_dir, tmp_path):
    sae = "resid_post/layer_0_width_32_l0_4"
    server = Server(run_dir, tmp_path / "serve.log")
    written: dict[int, str] = {}
    try:
        for i in range(3):
            status, _ = server.post(f"/api/feature/{sae}/{i}/label", {"text": f"web label {i}"})
            written[i] = f"web label {i}"
            cli = _cli("label", "set", str(run_dir), "0", str(10 + i), f"cli label {i}")
            assert cli.returncode == 0, cli.stderr
            written[10 + i] = f"cli label {i}"
            found = _cli("search", str(run_dir), "label", "--mode", "fts")
            assert found.returncode == 0, found.stderr
            server.post(f"/api/feature/{sae}/{20 + i}/label", {"text": f"second web label {i}"})
            written[20 + i] = f"second web label {i}"
            server.get("/api/search?q=label")
            server.post("/api/inspect", {"text": "the king is in paris", "top": 3})
            server.get(f"/api/feature/{sae}/{i}")
            server.get("/api/saes")
        status, inspected = server.post("/api/inspect", {"text": "the queen was at war", "top": 2})
        assert status == 200 and inspected, "the inspector no longer answers"
        shown = {idx: [lab["text"] for lab in server.get(f"/api/feature/{sae}/{idx}")[1]["labels"]
                       if lab["source"] == "human"] for idx in written}
        errors = [(what, status) for what, status in server.statuses if status >= 500]
        assert not errors, f"5xx answers: {errors}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        assert all(status == 200 for _, status in server.statuses), server.statuses
        assert shown == {idx: [text] for idx, text in written.items()}
        conn = sqlite3.connect(f"{(run_dir / 'features.sqlite').as_uri()}?mode=ro", uri=True)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            stored = dict(conn.execute("SELECT idx, text FROM labels WHERE source = 'human' AND is_current = 1 "
                                       "AND sae_id = ?", (sae,)).fetchall())
        finally:
            conn.close()
        assert stored == written
    finally:
        server.stop()


# --------------------------------------------------------------------------- a read-only run


def _drop_write_privilege() -> None:
    """In the child, before exec: root keeps its uid but loses the capabilities that ignore file
    modes (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so a read-only file is read-only for it too."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _cli_read_only(*args: str) -> subprocess.CompletedProcess:
    if os.geteuid() != 0:
        return _cli(*args)
    try:
        return subprocess.run([sys.executable, "-m", "saescope.cli", *args], capture_output=True, text=True,
                              timeout=300, preexec_fn=_drop_write_privilege)
    except subprocess.SubprocessError as err:
        pytest.skip(f"cannot drop root's file capabilities here: {err}")


@pytest.fixture
def read_only_run(run_dir):
    """The run with every file and folder read-only (features.sqlite has no -wal or -shm)."""
    assert not Path(f"{run_dir}/features.sqlite-shm").exists()
    paths = [run_dir, *run_dir.rglob("*")]
    modes = {p: p.stat().st_mode for p in paths}
    for p in sorted(paths, reverse=True):
        p.chmod(modes[p] & ~0o222)
    yield run_dir
    for p in sorted(paths):
        p.chmod(modes[p])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.stderr and "sqlite3." not in res.stderr
    return lines[0]


def test_label_set_on_a_read_only_run_is_one_line(read_only_run):
    before = _files(read_only_run)
    line = _one_line_error(_cli_read_only("label", "set", str(read_only_run), "0", "3", "a label"))
    assert "read-only" in line and "nothing was written" in line
    assert _files(read_only_run) == before


def test_read_only_run_without_shm_reads_fine(read_only_run):
    before = _files(read_only_run)
    for mode in ("fts", "hybrid"):  # hybrid also embeds the labels, without writing its cache here
        found = _cli_read_only("search", str(read_only_run), "city", "--mode", mode)
        assert found.returncode == 0 and "resid_post" in found.stdout, found.stderr
    shown = _cli_read_only("feature", str(read_only_run), "0", "3")
    assert shown.returncode == 0 and "top contexts" in shown.stdout, shown.stderr
    assert _files(read_only_run) == before


def _killed_writer(run_dir: Path) -> Path:
    """A process that writes a label and dies without closing: its -wal and -shm stay."""
    db = run_dir / "features.sqlite"
    writer = subprocess.run([sys.executable, "-c", (
        "import os, sys\n"
        "from saescope.featuredb import FeatureDB\n"
        "db = FeatureDB.open(sys.argv[1])\n"
        "db.set_label('resid_post/layer_0_width_32_l0_4', 5, 'only in the wal')\n"
        "os._exit(0)\n"), str(db)], capture_output=True, text=True, timeout=300)
    assert writer.returncode == 0, writer.stderr
    return db


def test_label_set_on_a_read_only_run_with_wal_and_shm_is_one_line(run_dir):
    _killed_writer(run_dir)
    modes = {p: p.stat().st_mode for p in (run_dir, *run_dir.iterdir())}
    for p, mode in modes.items():
        p.chmod(mode & ~0o222)
    try:
        before = _files(run_dir)
        line = _one_line_error(_cli_read_only("label", "set", str(run_dir), "0", "3", "a label"))
        assert "read-only" in line and "nothing was written" in line
        assert _files(run_dir) == before
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def test_read_only_run_with_a_wal_but_no_shm_says_the_true_cause(run_dir):
    db = _killed_writer(run_dir)
    Path(f"{db}-shm").unlink()
    assert Path(f"{db}-wal").stat().st_size > 0
    modes = {p: p.stat().st_mode for p in (run_dir, *run_dir.iterdir())}
    for p, mode in modes.items():
        p.chmod(mode & ~0o222)
    try:
        before = _files(run_dir)
        line = _one_line_error(_cli_read_only("search", str(run_dir), "city", "--mode", "fts"))
        assert "features.sqlite-wal holds writes" in line and "not a saescope" not in line and "aside" not in line
        assert _files(run_dir) == before
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


# --------------------------------------------------------------------------- kill -9 of `label auto`


def _offline_labels(run_dir: Path) -> list[tuple]:
    conn = sqlite3.connect(f"{(run_dir / 'features.sqlite').as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute(
            """SELECT labels.sae_id, labels.idx, labels.text, labels.model, labels.is_current,
                      scores.method, round(scores.value, 9)
               FROM labels LEFT JOIN scores ON scores.label_id = labels.id
               WHERE labels.source = 'offline' ORDER BY 1, 2, 3, 6""").fetchall()
    finally:
        conn.close()


def test_killed_label_auto_leaves_no_orphan_and_resumes_to_the_same_labels(atlas_dir, run_dir):
    psutil = pytest.importorskip("psutil")
    if (os.cpu_count() or 1) < 2:
        pytest.skip("label auto uses worker processes only with 2+ CPUs")
    uninterrupted = _offline_labels(atlas_dir)  # build_run labelled it offline in one go
    conn = sqlite3.connect(run_dir / "features.sqlite", isolation_level=None)
    conn.execute("DELETE FROM scores")
    conn.execute("DELETE FROM labels WHERE source = 'offline'")
    conn.close()
    assert uninterrupted and not _offline_labels(run_dir)
    parent = subprocess.Popen([sys.executable, "-m", "saescope.cli", "label", "auto", str(run_dir)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not _offline_labels(run_dir):  # the workers are labelling: kill their parent now
        assert parent.poll() is None, parent.stderr.read().decode()
        assert time.monotonic() < deadline, "label auto wrote no label within 300 s"
        time.sleep(0.01)
    family = psutil.Process(parent.pid).children(recursive=True)
    parent.kill()
    parent.wait()
    assert family, "label auto ran without worker processes"
    _, alive = psutil.wait_procs(family, timeout=5)
    orphans = []
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.status() != psutil.STATUS_ZOMBIE:
                orphans.append((p.pid, p.cmdline()))
                p.kill()  # do not leave them running after the test
    assert not orphans, f"orphans 5 s after kill -9 of their parent: {orphans}"
    if _offline_labels(run_dir) == uninterrupted:
        # The tiny run can finish (warm embedding cache) before the kill lands: then take the last SAE's
        # labels away, as if the kill had come before it, so the resume below still has work to do.
        conn = sqlite3.connect(run_dir / "features.sqlite", isolation_level=None)
        last = conn.execute("SELECT max(sae_id) FROM labels").fetchone()[0]
        conn.execute("DELETE FROM scores WHERE label_id IN (SELECT id FROM labels WHERE sae_id = ?)", (last,))
        conn.execute("DELETE FROM labels WHERE source = 'offline' AND sae_id = ?", (last,))
        conn.close()
    assert _offline_labels(run_dir) != uninterrupted  # killed before it finished
    resumed = _cli("label", "auto", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert _offline_labels(run_dir) == uninterrupted


def _db_rows(run_dir: Path) -> tuple:
    conn = sqlite3.connect(run_dir / "features.sqlite")
    try:
        return tuple(conn.execute(f"SELECT count(*), total(rowid) FROM {t}").fetchone()
                     for t in ("features", "examples", "labels", "scores"))
    finally:
        conn.close()


@pytest.mark.parametrize("verb", [["analyze", "RUN", "--force"], ["label", "auto", "RUN"], ["eval", "RUN", "--tokens", "64"]])
def test_a_second_process_writing_a_busy_run_is_refused_in_one_line(run_dir, verb):
    """While one process holds the run (here: this one, as a stage would), another that would write it stops
    before touching anything and names the holder; once free, the same command works."""
    from saescope.runs import Run

    args = [str(run_dir) if a == "RUN" else a for a in verb]
    before, manifest = _db_rows(run_dir), (run_dir / "manifest.json").read_bytes()
    eval_before = (run_dir / "eval.json").read_bytes() if (run_dir / "eval.json").exists() else None
    with Run.open(run_dir).exclusive("analyze"):
        res = _cli(*args)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert "is busy: saescope analyze (pid" in lines[0] and "wait for it to finish" in lines[0], lines[0]
    assert _db_rows(run_dir) == before
    assert (run_dir / "manifest.json").read_bytes() == manifest
    assert ((run_dir / "eval.json").read_bytes() if (run_dir / "eval.json").exists() else None) == eval_before
    again = _cli(*args)
    assert again.returncode == 0, again.stderr


def test_a_killed_holder_leaves_the_run_free(run_dir):
    """The lock is the OS's (flock): kill -9 of the process holding the run frees it, no stale lock file."""
    from saescope.errors import SaescopeError
    from saescope.runs import Run

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom saescope.runs import Run\n"
        f"with Run.open({str(run_dir)!r}).exclusive('label'):\n    print('held', flush=True)\n    time.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SaescopeError, match=r"is busy: saescope label \(pid"), Run.open(run_dir).exclusive("x"):
            pass
    finally:
        holder.kill()
        holder.wait()
    run = Run.open(run_dir)
    with run.exclusive("analyze"), run.exclusive("analyze again"):  # free now, and re-entrant in one process
        with run.stage("label"):
            pass
    assert run.is_done("label")


def test_holding_a_run_reads_the_manifest_another_process_wrote(run_dir):
    """A process that opened the run earlier sees, once it holds it, the stage records another one saved
    meanwhile, and keeps them when it saves its own (they were lost when each saved its stale copy)."""
    from saescope.runs import Run

    early, other = Run.open(run_dir), Run.open(run_dir)
    with other.stage("eval"):
        pass
    with early.stage("label"):
        pass
    again = Run.open(run_dir)
    assert again.manifest["stages"]["eval"]["status"] == "done"
    assert again.manifest["stages"]["label"]["status"] == "done"
    assert again.manifest["stages"]["eval"]["started"] == other.manifest["stages"]["eval"]["started"]


def test_a_second_harvest_into_a_busy_cache_is_refused_and_a_new_one_leaves_no_folder(tiny_gemma_dir, tmp_path):
    """An activation cache is held the same way (`fsio.exclusive`): a second harvest into it is refused in one
    line with the cache untouched; a refused harvest into a new folder leaves no folder behind."""
    from atlas_run import write_corpus

    from saescope.errors import SaescopeError
    from saescope.fsio import exclusive

    corpus = write_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    args = ["harvest", "--model", str(tiny_gemma_dir), "--corpus", str(corpus), "--layers", "0", "--tokens", "100",
            "--ctx-len", "32", "--out", str(cache)]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    files = {p: p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file() and p.name != ".lock"}
    with exclusive(cache, "harvest", kind="cache"):
        res = _cli(*args)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "cache" in lines[0] and "is busy: saescope harvest (pid" in lines[0], res.stderr
    assert {p: p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file() and p.name != ".lock"} == files
    new = tmp_path / "new-cache"
    with pytest.raises(SaescopeError, match="not a cache folder|is a file"), exclusive(new, "harvest"):
        raise SaescopeError(f"{new} is a file, not a cache folder")  # any refusal inside the held block
    assert not new.exists()
    assert _cli(*args).returncode == 0


def test_the_server_writes_while_label_auto_holds_the_run(atlas_dir, run_dir, tmp_path):
    """The run's lock is for writers of whole stages: the web app, which keeps features.sqlite open and saves hand
    labels, never takes it, so its saves land while `label auto` (which holds the run) relabels the atlas, and
    label auto's own labels come out as an uninterrupted run's."""
    uninterrupted = _offline_labels(atlas_dir)
    conn = sqlite3.connect(run_dir / "features.sqlite", isolation_level=None)
    conn.execute("DELETE FROM scores")
    conn.execute("DELETE FROM labels WHERE source = 'offline'")
    conn.close()
    sae = "resid_post/layer_0_width_32_l0_4"
    server = Server(run_dir, tmp_path / "serve.log")
    try:
        auto = subprocess.Popen([sys.executable, "-m", "saescope.cli", "label", "auto", str(run_dir)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        saved = 0
        while saved < 5 or auto.poll() is None:
            status, _ = server.post(f"/api/feature/{sae}/{saved % 8}/label", {"text": f"web label {saved}"})
            assert status == 200, (tmp_path / "serve.log").read_text()[-2000:]
            saved += 1
        assert auto.returncode == 0, auto.stderr.read()
        for i in range(saved - 8, saved):  # the last label saved on each feature is its current one
            if i >= 0:
                labels = server.get(f"/api/feature/{sae}/{i % 8}")[1]["labels"]
                assert f"web label {i}" in [lab["text"] for lab in labels if lab["source"] == "human"]
    finally:
        server.stop()
    assert _offline_labels(run_dir) == uninterrupted


def test_the_server_answers_while_analyze_rewrites_an_sae_and_drops_its_offline_scores(run_dir, tmp_path):
    """`analyze --force` deletes an SAE's features, examples and offline label scores (measured on the old text) in
    one transaction and writes the new atlas, while the web app, features.sqlite open all along, serves that SAE's
    cards: no answer fails; once analysed the cards show the offline labels unscored, and after `label auto` scored
    on the new text."""
    sae = "resid_post/layer_0_width_32_l0_4"

    def offline_scores(card: dict) -> list:
        return [s for lab in card["labels"] if lab["source"] == "offline" for s in lab["scores"]]

    server = Server(run_dir, tmp_path / "serve.log")
    try:
        assert any(offline_scores(server.get(f"/api/feature/{sae}/{i}")[1]) for i in range(8))
        analysis = subprocess.Popen([sys.executable, "-m", "saescope.cli", "analyze", str(run_dir), "--sae", "0",
                                     "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        asked = 0
        while asked < 5 or analysis.poll() is None:
            server.get(f"/api/feature/{sae}/{asked % 8}")
            asked += 1
        assert analysis.returncode == 0, analysis.stderr.read()
        errors = [(what, status) for what, status in server.statuses if status >= 500]
        assert not errors, f"5xx answers: {errors}\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        cards = [server.get(f"/api/feature/{sae}/{i}") for i in range(8)]
        assert all(status == 200 for status, _ in cards)
        assert not any(offline_scores(card) for _, card in cards)  # stale scores are gone
        relabel = _cli("label", "auto", str(run_dir), "--sae", "0")
        assert relabel.returncode == 0, relabel.stderr
        assert any(offline_scores(server.get(f"/api/feature/{sae}/{i}")[1]) for i in range(8))
    finally:
        server.stop()
