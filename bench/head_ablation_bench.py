"""Head-ablation benchmark: the batched sweep (K heads per forward pass, the batch stacked K
times) against the naive sweep (one forward pass per head) on the same probe set, for the
victim, Stage 1 and Stage 2 checkpoints of a finished demo run.

    .venv/bin/python -m bench.head_ablation_bench /tmp/runs/<demo run>   # an existing run folder
    .venv/bin/python -m bench.head_ablation_bench                         # runs the demo preset first

Both sweeps must give identical arrays (checked, reported in column `identical`). Also reported:
the largest difference between the TransformerLens bridge's answer logits and the pipeline's own
forward pass (engine.forward_answer) on the probe prompts.

Writes bench/results/head_ablation.csv and bench/results/head_ablation.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
import torch  # noqa: E402

from locphylax_core import RunDir, load_config, start_run  # noqa: E402
from locphylax_core import model as M  # noqa: E402
from locphylax_core.analysis import heads as H  # noqa: E402
from locphylax_core.engine import encode, forward_answer  # noqa: E402
from locphylax_core.experiment import prepare  # noqa: E402
from locphylax_core.text import render_prompt  # noqa: E402

OUT = ROOT / "bench" / "results"

try:
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
except Exception:  # pragma: no cover
    pass


def _identical(a: dict, b: dict) -> bool:
    same = lambda x, y: np.array_equal(x, y, equal_nan=True)  # noqa: E731
    return (same(a["delta_cacc"], b["delta_cacc"]) and all(same(a["delta_asr"][k], b["delta_asr"][k]) for k in a["delta_asr"])
            and all(same(a["delta_asr_raw"][k], b["delta_asr_raw"][k]) for k in a["delta_asr_raw"]))


@torch.no_grad()
def _bridge_vs_engine(model, tok_dir: Path, template: str, texts: list[str], max_length, batch_size: int = 64) -> float:
    bridge, tok = H.boot_bridge(model, tok_dir)
    worst = 0.0
    for i in range(0, len(texts), batch_size):
        b = encode(tok, [render_prompt(template, t) for t in texts[i:i + batch_size]], max_length, "cpu")
        ref, _ = forward_answer(model, b)
        worst = max(worst, (H.bridge_answer_logits(bridge, b) - ref).abs().max().item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", help="a finished demo run folder (default: run the demo preset first)")
    ap.add_argument("--keys", nargs="+", default=["victim", "stage1", "stage2"])
    ap.add_argument("--n-probe", type=int, default=200, help="clean probe inputs (plus their triggered copies)")
    ap.add_argument("--repeats", type=int, default=2, help="timings are the best of this many sweeps")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the run's train.threads)")
    args = ap.parse_args()

    if args.run:
        run = RunDir(Path(args.run))
    else:
        tmp = tempfile.mkdtemp(prefix="locphylax-bench-")
        print(f"running the demo preset under {tmp} ...", flush=True)
        run, _ = start_run(load_config("demo"), runs_root=tmp)
    cfg = load_config(str(run.path / "config.yaml"))
    tok_dir = run.path / "tokenizer"
    prep = prepare(cfg, tokenizer=M.load_tokenizer(str(tok_dir)))
    torch.set_num_threads(args.threads or cfg.train.threads)
    probe = prep.evalset.subset(args.n_probe)
    clean_texts, clean_labels, triggered = H.probe_inputs(probe)
    n_items = len(clean_texts) + sum(len(t[0]) for t in triggered.values())
    all_texts = clean_texts + [t for ts in triggered.values() for t in ts[0]]

    rows = []
    for key in args.keys:
        model = M.load_checkpoint(run.checkpoint(key))
        call = lambda batched: H.head_ablation(  # noqa: E731
            model, tok_dir, prep.task.template, clean_texts, clean_labels, triggered, prep.answer_ids,
            batched=batched, batch_size=args.batch_size, max_length=prep.max_length)
        call(True)  # warm-up (first-call allocations, lazy imports)
        best = {}
        results = {}
        for _ in range(args.repeats):
            for batched in (True, False):
                r = call(batched)
                results[batched] = r
                best[batched] = min(best.get(batched, float("inf")), r["seconds"]["sweep"])
        rb, rn = results[True], results[False]
        n_heads = rb["n_layers"] * rb["n_heads"]
        row = {"run": run.run_id, "key": key, "layers": rb["n_layers"], "heads": rb["n_heads"], "probe_inputs": n_items,
               "forward_passes_naive": n_heads, "seconds_batched": round(best[True], 3),
               "seconds_naive": round(best[False], 3), "speedup": round(best[False] / best[True], 2),
               "identical": _identical(rb, rn), "boot_seconds": round(rb["seconds"]["boot"], 3),
               "bridge_vs_engine_max_abs_logit_diff": _bridge_vs_engine(model, tok_dir, prep.task.template, all_texts,
                                                                         prep.max_length),
               "base_cacc": rb["base"]["cacc"], "base_asr_unknown": rb["base"]["asr"].get("unknown"),
               "top_head": rb["critical_heads"][0] if rb["critical_heads"] else None,
               "max_abs_delta_asr_unknown": float(np.nanmax(np.abs(rb["delta_asr"]["unknown"])))
               if "unknown" in rb["delta_asr"] and not np.all(np.isnan(rb["delta_asr"]["unknown"])) else None}
        rows.append(row)
        print(row, flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "head_ablation.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# Head ablation: batched vs naive sweep", "",
             f"Run `{run.run_id}` (preset `{cfg.name}`), {len(clean_texts)} clean probe inputs plus their triggered "
             f"copies ({n_items} prompts), batch size {args.batch_size}, {torch.get_num_threads()} torch threads, "
             f"best of {args.repeats}. Sweep seconds exclude booting the bridge.", "",
             "| stage | layers x heads | naive s (1 head/pass) | batched s | speed-up | identical arrays | "
             "bridge vs engine max abs logit diff | base CACC | base ASR unknown | top head [l, h, dASR] |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        top = r["top_head"]
        top_s = f"[{top[0]}, {top[1]}, {top[2]:+.3f}]" if top else "-"
        asr = "-" if r["base_asr_unknown"] is None else f"{r['base_asr_unknown']:.3f}"
        lines.append(f"| {r['key']} | {r['layers']} x {r['heads']} | {r['seconds_naive']:.2f} | {r['seconds_batched']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['identical']} | {r['bridge_vs_engine_max_abs_logit_diff']:.1e} | "
                     f"{r['base_cacc']:.3f} | {asr} | {top_s} |")
    (OUT / "head_ablation.md").write_text("\n".join(lines) + "\n")
    print((OUT / "head_ablation.md").read_text())


if __name__ == "__main__":
    main()
