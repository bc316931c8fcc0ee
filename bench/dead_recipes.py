"""Which training recipe leaves no dead features? Trains JumpReLU SAEs (width 2,048, L0* 32 unless told) on cached
Gemma 3 270M resid_post activations, one variant after another on the same tokens, and measures each on the
held-out split and on pydoc (text no run trains on).

    PYTHONPATH=src .venv/bin/python bench/dead_recipes.py --layers 0,1,2,3 --tokens 60000 --variants old,new

Activations are harvested once into --cache (train: the first max(--tokens, 100k) of the default corpus's train part, in the
default run's order; held-out: 16,384 tokens; pydoc: 10,240) and reused by later calls. Chunks of 2,040 rows, as
the default run's harvest batches (8 contexts × 255 tokens). Prints one markdown table per variant.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import saescope.train as train_mod
from saescope.corpus import Corpus
from saescope.evaluate import fidelity
from saescope.harvest import harvest
from saescope.models import load_model
from saescope.pipeline import sae_configs
from saescope.train import Chunk, MultiTrainer, TrainConfig

VARIANTS = {  # TrainConfig keyword arguments
    "old": {"revive_dead": False},
    "new": {},
}
EVAL_TOKENS = 10_240  # the default run's eval reads ~10,100 held-out tokens: its dead fraction is on these
PARTS = {"heldout": ("default", "heldout", 16_384), "pydoc": ("pydoc", "train", 10_240)}


def cached(lm, cache: Path, layers: list[int], source: str, part: str, n: int) -> dict[int, torch.Tensor]:
    files = {layer: cache / f"{source}-{part}-{n}-L{layer}.pt" for layer in layers}
    if all(f.is_file() for f in files.values()):
        return {layer: torch.load(f) for layer, f in files.items()}
    sites = lm.sites(kinds=("resid_post",), layers=layers)
    got = {s.key: [] for s in sites}
    corpus = Corpus(source)
    for b in harvest(lm, corpus.contexts(lm.tokenizer, part=part, ctx_len=256), sites, batch_size=8,
                     max_tokens=n, progress=False):
        for k, v in b.acts.items():
            got[k].append(v.float().cpu())
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for s in sites:
        out[s.layer] = torch.cat(got[s.key])[:n].contiguous()
        torch.save(out[s.layer], files[s.layer])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,1,2,3")
    ap.add_argument("--tokens", type=int, default=60_000)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--l0", type=float, default=32.0)
    ap.add_argument("--variants", default="old,new", help="names from VARIANTS, or JSON {name: {kwargs}}")
    ap.add_argument("--cache", default="/tmp/saescope-dead-cache")
    ap.add_argument("--save", default="", help="folder to save each variant's SAEs in (VARIANT/resid_post/...)")
    args = ap.parse_args()
    layers = [int(v) for v in args.layers.split(",")]
    variants = json.loads(args.variants) if args.variants.startswith("{") else {
        v: VARIANTS[v] for v in args.variants.split(",")}
    lm = load_model("gemma-3-270m", device="cpu")
    cache = Path(args.cache)
    train = cached(lm, cache, layers, "default", "train", max(args.tokens, 100_000))
    evals = {name: cached(lm, cache, layers, *spec) for name, spec in PARTS.items()}
    defaults = {k: getattr(train_mod, k) for k in dir(train_mod) if k.startswith("REVIVE_")}
    for name, kw in variants.items():
        kw = dict(kw)
        for k, v in {**defaults, **kw.pop("consts", {})}.items():  # {"consts": {"REVIVE_SHARE": 1.0}}: train.py's
            setattr(train_mod, k, v)
        cfgs = sae_configs(lm, "gemma-3-270m", ["resid_post"], layers, [args.width], [args.l0], "jump_relu")
        mt = MultiTrainer(cfgs, TrainConfig(tokens=args.tokens, **kw))
        t0 = time.perf_counter()
        mt.fit((Chunk({f"resid_post/{la}": train[la][i:i + 2040] for la in layers}, 8)
                for i in range(0, args.tokens, 2040)), progress=False)
        secs = time.perf_counter() - t0
        print(f"\n{name} {json.dumps(kw)}: {secs:.0f} s training ({args.tokens:,} tokens, {len(layers)} SAEs)")
        print("| layer | dead held-out 10k | dead held-out | L0 held-out | FVU held-out | dead pydoc | L0 pydoc | FVU pydoc |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in mt.trainers:
            sae = t.export()
            if args.save:
                sae.save(Path(args.save) / name / t.cfg.site / t.cfg.folder_name)
            m = {p: fidelity(sae, evals[p][t.cfg.layer]) for p in PARTS}
            h, o = m["heldout"], m["pydoc"]
            d10 = fidelity(sae, evals["heldout"][t.cfg.layer][:EVAL_TOKENS])["dead_fraction"]
            print(f"| {t.cfg.layer} | {d10:.3f} | {h['dead_fraction']:.3f} | {h['l0']:.1f} | {h['fvu']:.4f} | "
                  f"{o['dead_fraction']:.3f} | {o['l0']:.1f} | {o['fvu']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
