"""The default run's SAE training on a few layers, from exactly its token stream, under several settings.

    .venv/bin/python bench/default_layers.py [--layers 6,7,9] [--tokens 100000]
        [--setting '{"bias_lr": 1.0}' ...] [--no-append]

Harvests resid_post of the given layers of Gemma 3 270M the way `saescope run` does (corpus "default",
held-out fraction 0.05, seed 0, contexts of 256 tokens, 8 per forward pass, chunks fed to the trainer
in that order) and 8,192 held-out tokens; then, for each setting (JSON: TrainConfig fields, plus
"width", "l0" and "arch"; defaults width 2048, L0 32, jump_relu: the default run's SAEs), trains the
layers' SAEs together and prints held-out L0 / FVU / dead fraction, with a trace of the training batches
(step: L0 / λ / dead fraction, every 30 steps). Without --setting: the bias step-size comparison.
Appends a table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from sweep_batch import collect  # noqa: E402  (bench/ is on sys.path when run as a script)

from saescope.corpus import Corpus  # noqa: E402
from saescope.harvest import harvest  # noqa: E402
from saescope.models import load_model  # noqa: E402
from saescope.sae import SAEConfig  # noqa: E402
from saescope.train import Chunk, MultiTrainer, TrainConfig  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
SETTINGS = ['{"bias_lr": 1.0}', '{"bias_lr": 0.03}']


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="6,7,9")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--setting", action="append")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    lm = load_model()
    sites = lm.sites(kinds=["resid_post"], layers=layers)
    corpus = Corpus("default", heldout_fraction=0.05, seed=0)
    chunks, n = [], 0
    for b in harvest(lm, corpus.contexts(lm.tokenizer, part="train", ctx_len=256), sites, batch_size=8,
                     progress=False):
        chunks.append(Chunk(b.acts, b.n_contexts))
        n += len(b.token_ids)
        if n >= args.tokens:
            break
    held = collect(lm, sites, "heldout", 8192)

    rows = []
    for text in args.setting or SETTINGS:
        kw = json.loads(text)
        width, l0, arch = kw.pop("width", 2048), kw.pop("l0", 32.0), kw.pop("arch", "jump_relu")
        cfgs = [SAEConfig(d_in=lm.d_model, width=width, l0=l0, site="resid_post", layer=s.layer, architecture=arch)
                for s in sites]
        mt = MultiTrainer(cfgs, TrainConfig(tokens=args.tokens, **kw))
        traces: dict[int, list] = {}
        for t in mt.trainers:
            def traced(x, t=t, step_on=t.step_on, traces=traces):
                s = step_on(x)
                traces.setdefault(t.cfg.layer, []).append((t.step, s.l0, math.exp(t.log_lambda), s.dead_fraction))
                return s
            t.step_on = traced
        t0 = time.time()
        mt.fit(iter(chunks), progress=False)
        for t, s in zip(mt.trainers, sites):
            sae, xt = t.export(), held[s.key]
            with torch.no_grad():
                out = sae(xt)
            fired = out.f > 0
            rows.append((text, t.cfg.layer, fired.sum(1).float().mean().item(),
                         (((xt - out.x_hat) ** 2).sum() / ((xt - xt.mean(0)) ** 2).sum()).item(),
                         (fired.sum(0) == 0).float().mean().item(),
                         " ".join(f"{st}:{a:.0f}/{lam:.0e}/{d:.2f}" for st, a, lam, d in traces[t.cfg.layer][::30])))
            print(f"{text} layer {t.cfg.layer}: held-out L0 {rows[-1][2]:.1f} FVU {rows[-1][3]:.3f} dead {rows[-1][4]:.2f}"
                  f" ({time.time() - t0:.0f} s)\n   {rows[-1][5]}", flush=True)

    lines = [f"\n## The default run's training on layers {args.layers} ({time.strftime('%Y-%m-%d %H:%M')})\n",
             f"`.venv/bin/python bench/default_layers.py {shlex.join(sys.argv[1:])}` — resid_post, the default run's "
             f"token stream ({args.tokens:,} train tokens in its order), held-out L0/FVU/dead on 8,192 held-out "
             "tokens; trace = training batches, step: L0 / λ / dead fraction every 30 steps.\n",
             "| setting | layer | held-out L0 | FVU | dead | trace |", "|---|---:|---:|---:|---:|---|"]
    lines += [f"| `{s}` | {layer} | {a:.1f} | {f:.3f} | {d:.2f} | {tr} |" for s, layer, a, f, d, tr in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        with open(RESULTS, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
