"""Do the aux-k settings revive the early layers' dead features? Layers 0-2, width 2,048, L0* 32, 100k tokens.

    .venv/bin/python bench/dead_aux_sweep.py   (prints held-out dead fraction, FVU, L0 per layer per variant)
"""

import json
import time

import torch

from saescope.corpus import Corpus
from saescope.evaluate import fidelity
from saescope.harvest import harvest
from saescope.models import load_model
from saescope.pipeline import sae_configs
from saescope.train import Chunk, MultiTrainer, TrainConfig

lm = load_model("gemma-3-270m", device="cpu")
layers = [0, 1, 2]
sites = lm.sites(kinds=("resid_post",), layers=layers)
corp = Corpus("default")
held = {s.key: [] for s in sites}
for b in harvest(lm, corp.contexts(lm.tokenizer, part="heldout", ctx_len=256), sites, batch_size=16, max_tokens=16384, progress=False):
    for k, v in b.acts.items():
        held[k].append(v)
held = {k: torch.cat(v) for k, v in held.items()}
train_acts = {s.key: [] for s in sites}
for b in harvest(lm, corp.contexts(lm.tokenizer, part="train", ctx_len=256), sites, batch_size=16, max_tokens=100_000, progress=False):
    for k, v in b.acts.items():
        train_acts[k].append(v)
train_acts = {k: torch.cat(v)[:100_000] for k, v in train_acts.items()}
variants = {"today": {}, "dead_window_5k": {"dead_tokens": 5000}, "aux_1/4": {"aux_coef": 0.25},
            "window_5k+aux_1/4": {"dead_tokens": 5000, "aux_coef": 0.25}}
for name, kw in variants.items():
    t0 = time.time()
    cfgs = sae_configs(lm, "gemma-3-270m", ["resid_post"], layers, [2048], [32], "jump_relu")
    mt = MultiTrainer(cfgs, TrainConfig(tokens=100_000, **kw))
    mt.fit([Chunk({k: v[i:i + 8192] for k, v in train_acts.items()}, 1) for i in range(0, 100_000, 8192)], progress=False)
    res = {}
    for t in mt.trainers:
        m = fidelity(t.export(), held[f"resid_post/{t.cfg.layer}"])
        res[t.cfg.layer] = (round(m["dead_fraction"], 3), round(m["fvu"], 4), round(m["l0"], 1))
    print(name, round(time.time() - t0), "s", json.dumps(res), flush=True)
