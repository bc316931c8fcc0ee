"""Harvest throughput vs the bare forward pass, and peak RAM of a cache run.

    .venv/bin/python bench/bench_harvest.py [--tokens 16384] [--ram-tokens 100000,1000000]

1. Speed: the same packed contexts through (a) the bare model — the same 18 layers,
   no LM head, no capture hooks (the limit) — and (b) `harvest` with resid_post
   hooked on all 18 layers, positions filtered. Alternated in rounds so that this
   machine's drift hits both alike. Reports tokens/s and the ratio (target ≥ 0.9).
2. Memory: `saescope harvest` into a fresh cache for each --ram-tokens value in its
   own process, recording peak RSS (target: bounded, independent of the token count).
Results are appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saescope.corpus import Corpus  # noqa: E402
from saescope.harvest import _Stop, harvest  # noqa: E402
from saescope.models import load_model  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")


def bare_forward(lm, contexts, batch_size):
    """Forward through all layers with no capture hooks; stop before the final norm/LM head."""
    h = lm.layers[-1].register_forward_hook(lambda *a: (_ for _ in ()).throw(_Stop()))
    n = 0
    try:
        for i in range(0, len(contexts), batch_size):
            ids = torch.tensor(contexts[i : i + batch_size])
            try:
                with torch.no_grad():
                    lm.model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
            n += ids.numel()
    finally:
        h.remove()
    return n


def speed(tokens: int, batch_size: int, rounds: int) -> dict:
    lm = load_model()
    sites = lm.sites(kinds=["resid_post"])
    corpus = Corpus()
    n_ctx = tokens // 256
    contexts = [c for _, c in zip(range(n_ctx), corpus.contexts(lm.tokenizer, part="train", ctx_len=256))]
    bare_ctx = contexts[: 2 * batch_size]
    bare_forward(lm, bare_ctx, batch_size)  # warm-up
    t_bare = t_harv = 0.0
    n_bare = n_harv = n_emitted = 0
    per = len(contexts) // rounds
    for r in range(rounds):
        chunk = contexts[r * per : (r + 1) * per]
        t0 = time.perf_counter()
        n_bare += bare_forward(lm, chunk, batch_size)
        t_bare += time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in harvest(lm, chunk, sites, batch_size=batch_size, progress=False):
            n_emitted += len(b.token_ids)
        t_harv += time.perf_counter() - t0
        n_harv += sum(len(c) for c in chunk)
    return {"bare_tok_s": n_bare / t_bare, "harvest_tok_s": n_harv / t_harv, "ratio": (n_harv / t_harv) / (n_bare / t_bare),
            "tokens": n_harv, "emitted": n_emitted, "threads": torch.get_num_threads()}


def ram(tokens: int, layers: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        code = (
            "import resource,sys; from saescope.pipeline import harvest_to_cache; "
            f"harvest_to_cache(sys.argv[1], tokens={tokens}, layers='{layers}', progress=False); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        t0 = time.time()
        out = subprocess.run([sys.executable, "-c", code, str(Path(tmp) / "cache")], capture_output=True, text=True, check=True)
        return {"tokens": tokens, "layers": layers, "peak_rss_mb": int(out.stdout.strip().splitlines()[-1]) / 1024,
                "seconds": time.time() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--ram-tokens", default="100000,1000000")
    ap.add_argument("--ram-layers", default="0", help="layers hooked in the RAM runs (0 keeps a 1M-token run short)")
    args = ap.parse_args()
    s = speed(args.tokens, args.batch_size, args.rounds)
    print(s)
    rams = [ram(int(t), args.ram_layers) for t in args.ram_tokens.split(",") if t]
    for r in rams:
        print(r)
    lines = [
        f"\n## Harvest vs bare forward ({time.strftime('%Y-%m-%d')})\n",
        f"`.venv/bin/python bench/bench_harvest.py --tokens {args.tokens} --ram-tokens {args.ram_tokens} --ram-layers {args.ram_layers}`"
        f" — {platform.machine()}, {s['threads']} torch threads, torch {torch.__version__}, Gemma 3 270M fp32 CPU, batch {args.batch_size}×256,"
        f" {args.rounds} alternating rounds, {s['tokens']:,} tokens each way ({s['emitted']:,} emitted after dropping BOS/EOS/pad).\n",
        "| pass | tokens/s |", "|---|---:|",
        f"| bare forward, 18 layers, no hooks, no LM head | {s['bare_tok_s']:.0f} |",
        f"| harvest, resid_post × 18 layers | {s['harvest_tok_s']:.0f} |",
        f"| **ratio** (target ≥ 0.9) | **{s['ratio']:.3f}** |\n",
        "| cache run | layers | peak RSS | wall |", "|---|---|---:|---:|",
        *[f"| {r['tokens']:,} tokens, fp16 | {r['layers']} | {r['peak_rss_mb']:.0f} MB | {r['seconds']:.0f} s |" for r in rams],
    ]
    with open(RESULTS, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
