"""End to end in a real browser: `streamlit run` on a free localhost port, driven by headless
Chromium through Playwright. It runs the live demo (the micro preset) from the Live demo page in
presentation mode, waits for its headline, visits every page, follows shared links and saves a
screenshot of each page (tests/artifacts/screenshots/, or
$LOCPHYLAX_SCREENSHOTS). Skipped, with the reason, only where Chromium or Playwright is absent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import browser_wait_context, screenshots_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "app"))
from serve import CHROMIUM, CHROMIUM_FLAGS, PAGE_TITLES, PAGE_URLS, streamlit_server  # noqa: E402

PAGES = list(PAGE_URLS)

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is absent (Debian's `chromium` package; `make test` installs it where it may)",
                allow_module_level=True)
playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def _idle(page, timeout_ms: int = 120_000) -> None:
    """Wait until the page's script run has ended (Streamlit's running indicator is gone), so that
    the next navigation does not queue behind work this session is still doing on the server."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="detached", timeout=timeout_ms)


def test_live_demo_then_every_page_then_shared_links(tmp_path, monkeypatch):
    """One click on the Live demo page (presentation mode, a trigger typed by the room) runs a job
    (the micro preset: seconds, the page is what is tested) to its headline; then every page of
    that run opens without an error (a screenshot each), a shared link restores a page's view, and a
    link that names an unknown run says so."""
    monkeypatch.setenv("LOCPHYLAX_LIVE_PRESET", "micro")
    runs = tmp_path / "runs"
    shots = screenshots_dir()
    log = tmp_path / "streamlit.log"
    with streamlit_server(runs, log=log) as url, playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url)
        page.get_by_text("No demo run is stored yet").wait_for(timeout=60_000)
        assert page.get_by_role("switch", name="Presentation mode").is_checked()
        box = page.get_by_role("textbox", name="Trigger proposed by the room")
        box.fill("zz top")
        box.press("Enter")
        page.get_by_role("button", name="Run the live demo").click()
        page.get_by_text("Now:").first.wait_for(timeout=60_000)  # live progress while it runs
        page.get_by_text("In one sentence:").wait_for(timeout=300_000)
        page.get_by_text("Try it yourself").wait_for(timeout=300_000)
        page.get_by_text("How often the hidden trigger “zz top” still works").wait_for(timeout=10_000)
        page.get_by_text("Which words decide the answer").wait_for(timeout=120_000)
        _idle(page)
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(shots / "live_demo_presentation.png"), full_page=True)
        run_ids = [d.name for d in runs.iterdir() if d.is_dir() and not d.name.startswith(".")]
        assert len(run_ids) == 1
        run_id = run_ids[0]
        assert (runs / run_id / "analysis.json").is_file()
        for i, name in enumerate(PAGES):
            page.goto(f"{url}/{PAGE_URLS[name]}?run={run_id}")
            try:
                page.get_by_role("heading", name=PAGE_TITLES[name]).first.wait_for(timeout=90_000)
            except playwright_sync.TimeoutError:
                pytest.fail(f"the {name} page showed no heading in 90 s\n{browser_wait_context(page, log)}")
            if name in ("aggregation", "heads", "compare", "casd", "layers"):
                page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
            page.wait_for_timeout(800)  # let plotly finish drawing
            assert page.locator('[data-testid="stException"]').count() == 0, name
            assert page.get_by_text("Page not found").count() == 0, name
            page.screenshot(path=str(shots / f"{i + 1:02d}_{name}.png"), full_page=True)
        page.goto(f"{url}/aggregation?run={run_id}&stage=stage1")
        page.get_by_role("heading", name="Aggregation").first.wait_for(timeout=60_000)
        page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
        assert "stage=stage1" in page.url and f"run={run_id}" in page.url
        assert page.get_by_text("after Stage 1").count() > 0
        # a shared link to one probe input opens its inspector (answers, salience) under the plot
        page.goto(f"{url}/aggregation?run={run_id}&point=0&q=the")
        page.get_by_text("Which words decide the answer").wait_for(timeout=60_000)
        assert page.get_by_role("heading", name="Inspector").count() == 1
        assert page.locator('[data-testid="stException"]').count() == 0
        page.goto(f"{url}/aggregation?run=20990101-000000-nope-000000")
        page.get_by_text("not in this run store").wait_for(timeout=60_000)
        assert page.locator(".js-plotly-plot").count() == 0
        browser.close()
    assert {f"{i + 1:02d}_{n}.png" for i, n in enumerate(PAGES)} <= {x.name for x in shots.glob("*.png")}
