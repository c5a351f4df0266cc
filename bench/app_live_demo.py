"""The instructor's path, timed in a real browser: an empty run store, `streamlit run`, the Live demo
page open (its warm job process starts), one click on "Run the live demo", until the headline
(victim -> Stage 1 -> Stage 2 and plain clean fine-tuning) and then the whole page (every plot,
the analyses complete) are on screen. Median of ``--repeats`` runs, each from an empty run store.
Baseline in the same run: `locphylax demo` on the command line (the full demo preset: pipeline and
analyses, no app).

    .venv/bin/python bench/app_live_demo.py [--repeats 3] [--no-baseline] [--screenshots DIR]

Writes bench/results/app_live_demo.md (and, with --screenshots, the presentation-mode screenshots
at the headline and at the full page).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "app"))
sys.path.insert(0, str(REPO))
from serve import CHROMIUM, CHROMIUM_FLAGS, streamlit_server  # noqa: E402

from locphylax_core import jobs  # noqa: E402


def _analysis_complete(root: Path) -> bool:
    for p in root.glob("*/analysis.json"):
        try:
            return bool(json.loads(p.read_text()).get("complete"))
        except (OSError, ValueError):
            return False
    return False


def app_demo(root: Path, shots: Path | None, rep: int) -> dict:
    from playwright.sync_api import sync_playwright
    out = {}
    with streamlit_server(root) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        t_open = time.perf_counter()
        page.goto(url)
        page.get_by_text("No demo run is stored yet").wait_for(timeout=120_000)
        # as in a class: the page is open before the click, long enough for its warm job process
        while not jobs.standby_ready(root):
            if time.perf_counter() - t_open > 180:
                raise RuntimeError("the standby job process never became ready")
            time.sleep(0.2)
        out["standby_ready_after_open_s"] = time.perf_counter() - t_open
        t0 = time.perf_counter()
        page.get_by_role("button", name="Run the live demo").click()
        page.get_by_text("Now:").first.wait_for(timeout=60_000)
        out["progress_shown_s"] = time.perf_counter() - t0
        page.get_by_text("In one sentence:").wait_for(timeout=600_000)
        out["headline_s"] = time.perf_counter() - t0
        out["sentence"] = page.locator("p", has_text="In one sentence:").first.inner_text()
        if shots:
            page.screenshot(path=str(shots / f"live_demo_headline_{rep}.png"))
        while not _analysis_complete(root):
            if time.perf_counter() - t0 > 900:
                raise RuntimeError("the analyses never completed")
            time.sleep(0.2)
        page.get_by_text("More plots are on their way").wait_for(state="hidden", timeout=120_000)
        page.locator(".js-plotly-plot .main-svg").nth(2).wait_for(timeout=60_000)  # curves, projection, heads
        out["full_page_s"] = time.perf_counter() - t0
        if shots:  # the app scrolls inside its own container, so a tall window shows the whole page
            page.set_viewport_size({"width": 1600, "height": 3400})
            page.wait_for_timeout(2500)
            page.screenshot(path=str(shots / f"live_demo_full_{rep}.png"))
        browser.close()
    return out


def cli_demo(root: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "locphylax_core.cli", "--runs", str(root), "demo"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--screenshots", default=None)
    args = ap.parse_args()
    shots = Path(args.screenshots) if args.screenshots else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    reps = [app_demo(Path(tempfile.mkdtemp(prefix="app_demo_")), shots if i == 0 else None, i)
            for i in range(args.repeats)]
    cli = None if args.no_baseline else cli_demo(Path(tempfile.mkdtemp(prefix="cli_demo_")))
    med = {k: statistics.median(r[k] for r in reps) for k in ("progress_shown_s", "headline_s", "full_page_s")}
    each = lambda k: ", ".join(f"{r[k]:.1f}" for r in reps)  # noqa: E731
    lines = ["# The live demo from the app (bench/app_live_demo.py)", "",
             f"An empty run store each time, the Live demo page open in headless Chromium until its warm job "
             f"process is ready, then one click on **Run the live demo** (preset `live`, trigger `cf`); this "
             f"machine ({os.cpu_count()} CPU cores, no GPU). Seconds from the click, median of {len(reps)} "
             f"(each run in brackets).", "",
             "| what | median s | runs | target |", "| --- | ---: | --- | ---: |",
             f"| progress shown | {med['progress_shown_s']:.1f} | {each('progress_shown_s')} | |",
             f"| headline: victim, Stage 1, Stage 2 and clean fine-tuning | {med['headline_s']:.1f} | "
             f"{each('headline_s')} | 30 |",
             f"| full page: every baseline and plot, analyses complete | {med['full_page_s']:.1f} | "
             f"{each('full_page_s')} | 60 |"]
    if cli is not None:
        lines.append(f"| baseline, same session: `locphylax demo` on the command line (demo preset, pipeline + "
                     f"analyses) | {cli:.1f} | | |")
    lines += ["", f"The page said (first run): {reps[0]['sentence']}"]
    (REPO / "bench" / "results" / "app_live_demo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
