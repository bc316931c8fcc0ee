"""The web app on a real run, over HTTP (uvicorn in-process, httpx): what a researcher waits for.

- POST /api/inspect with a 2,000-character prompt: wall time and response size (top 5 and top 20), as the page
  asks (fast: bf16 matrix products where the CPU has them) and exact, and how many top-5 features they share;
- GET /api/feature/{sae}/{idx} (the feature page's data) for alive features of several layers, and the
  page's two follow-up calls (similar features, activation testing on a sentence);
- POST /api/steer/stream (one feature, 200 new tokens): time to the first streamed steered token, to
  the end, and how fast a cancel stops the model;
- with --shots DIR: headless-Chromium screenshots of every page at 1400 px and 400 px.

The model and SAEs are warmed up first (`Atlas.warm_up`, as `saescope serve` does). Timings are medians
of --calls calls. Prints a Markdown section; --write appends it to bench/RESULTS.md.

    PYTHONPATH=src .venv/bin/python bench/bench_web.py --run runs/gemma-3-270m [--calls 5] [--shots DIR] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import torch
import uvicorn

from saescope.server.app import create_app

TEXT = ("The Eiffel Tower, built for the 1889 World's Fair in Paris, was at first criticised by artists "
        "and writers. Today it is the most visited paid monument in the world, and its lights sparkle "
        "every evening for five minutes on the hour. Gustave Eiffel's company designed and built it; "
        "the engineers Maurice Koechlin and Emile Nouguier drew the first plans in 1884, and the "
        "architect Stephen Sauvestre added the arches at its base. ")
PROMPT_CHARS = 2000


def prompt(n: int = PROMPT_CHARS) -> str:
    return (TEXT * (n // len(TEXT) + 1))[:n]


class Server:
    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def timed(fn, calls: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(calls):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_inspect(c: httpx.Client, calls: int) -> dict:
    text = prompt()
    out = {}
    for fast in (True, False):  # True: what the page asks for (unless its "exact" box is ticked)
        for top in (5, 20):
            body = {"text": text, "top": top, "fast": fast}
            t, r = timed(lambda body=body: c.post("/api/inspect", json=body), calls)
            r.raise_for_status()
            out[fast, top] = {"s": t, "bytes": len(r.content), "tokens": len(r.json()["tokens"]),
                              "precision": r.json()["precision"], "idx": [L["idx"] for L in r.json()["layers"]]}
    return out


def top5_agreement(ins: dict) -> float:
    """Share of the exact top-5 features per token and SAE that the fast inspector also shows."""
    fast, exact = ins[True, 5]["idx"], ins[False, 5]["idx"]
    same = sum(len(set(f) & set(e)) for lf, le in zip(fast, exact) for f, e in zip(lf, le))
    return same / max(1, sum(len(e) for le in exact for e in le))


def bench_forward(app, calls: int, fast: bool) -> float:
    """The floor under POST /api/inspect: the model's forward pass alone on the same tokens, capturing
    every SAE's site (no SAEs, no JSON)."""
    from saescope.harvest import activations

    scope = app.state.atlas.scope
    lm = scope.model
    ids, _, _ = scope._prompt(prompt())
    sites = list({s.key: s for s in (lm.site(scope.saes[i].cfg.site, scope.saes[i].cfg.layer)
                                     for i in scope.run.sae_ids())}.values())
    with app.state.atlas.compute, lm.fast_matmuls() if fast else contextlib.nullcontext():
        return timed(lambda: activations(lm, ids, sites), calls)[0]


