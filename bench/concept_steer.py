"""The concept loop in one process: search a concept, steer by it, count its words (single vs several features).

    .venv/bin/python bench/concept_steer.py RUN [--tsv FILE] [--combine 1,2] [--variant min_strength=0.25 ...] [--seeds 3]
                                            [--tokens 40] [--results]

For each row of a concepts TSV (concept, prompt, concept_words), as ../shared/tools/concept_check.py
measures it but without a process per call: (a) does one of `search`'s top 3 features have a concept
word in at least half of its top 10 contexts; (b) `steer(run, prompt, concept=...)` sampled over
seeds × tokens: concept words in steered vs unsteered text; (c) mean distinct-bigram ratio >= 0.5.
`--combine 1,2` runs (b, c) once per setting (features steered together: `ConceptSteerConfig.combine`);
each setting calibrates anew (its cache key differs). `--variant k=v,k=v` (repeatable) runs once per variant of
the other `ConceptSteerConfig` settings (recipes side by side in one session). `--results` appends the tables to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saescope.conceptsteer import ConceptSteerConfig, distinct2  # noqa: E402
from saescope.label.evidence import TokenTable  # noqa: E402
from saescope.runs import Run  # noqa: E402
from saescope.search import search  # noqa: E402
from saescope.steer import steer  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")


def count(words, text):
    t = text.lower()
    return sum(len(re.findall(r"\b" + re.escape(w.lower()), t)) for w in words)


def about_share(run: Run, sae_id: str, idx: int, words) -> float:
    with run.db(readonly=True) as db:
        top = db.examples(sae_id, idx, kind="top")[:10]
        table = TokenTable(db)
        texts = ["".join(table.display([int(t) for t in e.tokens])) for e in top]
    return sum(count(words, t) > 0 for t in texts) / len(texts) if texts else 0.0


def one(run: Run, row: dict, cfg: ConceptSteerConfig, seeds: int, tokens: int) -> dict:
    words = row["concept_words"].split(",")
    t = time.time()
    hits = search(run, row["concept"], limit=3)
    t_search = time.time() - t
    shares = [about_share(run, h.sae_id, h.idx, words) for h in hits]
    base_n = steer_n = 0
    d2, texts, choice, t_steer = [], [], None, []
    for s in range(seeds):
        t = time.time()
        r = steer(run, row["prompt"], concept=row["concept"], concept_config=cfg, greedy=False, seed=s,
                  max_new_tokens=tokens)
        t_steer.append(time.time() - t)
        choice = r.concept.choice
        base_n += count(words, r.unsteered)
        steer_n += count(words, r.steered)
        d2.append(distinct2(r.steered))
        texts.append(r.steered.replace("\n", " ").replace("|", "/"))
    about = any(s >= 0.5 for s in shares)
    lang = sum(d2) / len(d2) >= 0.5
    return {"concept": row["concept"], "hit": f"{hits[0].layer}:{hits[0].idx} {hits[0].label}" if hits else "-",
            "shares": shares, "about": about, "base": base_n, "steered": steer_n, "d2": sum(d2) / len(d2),
            "rise": steer_n > base_n and lang, "pass": about and steer_n > base_n and lang, "texts": texts,
            "choice": choice, "t_search": t_search, "t_steer": t_steer}


def table(results: list[dict], combine: str) -> str:
    lines = [f"| concept | search top hit | about-shares | features (strength) | words unsteered → steered | "
             f"distinct2 | pass | steered texts (seeds 0-{len(results[0]['texts']) - 1}) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["choice"]
        feats = " + ".join(f"{sid.split('/')[1].split('_width')[0]}#{i}" for sid, i in c.features)
        lines.append(f"| {r['concept']} | {r['hit'][:50].replace('|', '/')} | {[round(s, 1) for s in r['shares']]} | "
                     f"{feats} ×{c.strength:g}{'' if c.calibrated else ' (uncalibrated)'} | {r['base']} → "
                     f"{r['steered']} | {r['d2']:.2f} | {'PASS' if r['pass'] else 'fail'} | "
                     + " // ".join(t[:160] for t in r["texts"]) + " |")
    n = len(results)
    lines.append(f"\n{combine}: search finds it {sum(r['about'] for r in results)}/{n}; steering raises its "
                 f"words as language {sum(r['rise'] for r in results)}/{n}; whole loop "
                 f"{sum(r['pass'] for r in results)}/{n}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--tsv", default=str(Path(__file__).resolve().parents[2] / "shared" / "concepts-dev.tsv"))
    ap.add_argument("--combine", default="1")
    ap.add_argument("--variant", action="append", default=None,
                    help="k=v,k=v: ConceptSteerConfig settings of one variant (repeatable; default: the defaults)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--results", action="store_true")
    a = ap.parse_args()
    run = Run.open(a.run)
    rows = list(csv.DictReader(open(a.tsv), delimiter="\t"))
    out = []
    fields = [f.name for f in dataclasses.fields(ConceptSteerConfig)]
    for combine, variant in [(int(x), v) for x in a.combine.split(",") for v in (a.variant or [""])]:
        settings = {}
        for k, v in (kv.split("=", 1) for kv in variant.split(",") if kv):
            if k not in fields:
                sys.exit(f"--variant: {k!r} is not a ConceptSteerConfig setting (one of {', '.join(fields)})")
            settings[k] = type(getattr(ConceptSteerConfig, k))(v)
        cfg = ConceptSteerConfig(combine=combine, **settings)
        name = ",".join([f"combine={combine}"] + [f"{k}={v}" for k, v in settings.items()])
        results = []
        for row in rows:
            r = one(run, row, cfg, a.seeds, a.tokens)
            c = r["choice"]
            print(f"== {r['concept']}: {r['hit'][:60]!r} shares {[round(s, 1) for s in r['shares']]} | "
                  f"{c.features} ×{c.strength:g} | words {r['base']} -> {r['steered']} | d2 {r['d2']:.2f} | "
                  f"{'PASS' if r['pass'] else 'fail'} | calibration {c.seconds:.0f}s, steer {r['t_steer']}",
                  flush=True)
            print("   ", c.reason)
            for t in r["texts"]:
                print("     steered:", t[:150])
            results.append(r)
        out.append(table(results, name))
        print(out[-1], flush=True)
    if a.results:
        head = (f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} — concept loop in process "
                f"({Path(a.tsv).name}, {a.seeds} seeds × {a.tokens} tokens, sampled)\n\n"
                f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; command: "
                f"`python bench/concept_steer.py {a.run} --tsv {a.tsv} --combine {a.combine}"
                f"{''.join(' --variant ' + v for v in a.variant or [])}`\n\n")
        with open(RESULTS, "a") as f:
            f.write(head + "\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
