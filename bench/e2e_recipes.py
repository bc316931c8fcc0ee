"""Today's recipe vs the end-to-end phase (issue 19 part 3): JumpReLU SAEs (width 2,048, L0* 32, 100k tokens) on
Gemma 3 270M resid_post, trained one recipe after the other on the same tokens, then scored side by side.

    PYTHONPATH=src .venv/bin/python bench/e2e_recipes.py --layers 0,6,12,17 --ce-contexts 0    # train, save
    PYTHONPATH=src .venv/bin/python bench/e2e_recipes.py --layers 0,6,12,17 --variants '{"today": null, "e2e": null}' \
        --ce-contexts 16                                                      # score the saved SAEs (null: load)
    PYTHONPATH=src .venv/bin/python bench/e2e_recipes.py --layers 6,12,17 --paired \
        --variants '{"e2e": {"e2e_fraction": 0.05}}' --ce-contexts 128 --per-context 128   # one main phase, 16k

The main phase reads the activations that bench/dead_recipes.py cached (--cache: the first 100k train tokens of the
default corpus in the default run's order, chunks of 8 contexts); the end-to-end phase runs the live model on the
contexts that follow. ΔLM / KL on the first --ce-contexts held-out contexts, every target scored (255 per context),
the same targets for every SAE (paired); FVU/L0/dead on 16,384 held-out tokens and 10,240 pydoc tokens.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from pathlib import Path

import torch

from saescope.corpus import Corpus
from saescope.endtoend import end_to_end
from saescope.evaluate import delta_lm_loss, fidelity
from saescope.formats import load_sae
from saescope.models import load_model
from saescope.pipeline import sae_configs
from saescope.train import Chunk, MultiTrainer, TrainConfig


def load_cached(cache: Path, layers: list[int], name: str) -> dict[int, torch.Tensor]:
    return {layer: torch.load(cache / f"{name}-L{layer}.pt") for layer in layers}


def train_variant(lm, layers, acts, kw: dict, tokens: int, end_to_end_too: bool = True
                  ) -> tuple[MultiTrainer, float, float]:
    cfgs = sae_configs(lm, "gemma-3-270m", ["resid_post"], layers, [2048], [32.0], "jump_relu")
    tc = TrainConfig(tokens=tokens, **kw)
    mt = MultiTrainer(cfgs, tc)
    t0 = time.perf_counter()
    mt.fit((Chunk({f"resid_post/{la}": acts[la][i:i + 2040] for la in layers}, 8)
            for i in range(0, tokens, 2040)), progress=False)
    t1 = time.perf_counter()
    if tc.e2e_fraction > 0 and end_to_end_too:
        stream = Corpus("default").contexts(lm.tokenizer, part="train", ctx_len=256)
        end_to_end(lm, mt, itertools.islice(stream, mt.contexts_done, None), progress=False)
    return mt, t1 - t0, time.perf_counter() - t1


def snapshot(mt: MultiTrainer) -> MultiTrainer:
    """A deep copy of `mt` that trains on its own. (deepcopy clones each W_enc Parameter, which then no longer is
    the view of the (width, d_in) tensor Adam steps: tie them again.)"""
    m = copy.deepcopy(mt)
    for t in m.trainers:
        old, new = t._w_enc_t, t.sae.w_enc.detach().T
        for group in t.opt.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        if old in t.opt.state:
            t.opt.state[new] = t.opt.state.pop(old)
        t._grad_params = [new if p is old else p for p in t._grad_params]
        t._w_enc_t = new
    return m


def train_paired(lm, layers, acts, kw: dict, tokens: int) -> dict[str, tuple[MultiTrainer, float, float]]:
    """One main phase for both recipes: trained with `kw` (an end-to-end fraction) to its main_tokens, then copied;
    "today" goes on reconstructing the cached rows that follow (the cosine schedule is the same: it depends on
    `tokens` only), the copy goes end to end. Paired: both SAEs share every step up to the phase."""
    e2e, main_s, e2e_s = train_variant(lm, layers, acts, kw, tokens, end_to_end_too=False)
    today = snapshot(e2e)
    t0 = time.perf_counter()
    plain = TrainConfig(tokens=tokens, **{k: v for k, v in kw.items() if not k.startswith("e2e_")})
    today.train = plain
    for t in today.trainers:
        t.train = plain
    rest = {f"resid_post/{la}": acts[la][today.tokens_done:tokens] for la in layers}
    today.fit([Chunk(rest, 0)], progress=False)
    today_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    stream = Corpus("default").contexts(lm.tokenizer, part="train", ctx_len=256)
    end_to_end(lm, e2e, itertools.islice(stream, e2e.contexts_done, None), progress=False)
    return {"today": (today, main_s, today_s), "e2e": (e2e, main_s, time.perf_counter() - t1)}


def save_all(mt: MultiTrainer, name: str, folder: Path) -> dict:
    """Every trainer's SAE saved under folder/name/site/…; {"name|layer": SAE}."""
    saes = {}
    for t in mt.trainers:
        sae = t.export()
        sae.save(folder / name / t.cfg.site / t.cfg.folder_name)
        saes[f"{name}|{t.cfg.layer}"] = sae
    return saes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,6,12,17")
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--variants", default='{"today": {}, "e2e": {"e2e_fraction": 0.05}}',
                    help="JSON {name: TrainConfig kwargs}")
    ap.add_argument("--ce-contexts", type=int, default=16)
    ap.add_argument("--per-context", type=int, default=64, help="scored targets per context (0: all 255)")
    ap.add_argument("--zero-every", type=int, default=4, help="zero-ablation pass (CE recovered) every N batches of 4 "
                    "contexts (0: none)")
    ap.add_argument("--paired", action="store_true", help="train 'today' and the 'e2e' variant from one main phase")
    ap.add_argument("--cache", default="/tmp/saescope-dead-cache")
    ap.add_argument("--save", default="/tmp/e2e/saes")
    args = ap.parse_args()
    layers = [int(v) for v in args.layers.split(",")]
    lm = load_model("gemma-3-270m", device="cpu")
    cache = Path(args.cache)
    train = load_cached(cache, layers, "default-train-100000")
    evals = {"heldout": load_cached(cache, layers, "default-heldout-16384"),
             "pydoc": load_cached(cache, layers, "pydoc-train-10240")}
    saes = {}
    variants = json.loads(args.variants)
    if args.paired:  # {"e2e": {...}}: "today" and "e2e" from one main phase
        for name, (mt, main_s, last_s) in train_paired(lm, layers, train, variants.pop("e2e"), args.tokens).items():
            print(f"{name} (paired): main phase {main_s:.0f} s, then {last_s:.0f} s ({mt.tokens_done:,} tokens, "
                  f"{len(layers)} SAEs)", flush=True)
            saes.update(save_all(mt, name, Path(args.save)))
    for name, kw in variants.items():
        if kw is None:
            for layer in layers:
                saes[f"{name}|{layer}"] = load_sae(Path(args.save) / name / "resid_post" /
                                                   f"layer_{layer}_width_2048_l0_32")
            continue
        mt, main_s, e2e_s = train_variant(lm, layers, train, kw, args.tokens)
        print(f"{name} {json.dumps(kw)}: main phase {main_s:.0f} s, end-to-end phase {e2e_s:.0f} s "
              f"({mt.tokens_done:,} tokens, {len(layers)} SAEs)", flush=True)
        saes.update(save_all(mt, name, Path(args.save)))
    if args.ce_contexts == 0:
        return
    contexts = list(itertools.islice(Corpus("default").contexts(lm.tokenizer, part="heldout", ctx_len=256),
                                     args.ce_contexts))
    print(f"{args.ce_contexts} held-out contexts × {args.per_context or 255} targets, the same for every SAE; "
          f"zero-ablation pass every {args.zero_every} batches of 4 contexts (CE recovered on those)")
    print("| layer | recipe | ΔLM ± SE | KL ± SE | CE recovered ± SE | CE tokens | L0 held-out | FVU held-out | "
          "dead held-out | L0 pydoc | FVU pydoc |")
    print("|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for layer in sorted(layers, reverse=True):  # the cheapest re-runs first
        mine = {k: s for k, s in saes.items() if k.endswith(f"|{layer}")}
        t0 = time.perf_counter()
        dlm = delta_lm_loss(lm, mine, contexts, per_context=args.per_context or None, zero_every=args.zero_every,
                            progress=False)
        secs = time.perf_counter() - t0
        for key in sorted(mine):
            h, o, d = (fidelity(mine[key], evals["heldout"][layer]), fidelity(mine[key], evals["pydoc"][layer]),
                       dlm[key])
            print(f"| {layer} | {key.split('|')[0]} | {d['delta_lm_loss']:.3f} ± {d['delta_lm_loss_se']:.3f} | "
                  f"{d['kl']:.3f} ± {d['kl_se']:.3f} | {d.get('ce_recovered', float('nan')):.3f} ± "
                  f"{d.get('ce_recovered_se', float('nan')):.3f} | {d['n_ce_tokens']:,} | {h['l0']:.1f} | {h['fvu']:.4f} | "
                  f"{h['dead_fraction']:.3f} | {o['l0']:.1f} | {o['fvu']:.4f} |", flush=True)
        print(f"(layer {layer}: {secs:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