def alive_features(app, n: int = 6) -> list[tuple[str, int]]:
    db = app.state.atlas.scope.db
    ids = app.state.atlas.run.sae_ids()
    picks = []
    for sae_id in ids[:: max(1, len(ids) // n)][:n]:
        rows, _ = db.feature_page(sae_id, state="alive", offset=100, limit=1)
        picks.append((sae_id, rows[0]["idx"]))
    return picks


def bench_feature(c: httpx.Client, feats, calls: int) -> dict:
    first, page, similar, acts = [], [], [], []
    for sae_id, idx in feats:
        t0 = time.perf_counter()
        c.get(f"/api/feature/{sae_id}/{idx}").raise_for_status()
        first.append(time.perf_counter() - t0)
        path = f"/api/feature/{sae_id}/{idx}"
        page.append(timed(lambda path=path: c.get(path), calls)[0])
        similar.append(timed(lambda path=path: c.get(f"{path}/similar", params={"k": 6}), calls)[0])
        acts.append(timed(lambda path=path: c.post(f"{path}/activations", json={"text": TEXT.strip()}), calls)[0])
    return {"first": statistics.median(first), "page": statistics.median(page), "page_max": max(page),
            "similar": statistics.median(similar), "acts": statistics.median(acts)}


def bench_stream(c: httpx.Client, feature: tuple[str, int], calls: int, tokens: int = 200) -> dict:
    sae_id, idx = feature
    body = {"prompt": "The city of", "features": [f"{sae_id}:{idx}=4"], "max_new_tokens": tokens}
    firsts, totals = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        first = None
        with c.stream("POST", "/api/steer/stream", json=body, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                msg = json.loads(line)
                if first is None and msg["type"] == "token" and msg["which"] == "steered":
                    first = time.perf_counter() - t0
        firsts.append(first)
        totals.append(time.perf_counter() - t0)
    # cancel: ask for the same, cancel after the 10th token, time until the stream says 'cancelled'
    with c.stream("POST", "/api/steer/stream", json=body, timeout=600) as r:
        n, t_cancel, stop = 0, None, None
        for line in r.iter_lines():
            msg = json.loads(line)
            n += msg["type"] == "token"
            if n == 10 and t_cancel is None:
                t_cancel = time.perf_counter()
                c.post("/api/steer/cancel", json={})
            if msg["type"] == "cancelled":
                stop = time.perf_counter() - t_cancel
    return {"first": statistics.median(firsts), "total": statistics.median(totals), "tokens": tokens,
            "cancel": stop}


def browser_feature_page(url: str, feats, calls: int) -> dict:
    """Time in headless Chromium from following a link to a feature page until its examples are drawn
    (`#top-examples`), and until its similar features are (`#similar .similar-group`, a second request)."""
    from playwright.sync_api import sync_playwright

    drawn, similar = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{url}/#/")
        page.wait_for_selector("#sae-table")
        for _ in range(calls):
            for sae_id, idx in feats:
                t0 = time.perf_counter()
                page.evaluate("h => { location.hash = h; }", f"#/feature/{quote(sae_id, safe='')}/{idx}")
                page.wait_for_selector(f"h1:has-text('feature #{idx}')")
                page.wait_for_selector("#top-examples")
                drawn.append(time.perf_counter() - t0)
                page.wait_for_selector("#similar .similar-group")
                similar.append(time.perf_counter() - t0)
        browser.close()
    return {"drawn": statistics.median(drawn), "similar": statistics.median(similar)}


def screenshots(url: str, feature: tuple[str, int], folder: Path) -> list[str]:
    """Every page at 1400 px and 400 px, full length, into `folder`."""
    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    sae_id, idx = feature
    pages = {"overview": "#/", "sae": f"#/sae/{quote(sae_id, safe='')}",
             "feature": f"#/feature/{quote(sae_id, safe='')}/{idx}", "inspect": "#/inspect",
             "search": "#/search?q=city&mode=concept", "steer": f"#/steer?f={quote(f'{sae_id}:{idx}=4')}"}
    ready = {"overview": "#charts svg", "sae": "#sae-features", "feature": "#similar .similar-group",
             "inspect": "table.heat td.cell", "search": "#search-results", "steer": "#steer-effects"}
    done = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        for width in (1400, 400):
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.set_default_timeout(300_000)
            for name, frag in pages.items():
                page.goto(f"{url}/{frag}")
                if name == "inspect":
                    page.fill("#inspect-text", TEXT.strip())
                    page.click("#inspect-go")
                    page.wait_for_selector(ready[name])
                    page.locator("table.heat td.cell[data-t='5'][data-li='6']").click()
                    page.locator("#inspect-details .hl-btn").first.click()
                    page.wait_for_selector("#highlight-tokens")
                elif name == "feature":
                    page.wait_for_selector("#act-text")
                    page.fill("#act-text", TEXT.strip())
                    page.click("#act-go")
                    page.wait_for_selector("#act-tokens")
                elif name == "steer":
                    page.fill("#steer-max", "24")
                    page.click("#steer-go")
                page.wait_for_selector(ready[name])
                path = folder / f"{name}-{width}.png"
                page.screenshot(path=str(path), full_page=True)
                over = page.evaluate("document.documentElement.scrollWidth") - width
                done.append(path.name + (f" (overflows by {over} px)" if over > 0 else ""))
            page.close()
        browser.close()
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/gemma-3-270m")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--stream-calls", type=int, default=2)
    ap.add_argument("--shots", type=Path, default=None, help="folder for screenshots (none by default)")
    ap.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args()

    t0 = time.perf_counter()
    app = create_app(args.run)
    app.state.atlas.warm_up()
    warm = time.perf_counter() - t0
    with Server(app) as srv, httpx.Client(base_url=srv.url, timeout=600) as c:
        load = os.getloadavg()[0]
        ins = bench_inspect(c, args.calls)
        forward = {fast: bench_forward(app, args.calls, fast) for fast in (True, False)}
        feats = alive_features(app)
        fea = bench_feature(c, feats, args.calls)
        stream = bench_stream(c, feats[len(feats) // 2], args.stream_calls)
        shown = browser_feature_page(srv.url, feats, args.calls)
        shots = screenshots(srv.url, feats[len(feats) // 2], args.shots) if args.shots else []
        load = f"{load:.1f} → {os.getloadavg()[0]:.1f}"
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    lines = [
        f"## Web app on {Path(args.run).name} over HTTP (issue 20, {datetime.date.today()})", "",
        f"Machine: {machine}. Command: `PYTHONPATH=src .venv/bin/python bench/bench_web.py --run {args.run} "
        f"--calls {args.calls}`. Medians; model + SAEs warmed up first ({warm:.0f} s). Load average (1 min) at "
        f"start → end: {load}.", "",
        "| call | time | response |", "|---|---|---|",
    ]
    for (fast, top), r in ins.items():
        lines.append(f"| POST /api/inspect, {PROMPT_CHARS} chars ({r['tokens']} tokens), top {top}, "
                     f"{'fast (the page)' if fast else 'exact'}: {r['precision']} | {r['s']:.2f} s | "
                     f"{r['bytes'] / 1e6:.2f} MB |")
    lines += [
        f"| the same tokens' top-5 features per token and SAE: fast's that exact's also has | "
        f"{top5_agreement(ins):.1%} | |",
        f"| the model's forward pass alone on those tokens (the floor under inspect), fast / exact | "
        f"{forward[True]:.2f} s / {forward[False]:.2f} s | |",
        f"| GET /api/feature (feature page data), {len(feats)} alive features of layers "
        f"{', '.join(str(s.split('layer_')[1].split('_')[0]) for s, _ in feats)} | {fea['page'] * 1e3:.0f} ms "
        f"(worst {fea['page_max'] * 1e3:.0f} ms; first read {fea['first'] * 1e3:.0f} ms) | |",
        f"| GET …/similar (k 6, this and adjacent layers) | {fea['similar'] * 1e3:.0f} ms | |",
        f"| feature page in Chromium, hash change → examples drawn / → similar features drawn | "
        f"{shown['drawn'] * 1e3:.0f} ms / {shown['similar'] * 1e3:.0f} ms | |",
        f"| POST …/activations (activation testing, {len(TEXT)} chars) | {fea['acts'] * 1e3:.0f} ms | |",
        f"| POST /api/steer/stream, {stream['tokens']} new tokens: first steered token | {stream['first']:.2f} s | |",
        f"| the same, to the end (steered + unsteered + measurement) | {stream['total']:.1f} s | |",
        "| cancel after the 10th token → stream says 'cancelled' | "
        + ("–" if stream["cancel"] is None else f"{stream['cancel']:.2f} s") + " | |",
    ]
    if shots:
        lines += ["", f"Screenshots ({args.shots}): " + ", ".join(shots)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        results = Path(__file__).with_name("RESULTS.md")
        results.write_text(results.read_text().rstrip("\n") + "\n\n" + text)


if __name__ == "__main__":
    main()
