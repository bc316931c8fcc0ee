"""Feature-atlas throughput and memory on the real default model (Gemma 3 270M).

    .venv/bin/python bench/bench_analyze.py                     # 18 × width-4096 resid_post SAEs, N = 4k and 16k
    .venv/bin/python bench/bench_analyze.py --tokens 2048 --layers 0,1 --no-append   # quick look

For every N, in a fresh process (so peak RSS belongs to that N alone), over the same
held-out tokens:
- bare harvest of the SAEs' sites (the model pass analysis cannot beat);
- harvest + SAE encode only (the floor of any analysis: same model pass + the SAE matmuls);
- the full streaming analysis pass (`analyze`, logit effects off), then its database writes;
- peak RSS (ru_maxrss) and RSS after loading the model and SAEs.
Logit effects are a fixed cost per SAE (independent of N): timed once for one SAE.

SAEs come from --run when it holds trained ones on the model, else they are random
(Gemma Scope init) with thresholds set per feature from held-out-free training-part
activations so each feature fires on ~--l0/width of tokens (L0 ≈ --l0, like a trained SAE;
the raw init's θ = 0.001 would fire half of all features).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_run(folder: Path, layers: list[int], width: int, l0: float) -> None:
    from saescope.corpus import Corpus
    from saescope.harvest import harvest
    from saescope.models import load_model
    from saescope.runs import Run
    from saescope.sae import SAE, SAEConfig

    lm = load_model()
    run = Run.create(folder, model="gemma-3-270m", corpus={"source": "default", "heldout_fraction": 0.05, "seed": 0},
                     config={"ctx_len": 256, "bench": "random SAEs, calibrated thresholds"})
    sites = [lm.site("resid_post", layer) for layer in layers]
    stream = Corpus("default", 0.05, 0).contexts(lm.tokenizer, part="train", ctx_len=256)
    acts = next(iter(harvest(lm, stream, sites, batch_size=8, max_tokens=2048, progress=False))).acts
    g = torch.Generator().manual_seed(0)
    for site in sites:
        cfg = SAEConfig(d_in=site.width, width=width, l0=l0, site="resid_post", layer=site.layer,
                        model_name="gemma-3-270m", hf_hook_point_in=site.hook_name, hf_hook_point_out=site.hook_name)
        sae = SAE.init(cfg, generator=g)
        with torch.no_grad():
            z = sae.pre_acts(acts[site.key])  # (n, width)
            k = max(1, int(z.shape[0] * (1 - l0 / width)))
            sae.threshold.copy_(z.kthvalue(k, dim=0).values.clamp(min=1e-3))
        sae.save(run.saes_dir / "resid_post" / cfg.folder_name)


def child(run_dir: str, n_tokens: int) -> dict:
    from saescope.analyze import analyze, encode
    from saescope.corpus import Corpus
    from saescope.harvest import harvest
    from saescope.runs import Run

    torch.set_grad_enabled(False)
    run = Run.open(run_dir)
    lm = run.model
    saes = {i: run.load_sae(i) for i in run.sae_ids()}
    sites = [lm.site(s.cfg.site, s.cfg.layer) for s in saes.values()]
    rss_loaded = rss_mb()
    c = run.manifest["corpus"]

    def stream():
        return Corpus(c["source"], c["heldout_fraction"], c["seed"]).contexts(lm.tokenizer, part="heldout", ctx_len=256)

    out = {"n_saes": len(saes), "width": next(iter(saes.values())).cfg.width, "rss_loaded_mb": rss_loaded}
    # bare harvest
    t0, c0, n = time.perf_counter(), cpu_s(), 0
    for b in harvest(lm, stream(), sites, batch_size=8, max_tokens=n_tokens, progress=False):
        n += b.token_ids.numel()
    out["harvest_tok_s"] = n / (time.perf_counter() - t0)
    out["harvest_tok_cpu_s"] = n / (cpu_s() - c0)
    # harvest + encode only
    t0, c0, n, l0 = time.perf_counter(), cpu_s(), 0, []
    for b in harvest(lm, stream(), sites, batch_size=8, max_tokens=n_tokens, progress=False):
        for s in saes.values():
            f = encode(s, b.acts[f"{s.cfg.site}/{s.cfg.layer}"])
        l0.append(float((f > 0).sum(1).float().mean()))
        n += b.token_ids.numel()
    out["encode_tok_s"] = n / (time.perf_counter() - t0)
    out["encode_tok_cpu_s"] = n / (cpu_s() - c0)
    out["l0_last_sae"] = sum(l0) / len(l0)
    # the analysis
    c0 = cpu_s()
    rep = analyze(run, n_tokens=n_tokens, n_logits=0, force=True, progress=False, lm=lm)
    out["analyze_cpu_s"] = cpu_s() - c0  # whole call: setup + pass + writes
    out.update(n_tokens=rep.n_tokens, analyze_tok_s=rep.tokens_per_s, pass_s=rep.seconds_pass,
               write_s=rep.seconds_write, examples=rep.examples, peak_rss_mb=peak_mb(),
               db_mb=run.db_path.stat().st_size / 2**20)
    return out


def logits_timing(run_dir: str) -> dict:
    from saescope.analyze import logit_effects
    from saescope.runs import Run

    run = Run.open(run_dir)
    lm = run.model
    sae = run.load_sae(run.sae_ids()[0])
    t0 = time.perf_counter()
    logit_effects(lm, sae, n=10)
    return {"logits_s_per_sae": time.perf_counter() - t0, "vocab": len(lm.tokenizer)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--l0", type=float, default=64)
    ap.add_argument("--run", default=str(ROOT / "runs" / "gemma-3-270m"), help="a run with trained SAEs, if any")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("RUN", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--logits-child", metavar="RUN", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    if args.logits_child:
        print(json.dumps(logits_timing(args.logits_child)))
        return

    t_start = time.time()
    tmp = tempfile.TemporaryDirectory(prefix="bench-analyze-")
    if (Path(args.run) / "manifest.json").is_file() and (Path(args.run) / "saes").is_dir():
        src = "trained run " + args.run
        run_dir = Path(tmp.name) / "run"  # analyse a copy: never touch the real run's features.sqlite
        import shutil

        shutil.copytree(args.run, run_dir, ignore=shutil.ignore_patterns("features.sqlite*", "checkpoints", "cache"))
    else:
        layers = list(range(18)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
        run_dir = Path(tmp.name) / "run"
        build_run(run_dir, layers, args.width, args.l0)
        src = f"random SAEs (thresholds calibrated to L0≈{args.l0:g}), resid_post layers {args.layers}"
    rows = []
    for n in [int(x) for x in args.tokens.split(",")]:
        res = subprocess.run([sys.executable, __file__, "--child", str(run_dir), str(n)], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    res = subprocess.run([sys.executable, __file__, "--logits-child", str(run_dir)], capture_output=True, text=True,
                         check=True)
    lg = json.loads(res.stdout.strip().splitlines()[-1])
    print(lg)
    total = time.time() - t_start
    lines = [
        "", "## Feature atlas (analyze)", "",
        f"`.venv/bin/python bench/bench_analyze.py {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} CPU fp32, {torch.get_num_threads()} threads. "
        f"Gemma 3 270M, {rows[0]['n_saes']} SAEs × width {rows[0]['width']}: {src}; "
        f"held-out tokens of the default corpus, ctx 256, batch 8 contexts. The machine is shared with other "
        f"work, so absolute numbers drift (±30%); each N ran in its own process, the three passes back to back.", "",
        "Wall-clock tokens/s, and in brackets tokens per CPU-second of this process (less sensitive to other "
        "load; the analysis' CPU figure covers the whole call, setup and writes included, so it is a lower bound).", "",
        "| N tokens | harvest tok/s | harvest+encode tok/s (floor) | analysis pass tok/s | analysis / harvest | "
        "analysis / floor | write s (no logits) | pass + write / harvest | examples | DB MB | RSS after load MB | "
        "peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a_cpu = r["n_tokens"] / r["analyze_cpu_s"]
        lines.append(f"| {r['n_tokens']:,} | {r['harvest_tok_s']:.0f} ({r['harvest_tok_cpu_s']:.0f}) | "
                     f"{r['encode_tok_s']:.0f} ({r['encode_tok_cpu_s']:.0f}) | {r['analyze_tok_s']:.0f} ({a_cpu:.0f}) | "
                     f"{r['analyze_tok_s'] / r['harvest_tok_s']:.2f} ({a_cpu / r['harvest_tok_cpu_s']:.2f}) | "
                     f"{r['analyze_tok_s'] / r['encode_tok_s']:.2f} | {r['write_s']:.1f} | "
                     f"{r['n_tokens'] / (r['pass_s'] + r['write_s']) / r['harvest_tok_s']:.2f} | {r['examples']:,} | "
                     f"{r['db_mb']:.0f} | {r['rss_loaded_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", f"Measured L0 of the last SAE: {rows[-1]['l0_last_sae']:.0f}. Logit effects (full "
              f"{lg['vocab']:,}-token unembedding, chunked): {lg['logits_s_per_sae']:.1f} s per SAE, "
              f"independent of N (×{rows[0]['n_saes']} SAEs ≈ {lg['logits_s_per_sae'] * rows[0]['n_saes']:.0f} s). "
              f"Bench wall time {total:.0f} s.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
