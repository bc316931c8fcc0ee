"""The web app in a real headless Chromium: inspector → feature → label → search → steering, and XSS.

Driven with the PyPI `playwright` package against Debian's /usr/bin/chromium (never
`playwright install`). Screenshots go to $SAESCOPE_SCREENSHOTS or a pytest temp folder.
Run only these: `pytest -m browser`.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install -y chromium)"),
]
playwright_sync = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install playwright)")
uvicorn = pytest.importorskip("uvicorn")

from atlas_run import build_run  # noqa: E402

from saescope.server.app import create_app  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000
TOKEN = "browser-token-0123456789"


@pytest.fixture(scope="session")
def atlas_dir(tmp_path_factory, tiny_gemma_dir):
    return build_run(tmp_path_factory.mktemp("atlas"), tiny_gemma_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving the app in a background thread on a free local port."""

    def __init__(self, app):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(atlas_dir):
    with LiveServer(create_app(atlas_dir)) as s:
        yield s


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("SAESCOPE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    pw = playwright_sync.sync_playwright().start()
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh --user-data-dir
    ctx = pw.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), headless=True,
                                                args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 900})
    ctx.set_default_timeout(TIMEOUT_MS)
    try:
        yield ctx
    finally:
        ctx.close()
        pw.stop()


class Watch:
    """Dialogs (alert/confirm) and console errors seen by a page: both must stay empty."""

    def __init__(self, page):
        self.dialogs, self.errors = [], []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(str(e)))


@pytest.fixture
def page(browser):
    p = browser.new_page()
    p.watch = Watch(p)
    yield p
    assert p.watch.dialogs == []
    assert p.watch.errors == []
    p.close()


def until(page, expression: str, timeout: float = TIMEOUT_MS / 1000):
    """Poll a JS expression until it is truthy (page.wait_for_function evaluates strings with eval,
    which the app's Content-Security-Policy forbids)."""
    deadline = time.time() + timeout
    while not page.evaluate(expression):
        if time.time() > deadline:
            raise AssertionError(f"still false after {timeout:.0f} s: {expression}")
        time.sleep(0.05)


def tab_to(page, selector: str, most: int = 40) -> None:
    """Press Tab until the focused element matches `selector` (keyboard-only navigation)."""
    for _ in range(most):
        page.keyboard.press("Tab")
        if page.evaluate("(s) => document.activeElement && document.activeElement.matches(s)", selector):
            return
    raise AssertionError(f"Tab never reached {selector}")


def feature_url(server, sae_id: str, idx: int) -> str:
    return f"{server.url}/#/feature/{quote(sae_id, safe='')}/{idx}"


def test_overview(server, page, shots):
    page.goto(server.url + "/")
    page.wait_for_selector("#sae-table tr:nth-child(4)")
    assert page.locator("#sae-table tr").count() == 4  # header + 3 SAEs
    assert page.locator("#charts svg.chart").count() == 7
    assert page.locator("#charts svg[data-metric=fvu] circle:not(.other)").count() == 3  # one point per layer
    # the never-trained-on text (pydoc) beside the held-out split, and ± SE bars where eval.json has SEs
    assert page.locator("#charts svg[data-metric=fvu] circle.other").count() == 3
    assert page.locator("#charts svg[data-metric=fvu] polyline.other").count() == 1
    assert page.locator("#charts svg[data-metric=delta_lm_loss] line.se").count() == 3
    assert page.locator("#charts svg[data-metric=kl] circle:not(.other)").count() == 3
    assert "never trained on" in page.text_content(".legend")
    assert "tiny-gemma" in page.text_content("#run-name") or "run" in page.text_content("#run-name")
    ticks = page.locator("#charts svg[data-metric=fvu] text.xtick").all_text_contents()
    assert ticks == ["0", "1", "2"]  # every layer, the last one included
    inside = page.evaluate("""() => [...document.querySelectorAll('#charts svg.chart')].every(s => {
        const c = s.closest('.card').getBoundingClientRect(), r = s.getBoundingClientRect();
        return r.left >= c.left && r.right <= c.right + 0.5; })""")
    assert inside, "a chart is wider than its card"
    page.screenshot(path=str(shots / "overview.png"), full_page=True)


