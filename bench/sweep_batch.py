"""Training settings for short runs: held-out FVU/L0 on a few layers.

    .venv/bin/python bench/sweep_batch.py [--tokens 100000] [--layers 0,6,12]
        [--setting '{"arch": "topk", "l0": 50, "batch_size": 256, "dead_tokens": 2560, "aux_k": 320}' ...]

Harvests train and held-out activations once (in RAM), then trains width-4096 SAEs of all the
layers together (one MultiTrainer) for each setting and prints held-out L0 / FVU / dead fraction.
A setting is JSON: "arch" and "l0", "aux_k" (train.AUX_K) and "aux_rows" (train.AUX_ROWS), the rest
are TrainConfig fields. Without --setting: the batch-size / learning-rate sweep recorded in RESULTS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import saescope.train as train_mod  # noqa: E402
from saescope.corpus import Corpus  # noqa: E402
from saescope.evaluate import fidelity  # noqa: E402
from saescope.harvest import harvest  # noqa: E402
from saescope.models import load_model  # noqa: E402
from saescope.sae import SAEConfig  # noqa: E402
from saescope.train import Chunk, MultiTrainer, TrainConfig  # noqa: E402

SETTINGS = [("jump_relu", 32, dict(batch_size=1024)), ("jump_relu", 32, dict(batch_size=256)),
            ("topk", 50, dict(batch_size=1024)), ("topk", 50, dict(batch_size=1024, lr=5e-3)),
            ("topk", 50, dict(batch_size=512)), ("topk", 50, dict(batch_size=256))]


def collect(lm, sites, part, n):
    out = {s.key: [] for s in sites}
    for b in harvest(lm, Corpus().contexts(lm.tokenizer, part=part), sites, max_tokens=n, progress=False):
        for k, v in b.acts.items():
            out[k].append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--layers", default="0,6,12")
    ap.add_argument("--setting", action="append", help="JSON (see above); repeat for several")
    args = ap.parse_args()
    settings = SETTINGS
    if args.setting:
        settings = []
        for text in args.setting:
            kw = json.loads(text)
            settings.append((kw.pop("arch", "jump_relu"), kw.pop("l0", 32), kw))
    lm = load_model()
    sites = [lm.site("resid_post", int(x)) for x in args.layers.split(",")]
    train, held = collect(lm, sites, "train", args.tokens), collect(lm, sites, "heldout", 8192)
    n = min(v.shape[0] for v in train.values())
    defaults = train_mod.AUX_K, train_mod.AUX_ROWS
    for arch, l0, kw in settings:
        kw = dict(kw)
        train_mod.AUX_K, train_mod.AUX_ROWS = kw.pop("aux_k", defaults[0]), kw.pop("aux_rows", defaults[1])
        cfgs = [SAEConfig(d_in=640, width=4096, architecture=arch, l0=l0, site="resid_post", layer=s.layer) for s in sites]
        mt = MultiTrainer(cfgs, TrainConfig(tokens=n, **kw))
        t0 = time.time()
        mt.fit((Chunk({k: v[i : i + 2048] for k, v in train.items()}, 8) for i in range(0, n, 2048)), progress=False)
        cells = []
        for t, s in zip(mt.trainers, sites):
            m = fidelity(t.export(), held[s.key])
            cells.append(f"L{s.layer}: L0 {m['l0']:.1f} FVU {m['fvu']:.4f} dead {m['dead_fraction']:.2f}")
        print(f"{arch} {l0:g} {kw} aux_k {train_mod.AUX_K} aux_rows {train_mod.AUX_ROWS} {time.time() - t0:.0f}s | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
