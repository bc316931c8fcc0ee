"""Are a run's dead features dead on its training tokens too, or only unseen on the held-out split?

    .venv/bin/python bench/dead_features.py RUN [--layers 0,1,2,6] [--train-tokens 100000] [--heldout-tokens 65536]

For each layer's SAE: the fraction of features that never fire (and that fire at most twice) on the first
train tokens of the run's corpus (what training read, in its order) and on its held-out split.
"""

from __future__ import annotations

import argparse

import torch

from saescope.harvest import harvest
from saescope.runs import Run


def fire_counts(lm, corpus, part: str, site, sae, n_tokens: int) -> tuple[torch.Tensor, int]:
    fired, seen = torch.zeros(sae.cfg.width), 0
    stream = corpus.contexts(lm.tokenizer, part=part, ctx_len=256)
    with torch.no_grad():
        for b in harvest(lm, stream, [site], batch_size=16, max_tokens=n_tokens, progress=False):
            f = sae.encode(b.acts[site.key].cpu())
            fired += (f > 0).sum(0)
            seen += f.shape[0]
    return fired, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--layers", default="0,1,2,6")
    ap.add_argument("--train-tokens", type=int, default=100_000)
    ap.add_argument("--heldout-tokens", type=int, default=65_536)
    args = ap.parse_args()
    run = Run.open(args.run)
    lm, corpus = run.model, run.corpus()
    print("| layer | split | tokens | never fire | fire ≤ 2 times |\n|---:|---|---:|---:|---:|")
    for layer in map(int, args.layers.split(",")):
        sid = next(i for i in run.sae_ids() if f"/layer_{layer}_" in i)
        sae, site = run.load_sae(sid), lm.site("resid_post", layer)
        for part, n in (("train", args.train_tokens), ("heldout", args.heldout_tokens)):
            fired, seen = fire_counts(lm, corpus, part, site, sae, n)
            print(f"| {layer} | {part} | {seen:,} | {float((fired == 0).float().mean()):.3f} | "
                  f"{float((fired <= 2).float().mean()):.3f} |", flush=True)


if __name__ == "__main__":
    main()