def test_inspect_feature_label_search_steer(server, page, shots):
    # --- inspector: a token × layer heat map
    page.goto(server.url + "/#/inspect")
    page.fill("#inspect-text", "the king is in paris and the queen is in france .")
    page.click("#inspect-go")
    page.wait_for_selector("table.heat td.cell")
    rows = page.locator("table.heat tr")
    assert rows.count() == 1 + 13  # header + one row per token (word-level tokenizer, with BOS)
    assert page.locator("table.heat tr:first-child th").count() == 1 + 3  # token column + 3 layers
    cell = page.locator("table.heat td.cell").filter(has_text=re.compile(r"^[1-9]\d*$")).first
    cell.click()
    page.wait_for_selector("#inspect-details .feat-link")
    page.screenshot(path=str(shots / "inspect.png"), full_page=True)

    # --- feature page from the inspector
    page.locator("#inspect-details .feat-link").first.click()
    page.wait_for_selector("#labels")
    assert re.search(r"feature #\d+", page.text_content("h1"))
    assert page.locator("#top-examples .ctx").count() > 0 or "no analysis data" in page.text_content("main")
    url = page.url

    # --- manual label edit, with history
    page.fill("#label-input", "royal browser label")
    page.fill("#label-author", "tester")
    page.click("#label-save")
    page.wait_for_selector("#label-msg:text('saved')")
    assert "royal browser label" in page.text_content("#labels")
    history = page.text_content("#label-history")
    assert "royal browser label" in history and "tester" in history
    page.screenshot(path=str(shots / "feature.png"), full_page=True)

    # --- search finds the new label and links back to the feature
    page.goto(server.url + "/#/search")
    page.fill("#search-q", "browser label")
    page.select_option("#search-mode", "fts")
    page.click("#search-go")
    page.wait_for_selector("#search-results tr:nth-child(2)")
    assert "royal browser label" in page.text_content("#search-results")
    page.screenshot(path=str(shots / "search.png"), full_page=True)
    page.locator("#search-results .feat-link").first.click()
    page.wait_for_selector("#labels")
    assert page.url == url

    # --- steering playground: two continuations and the measured effect
    sae_idx = url.split("#/feature/")[1]
    sae_id, idx = sae_idx.rsplit("/", 1)
    page.goto(server.url + "/#/steer")
    page.fill("#steer-features", f"{sae_id.replace('%2F', '/')}:{idx}=6")
    page.fill("#steer-prompt", "the king is")
    page.fill("#steer-max", "8")
    page.click("#steer-go")
    page.wait_for_selector("#steer-steered")
    unsteered, steered = page.text_content("#steer-unsteered"), page.text_content("#steer-steered")
    assert unsteered.startswith("the king is") and steered.startswith("the king is")
    assert len(unsteered) > len("the king is") and len(steered) > len("the king is")
    assert page.locator("#steer-effects tr").count() == 2
    assert "royal browser label" in page.text_content("#steer-effects")
    assert "nats/token" in page.text_content("#steer-ce")
    page.screenshot(path=str(shots / "steer.png"), full_page=True)

    # --- a bad spec shows the API's message, not a crash
    page.fill("#steer-features", "nonsense")
    page.click("#steer-go")
    page.wait_for_selector("#steer-out .error")
    assert "cannot read feature" in page.text_content("#steer-out .error")
    assert page.watch.errors == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    page.watch.errors.clear()  # that 400 was the point


def test_script_label_is_shown_literally(server, page, atlas_dir, shots):
    from saescope.label.manual import set_label
    from saescope.runs import Run

    run = Run.open(atlas_dir)
    sae_id = run.sae_ids()[0]
    evil = '<script>alert("xss1")</script><img src=x onerror="alert(\'xss2\')"><b>bold</b>'
    set_label(run, sae_id, 3, evil, author='<img src=y onerror=alert(3)>')
    page.goto(feature_url(server, sae_id, 3))
    page.wait_for_selector("#labels")
    assert evil in page.text_content("#labels")
    assert "<img src=y onerror=alert(3)>" in page.text_content("#label-history")
    page.goto(f"{server.url}/#/search?q={quote('script alert')}&mode=fts")
    page.wait_for_selector("#search-results tr:nth-child(2)")
    assert evil in page.text_content("#search-results")
    page.screenshot(path=str(shots / "xss.png"), full_page=True)
    # markup in data never became elements
    assert page.locator("main img, main b, main script").count() == 0
    assert page.evaluate("document.querySelectorAll('script').length") == 1  # app.js only
    # the page watcher asserts that no alert() dialog fired


