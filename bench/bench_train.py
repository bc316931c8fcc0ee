"""SAE-training throughput from in-memory activations, and achieved FLOP/s vs the measured matmul peak.

    .venv/bin/python bench/bench_train.py [--tokens 51200] [--epochs 1] [--warm-steps 40] [--rounds 1]
                                          [--batch 256,1024] [--width 4096] [--l0 32] [--no-append]

1. Harvests `--tokens` train tokens of resid_post on all 18 layers of Gemma 3 270M once, into RAM
   (fp32, BOS/EOS/pad dropped).
2. Alternates, `--rounds` times: fp32 matmul peak probe → train 18 JumpReLU SAEs (L0* = --l0) →
   peak probe → train 18 TopK SAEs (k = --l0) → … → peak probe. Every training run is a fresh
   `MultiTrainer(cfgs, TrainConfig(tokens=E·N, batch_size=B)).fit(chunks)` over the same tokens, --epochs E
   times (so that large batches get enough steps for the first-batch initialisation not to dominate), for
   every B in --batch (default 256, the default for short runs, and 1024);
   its wall time covers everything fit does (first-batch init, all steps of all 18 SAEs). A second rate
   is timed from the first chunk boundary after --warm-steps steps to the end: the first steps pay the
   L0 controller's transient (train L0 up to ~100 before it settles at 32, so 2–3× the active pairs).
3. Peak: `torch.matmul(A, B, out=C)` with A (1024×640), B (640×4096) — the shape of our dense encoder
   product — repeated for ~1 s windows; a probe takes the best of 3 windows. Each training run is
   compared with the mean of the probes just before and after it (this machine drifts and is shared).

FLOPs counted (matmul-type work only, 2 FLOPs per multiply-add; elementwise ops, top-k, nonzero,
Adam and the decoder renormalisation are work too but are NOT counted):

    per SAE per step:  2·B·d·W                 dense encoder forward z = (x − b_dec) W_enc + b_enc
                     + 2·d·W                   b_dec gradient through the encoder (W_enc · g_b_enc)
                     + 2·nnz_g·d               sparse W_enc gradient (scatter over active pairs)
                     + 6·nnz_d·d               sparse decode forward + W_dec gradient + gradient w.r.t. codes
                     + 2·nnz_w·d               JumpReLU pairs in the STE window below θ: the gradient w.r.t. their
                                               codes (0), which θ's STE needs (`code_grad_probe`)

nnz_g / nnz_d / nnz_w are the exact numbers of (token, feature) pairs passed to `gather_pre_acts` /
`sparse_decode` / `code_grad_probe` in the run (counted by wrapping them), so the JumpReLU STE window and the aux-k loss
on dead features are included. d = 640, W = --width.
Results are appended to bench/RESULTS.md under "## SAE training throughput".
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import saescope.train as train_mod  # noqa: E402
from saescope.corpus import Corpus  # noqa: E402
from saescope.harvest import harvest  # noqa: E402
from saescope.kernels import Active  # noqa: E402
from saescope.models import load_model  # noqa: E402
from saescope.sae import SAEConfig  # noqa: E402
from saescope.train import Chunk, MultiTrainer, TrainConfig  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
PROBE_B = 1024


def peak_probe(windows: int = 3, seconds: float = 1.0) -> float:
    """Best-of-`windows` fp32 matmul rate (FLOP/s) of (1024×640)@(640×4096)."""
    a, b = torch.randn(PROBE_B, 640), torch.randn(640, 4096)
    c = torch.empty(PROBE_B, 4096)
    flop = 2 * PROBE_B * 640 * 4096
    for _ in range(3):
        torch.matmul(a, b, out=c)
    best = 0.0
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.matmul(a, b, out=c)
            n += 1
        best = max(best, n * flop / (time.perf_counter() - t0))
    return best


class Counter:
    """Counts the active pairs handed to the sparse kernels (wraps the names train.py calls)."""

    KERNELS = {"gather_pre_acts": "nnz_g", "sparse_decode": "nnz_d", "code_grad_probe": "nnz_w"}

    def __init__(self):
        self.nnz_g = self.nnz_d = self.nnz_w = 0
        self._orig = {name: getattr(train_mod, name) for name in self.KERNELS}

    def __enter__(self):
        def counting(name, fn):
            def wrapped(*args, **kwargs):
                act = next(a for a in args if isinstance(a, Active))
                setattr(self, self.KERNELS[name], getattr(self, self.KERNELS[name]) + act.cols.numel())
                return fn(*args, **kwargs)
            return wrapped

        for name, fn in self._orig.items():
            setattr(train_mod, name, counting(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(train_mod, name, fn)


def train_once(acts: dict[str, torch.Tensor], arch: str, width: int, l0: float, tokens: int, B: int,
               epochs: int = 1, warm_steps: int = 40) -> dict:
    d = next(iter(acts.values())).shape[1]
    cfgs = [SAEConfig(d_in=d, width=width, architecture=arch, l0=l0, site="resid_post", layer=int(k.split("/")[1]))
            for k in sorted(acts, key=lambda k: int(k.split("/")[1]))]
    cfg = TrainConfig(tokens=tokens * epochs, batch_size=B)
    mt = MultiTrainer(cfgs, cfg)
    per_chunk = 8 * B

    def snapshot() -> dict:
        return {"t": time.perf_counter(), "steps": mt.steps_done, "tokens": mt.tokens_done,
                "nnz_g": cnt.nnz_g, "nnz_d": cnt.nnz_d, "nnz_w": cnt.nnz_w}

    warm = {}

    def chunks():
        for _ in range(epochs):
            for i in range(0, tokens, per_chunk):
                if not warm and mt.steps_done >= warm_steps:  # fit asks for a chunk once it has trained the last
                    warm.update(snapshot())
                yield Chunk({k: v[i : i + per_chunk] for k, v in acts.items()}, 1)

    with Counter() as cnt:
        start = snapshot()
        mt.fit(chunks(), progress=False)
        end = snapshot()
    n_saes = len(cfgs)

    def rates(a: dict, b: dict) -> dict:  # between two snapshots
        n = {k: b[k] - a[k] for k in b}
        dense = n_saes * n["steps"] * (2 * B * d * width + 2 * d * width)
        sparse = (2 * n["nnz_g"] + 6 * n["nnz_d"] + 2 * n["nnz_w"]) * d
        return {"steps": n["steps"], "tokens": n["tokens"], "wall": n["t"], "tok_s": n["tokens"] / n["t"],
                "sae_tok_s": n_saes * n["tokens"] / n["t"], "flop_s": (dense + sparse) / n["t"],
                "nnz_per_tok": n["nnz_d"] / (n_saes * n["tokens"]), "win_per_tok": n["nnz_w"] / (n_saes * n["tokens"])}

    l0s = [t.ema["l0"] for t in mt.trainers]
    fvus = [t.ema["fvu"] for t in mt.trainers]
    return {"arch": arch, "batch": B, "n_saes": n_saes, **rates(start, end),
            "steady": rates(warm, end) if warm and end["steps"] > warm["steps"] else None,
            "l0_min": min(l0s), "l0_max": max(l0s),
            "fvu_min": min(fvus), "fvu_max": max(fvus), "failures": len(mt.failures)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=50 * 1024)
    ap.add_argument("--batch", default="256,1024", help="batch sizes (comma-separated); each is trained every round")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the harvested tokens per training run")
    ap.add_argument("--warm-steps", type=int, default=40,
                    help="steps after which the steady-state rate is timed (the first ones pay the L0 transient)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--l0", type=float, default=32.0)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    t_start = time.perf_counter()
    batches = [int(b) for b in args.batch.split(",")]
    load = os.getloadavg()[0]

    lm = load_model()
    sites = lm.sites(kinds=["resid_post"])
    parts: dict[str, list] = {s.key: [] for s in sites}
    n = 0
    t0 = time.perf_counter()
    stream = Corpus().contexts(lm.tokenizer, part="train", ctx_len=256)
    for b in harvest(lm, stream, sites, batch_size=8, max_tokens=args.tokens, progress=False):
        for k, v in b.acts.items():
            parts[k].append(v)
        n += len(b.token_ids)
    acts = {k: torch.cat(v)[: args.tokens].contiguous() for k, v in parts.items()}
    t_harvest = time.perf_counter() - t0
    del lm
    print(f"harvested {n:,} tokens × {len(acts)} sites in {t_harvest:.0f} s", flush=True)

    peaks = [peak_probe()]
    runs = []
    for r in range(args.rounds):
        for batch, arch in [(b, a) for b in batches for a in ("jump_relu", "topk")]:
            res = train_once(acts, arch, args.width, args.l0, args.tokens, batch, args.epochs, args.warm_steps)
            peaks.append(peak_probe())
            res["round"] = r
            res["peak"] = (peaks[-2] + peaks[-1]) / 2
            res["frac"] = res["flop_s"] / res["peak"]
            st = res["steady"]
            if st:
                st["frac"] = st["flop_s"] / res["peak"]
            runs.append(res)
            print(f"round {r} batch {batch} {arch:9s}: {res['tok_s']:7.0f} tok/s (×18 SAEs = {res['sae_tok_s']:,.0f} SAE-tok/s), "
                  f"{res['flop_s'] / 1e9:6.1f} GFLOP/s = {100 * res['frac']:.0f}% of peak {res['peak'] / 1e9:.1f} GFLOP/s"
                  + (f"; after step {args.warm_steps}: {st['tok_s']:.0f} tok/s, {100 * st['frac']:.0f}%" if st else "")
                  + f"; train-batch L0 {res['l0_min']:.1f}–{res['l0_max']:.1f}, FVU {res['fvu_min']:.3f}–{res['fvu_max']:.3f}",
                  flush=True)
    total = time.perf_counter() - t_start

    lines = ["", "## SAE training throughput (bench_train.py)", "",
             f"{time.strftime('%Y-%m-%d %H:%M')}, `.venv/bin/python bench/bench_train.py --tokens {args.tokens} --epochs {args.epochs} "
             f"--warm-steps {args.warm_steps} --rounds {args.rounds} --batch {args.batch}` — {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"fp32 CPU, load average {load:.2f} at the start. 18 SAEs (resid_post, layers 0–17 of Gemma 3 270M), width "
             f"{args.width}, L0*/k {args.l0:g}, batch B as in the table, trained from {args.tokens:,} harvested train tokens held in RAM, {args.epochs} pass(es) "
             f"(harvest {t_harvest:.0f} s, not timed below). Runs alternate with fp32 matmul peak probes "
             f"((1024×640)@(640×4096), best of 3×1 s); each run is compared with the mean of the probes around it.",
             "",
             "FLOPs counted per SAE per step: 2·B·d·W (dense encoder) + 2·d·W (b_dec grad) + 2·nnz_g·d (sparse W_enc grad) "
             "+ 6·nnz_d·d (sparse decode fwd, W_dec grad, code grad) + 2·nnz_w·d (JumpReLU STE-window pairs below θ: "
             "code grad only); nnz = active (token, feature) pairs actually "
             "passed to the sparse kernels (aux-k pairs included). Elementwise work, top-k, "
             "Adam and decoder renormalisation are not counted.",
             "",
             f"Two rates per run: the whole run (first-batch initialisation and the first steps, where the L0 controller "
             f"overshoots and the SAEs have 2–3× the pairs, included), and the steps after step {args.warm_steps} — what a "
             "long run spends nearly all of its time in.",
             "",
             "| round | batch | arch | steps | tokens/s (all 18 SAEs) | SAE-tokens/s | wall s | nnz/token | window/token | GFLOP/s | "
             f"% of peak | after step {args.warm_steps}: tokens/s | GFLOP/s | % of peak | peak GFLOP/s | train-batch L0 (min–max) | "
             "train-batch FVU (min–max) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in runs:
        st = r["steady"] or {"tok_s": float("nan"), "flop_s": float("nan"), "frac": float("nan")}
        lines.append(f"| {r['round']} | {r['batch']} | {r['arch']} | {r['steps']} | {r['tok_s']:,.0f} | {r['sae_tok_s']:,.0f} | "
                     f"{r['wall']:.1f} | {r['nnz_per_tok']:.1f} | {r['win_per_tok']:.1f} | {r['flop_s'] / 1e9:.1f} | "
                     f"{100 * r['frac']:.0f}% | {st['tok_s']:,.0f} | {st['flop_s'] / 1e9:.1f} | {100 * st['frac']:.0f}% | "
                     f"{r['peak'] / 1e9:.1f} | {r['l0_min']:.1f}–{r['l0_max']:.1f} | {r['fvu_min']:.3f}–{r['fvu_max']:.3f} |")
    by = {(b, a): [r for r in runs if r["arch"] == a and r["batch"] == b] for b in batches for a in ("jump_relu", "topk")}
    summ = []
    for (b, a), rs in by.items():
        fr = sum(r["frac"] for r in rs) / len(rs)
        ts = sum(r["tok_s"] for r in rs) / len(rs)
        steady = [r["steady"]["frac"] for r in rs if r["steady"]]
        summ.append(f"batch {b} {a}: mean {ts:,.0f} tokens/s for 18 SAEs, {100 * fr:.0f}% of peak"
                    + (f" ({100 * sum(steady) / len(steady):.0f}% after step {args.warm_steps})" if steady else ""))
    mean_frac = sum(r["frac"] for r in runs) / len(runs)
    steady = [r["steady"]["frac"] for r in runs if r["steady"]]
    mean_steady = sum(steady) / len(steady) if steady else float("nan")
    lines += ["", f"Peak probes (GFLOP/s, in order): {', '.join(f'{p / 1e9:.1f}' for p in peaks)}. "
              + "; ".join(summ) + f". Total bench time {total:.0f} s.",
              f"Target ≥ 50% of peak: after step {args.warm_steps} {'met' if mean_steady >= 0.5 else 'NOT met'} on the mean "
              f"of all runs ({100 * mean_steady:.0f}%; lowest {100 * min(steady or [float('nan')]):.0f}%); whole runs "
              f"{100 * mean_frac:.0f}%. "
              "L0/FVU columns are EMA stats on training batches (not held-out) — only a sanity check that the runs trained."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
