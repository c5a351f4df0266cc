"""End to end in a real browser: `streamlit run` on a free localhost port, driven by headless
Chromium through Playwright. It runs the micro preset from the Run page, waits for the job to
finish, visits every page and saves a screenshot of each (tests/artifacts/screenshots/, or
$LOCPHYLAX_SCREENSHOTS). Skipped, with the reason, only where Chromium or Playwright is absent."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PAGES = ["live_demo", "setup", "run", "aggregation", "heads", "compare", "export"]
URLS = {"live_demo": ""}  # the default page lives at the root URL
TITLES = {"live_demo": "Backdoor collapse, live", "setup": "Setup", "run": "Run", "aggregation": "Aggregation",
          "heads": "Heads", "compare": "Compare", "export": "Export"}

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is absent (Debian's `chromium` package; .ci/run installs it)", allow_module_level=True)
playwright_sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def server(tmp_path):
    port = _free_port()
    runs = tmp_path / "runs"
    env = {**os.environ, "LOCPHYLAX_RUNS": str(runs), "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "app" / "Home.py"),
                             "--server.port", str(port), "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("streamlit did not start: " + (tmp_path / "streamlit.log").read_text()[-2000:])
    yield url, runs
    os.killpg(proc.pid, 15)
    proc.wait(timeout=20)
    log.close()


def _shots_dir() -> Path:
    d = Path(os.environ.get("LOCPHYLAX_SCREENSHOTS", REPO / "tests" / "artifacts" / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_micro_run_from_the_run_page_then_every_page(server):
    url, runs = server
    shots = _shots_dir()
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
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
            page.goto(f"{url}/{URLS.get(name, name)}?run={run_id}")
            page.get_by_role("heading", name=TITLES[name]).first.wait_for(timeout=60_000)
            if name in ("aggregation", "heads", "compare"):
                page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # let plotly finish drawing
            assert page.locator('[data-testid="stException"]').count() == 0, name
            assert page.get_by_text("Page not found").count() == 0, name
            page.screenshot(path=str(shots / f"{i + 1:02d}_{name}.png"), full_page=True)
        browser.close()
    assert sorted(x.name for x in shots.glob("*.png")) >= [f"{i + 1:02d}_{n}.png" for i, n in enumerate(PAGES)]