def test_token_login_in_browser(atlas_dir, browser):
    with LiveServer(create_app(atlas_dir, token=TOKEN)) as s:
        page = browser.new_page()
        resp = page.goto(s.url + "/")
        assert resp.status == 401
        page.goto(f"{s.url}/?token={TOKEN}#/search")
        assert "token=" not in page.url  # redirected: the token lives in an HttpOnly cookie
        page.wait_for_selector("#search-q")
        until(page, "document.getElementById('run-name').textContent.length > 0")
        assert page.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read it
        page.close()


# --------------------------------------------------------------------------- issue #20: a researcher's workbench


def api_json(page, path, body=None):
    """The JSON answer of an API call made from the page (same origin, same cookies)."""
    return page.evaluate("""async ([path, body]) => {
        const opts = body === null ? {} : {method: 'POST', headers: {'Content-Type': 'application/json'},
                                            body: JSON.stringify(body)};
        const r = await fetch(path, opts); return await r.json(); }""", [path, body])


@pytest.fixture(scope="module")
def fired(server, atlas_dir):
    """(sae_id, idx) of the most frequent feature of layer 1."""
    from saescope.runs import Run

    with Run.open(atlas_dir).db(readonly=True) as db:
        sae_id = Run.open(atlas_dir).sae_ids()[1]
        return sae_id, db.top_features(sae_id, limit=1)[0]["idx"]


def test_activation_testing_on_the_feature_page(server, page, fired, shots):
    sae_id, idx = fired
    text = "the king is in paris and the queen is in france ."
    page.goto(feature_url(server, sae_id, idx))
    page.fill("#act-text", text)
    page.click("#act-go")
    page.wait_for_selector("#act-tokens")
    expected = api_json(page, f"/api/feature/{sae_id}/{idx}/activations", {"text": text})
    spans = page.locator("#act-tokens span.t")
    assert spans.count() == len(expected["tokens"])
    shown = [float(v) for v in spans.evaluate_all("els => els.map(e => e.dataset.act)")]
    assert shown == pytest.approx(expected["acts"])
    assert page.locator("#act-tokens span.on").count() == sum(a > 0 for a in expected["acts"]) > 0
    assert f"fires on {sum(a > 0 for a in expected['acts'])} of {len(expected['acts'])} tokens" in \
        page.text_content("#act-summary")
    page.screenshot(path=str(shots / "feature-activation-test.png"), full_page=True)


def test_similar_features_quantiles_random_and_histogram(server, page, fired):
    sae_id, idx = fired
    page.goto(feature_url(server, sae_id, idx))
    page.wait_for_selector("#similar .similar-group")
    expected = api_json(page, f"/api/feature/{sae_id}/{idx}/similar?k=6")["groups"]
    groups = page.locator("#similar .similar-group")
    assert groups.count() == len(expected) == 3
    for g, want in zip(groups.all(), expected):
        links = g.locator("a.feat-link").all_text_contents()
        assert links == [f"#{f['idx']}" for f in want["features"]]
    assert "(this SAE)" in page.text_content("#similar")
    # quantile groups show their activation range; random examples are shown
    ranges = page.locator("#quantile-examples .q-range").all_text_contents()
    assert ranges and all(re.search(r"activation [\d.]+–[\d.]+", r) for r in ranges)
    assert "(strongest)" in ranges[0]
    assert page.locator("#random-examples .ctx").count() > 0
    assert page.locator("#histogram text.xtick").count() >= 2 and page.locator("#histogram text.ytick").count() >= 1
    # following a similar feature opens its page
    page.locator("#similar .similar-group").nth(0).locator("a.feat-link").first.click()
    page.wait_for_selector("#labels")
    assert f"{quote(expected[0]['sae_id'], safe='')}/{expected[0]['features'][0]['idx']}" in page.url


