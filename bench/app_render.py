"""How fast a stored run's pages render in the app (issue 5: at most 2 s).

Two measurements on one stored, analysed run (default: the newest analysed demo run in runs/):

1. Server side, with streamlit.testing's AppTest: the time of one script run of each page.
   - ``cached``: the app as shipped, caches warm (median of N reruns).
   - ``uncached`` (the baseline): every ``st.cache_data`` / ``st.cache_resource`` cleared before each
     run, which is what each rerun would cost without the caches.
   - ``first``: the page's first run in this process (imports already done by a warm-up page).
2. In a real browser (headless Chromium, when /usr/bin/chromium exists): from navigation to the
   page's title and (on plot pages) its first plotly chart being drawn, for a fresh page load.

    .venv/bin/python -m bench.app_render [RUN_FOLDER] [--repeats 5] [--screenshots DIR]

Writes bench/results/app_render.csv and bench/results/app_render.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from app.serve import CHROMIUM, CHROMIUM_FLAGS, PAGE_TITLES, PAGE_URLS, streamlit_server
from bench.common import RESULTS, ROOT as REPO

OUT = RESULTS
HOME = REPO / "app" / "Home.py"

PAGES = list(PAGE_URLS)
PLOT_PAGES = {"live_demo", "aggregation", "heads", "compare"}


def newest_analysed_demo(root: Path) -> Path:
    import json
    for p in sorted((x for x in root.iterdir() if x.is_dir()), reverse=True):
        try:
            if json.loads((p / "state.json").read_text()).get("preset") == "demo" and (p / "analysis.json").is_file():
                return p
        except (OSError, ValueError):
            continue
    raise SystemExit(f"no analysed demo run under {root}: run `locphylax demo` first")


def server_side(root: Path, run_id: str, repeats: int) -> list[dict]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest
    os.environ["LOCPHYLAX_RUNS"] = str(root)

    def one(page: str, clear: bool) -> float:
        at = AppTest.from_file(str(HOME), default_timeout=300)
        at.query_params["run"] = run_id
        at.run()  # the default page (live demo) runs first on a fresh AppTest
        if page != "live_demo":
            at.switch_page(f"views/{page}.py")
        if clear:
            st.cache_data.clear()
            st.cache_resource.clear()
        t0 = time.perf_counter()
        at.run()
        dt = time.perf_counter() - t0
        if at.exception:
            raise SystemExit(f"{page}: {at.exception[0].value}")
        return dt

    one("setup", clear=False)  # warm-up: imports
    rows = []
    for page in PAGES:
        st.cache_data.clear()
        st.cache_resource.clear()
        first = one(page, clear=True)
        cached = [one(page, clear=False) for _ in range(repeats)]
        uncached = [one(page, clear=True) for _ in range(repeats)]
        rows.append({"page": page, "first_s": round(first, 3), "cached_median_s": round(statistics.median(cached), 3),
                     "cached_max_s": round(max(cached), 3),
                     "uncached_median_s": round(statistics.median(uncached), 3)})
        print(rows[-1], flush=True)
    return rows


def _timed_load(page, url: str, name: str, run_id: str) -> float:
    """Seconds from navigation until the page's title and (on plot pages) its first chart are drawn."""
    t0 = time.perf_counter()
    page.goto(f"{url}/{PAGE_URLS[name]}?run={run_id}")
    page.get_by_role("heading", name=PAGE_TITLES[name]).first.wait_for(timeout=120_000)
    if name in PLOT_PAGES:
        page.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=120_000)
    return time.perf_counter() - t0


def browser_side(root: Path, run_id: str, repeats: int, shots: Path | None) -> dict[str, list[float]]:
    """Per page: ``repeats + 1`` loads in one tab (the first fills the caches), then one load in a
    fresh browser context (empty HTTP cache: Streamlit's and plotly's JavaScript load again)."""
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} absent: browser timings skipped")
        return {}
    from playwright.sync_api import sync_playwright
    out: dict[str, list[float]] = {}
    with streamlit_server(root) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        _timed_load(page, url, "setup", run_id)  # warm-up: server imports, first session
        for name in PAGES:
            times = []
            for i in range(repeats + 1):
                times.append(_timed_load(page, url, name, run_id))
                if i == 0 and shots is not None:
                    page.wait_for_timeout(1500)
                    shots.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(shots / f"{PAGES.index(name) + 1:02d}_{name}.png"), full_page=True)
            ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
            times.append(_timed_load(ctx.new_page(), url, name, run_id))
            ctx.close()
            out[name] = times
            print(name, [round(t, 2) for t in times], flush=True)
        browser.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", help="an analysed run folder (default: newest analysed demo run in runs/)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--screenshots", default=None, help="also save a screenshot of each page here")
    args = ap.parse_args()
    src = Path(args.run) if args.run else newest_analysed_demo(REPO / "runs")
    tmp = Path(tempfile.mkdtemp(prefix="app_render_"))
    shutil.copytree(src, tmp / src.name)  # a store holding only this run
    rows = server_side(tmp, src.name, args.repeats)
    browser = browser_side(tmp, src.name, args.repeats, Path(args.screenshots) if args.screenshots else None)
    for r in rows:
        t = browser.get(r["page"])
        r["browser_first_load_s"] = round(t[0], 3) if t else None
        r["browser_median_s"] = round(statistics.median(t[1:-1]), 3) if t else None
        r["browser_max_s"] = round(max(t[1:-1]), 3) if t else None
        r["fresh_browser_s"] = round(t[-1], 3) if t else None
    OUT.mkdir(parents=True, exist_ok=True)
    import csv
    with open(OUT / "app_render.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    worst = max(max(r["cached_max_s"], r["browser_max_s"] or 0) for r in rows)
    lines = ["# App render times (bench/app_render.py)", "",
             f"Stored run: `{src.name}` (preset demo), {args.repeats} repeats, this machine "
             f"({os.cpu_count()} CPU cores). Seconds.", "",
             "| page | AppTest first run | AppTest cached, median | cached, max | uncached (baseline), median "
             "| browser first load | browser load, median | browser, max | fresh browser |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['page']} | {r['first_s']:.2f} | {r['cached_median_s']:.2f} | {r['cached_max_s']:.2f} | "
                     f"{r['uncached_median_s']:.2f} | "
                     + " | ".join("n/a" if r[k] is None else f"{r[k]:.2f}"
                                  for k in ("browser_first_load_s", "browser_median_s", "browser_max_s",
                                            "fresh_browser_s")) + " |")
    fresh = max((r["fresh_browser_s"] or 0) for r in rows)
    first = max((r["browser_first_load_s"] or 0) for r in rows)
    lines += ["", f"Slowest cached render, server or browser, in an open app: **{worst:.2f} s** (target: at most 2 s).",
              f"Not met on a first visit: the slowest first load in the open tab is {first:.2f} s, and a page "
              f"opened in a fresh browser (empty cache) takes up to {fresh:.2f} s.",
              "",
              "Columns:",
              "- AppTest times one script run on the server.",
              "- Browser times run from `page.goto` until the page's title and (on plot pages) its first plotly "
              "chart are drawn, in headless Chromium.",
              "- The first load in the tab also fills the app's caches, and the first plot page loads plotly's "
              "JavaScript.",
              "- 'fresh browser' is one load in a new browser context, which loads Streamlit's and plotly's "
              "JavaScript again.",
              "- The uncached baseline clears every Streamlit cache before each run."]
    (OUT / "app_render.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
