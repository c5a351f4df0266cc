"""How fast the real pretrained LM (SmolLM2-135M, preset ``sst2-smollm2``) trains and evaluates on
this machine, each lever beside the plain baseline in the same run:

- LoRA step time: 1 and 2 threads; float32 against bfloat16 autocast; adapters on every block
  against the last 8 (``model.lora.last_blocks``: the backward pass stops at block 22); and the
  last 8, 4 and 2 on stored rows (``train.reuse_frozen_states``: only the adapted blocks run);
- evaluation cost per row: float32 against bfloat16 (``eval.bf16``), the answer position
  unembedded alone (``logits_to_keep=1``) against the whole sequence, length-sorted batches
  against batches in data order, and the output of the 22 blocks no stage adapts reused from an
  earlier model's scoring (``engine.answer_logits``: what every model after a run's first scores);
- what bfloat16 evaluation does to CACC / ASR (the same model scored both ways);
- ``--cell``: the wall time of one SST-2 cell through the pipeline (victim, Stage 1, Stage 2 and
  clean fine-tuning, every evaluation included), the issue's 10-minute target.

    .venv/bin/python -m bench.smollm2_speed                 # steps + evaluation (about 10 min)
    .venv/bin/python -m bench.smollm2_speed --cell          # and one pipeline cell

Writes bench/results/smollm2_speed.md (quoted in docs/models/smollm2-135m.md and docs/results.md)
and smollm2_speed.csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

from locphylax_core import load_config, start_run  # noqa: E402
from locphylax_core import model as M  # noqa: E402
from locphylax_core.config import load_run_config  # noqa: E402
from locphylax_core.engine import answer_logits, encode  # noqa: E402
from locphylax_core.evaluation import evaluate  # noqa: E402
from locphylax_core.paradigms import owner_samples  # noqa: E402
from locphylax_core.experiment import as_lm, prepare  # noqa: E402
from locphylax_core.precision import use_bf16  # noqa: E402
from locphylax_core.pretrain import cpu_name  # noqa: E402  (the pretraining report's CPU line)
from locphylax_core.text import render_prompt  # noqa: E402
from locphylax_core.trainer import StageContext, TrainSettings, fit  # noqa: E402

OUT = ROOT / "bench" / "results"


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in set(flags) if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))


def step_seconds(cfg, prep, *, threads: int, bf16: bool, last_blocks, steps: int, stored: bool = False) -> float:
    """Median seconds of one LoRA training step (the first, warm-up step left out). ``stored``:
    with ``train.reuse_frozen_states``, timed on rows whose inputs of the first adapted block are
    already stored (an untimed pass over the same batches first), as every stage after the first
    that sees a row, every later defense, and the live demo's prepared defender set are."""
    torch.set_num_threads(threads)
    model = M.initial_model(cfg.model, prep.tokenizer, 0)
    lm = M.LM(model, prep.tokenizer, prep.answer_ids)
    samples, _ = owner_samples(prep, lm, 0, poisoned=True)
    lora = cfg.model.lora.model_copy(update={"last_blocks": last_blocks})
    settings = TrainSettings(lr=cfg.attack.lr, batch_size=cfg.train.batch_size, max_length=prep.max_length, every=1,
                             lora=lora, bf16=bf16, reuse_frozen_states=stored)
    if stored:  # the same seed draws the same batches: this pass stores their rows
        fit(M.LM(copy.deepcopy(model), prep.tokenizer, prep.answer_ids), samples, steps + 1,
            StageContext(seed=0, settings=settings), kind=prep.task.kind)
    stamps = []
    fit(lm, samples, steps + 1, StageContext(seed=0, settings=settings,
                                             observer=lambda step, logs: stamps.append(time.perf_counter())),
        kind=prep.task.kind)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def eval_seconds(lm, prep, texts, *, bf16: bool, keep_one: bool, sort: bool, batch_size: int,
                 reuse: bool = False) -> float:
    """Seconds per row of the scoring forward pass over ``texts`` (``reuse``: through
    ``answer_logits``, whose warm-up pass stores the frozen blocks' output, as a run's first model does)."""
    prompts = [render_prompt(prep.task.template, t) for t in texts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i])) if sort else list(range(len(prompts)))
    lm = M.LM(lm.model, lm.tokenizer, lm.answer_ids, bf16=bf16, frozen_blocks=lm.frozen_blocks)
    batches = [encode(lm.tokenizer, [prompts[j] for j in order[i:i + batch_size]], prep.max_length, lm.device)
               for i in range(0, len(order), batch_size)]
    with torch.no_grad(), lm.inference_autocast():
        for timed in (False, True):  # the first pass warms the kernels up (oneDNN picks them on first use)
            t0 = time.perf_counter()
            for b in batches:
                if reuse:
                    answer_logits(lm.model, b, lm.frozen_blocks)
                else:
                    lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                             logits_to_keep=1 if keep_one else 0, use_cache=False)
    return (time.perf_counter() - t0) / len(texts)


