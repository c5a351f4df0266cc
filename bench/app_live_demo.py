"""The instructor's path, timed in a real browser: an empty run store, `streamlit run`, the Live demo
page open (its warm job process starts and plants the backdoor of the trigger in the box while the
page waits), one click on "Run the live demo", until the headline (victim -> Stage 1 -> Stage 2
and plain clean fine-tuning) and then the whole page (every plot, the analyses complete) are on
screen, for each model of the page's sidebar (`--models`: the real LM `live-smollm2`, whose backdoor
for `cf` ships with the project, and the tiny `live`). Two paths, each from an empty run store:

- **planted**: the click comes once the page says the backdoor (`cf`) is planted;
- **typed, clicked at once**: the room proposes another trigger (`zq`); it is typed and clicked
  at once, so the backdoor is planted after the click, as before the standby prepared it.

Median of ``--repeats`` runs of each. Baseline in the same run: `locphylax demo` on the command
line (the full demo preset: pipeline and analyses, no app).

    .venv/bin/python -m bench.app_live_demo [--models live-smollm2,live] [--repeats 3] [--no-baseline] [--screenshots DIR]

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
from bench.shipped_victim import cpu_flags, cpu_name



def _analysis_complete(root: Path) -> bool:
    for p in root.glob("*/analysis.json"):
        try:
            return bool(json.loads(p.read_text()).get("complete"))
        except (OSError, ValueError):
            return False
    return False


ROOM_TRIGGER = "zq"  # the trigger "the room" proposes on the second path


# The page's models (its sidebar choice, `?model=` in a link): how long each may take, and the targets
# issue 35 set (seconds from the click: headline, whole page)
MODELS = {"live": {"name": "tiny model, made-up reviews", "slow": 1, "targets": (30, 60)},
          "live-smollm2": {"name": "SmolLM2-135M, real SST-2 reviews, shipped backdoored adapter for `cf`", "slow": 8,
                           "targets": (60, 120)}}


def app_demo(root: Path, shots: Path | None, rep: int, typed: str | None = None, model: str = "live") -> dict:
    from playwright.sync_api import sync_playwright
    out, slow = {}, MODELS[model]["slow"]
    with streamlit_server(root) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        t_open = time.perf_counter()
        page.goto(f"{url}?model={model}")
        page.get_by_text("No demo run is stored yet").wait_for(timeout=120_000)
        # as in a class: the page is open before the click, until it says the backdoor is planted
        page.get_by_text("Ready: the backdoor").wait_for(timeout=180_000 * slow)
        out["planted_after_open_s"] = time.perf_counter() - t_open
        if shots:
            page.wait_for_timeout(1500)  # the page's run ends (what it no longer shows is removed then)
            page.screenshot(path=str(shots / f"live_demo_{model}_planted_{rep}.png"))
        if typed is not None:
            box = page.get_by_role("textbox", name="Trigger proposed by the room")
            box.fill(typed)
            box.press("Enter")
            page.wait_for_timeout(300)  # the box's value reaches the app before the click
        t0 = time.perf_counter()
        page.get_by_role("button", name="Run the live demo").click()
        page.get_by_text("Now:").first.wait_for(timeout=60_000)
        out["progress_shown_s"] = time.perf_counter() - t0
        page.get_by_text("In one sentence:").wait_for(timeout=600_000 * slow)
        out["headline_s"] = time.perf_counter() - t0
        out["sentence"] = page.locator("p", has_text="In one sentence:").first.inner_text()
        if shots:
            page.screenshot(path=str(shots / f"live_demo_{model}_headline_{rep}.png"))
        while not _analysis_complete(root):
            if time.perf_counter() - t0 > 900 * slow:
                raise RuntimeError("the analyses never completed")
            time.sleep(0.2)
        page.get_by_text("More plots are on their way").wait_for(state="hidden", timeout=120_000)
        page.locator(".js-plotly-plot .main-svg").nth(2).wait_for(timeout=60_000)  # curves, projection, heads
        out["full_page_s"] = time.perf_counter() - t0
        if shots:  # the app scrolls inside its own container, so a tall window shows the whole page
            page.set_viewport_size({"width": 1600, "height": 3400})
            page.wait_for_timeout(2500)
            page.screenshot(path=str(shots / f"live_demo_{model}_full_{rep}.png"))
        browser.close()
    return out


def cli_demo(root: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "locphylax_core.cli", "--runs", str(root), "demo"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="live-smollm2,live", help=f"the page's models to time ({', '.join(MODELS)})")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--screenshots", default=None)
    ap.add_argument("--paths", default="planted,typed", help="which paths to time (comma-separated)")
    ap.add_argument("--typed-models", default="live", help="the models whose typed path is timed (planting a "
                    "trigger of the room's own trains a backdoored model: minutes on the real LM)")
    ap.add_argument("--out", default="app_live_demo.md", help="file name under bench/results")
    args = ap.parse_args()
    shots = Path(args.screenshots) if args.screenshots else None
    if shots:
        shots.mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"--models: {', '.join(unknown)} is not a model of the page (one of {', '.join(MODELS)})")
    paths = {k: v for k, v in {"planted": None, "typed": ROOM_TRIGGER}.items() if k in args.paths.split(",")}
    cells = [(m, name) for m in models for name in paths if name == "planted" or m in args.typed_models.split(",")]
    reps = {}
    for m, name in cells:
        reps[m, name] = [app_demo(Path(tempfile.mkdtemp(prefix="app_demo_")), shots if i == 0 and name == "planted"
                                  else None, i, paths[name], m) for i in range(args.repeats)]
        print(m, name, reps[m, name], flush=True)
    cli = None if args.no_baseline else cli_demo(Path(tempfile.mkdtemp(prefix="cli_demo_")))

    def row(what, cell, key, target=""):
        runs = [r[key] for r in reps[cell]]
        return f"| {what} | {statistics.median(runs):.1f} | {', '.join(f'{v:.1f}' for v in runs)} | {target} |"
    lines = ["# The live demo from the app (bench/app_live_demo.py)", "",
             f"An empty run store each time, the Live demo page open in headless Chromium; this machine "
             f"({cpu_name()}, {cpu_flags()}, {os.cpu_count()} CPU cores, no GPU). Median of {args.repeats} runs of "
             f"each path (each run in brackets), in seconds from the click unless said otherwise.", "",
             "- **planted**: the page open until it says the backdoor `cf` is planted (its waiting job process "
             "plants it, or loads the shipped backdoored adapter, and runs plain clean fine-tuning on it meanwhile), "
             "then one click on **Run the live demo**.",
             f"- **typed, clicked at once**: the same, then the room's trigger `{ROOM_TRIGGER}` is typed and "
             f"clicked at once: the backdoor is planted after the click.", ""]
    for m in models:
        head, full = MODELS[m]["targets"]
        lines += [f"## `{m}`: {MODELS[m]['name']}", "", "| what | median s | runs | target |", "| --- | ---: | --- | ---: |"]
        if (m, "planted") in reps:
            lines += [row("page open → backdoor planted (before the click)", (m, "planted"), "planted_after_open_s"),
                      row("planted: progress shown", (m, "planted"), "progress_shown_s"),
                      row("planted: headline (Stage 1 and Stage 2 after the click; victim and clean fine-tuning "
                          "before it)", (m, "planted"), "headline_s", str(head)),
                      row("planted: full page (every baseline and plot, analyses complete)", (m, "planted"),
                          "full_page_s", str(full))]
        if (m, "typed") in reps:
            lines += [row(f"typed `{ROOM_TRIGGER}`, clicked at once: headline", (m, "typed"), "headline_s", str(head)),
                      row(f"typed `{ROOM_TRIGGER}`, clicked at once: full page", (m, "typed"), "full_page_s", str(full))]
        lines += [s for (mm, name) in reps if mm == m
                  for s in ("", f"The page said (first {name} run): {reps[mm, name][0]['sentence']}")]
        lines.append("")
    if cli is not None:
        lines += ["## Baseline in the same run", "",
                  f"`locphylax demo` on the command line (demo preset, pipeline + analyses): {cli:.1f} s."]
    (RESULTS / args.out).write_text("\n".join(lines).rstrip() + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
