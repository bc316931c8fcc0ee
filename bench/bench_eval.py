"""Where the ΔLM / KL evaluation spends its time on a real run (Gemma 3 270M: 262k-token head).

    PYTHONPATH=src .venv/bin/python bench/bench_eval.py runs/gemma-3-270m [--contexts 4] [--per-context 64]

One batch of held-out contexts, timed piece by piece with the functions `evaluate` uses:
- clean pass: every layer once, stopped before the head (its layer inputs are kept for all SAEs);
- per SAE: the spliced re-run from the SAE's layer on (body), then its head + log-softmax + CE + KL
  on the scored targets (head);
- zero pass per site: the same body with the site zeroed (its head costs as much as an SAE's);
- the clean head on the scored targets (once per batch, shared).
Prints a markdown table (seconds per batch) for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from saescope.evaluate import _pick_targets, _score_head
from saescope.harvest import capture, keep_mask, run_captured
from saescope.harvest import capture_layer_inputs as _capture_layer_inputs
from saescope.harvest import replace_site as _replace_site
from saescope.harvest import run_from as _run_from
from saescope.runs import Run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--contexts", type=int, default=4)
    ap.add_argument("--per-context", type=int, default=64)
    args = ap.parse_args()
    run = Run.open(args.run)
    lm = run.model
    saes = {i: run.load_sae(i) for i in run.sae_ids()}
    ctx_len = int(run.manifest["config"]["ctx_len"])
    it = run.corpus().contexts(lm.tokenizer, part="heldout", ctx_len=ctx_len)
    ids = torch.tensor([next(it) for _ in range(args.contexts)])
    keep = keep_mask(lm, ids)
    targets = _pick_targets(keep, args.per_context, torch.Generator().manual_seed(0))
    last = lm.site("resid_post", lm.n_layers - 1)
    rows = []
    with torch.no_grad():
        t = time.perf_counter()
        with _capture_layer_inputs(lm) as layer_inputs, capture(lm, [last]) as store:
            run_captured(lm, ids)
        clean = store[last.key][:, :-1][targets]
        rows.append(("clean pass (all layers, no head)", time.perf_counter() - t))
        y = ids[:, 1:][targets]
        t = time.perf_counter()
        _score_head(lm, clean, {}, y)
        rows.append((f"clean head on {len(y)} targets", time.perf_counter() - t))
        for sae in saes.values():
            site = lm.site(sae.cfg.site, sae.cfg.layer)
            for name, fn in (("SAE", lambda x, s=sae: s(x.float()).x_hat), ("zero", torch.zeros_like)):
                t = time.perf_counter()
                with _replace_site(site, fn, keep):
                    h = _run_from(lm, site.layer, layer_inputs)[:, :-1][targets]
                body = time.perf_counter() - t
                t = time.perf_counter()
                _score_head(lm, clean, {"v": h}, y)
                both = time.perf_counter() - t  # the clean head again + this variant's head
                rows.append((f"{name} L{sae.cfg.layer}", body, both))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; batch {args.contexts} × {ctx_len}, "
          f"{len(y)} scored targets")
    print("| piece | body s | head s (clean + variant) |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} |" if len(r) == 3 else f"| {r[0]} | {r[1]:.2f} | |")
    for name in ("SAE", "zero"):
        sel = [r for r in rows if r[0].startswith(name)]
        print(f"| {name}: sum over {len(sel)} SAEs | {sum(r[1] for r in sel):.1f} | {sum(r[2] for r in sel):.1f} |")


if __name__ == "__main__":
    main()
