"""Why did the end-to-end phase diverge on Gemma 3 270M? Trains one JumpReLU SAE (resid_post, width 2,048, L0* 32)
on the cached main-phase tokens (bench/dead_recipes.py's cache), then runs a few dozen end-to-end steps per variant
from a copy of that same trained state, logging each step's parts: reconstruction FVU, KL(clean ‖ spliced), L0,
the relative change of W_dec and W_enc, and the lr.

    PYTHONPATH=src .venv/bin/python bench/e2e_diagnose.py --layer 12 --steps 24 \
        --variants '{"old": {"e2e_lr": 1.0, "e2e_fresh_adam": false}, "new": {"e2e_lr": 0.1}}'
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from e2e_recipes import snapshot  # bench/, the script's folder

from saescope.corpus import Corpus
from saescope.endtoend import clean_pass, spliced_kl
from saescope.evaluate import delta_lm_loss, fidelity
from saescope.models import load_model
from saescope.pipeline import sae_configs
from saescope.train import Chunk, MultiTrainer, TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--e2e", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--variants", default='{"old": {}}', help="JSON {name: TrainConfig kwargs for the phase}")
    ap.add_argument("--eval-every", type=int, default=1000, help="held-out ΔLM / KL every N steps (and at the end)")
    ap.add_argument("--held", type=int, default=4, help="held-out contexts for the final ΔLM / KL")
    ap.add_argument("--cache", default="/tmp/saescope-dead-cache")
    args = ap.parse_args()
    lm = load_model("gemma-3-270m", device="cpu")
    la = args.layer
    acts = torch.load(Path(args.cache) / f"default-train-100000-L{la}.pt")
    cfgs = sae_configs(lm, "gemma-3-270m", ["resid_post"], [la], [2048], [32.0], "jump_relu")
    base = TrainConfig(tokens=args.tokens, e2e_fraction=args.e2e)
    mt = MultiTrainer(cfgs, base)
    t0 = time.perf_counter()
    mt.fit((Chunk({f"resid_post/{la}": acts[i:i + 2040]}, 8) for i in range(0, base.main_tokens, 2040)),
           progress=False)
    print(f"main phase {time.perf_counter() - t0:.0f} s, {mt.tokens_done:,} tokens", flush=True)
    site = lm.site("resid_post", la)
    held = list(itertools.islice(Corpus("default").contexts(lm.tokenizer, part="heldout", ctx_len=256), args.held))
    held_acts = torch.load(Path(args.cache) / f"default-heldout-16384-L{la}.pt")[:4096]
    stream = Corpus("default").contexts(lm.tokenizer, part="train", ctx_len=256)
    ctxs = list(itertools.islice(stream, mt.contexts_done, mt.contexts_done + args.steps))
    cleans = [clean_pass(lm, torch.tensor([c]), [site], base.e2e_vocab) for c in ctxs]
    for name, kw in json.loads(args.variants).items():
        m = snapshot(mt)
        t = m.trainers[0]
        t0 = time.perf_counter()
        t.train = m.train = TrainConfig(tokens=args.tokens, e2e_fraction=args.e2e, **kw)
        print(f"\n{name} {json.dumps(kw)}\n| step | lr | FVU | KL | L0 | ‖ΔW_dec‖/‖W_dec‖ | ‖ΔW_enc‖/‖W_enc‖ |")
        for i, clean in enumerate(cleans):
            kls: list[float] = []

            def extra(tr, x_hat, clean=clean, kls=kls):
                kl = spliced_kl(lm, clean, site, x_hat * tr.scale)
                kls.append(float(kl.detach()))
                return tr.train.e2e_kl_coef * kl

            w_dec, w_enc = t.sae.w_dec.detach().clone(), t.sae.w_enc.detach().clone()
            t.start_end_to_end()
            st = t.step_on(clean.acts[site.key], None, lambda x_hat, tr=t, f=extra: f(tr, x_hat))
            lr = t.opt.param_groups[0]["lr"]
            dd = float((t.sae.w_dec - w_dec).norm() / w_dec.norm())
            de = float((t.sae.w_enc - w_enc).norm() / w_enc.norm())
            print(f"| {i} | {float(lr):.2e} | {float(st.fvu):.3f} | {kls[0]:.3f} | {float(st.l0):.1f} | {dd:.4f} | "
                  f"{de:.4f} |", flush=True)
            if (i + 1) % args.eval_every == 0 or i + 1 == len(cleans):
                sae = t.export()
                d = delta_lm_loss(lm, {"s": sae}, held, zero_every=0, progress=False)["s"]
                f = fidelity(sae, held_acts)
                print(f"{name} after {i + 1} steps: {time.perf_counter() - t0:.0f} s; held-out ({d['n_ce_tokens']} "
                      f"CE tokens) ΔLM {d['delta_lm_loss']:.3f} ± {d['delta_lm_loss_se']:.3f}, KL {d['kl']:.3f} ± "
                      f"{d['kl_se']:.3f}, FVU {f['fvu']:.4f}, L0 {f['l0']:.1f}", flush=True)


if __name__ == "__main__":
    main()
