"""Prompt-inspector latency: a 64-token prompt through all 18 layers of Gemma 3 270M with 18 SAEs.

Times the two paths the web app uses, warm (model and SAEs loaded, warm-up calls reported apart):
- `Scope.inspect(text, top=5)` (the library call behind POST /api/inspect);
- POST /api/inspect through the FastAPI app in-process (TestClient: JSON + the
  prompt check + the worker thread + the model lock).

SAEs: the width-4096 resid_post SAEs of runs/gemma-3-270m when it has one per layer;
otherwise 18 randomly initialised JumpReLU SAEs saved into a temporary run, their
thresholds set so that ~32 features fire per token (random init alone fires half the
features). Target: median ≤ 1 s. Appends a section to bench/RESULTS.md.

    .venv/bin/python bench/bench_inspect.py [--run runs/gemma-3-270m] [--calls 10] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from saescope.models import DEFAULT_MODEL, load_model
from saescope.runs import Run
from saescope.sae import SAE, SAEConfig

WIDTH = 4096
L0 = 32
N_TOKENS = 64
TEXT = ("The Eiffel Tower, built for the 1889 World's Fair in Paris, was at first criticised by artists "
        "and writers. Today it is the most visited paid monument in the world, and its lights sparkle "
        "every evening for five minutes on the hour. Gustave Eiffel's company designed and built it; "
        "the engineers Maurice Koechlin and Emile Nouguier drew the first plans in 1884, and the "
        "architect Stephen Sauvestre added the arches at its base.")


def prompt(tokenizer, n: int = N_TOKENS) -> str:
    """TEXT cut to n tokens including BOS."""
    body = tokenizer(TEXT, add_special_tokens=False)["input_ids"][: n - 1]
    return tokenizer.decode(body)


def real_run(path: Path) -> Run | None:
    if not (path / "manifest.json").is_file():
        return None
    run = Run.open(path)
    ids = [i for i in run.sae_ids() if i.startswith("resid_post/") and f"_width_{WIDTH}_" in i]
    layers = {int(i.split("layer_")[1].split("_")[0]) for i in ids}
    return run if len(layers) >= 18 and len(ids) == 18 else None


def random_run(folder: Path) -> Run:
    """18 random width-4096 JumpReLU SAEs, thresholds calibrated to ~L0 on the benchmark text."""
    from saescope.harvest import activations

    lm = load_model(DEFAULT_MODEL)
    run = Run.create(folder, model=DEFAULT_MODEL, corpus={"source": "none"}, config={"bench": "inspect"})
    ids = lm.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    sites = lm.sites(kinds=("resid_post",))
    acts = activations(lm, ids, sites)
    gen = torch.Generator().manual_seed(0)
    for site in sites:
        cfg = SAEConfig(d_in=site.width, width=WIDTH, l0=L0, site="resid_post", layer=site.layer,
                        hf_hook_point_in=site.hook_name, hf_hook_point_out=site.hook_name, model_name=DEFAULT_MODEL)
        sae = SAE.init(cfg, generator=gen)
        with torch.no_grad():
            x = acts[site.key][0, 1:].float()  # (seq, d_in), BOS dropped
            z = x @ sae.w_enc + sae.b_enc  # (seq, width)
            # per-feature threshold at the (1 - L0/width) quantile of its pre-activations
            sae.threshold.copy_(torch.quantile(z, 1 - L0 / WIDTH, dim=0).clamp(min=1e-3))
        sae.save(run.saes_dir / "resid_post" / cfg.folder_name)
    return run


WARM_CALLS = 5


def timed(fn, calls: int) -> tuple[list[float], list[float]]:
    """(warm-up call times, timed call times). The first calls after loading are several times
    slower (weights paged in on first touch), so WARM_CALLS are run and reported apart."""
    def one():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    warm = [one() for _ in range(WARM_CALLS)]
    return warm, [one() for _ in range(calls)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/gemma-3-270m")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--no-write", action="store_true", help="do not append to bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastapi.testclient import TestClient

    from saescope.scope import Scope
    from saescope.server.app import create_app

    tmp = None
    run = real_run(Path(args.run))
    source = f"trained SAEs of {args.run}"
    if run is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-inspect-")
        t0 = time.perf_counter()
        run = random_run(Path(tmp.name) / "run")
        source = f"18 random-init JumpReLU SAEs (thresholds calibrated to L0≈{L0}), built in {time.perf_counter() - t0:.0f} s"
    t0 = time.perf_counter()
    scope = Scope.open(run.root)
    lm = scope.model
    text = prompt(lm.tokenizer)
    out = scope.inspect(text, top=5)
    n_tok = len(out["tokens"])
    load_s = time.perf_counter() - t0
    assert len(out["layers"]) == 18, [layer["sae_id"] for layer in out["layers"]]
    mean_active = statistics.mean(len(f) for layer in out["layers"] for f in layer["features"])
    lib_warm, lib = timed(lambda: scope.inspect(text, top=5), args.calls)

    app = create_app(run.root)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        def via_api():
            r = client.post("/api/inspect", json={"text": text, "top": 5})
            assert r.status_code == 200, r.text
            return r
        api_warm, api = timed(via_api, args.calls)
        n_bytes = len(via_api().content)

    med_lib, med_api = statistics.median(lib), statistics.median(api)
    lines = [
        f"## Prompt inspector latency ({datetime.date.today()})",
        "",
        f"`.venv/bin/python bench/bench_inspect.py{' ' + ' '.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else ''}` — "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {lm.device}, {str(lm.dtype).replace('torch.', '')}; "
        f"model {DEFAULT_MODEL} (18 layers); SAEs: {source}.",
        f"Prompt: {n_tok} tokens (incl. BOS), top 5 features per token per layer; mean shown per cell "
        f"{mean_active:.1f}; response {n_bytes / 1024:.0f} KiB. Scope.open + first inspect: {load_s:.1f} s; then "
        f"{WARM_CALLS} warm-up calls per path (library: {', '.join(f'{t:.2f}' for t in lib_warm)} s; API, a second "
        f"Scope: {', '.join(f'{t:.2f}' for t in api_warm)} s), then {args.calls} timed calls each.",
        "",
        "| path | median | min | max |",
        "|---|---:|---:|---:|",
        f"| `Scope.inspect` | {med_lib * 1000:.0f} ms | {min(lib) * 1000:.0f} ms | {max(lib) * 1000:.0f} ms |",
        f"| POST /api/inspect (TestClient) | {med_api * 1000:.0f} ms | {min(api) * 1000:.0f} ms | {max(api) * 1000:.0f} ms |",
        "",
        f"Target ≤ 1 s: {'met' if med_api <= 1.0 else 'NOT met'}.",
        "",
    ]
    text = "\n".join(lines)
    sys.stdout.write(text + "\n")
    if not args.no_write:
        results = Path(__file__).with_name("RESULTS.md")
        with open(results, "a") as f:
            f.write("\n" + text)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
