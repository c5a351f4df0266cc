"""The analyses of a run on the real LM (SmolLM2-135M-Instruct, preset sst2-smollm2) beside the same
analyses of a tiny-model run (preset sst2, the `small` base) with the same trigger: the t-SNE of the
probe set's final-layer states per stage, the aggregation scores, and the head-ablation sweep with
what it costs.

    .venv/bin/locphylax run sst2-smollm2 --no-analyze --set 'defense.baselines=[clean_ft]'
    .venv/bin/locphylax run sst2 --no-analyze --set 'defense.baselines=[clean_ft]'
    .venv/bin/python -m bench.smollm2_analysis --real RUN_REAL --tiny RUN_TINY [--probe 32] [--blocks 8]

The real LM's sweep covers its last ``--blocks`` blocks only (the blocks its LoRA adapters change;
every other block is NaN in the arrays): a full 30 x 9 sweep costs one forward pass of every probe
input per head, and the measured cost per head is extrapolated to all 270 heads in the results.
The tiny model's sweep covers all of its heads. Writes bench/results/smollm2_analysis.md and
docs/figures/{tsne,heads}_smollm2_vs_small_sst2.{html,png} (PNG where Chromium is installed).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.base_tsne import panel, screenshot  # noqa: E402  (one t-SNE panel reader and one PNG writer)
from bench.common import RESULTS, ROOT  # noqa: E402
from locphylax_core import RunDir  # noqa: E402
from locphylax_core.analysis import figures as F  # noqa: E402
from locphylax_core.analysis.heads import run_head_ablation  # noqa: E402
from locphylax_core.analysis.run_analysis import analyze_run  # noqa: E402
from locphylax_core.pretrain import cpu_name  # noqa: E402
from locphylax_core.runs import atomic_write_text, read_json  # noqa: E402

STAGES = ("victim", "stage1", "stage2")
FIGURES = ROOT / "docs" / "figures"
OUT = RESULTS


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def tsne(runs: dict[str, RunDir]) -> dict[str, dict]:
    """t-SNE of every stage of each run (the probe states the run stored), and its aggregation scores."""
    out = {}
    for name, run in runs.items():
        t0 = time.perf_counter()
        analyze_run(run, methods=("tsne",), heads=False, casd=False, layers=False)
        out[name] = {"seconds": time.perf_counter() - t0, "aggregation": read_json(run.path / "analysis.json")["aggregation"],
                     "summary": read_json(run.path / "summary.json")}
    fig = F.projection_grid_figure({name: panel(run) for name, run in runs.items()}, method="tsne",
                                   title="SST-2, trigger cf: final-layer states (t-SNE) per stage, "
                                         "SmolLM2-135M-Instruct (top) vs the tiny `small` model (bottom)")
    html = FIGURES / "tsne_smollm2_vs_small_sst2.html"
    fig.write_html(str(html), include_plotlyjs="cdn", div_id="tsne-smollm2")
    out["_png"] = screenshot(fig, html.with_suffix(".png"))
    return out


def sweep(run: RunDir, n_probe: int, layers: list[int] | None) -> dict:
    t0 = time.perf_counter()
    res = run_head_ablation(run, keys=("victim", "stage2"), n_probe=n_probe, batched=True, layers=layers)
    wall = time.perf_counter() - t0
    v = res["victim"]
    n_items = v["n_items"]
    swept = len(v["layers"]) * v["n_heads"]
    per_head = sum(r["seconds"]["sweep"] for r in res.values()) / (len(res) * (swept + 1))  # +1: the unablated pass
    return {"res": res, "wall": wall, "n_items": n_items, "swept_heads": swept, "per_head": per_head,
            "all_heads": v["n_layers"] * v["n_heads"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", required=True, help="a finished sst2-smollm2 run folder")
    ap.add_argument("--tiny", required=True, help="a finished sst2 run folder (the `small` base), same trigger")
    ap.add_argument("--probe", type=int, default=32, help="clean probe inputs of the head sweep (and their triggered copies)")
    ap.add_argument("--blocks", type=int, default=8, help="the real LM's last N blocks are swept")
    args = ap.parse_args(argv)
    runs = {"SmolLM2-135M-Instruct": RunDir(Path(args.real)), "small (tiny)": RunDir(Path(args.tiny))}
    threads = torch.get_num_threads()

    t = tsne(runs)
    heads = {"SmolLM2-135M-Instruct": sweep(runs["SmolLM2-135M-Instruct"], args.probe, list(range(-args.blocks, 0))),
             "small (tiny)": sweep(runs["small (tiny)"], args.probe, None)}
    real = heads["SmolLM2-135M-Instruct"]["res"]
    fig = F.head_heatmaps(real["victim"]["delta_asr"]["unknown"], real["stage2"]["delta_asr"]["unknown"])
    fig.update_layout(title=f"SmolLM2-135M-Instruct, SST-2, trigger cf: ΔASR of the unknown trigger when one head is "
                            f"ablated (last {args.blocks} blocks swept; blank rows not swept)", height=1100)
    html = FIGURES / "heads_smollm2_sst2.html"
    fig.write_html(str(html), include_plotlyjs="cdn", div_id="heads-smollm2")
    heads_png = screenshot(fig, html.with_suffix(".png"))

    lines = ["# The real LM's analyses beside the tiny model's (SST-2, trigger `cf`)\n",
             f"Measured on {cpu_name()}, {threads} torch threads, no GPU. Command: "
             f"`.venv/bin/python -m bench.smollm2_analysis --real {args.real} --tiny {args.tiny} "
             f"--probe {args.probe} --blocks {args.blocks}`.\n",
             "## Aggregation of the final-layer states per stage\n",
             "| model | run | aggregation score: victim / Stage 1 / Stage 2 | CACC victim → Stage 2 | "
             "unknown ASR victim → Stage 1 → Stage 2 | clean FT ASR | t-SNE seconds |",
             "| --- | --- | --- | --- | --- | ---: | ---: |"]
    for name, run in runs.items():
        agg, s = t[name]["aggregation"], t[name]["summary"]
        st = s["stages"]
        scores = " / ".join("n/a" if agg.get(k, {}).get("aggregation_score") is None
                            else f"{agg[k]['aggregation_score']:.3f}" for k in STAGES)
        cft = s.get("baselines", {}).get("clean_ft", {}).get("asr", {}).get("unknown")
        lines.append(f"| {name} | `{run.run_id}` | {scores} | {_pct(st['victim']['cacc'])} → {_pct(st['stage2']['cacc'])} | "
                     f"{' → '.join(_pct(st[k]['asr']['unknown']) for k in STAGES)} | {_pct(cft)} | "
                     f"{t[name]['seconds']:.0f} |")
    if t["_png"]:
        lines.append("\nFigure: [tsne_smollm2_vs_small_sst2.png](../../docs/figures/tsne_smollm2_vs_small_sst2.png) "
                     "([interactive](../../docs/figures/tsne_smollm2_vs_small_sst2.html))")
    lines += ["\n## Head-ablation sweep (victim and Stage 2)\n",
              "| model | heads swept of all | probe inputs | seconds (both checkpoints) | seconds per head and "
              "checkpoint | a full sweep of one checkpoint | top heads by ΔASR, victim | top heads, Stage 2 |",
              "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for name, h in heads.items():
        top = {k: ", ".join(f"L{ly}h{hh} {100 * d:+.0f}" for ly, hh, d in h["res"][k]["critical_heads"][:3]
                            if not np.isnan(d)) for k in ("victim", "stage2")}
        full = h["per_head"] * (h["all_heads"] + 1)
        lines.append(f"| {name} | {h['swept_heads']} of {h['all_heads']} | {h['n_items']} | {h['wall']:.0f} | "
                     f"{h['per_head']:.2f} | {full / 60:.1f} min{' (extrapolated)' if h['swept_heads'] < h['all_heads'] else ''}"
                     f" | {top['victim']} | {top['stage2']} |")
    if heads_png:
        lines.append("\nFigure: [heads_smollm2_sst2.png](../../docs/figures/heads_smollm2_sst2.png) "
                     "([interactive](../../docs/figures/heads_smollm2_sst2.html))")
    atomic_write_text(OUT / "smollm2_analysis.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
