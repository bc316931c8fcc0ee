"""Several saescope processes on one run at once: a live `saescope serve` and CLI commands.

The web app keeps features.sqlite open for its whole life while `label set` and `search`
open and close it in other processes (issue 16: a label save in the app plus any CLI
command on the same run used to delete the WAL under the server, losing the next save).
"""

from __future__ import annotations

import json
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
