"""Offline label quality per layer, and a seeded sample of features to judge by hand.

    .venv/bin/python bench/label_quality.py RUN                      # per-layer table
    .venv/bin/python bench/label_quality.py RUN --sample 20 --old OLD_RUN   # + evidence of 20 features

Per layer (current offline labels): alive features, median detection-offline (as stored:
on fresh held-out windows where the labeller had them, label/detection.py), the median of
the same labels scored on the analysis's stored held-out windows alone (the earlier
protocol, from the score's details), the median number of silent windows a score used,
median output-offline (over the labels that have one), share of "unclear" labels,
share of labels that name a concept (they hold " · ") and of those named from the output
side ("(promotes ...)"). With --sample, prints for
N random alive features (seeded) the new label, the label of the same feature in
OLD_RUN (e.g. a copy labelled by the previous labeller), a few top contexts with
the firing tokens marked, and the promoted tokens: the material to judge right /
partly / wrong from.
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

from saescope.label.evidence import display_token, gather
from saescope.runs import Run


def offline_labels(run: Run) -> dict[tuple[str, int], dict]:
    with run.db() as db:
        out = {}
        for lab in db.current_labels("offline"):
            lab["scores"] = {s["method"]: s for s in reversed(db.scores(lab["id"]))}  # newest wins
            out[(lab["sae_id"], lab["idx"])] = lab
    return out


def per_layer(run: Run) -> list[dict]:
    labels = offline_labels(run)
    with run.db() as db:
        saes = {s["id"]: s for s in db.saes()}
    rows = []
    for sae_id, sae in sorted(saes.items(), key=lambda kv: (kv[1]["layer"], kv[0])):
        labs = [lab for (s, _), lab in labels.items() if s == sae_id]
        dets = [lab["scores"]["detection-offline"] for lab in labs if "detection-offline" in lab["scores"]]
        det = [d["value"] for d in dets]
        stored = [d["details"].get("stored_balanced_accuracy", d["value"]) for d in dets]
        stored = [v for v in stored if v is not None]
        silent = [d["details"].get("n_silent", d["details"].get("tn", 0) + d["details"].get("fp", 0)) for d in dets]
        out = [lab["scores"]["output-offline"]["value"] for lab in labs if "output-offline" in lab["scores"]]
        rows.append({"layer": sae["layer"], "alive": len(labs),
                     "detection": statistics.median(det) if det else None,
                     "stored": statistics.median(stored) if stored else None,
                     "silent": statistics.median(silent) if silent else None,
                     "promotes": sum("(promotes " in lab["text"] for lab in labs) / max(len(labs), 1),
                     "output": statistics.median(out) if out else None, "n_output": len(out),
                     "unclear": sum(lab["text"].startswith("unclear") for lab in labs) / max(len(labs), 1),
                     "concepts": sum(" · " in lab["text"] for lab in labs) / max(len(labs), 1)})
    return rows


def _fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def sample(run: Run, old: Run | None, n: int, seed: int) -> None:
    labels = offline_labels(run)
    old_labels = offline_labels(old) if old else {}
    keys = sorted(labels)
    picks = random.Random(seed).sample(keys, n)
    with run.db() as db:
        for k, (sae_id, idx) in enumerate(picks, 1):
            lab = labels[(sae_id, idx)]
            ev = gather(db, sae_id, idx)
            layer = sae_id.split("layer_")[1].split("_")[0]
            det = lab["scores"].get("detection-offline", {}).get("value")
            out = lab["scores"].get("output-offline", {}).get("value")
            print(f"\n### {k}. {layer}:{idx}  new: {lab['text']}  (det {_fmt(det, '.2f')}, out {_fmt(out, '.2f')})")
            print(f"    old: {old_labels.get((sae_id, idx), {}).get('text', '–')}")
            print("    promoted: " + ", ".join(repr(display_token(str(t))) for t, _ in ev.logits_pos[:10]))
            for ctx in [c for c in ev.labelling if c.kind == "top"][:4]:
                print("    top: " + ctx.marked()[-110:])
            for ctx in [c for c in ev.labelling if c.kind == "quantile"][:2]:
                print("    quantile: " + ctx.marked()[-110:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--sample", type=int, default=0)
    p.add_argument("--old", type=Path, default=None)
    p.add_argument("--seed", type=int, default=18)
    args = p.parse_args()
    run = Run.open(args.run)
    print("| layer | alive | median detection | same, stored windows only | silent windows (median) | "
          "median output (n) | unclear | concept labels | of which from the output side |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in per_layer(run):
        print(f"| {r['layer']} | {r['alive']} | {_fmt(r['detection'])} | {_fmt(r['stored'])} | {_fmt(r['silent'], '.0f')} | "
              f"{_fmt(r['output'])} ({r['n_output']}) | {r['unclear']:.1%} | {r['concepts']:.1%} | {r['promotes']:.1%} |")
    if args.sample:
        sample(run, Run.open(args.old) if args.old else None, args.sample, args.seed)


if __name__ == "__main__":
    main()
