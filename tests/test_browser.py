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


def feature_url(server, sae_id: str, idx: int) -> str:
    return f"{server.url}/#/feature/{quote(sae_id, safe='')}/{idx}"


def test_overview(server, page, shots):
    page.goto(server.url + "/")
    page.wait_for_selector("#sae-table tr:nth-child(4)")
    assert page.locator("#sae-table tr").count() == 4  # header + 3 SAEs
    assert page.locator("#charts svg.chart").count() == 6
    assert page.locator("#charts svg[data-metric=fvu] circle").count() == 3  # one point per layer
    assert "tiny-gemma" in page.text_content("#run-name") or "run" in page.text_content("#run-name")
    page.screenshot(path=str(shots / "overview.png"), full_page=True)


def test_inspect_feature_label_search_steer(server, page, shots):
    # --- inspector: a token × layer heat map
    page.goto(server.url + "/#/inspect")
    page.fill("#inspect-text", "the king is in paris and the queen is in france .")
    page.click("#inspect-go")
    page.wait_for_selector("table.heat td.cell")
    rows = page.locator("table.heat tr")
    assert rows.count() == 1 + 13  # header + one row per token (word-level tokenizer, with BOS)
    assert page.locator("table.heat th").count() == 1 + 3  # token column + 3 layers
    cell = page.locator("table.heat td.cell:not(:empty)").first
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
        page.wait_for_function("document.getElementById('run-name').textContent.length > 0")
        assert page.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read it
        page.close()
