"""ΔLM / KL of several recipes' SAEs spliced in on the same held-out targets (saved by bench/dead_recipes.py --save).

    PYTHONPATH=src .venv/bin/python bench/dead_delta_lm.py /tmp/dead/saes100k --variants old,new --contexts 12

Every SAE is scored on the same contexts and the same random 64 targets per context (the eval stage's sampling),
so the differences between variants are paired; SEs are over contexts, as in `saescope eval`.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from saescope.corpus import Corpus
from saescope.evaluate import PER_CONTEXT, delta_lm_loss
from saescope.formats import load_sae
from saescope.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--variants", default="old,new")
    ap.add_argument("--contexts", type=int, default=12)
    args = ap.parse_args()
    lm = load_model("gemma-3-270m", device="cpu")
    contexts = list(itertools.islice(Corpus("default").contexts(lm.tokenizer, part="heldout", ctx_len=256),
                                     args.contexts))
    saes = {f"{v}|{f.name}": load_sae(f) for v in args.variants.split(",")
            for f in sorted((Path(args.folder) / v / "resid_post").iterdir())}
    res = delta_lm_loss(lm, saes, contexts, per_context=PER_CONTEXT, zero_every=4, progress=False)
    print(f"{args.contexts} held-out contexts × {PER_CONTEXT} targets\n| SAE | variant | ΔLM ± SE | KL ± SE | CE rec |")
    print("|---|---|---|---|---|")
    for key, d in sorted(res.items(), key=lambda kv: (kv[0].split("|")[1], kv[0])):
        v, name = key.split("|")
        print(f"| {name} | {v} | {d['delta_lm_loss']:.3f} ± {d['delta_lm_loss_se']:.3f} | {d['kl']:.3f} ± "
              f"{d['kl_se']:.3f} | {d.get('ce_recovered', float('nan')):.3f} |", flush=True)


if __name__ == "__main__":
    main()
