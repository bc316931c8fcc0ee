"""Time of one training step of one SAE (no model, synthetic sparse data) and where it goes.

    .venv/bin/python bench/bench_step.py [--batch 256] [--arch jump_relu] [--width 4096] [--optimizer auto] [--profile]

Builds one `SAETrainer` (d_in 640, like Gemma 3 270M), feeds it batches that are sparse sums of
8,000 random unit directions plus noise, runs 30 warm-up steps, then 4 × 30 timed steps (the best
window is reported), and the dense encoder product alone on the same shape for comparison.
`--profile` adds a torch.profiler table of 10 more steps. For A/B comparisons run two checkouts
alternately (`PYTHONPATH=/other/checkout/src`); this machine drifts ±10% from run to run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "src"))  # PYTHONPATH (another checkout) wins

from saescope.sae import SAEConfig  # noqa: E402
from saescope.train import SAETrainer, TrainConfig  # noqa: E402

D_IN = 640


def best_time(fn, reps: int, windows: int) -> float:
    out = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t0) / reps)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--arch", default="jump_relu")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--l0", type=float, default=32)
    ap.add_argument("--optimizer", default="auto", help="TrainConfig.optimizer (auto: sf-adam for topk, adam otherwise)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=D_IN, width=args.width, l0=args.l0, site="resid_post", layer=0, architecture=args.arch)
    trainer = SAETrainer(cfg, TrainConfig(tokens=10**6, batch_size=args.batch, optimizer=args.optimizer))
    dirs = torch.randn(8000, D_IN)
    dirs /= dirs.norm(dim=1, keepdim=True)
    xs = []
    for _ in range(8):
        idx, coef = torch.randint(0, 8000, (args.batch, 40)), torch.rand(args.batch, 40) * 3
        xs.append((coef[..., None] * dirs[idx]).sum(1) + 0.1 * torch.randn(args.batch, D_IN))
    it = iter(range(10**9))

    def step():
        trainer.step_on(xs[next(it) % len(xs)])

    for _ in range(30):
        step()
    t_step = best_time(step, 30, 4)
    a, w = torch.randn(args.batch, D_IN), torch.randn(D_IN, args.width)
    t_mm = best_time(lambda: a @ w, 10, 5)
    print(f"batch {args.batch} {args.arch} width {args.width} {trainer.train.optimizer_for(args.arch)}: step {t_step * 1e3:.1f} ms; the encoder product alone "
          f"{t_mm * 1e3:.1f} ms ({t_mm / t_step:.0%} of the step, {2 * args.batch * D_IN * args.width / t_mm / 1e9:.0f} "
          f"GFLOP/s); train-batch L0 {trainer.ema['l0']:.1f}")
    if args.profile:
        from torch.profiler import profile

        with profile() as prof:
            for _ in range(10):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
