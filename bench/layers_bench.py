"""Layer-analysis benchmark on a finished run (the demo preset): what the new analyses (logit
lens, activation patching, salience, trigger localisation) add to `locphylax analyze`, beside
today's parts in the same process, and activation patching batched over sites (K sites per
forward pass, the batch stacked K times) against the per-site loop (one forward per site), on the
same probe inputs of each analysed checkpoint.

    .venv/bin/python -m bench.layers_bench /tmp/runs/<demo run>

The run folder is analysed in a copy (the original is not touched). Both patching variants must
give the same arrays (checked, column `same arrays`). Writes bench/results/layers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
import torch  # noqa: E402

from locphylax_core import RunDir  # noqa: E402
from locphylax_core.analysis import analyze_run  # noqa: E402
from locphylax_core.analysis.heads import borrowed_bridge  # noqa: E402
from locphylax_core.analysis.layer_run import LayerProbe, layer_keys  # noqa: E402
from locphylax_core.analysis.layers import activation_patching  # noqa: E402

OUT = ROOT / "bench" / "results"


def patching_times(run: RunDir, keys, repeats: int = 2) -> list[dict]:
    probe = LayerProbe(run)
    rows = []
    for key in keys:
        model, max_length = probe.load(key)
        with borrowed_bridge(model, probe.tok_dir) as pair:
            res, secs = {}, {}
            for batched in (False, True):
                best = None
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    res[batched] = activation_patching(model, probe.tok_dir, probe.template, probe.triggered,
                                                       probe.clean, probe.target_ids(), probe.correct_ids(),
                                                       batched=batched, max_length=max_length, bridge=pair)
                    dt = time.perf_counter() - t0
                    best = dt if best is None else min(best, dt)
                secs[batched] = best
        same = all(np.allclose(res[False][k], res[True][k], atol=1e-6, equal_nan=True) for k in ("residual", "heads"))
        n_sites = res[True]["residual"].size + res[True]["heads"].size
        rows.append({"stage": key, "sites": n_sites, "inputs": res[True]["n_inputs"], "loop_s": secs[False],
                     "batched_s": secs[True], "same": same})
        del model
    return rows


def write_figures(out: dict, keys) -> None:
    """docs/figures/layers_*.html (plotly from its CDN, so the files stay small)."""
    from locphylax_core.analysis import figures as F
    from locphylax_core.analysis.run_analysis import LENS_KEYS
    docs = ROOT / "docs" / "figures"
    pa = out["patching"]
    if "victim" in pa and "stage2" in pa:
        for part, xl in (("residual", pa["victim"]["roles"]), ("heads", None)):
            fig = F.patching_heatmaps(np.asarray(pa["victim"][part], float), np.asarray(pa["stage2"][part], float),
                                      x_labels=xl)
            fig.write_html(str(docs / f"layers_patching_{part}_demo.html"), include_plotlyjs="cdn")
    lens = {k: {q: np.asarray(out["logit_lens"][k][q], float) for q in LENS_KEYS} for k in keys
            if k in ("victim", "stage1", "stage2")}
    F.logit_lens_figure(lens).write_html(str(docs / "layers_logit_lens_demo.html"), include_plotlyjs="cdn")


def stage_rows(out: dict, keys) -> list[str]:
    """Per stage: the answer gap, the lens, the strongest sites and the salience rate."""
    lines = ["| stage | LD triggered / clean | P(target) after each block, triggered | residual: trigger role by "
             "layer | residual: answer position by layer | heads (top 2) | trigger ranked first |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for k in keys:
        p, lens, sal = out["patching"][k], out["logit_lens"][k], out["salience"][k]
        roles = p["roles"]
        res = np.asarray(p["residual"], float)
        heads = np.asarray(p["heads"], float)
        order = np.argsort(-np.nan_to_num(heads.ravel(), nan=-9))[:2]
        top = ", ".join(f"L{i // heads.shape[1]}h{i % heads.shape[1]} {heads.ravel()[i]:.2f}" for i in order)
        fmt = lambda a: " / ".join("n/a" if not np.isfinite(v) else f"{v:.2f}" for v in a)  # noqa: E731
        rate = sal["trigger_top1_rate"]
        lines.append(f"| {k} | {p['logit_diff']['triggered']:+.2f} / {p['logit_diff']['clean']:+.2f} | "
                     f"{fmt(np.asarray(lens['target_triggered']))} | {fmt(res[:, roles.index('trigger')])} | "
                     f"{fmt(res[:, roles.index('answer position')])} | {top} | "
                     f"{'n/a' if rate is None else f'{100 * rate:.0f}%'} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished run folder")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = Path(args.run)
    with tempfile.TemporaryDirectory(prefix="locphylax-layers-bench-") as tmp:
        dst = Path(tmp) / src.name
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("analysis", "analysis.json"))
        run = RunDir(dst)
        t0 = time.perf_counter()
        out = analyze_run(run, progress=lambda m: print(f"analysis: {m}", file=sys.stderr, flush=True))
        total = time.perf_counter() - t0
        keys = layer_keys(run, out["stages"])
        rows = patching_times(run, keys)
        write_figures(out, keys)
    sec = out["seconds"]
    layer_parts = ("lens_patching_salience", "localisation")
    today = {k: v for k, v in sec.items() if k not in layer_parts + ("layers", "total")}
    cfg_line = json.dumps({k: out["logit_lens"][keys[0]]["n_inputs"] for k in ("victim",) if keys})
    md = [
        "# Layer analyses: cost and batched patching",
        "",
        f"Run `{src.name}`, {len(keys)} checkpoints ({', '.join(keys)}), "
        f"triggered probe inputs per checkpoint {cfg_line}, {args.threads} torch threads; measured on this machine "
        "(2 CPU cores shared with other jobs, so times are upper bounds).",
        "",
        "## `analyze` in one process",
        "",
        "| part | seconds |",
        "| --- | --- |",
        *[f"| {k} | {v:.1f} |" for k, v in today.items()],
        f"| **today's parts, sum** | **{sum(today.values()):.1f}** |",
        f"| logit lens + patching + salience (all checkpoints) | {sec.get('lens_patching_salience', 0):.1f} |",
        f"| trigger localisation (Stage 1) | {sec.get('localisation', 0):.1f} |",
        f"| **layer analyses, total (`seconds.layers`)** | **{sec.get('layers', 0):.1f}** |",
        f"| whole analysis (wall) | {total:.1f} |",
        "",
        "## Activation patching: per-site loop vs batched over sites (best of 2, bridge booted once)",
        "",
        "| stage | sites | inputs | loop s | batched s | speed-up | same arrays |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {r['stage']} | {r['sites']} | {r['inputs']} | {r['loop_s']:.2f} | {r['batched_s']:.2f} | "
          f"{r['loop_s'] / r['batched_s']:.2f}x | {r['same']} |" for r in rows],
        "",
        "## Where the backdoor sits, per stage",
        "",
        "Restoration: 1 = patching that site with the clean run's activation undoes the trigger's effect "
        "on the answer. Residual rows are block inputs (L0 = embeddings).",
        "",
        *stage_rows(out, keys),
        "",
        "Trigger localisation (defender, Stage 1 model, no trigger given): "
        + json.dumps({k: v for k, v in (out.get("localisation") or {}).items() if k != "examples"}),
        "",
        "Reproduce: `.venv/bin/python -m bench.layers_bench RUN_FOLDER`.",
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "layers.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
