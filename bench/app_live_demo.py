"""The instructor's path, timed in a real browser: an empty run store, `streamlit run`, one click on
"Run the live demo", until the result and its plots are on the page. Baseline in the same run:
`locphylax demo` on the command line (the same pipeline and analyses, no app).

    .venv/bin/python bench/app_live_demo.py [--no-baseline] [--screenshot FILE]

Writes bench/results/app_live_demo.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "app"))
from serve import CHROMIUM, CHROMIUM_FLAGS, streamlit_server  # noqa: E402


def app_demo(root: Path, screenshot: Path | None) -> dict:
    from playwright.sync_api import sync_playwright
    out = {}
    with streamlit_server(root) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_text("No demo run is stored yet").wait_for(timeout=120_000)
        t0 = time.perf_counter()
        page.get_by_role("button", name="Run the live demo").click()
        page.get_by_text("% of the run").first.wait_for(timeout=60_000)
        out["progress_shown_s"] = time.perf_counter() - t0
        page.get_by_text("In one sentence:").wait_for(timeout=900_000)
        page.locator(".js-plotly-plot .main-svg").nth(2).wait_for(timeout=60_000)
        out["result_shown_s"] = time.perf_counter() - t0
        out["sentence"] = page.locator("p", has_text="In one sentence:").first.inner_text()
        if screenshot:
            # the app reruns once more after the job ends; wait until it is idle
            page.get_by_text("Running...").wait_for(state="hidden", timeout=60_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return out


def cli_demo(root: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "locphylax_core.cli", "--runs", str(root), "demo"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--screenshot", default=None)
    args = ap.parse_args()
    app = app_demo(Path(tempfile.mkdtemp(prefix="app_demo_")), Path(args.screenshot) if args.screenshot else None)
    cli = None if args.no_baseline else cli_demo(Path(tempfile.mkdtemp(prefix="cli_demo_")))
    lines = ["# The live demo from the app (bench/app_live_demo.py)", "",
             f"An empty run store, one click on **Run the live demo** in headless Chromium, this machine "
             f"({os.cpu_count()} CPU cores). Seconds from the click.", "",
             "| what | seconds |", "| --- | ---: |",
             f"| progress bar shown | {app['progress_shown_s']:.1f} |",
             f"| result, sentence and plots shown (pipeline + analyses) | {app['result_shown_s']:.1f} |"]
    if cli is not None:
        lines.append(f"| baseline: `locphylax demo` on the command line (pipeline + analyses) | {cli:.1f} |")
    lines += ["", f"What the page said: {app['sentence']}"]
    (REPO / "bench" / "results" / "app_live_demo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