def cell_seconds(preset: str, runs: Path) -> dict:
    """One pipeline cell: victim, Stage 1, Stage 2 and clean fine-tuning, every evaluation included."""
    cfg = load_config(preset, {"defense.baselines": ["clean_ft"]})
    t0 = time.perf_counter()
    _, summary = start_run(cfg, runs)
    total = time.perf_counter() - t0
    return {"total": total, **summary["seconds"], "summary": summary}


def _sections(path: Path) -> dict[str, list[str]]:
    """The ``## `` sections of an earlier report by their first words (kept where not re-measured)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in (path.read_text().splitlines() if path.is_file() else []):
        if line.startswith("## "):
            current = next((k for k in ("## One LoRA training step", "## Scoring forward pass",
                                        "## What bf16 evaluation", "## One SST-2 cell") if line.startswith(k)), None)
            if current:
                out[current] = []
        if current:
            out[current].append(line)
    return out


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sst2-smollm2")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per variant (after one warm-up)")
    ap.add_argument("--eval-rows", type=int, default=128, help="rows of the evaluation-cost measurements")
    ap.add_argument("--cell", action="store_true", help="also time one pipeline cell (several minutes)")
    ap.add_argument("--victim", type=Path, default=None,
                    help="a victim checkpoint folder (a run's checkpoints/victim) to score in fp32 and bf16 "
                         "(default: the base model, which has no backdoor)")
    ap.add_argument("--parts", nargs="*", choices=["steps", "eval", "scores"], default=["steps", "eval", "scores"],
                    help="which measurements to take (the report keeps the sections of the others as they were)")
    ap.add_argument("--stored-last-blocks", nargs="*", type=int, default=[4, 2],
                    help="further adapter depths timed on stored rows (train.reuse_frozen_states)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="thread counts of the step timings")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    cfg = load_config(args.preset)
    prep = prepare(cfg)
    rows = []
    where = f"{cpu_name()}, flags {', '.join(cpu_flags()) or 'none of note'}, torch {torch.__version__}"
    print(where, flush=True)
    # bf16 where the CPU computes in it; emulated (AVX2 only) it is ~60x slower and not worth timing
    native_bf16 = use_bf16("auto", torch.device("cpu"))

    # --- training steps
    n_blocks = cfg.model.n_layer
    for threads in (args.threads if "steps" in args.parts else ()):
        for bf16 in ((False, True) if native_bf16 else (False,)):
            ways = [(None, False), (cfg.model.lora.last_blocks, False)]
            ways += [(last, True) for last in (cfg.model.lora.last_blocks, *args.stored_last_blocks)]
            for last, stored in ways:
                s = step_seconds(cfg, prep, threads=threads, bf16=bf16, last_blocks=last, steps=args.steps,
                                 stored=stored)
                rows.append({"what": "lora step", "threads": threads, "bf16": bf16,
                             "lora_blocks": (f"all {n_blocks}" if last is None else f"last {last}")
                             + (", stored rows" if stored else ""),
                             "seconds": round(s, 3)})
                print(rows[-1], flush=True)

    # --- evaluation
    torch.set_num_threads(cfg.train.threads)
    lm = as_lm(prep, M.initial_model(cfg.model, prep.tokenizer, 0), torch.device("cpu"))
    lm.model.eval()
    texts = [e.text for e in prep.evalset.clean[:args.eval_rows]]
    variants = [(False, True, True, False), (True, True, True, False), (False, False, True, False),
                (False, True, False, False), (False, True, True, True)]
    variants = [v for v in variants if native_bf16 or not v[0]]
    for bf16, keep_one, sort, reuse in (variants if "eval" in args.parts else ()):
        s = eval_seconds(lm, prep, texts, bf16=bf16, keep_one=keep_one, sort=sort, batch_size=cfg.eval.batch_size,
                         reuse=reuse)
        rows.append({"what": "eval row", "threads": cfg.train.threads, "bf16": bf16,
                     "unembed": "answer position" if keep_one else "every position",
                     "batches": "length-sorted" if sort else "data order",
                     "blocks run": f"last {n_blocks - lm.frozen_blocks} (reused)" if reuse else f"all {n_blocks}",
                     "seconds": round(s, 4)})
        print(rows[-1], flush=True)

    # --- what bf16 evaluation does to the scores (the same model, the preset's whole evaluation set)
    scored = "the base model before any fine-tuning"
    if args.victim is not None:
        lm = as_lm(prep, M.load_checkpoint(args.victim), torch.device("cpu"))
        run_cfg = load_run_config(args.victim.parent.parent / "config.yaml")  # the run that trained it
        scored = (f"the victim of `locphylax run {run_cfg.name} --stop-after victim` with trigger "
                  f"`{run_cfg.attack.trigger_text}`, seed {run_cfg.seed}")
    scores = {}
    # fp32 and bf16 through every block; then fp32 reusing the frozen blocks' output: the first
    # pass stores it (as a run's first model), the second reuses it (as every later model)
    ways = {"fp32": (False, 0), "bf16": (True, 0), "fp32, storing the frozen blocks' output": (False, lm.frozen_blocks),
            "fp32, reusing it": (False, lm.frozen_blocks)}
    if not native_bf16:
        del ways["bf16"]
    for name, (bf16, frozen) in (ways.items() if "scores" in args.parts else ()):
        t0 = time.perf_counter()
        r = evaluate(M.LM(lm.model, lm.tokenizer, lm.answer_ids, bf16=bf16, frozen_blocks=frozen),
                     prep.task.template, prep.evalset, cfg.eval.batch_size, prep.max_length)
        scores[name] = (r, time.perf_counter() - t0)
        print(name, r["cacc"], r["asr"], flush=True)

    cell = None
    if args.cell:
        with tempfile.TemporaryDirectory() as tmp:
            cell = cell_seconds(args.preset, Path(tmp))
        print({k: v for k, v in cell.items() if k != "summary"}, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["what", "threads", "bf16", "lora_blocks", "unembed", "batches", "blocks run", "seconds"]
    measured = {r["what"] for r in rows}
    csv_path = args.out / "smollm2_speed.csv"
    kept = []
    if csv_path.is_file():  # an earlier run's rows of what this run did not measure
        with csv_path.open(newline="") as f:
            kept = [r for r in csv.DictReader(f) if r["what"] not in measured]
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows([{k: r.get(k, "") for k in fields} for r in kept + rows])

    previous = _sections(args.out / "smollm2_speed.md")
    md = [f"# SmolLM2-135M on this CPU (`bench/smollm2_speed.py`, preset `{args.preset}`)", "",
          f"Measured on {where}; batch {cfg.train.batch_size}, SST-2 prompts (median about 30 tokens)."
          + ("" if len(args.parts) == 3 else f" This run measured {', '.join(args.parts) or 'only the cell'}; the "
             "other sections are an earlier run's, each with its own CPU line."), ""]
    steps = [r for r in rows if r["what"] == "lora step"]
    if steps:
        md += ["## One LoRA training step (median of "
               f"{args.steps}, after a warm-up step; r {cfg.model.lora.r}, every linear layer of the adapted blocks)", "",
               f"Measured on {where}.", "",
               "| threads | autocast | adapted blocks | seconds / step | vs fp32, all blocks, same threads |",
               "|---:|---|---|---:|---:|"]
        for r in steps:
            base = next(b for b in steps if b["threads"] == r["threads"] and not b["bf16"] and b["lora_blocks"].startswith("all"))
            md.append(f"| {r['threads']} | {'bf16' if r['bf16'] else 'fp32'} | {r['lora_blocks']} | {r['seconds']:.2f} | "
                      f"{base['seconds'] / r['seconds']:.1f}x |")
        md.append("")
    else:
        md += previous.get("## One LoRA training step", [])
    evals = [r for r in rows if r["what"] == "eval row"]
    if evals:
        md += [f"## Scoring forward pass ({args.eval_rows} SST-2 test rows, batch {cfg.eval.batch_size}, "
               f"{cfg.train.threads} threads)", "", f"Measured on {where}.", "",
               "| autocast | unembedding | batches | blocks run | ms / row | vs fp32, answer position, sorted |",
               "|---|---|---|---|---:|---:|"]
        for r in evals:
            md.append(f"| {'bf16' if r['bf16'] else 'fp32'} | {r['unembed']} | {r['batches']} | {r['blocks run']} | "
                      f"{1000 * r['seconds']:.1f} | {evals[0]['seconds'] / r['seconds']:.1f}x |")
        md.append("")
    else:
        md += previous.get("## Scoring forward pass", [])
    if scores:
        md += [f"## What bf16 evaluation and reuse change ({scored}, the preset's whole "
               f"evaluation set: {len(prep.evalset.clean)} clean rows and their triggered copies)", "",
               f"Measured on {where}.", "",
               "| evaluation | seconds | CACC % | unknown ASR % | t1 ASR % | t2 ASR % |", "|---|---:|---:|---:|---:|---:|"]
        for name, (r, t) in scores.items():
            md.append(f"| {name} | {t:.0f} | {_pct(r['cacc'])} | {_pct(r['asr'].get('unknown'))} | "
                      f"{_pct(r['asr'].get('t1'))} | {_pct(r['asr'].get('t2'))} |")
        md.append("")
    else:
        md += previous.get("## What bf16 evaluation", [])
    if cell is None:
        md += previous.get("## One SST-2 cell", [])
    else:
        s = cell["summary"]
        md += ["## One SST-2 cell through the pipeline (`locphylax run sst2-smollm2 --set "
               "'defense.baselines=[clean_ft]' --no-analyze`)", "",
               f"Measured on {where}, {cfg.train.threads} threads, nothing else running.", "",
               f"Wall time {cell['total'] / 60:.1f} min: victim {cell['victim']:.0f} s, Stage 1 {cell['stage1']:.0f} s, "
               f"Stage 2 {cell['stage2']:.0f} s, clean fine-tuning {cell.get('clean_ft', 0):.0f} s (each with its "
               "evaluations and checkpoint), the rest preparation.", "",
               f"Victim CACC {_pct(s['stages']['victim']['cacc'])} / unknown ASR "
               f"{_pct(s['stages']['victim']['asr']['unknown'])}; Stage 2 {_pct(s['stages']['stage2']['cacc'])} / "
               f"{_pct(s['stages']['stage2']['asr']['unknown'])}; clean fine-tuning "
               f"{_pct(s['baselines']['clean_ft']['cacc'])} / {_pct(s['baselines']['clean_ft']['asr']['unknown'])} "
               "(seed 0, the preset's trigger: one cell, not a result)."]
    (args.out / "smollm2_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
