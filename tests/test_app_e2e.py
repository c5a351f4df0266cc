"""End to end in a real browser: `streamlit run` on a free localhost port, driven by headless
Chromium through Playwright. It runs the micro preset from the Run page, waits for the job to
finish, visits every page and saves a screenshot of each (tests/artifacts/screenshots/, or
$LOCPHYLAX_SCREENSHOTS). Skipped, with the reason, only where Chromium or Playwright is absent."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "app"))
from serve import CHROMIUM, CHROMIUM_FLAGS, PAGE_TITLES, PAGE_URLS, streamlit_server  # noqa: E402

PAGES = list(PAGE_URLS)

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is absent (Debian's `chromium` package; `make test` installs it where it may)",
                allow_module_level=True)
playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


@pytest.fixture()
def server(tmp_path):
    runs = tmp_path / "runs"
    with streamlit_server(runs, log=tmp_path / "streamlit.log") as url:
        yield url, runs


def _shots_dir() -> Path:
    d = Path(os.environ.get("LOCPHYLAX_SCREENSHOTS", REPO / "tests" / "artifacts" / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_micro_run_from_the_run_page_then_every_page(server):
    url, runs = server
    shots = _shots_dir()
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/run")
        page.get_by_text("What to run").wait_for(timeout=60_000)
        page.locator('[data-testid="stSelectbox"]').filter(has_text="What to run").click()
        page.get_by_role("option", name="Micro (seconds; numbers meaningless)").click()
        page.get_by_role("button", name="Start run").click()
        # live progress while it runs, then the finished job's outcome
        page.get_by_text("% of the run").first.wait_for(timeout=60_000)
        page.get_by_text("Finished. Its plots are on").wait_for(timeout=300_000)
        run_ids = [d.name for d in runs.iterdir() if d.is_dir() and not d.name.startswith(".")]
        assert len(run_ids) == 1
        run_id = run_ids[0]
        assert (runs / run_id / "analysis.json").is_file()
        for i, name in enumerate(PAGES):
            page.goto(f"{url}/{PAGE_URLS[name]}?run={run_id}")
            page.get_by_role("heading", name=PAGE_TITLES[name]).first.wait_for(timeout=60_000)
            if name in ("aggregation", "heads", "compare"):
                page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # let plotly finish drawing
            assert page.locator('[data-testid="stException"]').count() == 0, name
            assert page.get_by_text("Page not found").count() == 0, name
            page.screenshot(path=str(shots / f"{i + 1:02d}_{name}.png"), full_page=True)
        browser.close()
    assert sorted(x.name for x in shots.glob("*.png")) >= [f"{i + 1:02d}_{n}.png" for i, n in enumerate(PAGES)]