def test_inspector_keyboard_cells_and_feature_highlight(server, page, shots):
    text = "the king is in paris and the queen is in france ."
    page.goto(server.url + "/#/inspect")
    page.fill("#inspect-text", text)
    page.click("#inspect-go")
    page.wait_for_selector("table.heat td.cell")
    res = api_json(page, "/api/inspect", {"text": text, "top": 5, "fast": True})  # what the page asks for
    assert page.locator("#inspect-out p.muted").first.text_content().endswith(f"({res['precision']})")
    for li, layer in enumerate(res["layers"]):  # each cell shows L0 at that token
        cells = page.locator(f"table.heat td.cell[data-li='{li}']").all_text_contents()
        assert cells == ["" if t["bos"] else str(n) for t, n in zip(res["tokens"], layer["l0"])]
    assert page.locator("table.heat td.cell[tabindex='0']").count() == 1  # one tab stop for the grid
    # keyboard only: Tab into the grid, arrows to token 3 at layer 1, Enter
    page.focus("#inspect-go")
    tab_to(page, "table.heat td.cell", most=5)  # past the highlight form, into the grid
    assert page.evaluate("document.activeElement.dataset.t") == "1"
    for key in ("ArrowDown", "ArrowDown", "ArrowRight", "Enter"):
        page.keyboard.press(key)
    assert page.evaluate("[document.activeElement.dataset.t, document.activeElement.dataset.li]") == ["3", "1"]
    page.wait_for_selector("#inspect-details .feat-link")
    top = res["layers"][1]["idx"][3][0]
    assert page.locator("#inspect-details .feat-link").first.text_content() == f"#{top}"
    page.locator("#inspect-details .hl-btn").first.focus()
    page.keyboard.press("Enter")
    page.wait_for_selector("#highlight-tokens")
    acts = api_json(page, f"/api/feature/{res['layers'][1]['sae_id']}/{top}/activations", {"text": text})["acts"]
    assert page.locator("#highlight-tokens span.t").count() == len(res["tokens"])
    assert page.locator("#highlight-tokens span.on").count() == sum(a > 0 for a in acts) >= 1
    marked = page.locator("table.heat td.cell.hl").evaluate_all("els => els.map(e => [e.dataset.t, e.dataset.li])")
    assert sorted(marked) == sorted([str(t), "1"] for t, a in enumerate(acts) if a > 0)
    page.screenshot(path=str(shots / "inspect-highlight.png"), full_page=True)
    page.click("#highlight-clear")
    assert page.locator("table.heat td.cell.hl").count() == 0
    # or typed as LAYER:INDEX
    page.fill("#hl-spec", f"1:{top}")
    page.click("#hl-go")
    page.wait_for_selector("#highlight-tokens")
    assert page.locator("#highlight-tokens span.on").count() == sum(a > 0 for a in acts)
    page.fill("#hl-spec", "nonsense")
    page.click("#hl-go")
    page.wait_for_selector("#highlight .error")
    assert "LAYER:INDEX" in page.text_content("#highlight .error")
    page.fill("#hl-spec", "1:999")
    page.click("#hl-go")
    page.wait_for_selector("#highlight .error")
    until(page, "document.querySelector('#highlight .error').textContent.includes('out of range')")
    page.watch.errors.clear()  # the 404 of feature 999 was the point


