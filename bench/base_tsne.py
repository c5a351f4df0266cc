"""t-SNE of the probe set's final-layer states per stage, a run on the pretrained base beside the
same run from scratch (the preset's model before the bases), in one figure.

    .venv/bin/python -m bench.base_tsne                 # demo preset, seed 0: runs both, then plots
    .venv/bin/python -m bench.base_tsne --runs RUN_BASE RUN_SCRATCH   # two analysed runs

Writes docs/figures/tsne_base_vs_scratch_<preset>.html and, where Chromium is installed, a PNG
beside it (bench/results/base_tsne_<preset>.md lists the runs and their aggregation scores).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.collapse import SCRATCH_MODELS  # noqa: E402
from bench.common import RESULTS, ROOT  # noqa: E402
from locphylax_core import RunDir, load_config, start_run  # noqa: E402
from locphylax_core.analysis import figures as F  # noqa: E402
from locphylax_core.analysis.run_analysis import analyze_run, load_arrays  # noqa: E402
from locphylax_core.runs import atomic_write_text, read_json  # noqa: E402


def run_pair(preset: str, seed: int, root: Path) -> tuple[RunDir, RunDir]:
    out = []
    for sets in ({}, {"model.base": "scratch", **SCRATCH_MODELS.get(preset, {})}):
        cfg = load_config(preset, {"seed": seed, **sets})
        run, _ = start_run(cfg, runs_root=root)
        analyze_run(run, methods=("tsne",), heads=False, casd=False)
        out.append(run)
    return out[0], out[1]


def panel(run: RunDir):
    coords = {k.replace("__", "/"): v for k, v in load_arrays(run.path / "analysis/projection_tsne.safetensors").items()}
    probe = [json.loads(x) for x in (run.path / "probe.jsonl").read_text().splitlines() if x.strip()]
    return coords, probe


def screenshot(fig, png: Path) -> bool:
    """A PNG of the figure through headless Chromium (the page inlines plotly.js: no network here)."""
    if not Path("/usr/bin/chromium").exists():
        return False
    import tempfile

    from playwright.sync_api import sync_playwright
    html = Path(tempfile.mkdtemp()) / "figure.html"
    fig.write_html(str(html), include_plotlyjs=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1240, "height": 900})
        page.goto(html.resolve().as_uri())
        page.wait_for_timeout(1500)
        page.screenshot(path=str(png), full_page=True)
        browser.close()
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", nargs=2, default=None, metavar=("BASE", "SCRATCH"), help="two analysed run folders")
    ap.add_argument("--root", default="runs", help="run store for the two runs (default: runs)")
    args = ap.parse_args(argv)
    if args.runs:
        base, scratch = RunDir(Path(args.runs[0])), RunDir(Path(args.runs[1]))
    else:
        base, scratch = run_pair(args.preset, args.seed, Path(args.root))
    panels = {}
    lines = [f"# t-SNE per stage: pretrained base vs from scratch ({args.preset})\n",
             "| model | run | aggregation score: victim / Stage 1 / Stage 2 | unknown ASR after Stage 2 |",
             "| --- | --- | --- | ---: |"]
    for name, run in (("pretrained base", base), ("from scratch", scratch)):
        panels[name] = panel(run)
        agg = read_json(run.path / "analysis.json")["aggregation"]
        s = read_json(run.path / "summary.json")
        scores = " / ".join("n/a" if agg.get(k, {}).get("aggregation_score") is None
                            else f"{agg[k]['aggregation_score']:.3f}" for k in ("victim", "stage1", "stage2"))
        lines.append(f"| {name} | `{run.run_id}` | {scores} | {100 * s['stages']['stage2']['asr']['unknown']:.1f}% |")
    fig = F.projection_grid_figure(panels, method="tsne", title=f"{args.preset}: final-layer states (t-SNE) per "
                                   "stage, pretrained base (top) vs from scratch (bottom)")
    html = ROOT / "docs" / "figures" / f"tsne_base_vs_scratch_{args.preset}.html"
    html.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(html), include_plotlyjs="cdn", div_id=f"tsne-{args.preset}")
    png = html.with_suffix(".png")
    if screenshot(fig, png):
        lines.append(f"\nFigure: [{png.name}](../../docs/figures/{png.name}) ([interactive]"
                     f"(../../docs/figures/{html.name}))")
    atomic_write_text(RESULTS / f"base_tsne_{args.preset}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
