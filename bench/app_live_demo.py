"""The instructor's path, timed in a real browser: an empty run store, `streamlit run`, the Live demo
page open (its warm job process starts and plants the backdoor of the trigger in the box while the
page waits), one click on "Run the live demo", until the headline (victim -> Stage 1 -> Stage 2
and plain clean fine-tuning) and then the whole page (every plot, the analyses complete) are on
screen. Two paths, each from an empty run store:

- **planted**: the click comes once the page says the backdoor (`cf`) is planted;
- **typed, clicked at once**: the room proposes another trigger (`zq`); it is typed and clicked
  at once, so the backdoor is planted after the click, as before the standby prepared it.

Median of ``--repeats`` runs of each. Baseline in the same run: `locphylax demo` on the command
line (the full demo preset: pipeline and analyses, no app).

    .venv/bin/python -m bench.app_live_demo [--repeats 3] [--no-baseline] [--screenshots DIR]

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

from app.serve import CHROMIUM, CHROMIUM_FLAGS, streamlit_server
from bench.common import RESULTS, ROOT as REPO



def _analysis_complete(root: Path) -> bool:
    for p in root.glob("*/analysis.json"):
        try:
            return bool(json.loads(p.read_text()).get("complete"))
        except (OSError, ValueError):
            return False
    return False


ROOM_TRIGGER = "zq"  # the trigger "the room" proposes on the second path


def app_demo(root: Path, shots: Path | None, rep: int, typed: str | None = None) -> dict:
    from playwright.sync_api import sync_playwright
    out = {}
    with streamlit_server(root) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        t_open = time.perf_counter()
        page.goto(url)
        page.get_by_text("No demo run is stored yet").wait_for(timeout=120_000)
        # as in a class: the page is open before the click, until it says the backdoor is planted
        page.get_by_text("Ready: the backdoor").wait_for(timeout=180_000)
        out["planted_after_open_s"] = time.perf_counter() - t_open
        if shots:
            page.wait_for_timeout(1500)  # the page's run ends (what it no longer shows is removed then)
            page.screenshot(path=str(shots / f"live_demo_planted_{rep}.png"))
        if typed is not None:
            box = page.get_by_role("textbox", name="Trigger proposed by the room")
            box.fill(typed)
            box.press("Enter")
            page.wait_for_timeout(300)  # the box's value reaches the app before the click
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
    ap.add_argument("--paths", default="planted,typed", help="which paths to time (comma-separated)")
    ap.add_argument("--out", default="app_live_demo.md", help="file name under bench/results")
    args = ap.parse_args()
    shots = Path(args.screenshots) if args.screenshots else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    paths = {k: v for k, v in {"planted": None, "typed": ROOM_TRIGGER}.items() if k in args.paths.split(",")}
    reps = {name: [app_demo(Path(tempfile.mkdtemp(prefix="app_demo_")), shots if i == 0 and name == "planted"
                            else None, i, typed) for i in range(args.repeats)] for name, typed in paths.items()}
    cli = None if args.no_baseline else cli_demo(Path(tempfile.mkdtemp(prefix="cli_demo_")))

    def row(what, name, key, target=""):
        if name not in reps:
            return f"| {what} | not timed in this run | | {target} |"
        runs = [r[key] for r in reps[name]]
        return f"| {what} | {statistics.median(runs):.1f} | {', '.join(f'{v:.1f}' for v in runs)} | {target} |"
    lines = ["# The live demo from the app (bench/app_live_demo.py)", "",
             f"An empty run store each time, the Live demo page open in headless Chromium (preset `live`); this "
             f"machine ({os.cpu_count()} CPU cores, no GPU). Median of {args.repeats} runs of each path (each run "
             f"in brackets), in seconds from the click unless said otherwise.", "",
             "- **planted**: the page open until it says the backdoor `cf` is planted (its waiting job process "
             "trains the backdoored model and plain clean fine-tuning on it meanwhile), then one click on **Run the live demo**.",
             f"- **typed, clicked at once**: the same, then the room's trigger `{ROOM_TRIGGER}` is typed and "
             f"clicked at once: the backdoor is planted after the click.", "",
             "| what | median s | runs | target |", "| --- | ---: | --- | ---: |",
             row("page open → backdoor planted (before the click)", "planted", "planted_after_open_s"),
             row("planted: progress shown", "planted", "progress_shown_s"),
             row("planted: headline (Stage 1 and Stage 2 after the click; victim and clean fine-tuning before it)", "planted", "headline_s", "30"),
             row("planted: full page (every baseline and plot, analyses complete)", "planted", "full_page_s", "60"),
             row(f"typed `{ROOM_TRIGGER}`, clicked at once: headline", "typed", "headline_s", "30"),
             row(f"typed `{ROOM_TRIGGER}`, clicked at once: full page", "typed", "full_page_s", "60")]
    if cli is not None:
        lines.append(f"| baseline, same session: `locphylax demo` on the command line (demo preset, pipeline + "
                     f"analyses) | {cli:.1f} | | |")
    lines += [s for name in reps for s in ("", f"The page said (first {name} run): {reps[name][0]['sentence']}")]
    (RESULTS / args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