def test_sae_page_paging_sort_and_filters(server, page, atlas_dir):
    from saescope.runs import Run

    sae_id = Run.open(atlas_dir).sae_ids()[1]
    page.goto(f"{server.url}/#/sae/{quote(sae_id, safe='')}?order=idx&dir=asc&n=10&state=all")
    page.wait_for_selector("#sae-features")

    def shown():
        return [int(t[1:]) for t in page.locator("#sae-features a.feat-link").all_text_contents()]

    assert shown() == list(range(10)) and page.text_content("#sae-range") == "features 1–10 of 32"
    assert page.locator("#sae-prev").is_disabled()
    page.click("#sae-next")
    until(page, "document.getElementById('sae-range').textContent.startsWith('features 11–20')")
    assert shown() == list(range(10, 20))
    page.click("#sae-dir")  # largest index first, back to the first page
    until(page, "document.getElementById('sae-range').textContent.startsWith('features 1–10')")
    assert shown() == list(range(31, 21, -1))
    page.select_option("#sae-state", "dead")
    page.wait_for_selector("#sae-range")
    every = api_json(page, f"/api/features/{sae_id}?order_by=idx&desc=false&limit=500")["features"]
    dead = [f["idx"] for f in every if not f["n_fired"]]
    until(page, f"document.getElementById('sae-range') && "
                           f"document.getElementById('sae-range').textContent.endsWith('of {len(dead)}')")
    assert shown() == sorted(dead, reverse=True)[:10]
    page.select_option("#sae-state", "all")
    until(page, "document.getElementById('sae-range').textContent.endsWith('of 32')")
    assert page.input_value("#sae-state") == "all"
    page.fill("#sae-minfreq", "1")
    page.fill("#sae-maxfreq", "20")
    page.click("#sae-filter-go")
    band = [f["idx"] for f in every if 0.01 <= f["frequency"] <= 0.2]
    until(page, f"document.getElementById('sae-range').textContent.endsWith('of {len(band)}')")
    assert set(shown()) <= set(band)
    page.goto(f"{server.url}/#/sae/{quote(sae_id, safe='')}")  # by default: alive, not dense
    sparse = [f["idx"] for f in every if f["n_fired"] and f["frequency"] <= 0.1]
    until(page, f"location.hash.indexOf('state') < 0 && "
                f"document.getElementById('sae-range').textContent.endsWith('of {len(sparse)}')")
    assert page.input_value("#sae-state") == "sparse" and sorted(shown()) == sorted(sparse)


def test_steering_streams_with_progress_and_cancels(server, page, fired, shots):
    sae_id, idx = fired
    page.goto(server.url + "/#/steer")
    assert page.locator("#steer-seed").is_disabled() and page.locator("#steer-temp").is_disabled()
    page.uncheck("#steer-greedy")
    assert page.locator("#steer-seed").is_enabled() and page.locator("#steer-n").is_enabled()
    page.fill("#steer-features", f"{sae_id}:{idx}=4")
    page.fill("#steer-prompt", "the king is")
    page.fill("#steer-max", "200")
    page.fill("#steer-n", "4")
    page.click("#steer-go")
    until(page, "document.getElementById('steer-progress').value >= 3")
    assert page.locator("#steer-cancel").is_visible()
    page.click("#steer-cancel")
    until(page, "document.getElementById('steer-status').textContent === 'Cancelled.'")
    page.wait_for_selector("#steer-cancel", state="hidden")
    assert page.evaluate("document.getElementById('steer-progress').value") < 1600
    assert page.locator("#steer-go").is_enabled()
    page.watch.errors.clear()  # the aborted fetch is logged by some Chromium versions
    # the model is free again: two sampled pairs complete, with a progress bar that reaches the end
    page.fill("#steer-max", "6")
    page.fill("#steer-n", "2")
    page.fill("#steer-temp", "1.3")
    page.click("#steer-go")
    page.wait_for_selector("#steer-steered-1")
    until(page, "document.getElementById('steer-status').textContent === 'Done.'")
    assert page.evaluate("[document.getElementById('steer-progress').value, "
                         "document.getElementById('steer-progress').max]") == [24, 24]
    assert page.locator("section.sample").count() == 2
    page.screenshot(path=str(shots / "steer-samples.png"), full_page=True)


def test_concept_candidates_are_listed_to_choose_from(server, page):
    page.goto(server.url + "/#/steer")
    page.fill("#steer-concept", "music")
    page.click("#steer-concept-list")
    page.wait_for_selector("#steer-candidate-table .add-candidate")
    expected = api_json(page, "/api/concept?q=music")["candidates"]
    assert page.locator("#steer-candidate-table tr").count() == 1 + len(expected)
    page.fill("#steer-strength", "3")
    page.locator("#steer-candidate-table .add-candidate").first.click()
    sid, i = expected[0]["features"][0]
    assert page.input_value("#steer-features") == f"{sid}:{i}=3"


