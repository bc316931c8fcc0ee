"""Steer 10 labelled features from different layers of a run and record what happened.

    .venv/bin/python bench/steer_examples.py RUN [--strength 1.0] [--tokens 24] [--prompt "..."]

For each of 10 layers spread over the model, picks the labelled feature with the best
detection score whose label is not "unclear", adds its decoder direction at
`strength` × its max activation, and generates greedily with and without the
intervention from the same prompt. Reports the feature's activation on the generated
text (re-encoded by the unsteered model), the probability of its promoted tokens, and
the cost (CE of the steered text under the unsteered model). Appends a table to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saescope.runs import Run  # noqa: E402
from saescope.steer import Intervention, steer  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
MIN_FIRED = 20


def pick_features(run: Run, n: int = 10) -> list[tuple[str, int, str, float]]:
    with run.db() as db:
        best: dict[str, tuple[float, int, str]] = {}
        for lab in db.current_labels():
            if lab["text"].startswith("unclear"):
                continue
            scores = [s["value"] for s in db.scores(lab["id"])]
            if not scores:
                continue
            stats = db.feature(lab["sae_id"], lab["idx"]) or {}
            if (stats.get("n_fired") or 0) < MIN_FIRED:  # enough evidence that the label means something
                continue
            key = (round(scores[-1], 2), stats["n_fired"])
            cur = best.get(lab["sae_id"])
            if cur is None or key > cur[0]:
                best[lab["sae_id"]] = (key, lab["idx"], lab["text"])
    ids = [i for i in run.sae_ids() if i in best]
    spread = sorted({round(k * (len(ids) - 1) / max(1, n - 1)) for k in range(n)}) if ids else []
    chosen = [ids[k] for k in spread]  # layers spread over the whole model
    return [(i, best[i][1], best[i][2], best[i][0][0]) for i in chosen]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--prompt", default="I went for a walk and")
    args = ap.parse_args()
    run = Run.open(args.run)
    rows = []
    t0 = time.time()
    for sae_id, idx, label, score in pick_features(run):
        r = steer(run, args.prompt, [Intervention(sae_id, idx, "add", args.strength)], max_new_tokens=args.tokens)
        e = r.effect
        rows.append((sae_id, idx, label, score, e, r))
        print(f"{sae_id}:{idx} {label!r} score {score:.2f}: act {e.act_unsteered:.2f} → {e.act_steered_text:.2f}, "
              f"p(promoted) {e.prob_unsteered:.4f} → {e.prob_steered:.4f}, CE +{r.ppl_cost:.2f}\n"
              f"   unsteered: {r.unsteered!r}\n   steered:   {r.steered!r}", flush=True)
    rose_act = sum(e.act_steered_text > e.act_unsteered + 1e-3 for *_, e, _ in rows)
    rose_during = sum(e.act_during > e.act_unsteered + 1e-3 for *_, e, _ in rows)
    rose_prob = sum(e.prob_steered > e.prob_unsteered + 1e-4 for *_, e, _ in rows)
    lines = [f"\n## Steering 10 labelled features ({time.strftime('%Y-%m-%d')})\n",
             f"`.venv/bin/python bench/steer_examples.py {args.run} --strength {args.strength} --tokens {args.tokens}` — "
             f"prompt {args.prompt!r}, greedy, add strength × the feature's max activation; {time.time() - t0:.0f} s. "
             f"Activation = the feature's mean code on the generated tokens, re-encoded by the unsteered model; "
             f"p = mean probability of its 10 most promoted tokens; cost = CE of the steered text under the unsteered "
             f"model minus that of the unsteered text (nats/token).\n",
             "| SAE:feature | label (score) | activation before → after (during) | p(promoted) before → after | cost | unsteered | steered |",
             "|---|---|---|---|---:|---|---|"]
    for sae_id, idx, label, score, e, r in rows:
        cell = lambda t: t.replace("|", "\\|").replace("\n", "↵")  # noqa: E731
        lines.append(f"| {sae_id}:{idx} | {cell(label)} ({score:.2f}) | {e.act_unsteered:.2f} → {e.act_steered_text:.2f} ({e.act_during:.1f}) | "
                     f"{e.prob_unsteered:.4f} → {e.prob_steered:.4f} | {r.ppl_cost:+.2f} | {cell(r.unsteered)} | {cell(r.steered)} |")
    lines.append(f"\nActivation on the generated text rose (by > 0.001) for {rose_act}/{len(rows)}; during steered generation "
                 f"for {rose_during}/{len(rows)}; promoted-token probability rose (by > 1e-4) for {rose_prob}/{len(rows)}; "
                 f"median cost {statistics.median([r.ppl_cost for *_, r in rows]):+.2f} nats/token.")
    with open(RESULTS, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
