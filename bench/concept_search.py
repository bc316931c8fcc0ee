"""Criterion (a) of the concept check, in one process, and its ceiling on a run.

    .venv/bin/python bench/concept_search.py RUN LIST.tsv [LIST.tsv ...]            # ~15-30 s
    .venv/bin/python bench/concept_search.py RUN LIST.tsv --ceiling                 # ~1 min

Without --ceiling: for each concept, `Scope.search` top 3 and the share of each hit's top-10 contexts that hold a
concept word (word-prefix match, as ../shared/tools/concept_check.py counts it); a concept is found when a share is
at least 0.5. Much faster than the check's subprocesses, for comparing search recipes side by side.

With --ceiling: over every analysed feature of the run, how many have at least half of their top-10 contexts
(three or more) holding a concept word: when none has, no search ranking can pass (a) on this run.
"""

from __future__ import annotations

import argparse
import csv
import re
import time

from saescope.runs import as_run
from saescope.scope import Scope


def concepts(paths: list[str]) -> list[dict]:
    rows: list[dict] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            rows += list(csv.DictReader(f, delimiter="\t"))
    return rows


def pattern(row: dict) -> re.Pattern:
    return re.compile("|".join(r"\b" + re.escape(w.lower()) for w in row["concept_words"].split(",")))


def search_check(run: str, rows: list[dict]) -> None:
    found, t0 = 0, time.time()
    with Scope.open(run) as scope:
        for row in rows:
            words = pattern(row)
            hits = scope.search(row["concept"], limit=3)
            shares = []
            for h in hits[:3]:
                card = scope.feature(h["sae_id"], h["idx"]) or {}
                top = [e for e in card.get("examples", []) if e.get("kind") == "top"][:10]
                shares.append(sum(bool(words.search("".join(e["tokens"]).lower())) for e in top) / max(len(top), 1))
            ok = any(s >= 0.5 for s in shares)
            found += ok
            shown = " | ".join(f"L{h['layer']}:{h['idx']} {h['label'][:40]!r}" for h in hits[:3])
            print(f"{'ok ' if ok else 'NO '} {row['concept'][:24]:24s} {[round(s, 1) for s in shares]} {shown}")
    print(f"search finds {found}/{len(rows)} ({time.time() - t0:.0f} s)")


def ceiling(run: str, rows: list[dict]) -> None:
    pats = {row["concept"]: pattern(row) for row in rows}
    best: dict[str, list] = {c: [] for c in pats}
    with as_run(run).db(readonly=True) as db:
        for sae in db.saes():
            contexts = db.top_tokens(sae["id"], 10)
            ids = sorted({int(t) for rs in contexts.values() for r in rs for t in r})
            vocab = dict(zip(ids, db.vocab(ids)))
            for idx, rs in contexts.items():
                texts = ["".join(vocab[int(t)] for t in r).replace("▁", " ").lower() for r in rs]
                for c, p in pats.items():
                    share = sum(bool(p.search(t)) for t in texts) / max(len(texts), 1)
                    if share >= 0.5 and len(texts) >= 3:
                        best[c].append((round(share, 2), len(texts), sae["layer"], idx))
    for c, b in best.items():
        b.sort(reverse=True)
        print(f"{c[:24]:24s} features with >= half of their top contexts about it: {len(b):4d}  best: {b[:3]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("lists", nargs="+")
    ap.add_argument("--ceiling", action="store_true")
    a = ap.parse_args()
    (ceiling if a.ceiling else search_check)(a.run, concepts(a.lists))


if __name__ == "__main__":
    main()
