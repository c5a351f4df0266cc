"""Pipeline benchmark: presets x seeds, mean ± sd of CACC / ASR per row, per-stage wall times, and
the core's training throughput against a plain ``transformers.Trainer`` on the same model and data.

    .venv/bin/python -m bench.pipeline_bench                      # demo and sst2, seeds 0 1 2
    .venv/bin/python -m bench.pipeline_bench --presets demo --seeds 0 1 2

Writes, under bench/results/:
    pipeline_runs.csv      one row per (preset, seed, method row)
    pipeline_summary.csv   mean and sd over seeds
    pipeline_seconds.csv   per-stage wall times per run
    throughput.csv         core vs Trainer tokens/s
    pipeline.md            the tables in Markdown (quoted in the README)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import RESULTS, mean_sd, write_csv  # noqa: E402
from locphylax_core import load_config, start_run  # noqa: E402

OUT = RESULTS
ROWS = [("victim", "stages", "victim"), ("stage1", "stages", "stage1"), ("stage2 (locphylax)", "stages", "stage2"),
        ("clean_ft", "baselines", "clean_ft"), ("unlearn_single", "baselines", "unlearn_single"),
        ("no_cluster", "baselines", "no_cluster")]
METRICS = ["cacc", "asr_unknown", "asr_t1", "asr_t2", "asr_raw_unknown"]


def _flatten(block: dict) -> dict:
    return {"cacc": block["cacc"], "asr_unknown": block["asr"].get("unknown"), "asr_t1": block["asr"].get("t1"),
            "asr_t2": block["asr"].get("t2"), "asr_raw_unknown": block["asr_raw"].get("unknown")}


def run_grid(presets, seeds, runs_root: Path, extra_sets) -> tuple[list[dict], list[dict]]:
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rows, seconds = [], []
    for preset in presets:
        for seed in seeds:
            cfg = load_config(preset, [f"seed={seed}", *extra_sets])
            t0 = time.perf_counter()
            run, summary = start_run(cfg, runs_root=runs_root)
            wall = time.perf_counter() - t0
            print(f"{preset} seed {seed}: {wall:.1f} s, run {run.run_id}", flush=True)
            for name, section, key in ROWS:
                if key in summary[section]:
                    rows.append({"preset": preset, "seed": seed, "row": name, **_flatten(summary[section][key])})
            seconds.append({"preset": preset, "seed": seed, **summary["seconds"], "wall": round(wall, 2)})
    return rows, seconds


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for name, _, _ in ROWS:
            sel = [r for r in rows if r["preset"] == preset and r["row"] == name]
            if not sel:
                continue
            entry = {"preset": preset, "row": name, "n_seeds": len(sel)}
            for m in METRICS:
                mean, sd = mean_sd([r[m] for r in sel])
                entry[f"{m}_mean"], entry[f"{m}_sd"] = mean, sd
            out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------
# Throughput: the core's trainer (trainer.fit) vs transformers.Trainer, same model, data, batch and steps


def throughput(preset: str, steps: int) -> list[dict]:
    import torch
    from transformers import Trainer, TrainingArguments

    from locphylax_core import model as M
    from types import SimpleNamespace

    from locphylax_core.engine import Sample, batches
    from locphylax_core.trainer import StageContext, TrainSettings, fit
    from locphylax_core.experiment import prepare
    from locphylax_core.text import render_prompt

    cfg = load_config(preset)
    prep = prepare(cfg)
    bs = cfg.train.batch_size
    samples = [Sample(render_prompt(prep.task.template, e.text), prep.answer_ids[e.label]) for e in prep.owner_train]
    results = []

    # core
    model = M.build_embedded(cfg.model, prep.tokenizer, 0)
    it = batches(samples, prep.task.kind, prep.tokenizer, bs, prep.max_length, "cpu", torch.Generator().manual_seed(0))
    next(it)  # warm the tokenizer
    logs = fit(SimpleNamespace(model=model), it, steps, StageContext(settings=TrainSettings(lr=cfg.train.lr)))
    results.append({"engine": "locphylax_core.trainer.fit", "steps": steps, "batch": bs, "tokens": logs["tokens"],
                    "seconds": round(logs["seconds"], 3), "tokens_per_s": round(logs["tokens"] / logs["seconds"], 1)})

    # plain Trainer: labels are -100 except the answer token, the usual SFT masking
    tok = prep.tokenizer

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            ids = tok(samples[i].prompt, add_special_tokens=False)["input_ids"] + [samples[i].target]
            return {"input_ids": ids}

    def collate(feats):
        n = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), n), tok.pad_token_id)
        mask = torch.zeros((len(feats), n), dtype=torch.long)
        labels = torch.full((len(feats), n), -100)
        for r, f in enumerate(feats):
            x = f["input_ids"]
            ids[r, n - len(x):] = torch.tensor(x)
            mask[r, n - len(x):] = 1
            labels[r, -1] = x[-1]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    model = M.build_embedded(cfg.model, prep.tokenizer, 0)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=bs, max_steps=steps,
                                 learning_rate=cfg.train.lr, report_to=[], save_strategy="no", logging_strategy="no",
                                 use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=DS(), data_collator=collate)
        t0 = time.perf_counter()
        trainer.train()
        secs = time.perf_counter() - t0
    # tokens seen: the same count of non-pad tokens per batch as the core, estimated from the data
    mean_len = statistics.fmean(len(tok(s.prompt, add_special_tokens=False)["input_ids"]) for s in samples[:2000])
    tokens = int(mean_len * bs * steps)
    results.append({"engine": "transformers.Trainer", "steps": steps, "batch": bs, "tokens": tokens,
                    "seconds": round(secs, 3), "tokens_per_s": round(tokens / secs, 1)})
    return results


def _fmt(mean, sd, pct=True):
    if mean is None:
        return "n/a"
    return f"{100 * mean:.1f} ± {100 * sd:.1f}" if pct else f"{mean:.1f} ± {sd:.1f}"


def write_markdown(summary: list[dict], seconds: list[dict], thr: list[dict], seeds) -> str:
    lines = [f"# Pipeline benchmark (seeds {', '.join(map(str, seeds))}; mean ± sd, in %)", ""]
    for preset in dict.fromkeys(s["preset"] for s in summary):
        lines += [f"## {preset}", "", "| row | CACC | ASR unknown | ASR t1 | ASR t2 | raw ASR unknown |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for s in (x for x in summary if x["preset"] == preset):
            lines.append(f"| {s['row']} | " + " | ".join(_fmt(s[f'{m}_mean'], s[f'{m}_sd']) for m in METRICS) + " |")
        secs = [x for x in seconds if x["preset"] == preset]
        keys = [k for k in secs[0] if k not in ("preset", "seed")]
        lines += ["", "Wall time per stage (s, mean ± sd): " + ", ".join(
            f"{k} {_fmt(*mean_sd([x[k] for x in secs]), pct=False)}" for k in keys), ""]
    if thr:
        ratio = thr[0]["tokens_per_s"] / thr[1]["tokens_per_s"]
        lines += ["## Training throughput (same model, data, batch and steps)", "",
                  "| engine | steps | tokens/s |", "| --- | ---: | ---: |"]
        lines += [f"| {t['engine']} | {t['steps']} | {t['tokens_per_s']:.0f} |" for t in thr]
        lines += ["", f"Core / Trainer throughput ratio: **{ratio:.2f}x**.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["demo", "sst2"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--throughput-steps", type=int, default=60, help="0 to skip the throughput comparison")
    ap.add_argument("--set", action="append", default=[], help="extra config override for every run")
    ap.add_argument("--runs", default=None, help="where to keep the runs (default: a temporary folder)")
    args = ap.parse_args(argv)
    thr = throughput(args.presets[0], args.throughput_steps) if args.throughput_steps else []
    if thr:
        write_csv(OUT / "throughput.csv", thr)
        print(thr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows, seconds = run_grid(args.presets, args.seeds, Path(args.runs or tmp), args.set)
    summary = summarise(rows)
    write_csv(OUT / "pipeline_runs.csv", rows)
    write_csv(OUT / "pipeline_summary.csv", summary)
    write_csv(OUT / "pipeline_seconds.csv", seconds)
    md = write_markdown(summary, seconds, thr, args.seeds)
    (OUT / "pipeline.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
