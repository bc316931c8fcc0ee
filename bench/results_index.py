"""Rewrite the index at the top of bench/RESULTS.md: every `## ` section, grouped by what it is about, linked.

    python bench/results_index.py        # after adding a section (new sections go at the end of the file)

The index sits between the two marker lines below; the sections themselves are not touched.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- index: bench/results_index.py -->", "<!-- end of index -->"
GROUPS = [  # (title, pattern on the heading), first match wins
    ("GPU and many processes (issue 21)", r"GPU|H100|H200|torchrun|gloo|data parallel|layer parallel|sparsify's own"),
    ("Peers: SAELens, sparsify", r"SAELens|sparsify|[Pp]eers"),
    ("The web app and the prompt inspector (issue 20)", r"[Ww]eb app|[Ii]nspector"),
    ("Concepts: labels, search, steering (issue 18)", r"[Ll]abel|[Ss]earch|[Ss]teer|[Cc]oncept|atlas|explain"),
    ("SAE fidelity, the training recipe and the default run (issue 19)",
     r"[Dd]ead|ΔLM|[Ee]nd-to-end|[Mm]atryoshka|recipe|[Ee]val|FVU|fidelity|[Dd]efault run|step|[Tt]rain|[Bb]atch|"
     r"[Aa]uxiliary|[Ll]ayers?\b"),
    ("Reliability, speed and the rest", r""),
]


def anchor(heading: str, seen: Counter) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens, -N for repeats."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    n = seen[slug]
    seen[slug] += 1
    return slug if n == 0 else f"{slug}-{n}"


def build(text: str) -> str:
    body = re.sub(re.escape(START) + r".*?" + re.escape(END) + r"\n*", "", text, flags=re.S)
    seen: Counter = Counter()
    grouped: dict[str, list[str]] = {title: [] for title, _ in GROUPS}
    for line in body.splitlines():
        if line.startswith("## "):
            heading = line[3:]
            link = f"- [{heading}](#{anchor(heading, seen)})"
            group = next(title for title, pat in GROUPS if re.search(pat, heading))
            grouped[group].append(link)
    lines = [START, "## Index", "", "Every section below, in the order written (newest last), by what it is about. "
             "Regenerate with `python bench/results_index.py` after adding one.", ""]
    for title, links in grouped.items():
        if links:
            lines += [f"**{title}**", "", *links, ""]
    lines.append(END)
    head, _, rest = body.partition("\n")  # keep the title line first
    return f"{head}\n\n" + "\n".join(lines) + "\n\n" + rest.lstrip("\n")


if __name__ == "__main__":
    RESULTS.write_text(build(RESULTS.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"indexed {RESULTS}")