def test_keyboard_only_search_to_feature_to_steering(server, page, fired, atlas_dir):
    from saescope.label.manual import set_label
    from saescope.runs import Run

    sae_id, idx = fired
    set_label(Run.open(atlas_dir), sae_id, idx, "keyboard walrus label")
    page.goto(server.url + "/#/search")
    page.focus("#search-q")
    page.keyboard.type("walrus")
    page.keyboard.press("Tab")
    page.keyboard.press("ArrowDown")  # mode select: concept → hybrid → fts
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.wait_for_selector("#search-results .feat-link")

    tab_to(page, "#search-results .feat-link")
    page.keyboard.press("Enter")
    page.wait_for_selector("#labels")
    assert "keyboard walrus label" in page.text_content("#labels")
    tab_to(page, "#steer-link")
    page.keyboard.press("Enter")
    page.wait_for_selector("#steer-features")
    assert page.input_value("#steer-features") == f"{sae_id}:{idx}=2"
    page.focus("#steer-max")
    page.keyboard.press("Control+A")
    page.keyboard.type("4")
    tab_to(page, "#steer-go")
    page.keyboard.press("Enter")
    page.wait_for_selector("#steer-steered")
    assert page.text_content("#steer-steered").startswith("The city of")


NARROW = 400


@pytest.mark.parametrize("where", ["overview", "inspect", "feature", "sae", "steer", "search"])
def test_nothing_overflows_at_400_px(server, browser, fired, shots, where):
    sae_id, idx = fired
    page = browser.new_page()
    page.set_viewport_size({"width": NARROW, "height": 800})
    watch = Watch(page)
    urls = {"overview": "/#/", "inspect": "/#/inspect", "feature": feature_url(server, sae_id, idx)[len(server.url):],
            "sae": f"/#/sae/{quote(sae_id, safe='')}", "steer": f"/#/steer?f={quote(f'{sae_id}:{idx}=4')}",
            "search": "/#/search?q=king&mode=fts"}
    page.goto(server.url + urls[where])
    ready = {"overview": "#charts svg", "inspect": "#inspect-go", "feature": "#similar .similar-group",
             "sae": "#sae-features", "steer": "#steer-go", "search": "#search-out"}
    page.wait_for_selector(ready[where])
    if where == "inspect":
        page.click("#inspect-go")
        page.wait_for_selector("table.heat td.cell")
        page.locator("table.heat td.cell").filter(has_text=re.compile(r"^[1-9]\d*$")).first.click()
        page.wait_for_selector("#inspect-details .feat-link")
    if where == "steer":
        page.fill("#steer-max", "4")
        page.click("#steer-go")
        page.wait_for_selector("#steer-effects")
    page.screenshot(path=str(shots / f"narrow-{where}.png"), full_page=True)
    widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]")
    assert widths[0] <= NARROW and widths[1] <= NARROW, widths
    if where == "inspect":  # the heat map keeps readable columns and scrolls inside its box
        assert page.locator("table.heat td.cell").first.bounding_box()["width"] >= 20
    assert watch.dialogs == [] and watch.errors == []
    page.close()


def test_failures_show_the_servers_reason(server, page, fired, monkeypatch):
    sae_id, idx = fired

    def broken(*a, **kw):
        raise RuntimeError("the label store fell over")

    monkeypatch.setattr("saescope.label.manual.set_label", broken)
    page.goto(feature_url(server, sae_id, idx))
    page.fill("#label-input", "anything")
    page.click("#label-save")
    page.wait_for_selector("#label-msg .error")
    assert page.text_content("#label-msg .error") == \
        "internal error (RuntimeError: the label store fell over); see the server log"
    page.fill("#act-text", "   ")
    page.click("#act-go")
    page.wait_for_selector("#act-out .error")
    assert "empty" in page.text_content("#act-out .error")
    page.goto(server.url + "/#/steer")
    page.fill("#steer-features", "1:99=2")
    page.click("#steer-go")
    page.wait_for_selector("#steer-out .error")
    assert "out of range" in page.text_content("#steer-out .error")
    page.goto(f"{server.url}/#/sae/{quote(sae_id, safe='')}?min_score=7")
    page.wait_for_selector("main .error")
    assert "min_score" in page.text_content("main .error")
    page.watch.errors.clear()  # the 4xx/5xx answers above were the point
