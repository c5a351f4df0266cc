"""What the Live demo can promise: its preset over several seeds and room-style triggers (a word, a
phrase, a symbol), each run exactly as the page starts it (its trigger and family, the contrast
baseline plain clean fine-tuning), so that the page can state the measured range in advance and
show where a run sits in it.

    .venv/bin/python -m bench.live_range                      # live: seeds 0-4 x cf, a phrase, a symbol
    .venv/bin/python -m bench.live_range --seeds 0 1 --jobs 2  # fewer, two at a time
    .venv/bin/python -m bench.live_range --preset demo --triggers cf --all-baselines  # the README's demo table

One thread per run (two runs at a time on 2 cores), so a run's numbers do not depend on the load;
finished runs are kept under bench/.cache/live_range/ and not run again. Writes
bench/results/live_range_<preset>.json (read by the app's Live demo page) and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import RESULTS, ROOT
from bench.shipped_victim import cpu_flags, cpu_name

CACHE = ROOT / "bench" / ".cache" / "live_range"
TRIGGERS = ["cf", "the popcorn was cold", "§"]  # the page's default word, a phrase, a symbol
PARTS = {"victim": ("stages", "victim"), "stage1": ("stages", "stage1"), "stage2": ("stages", "stage2"),
         "clean_ft": ("baselines", "clean_ft")}
LABELS = {"victim": "backdoored model", "stage1": "after Stage 1", "stage2": "after Stage 2",
          "clean_ft": "plain clean fine-tuning"}


def family(trigger: str) -> str:
    return "phrase" if " " in trigger else "word"  # as the page's live_config


def run_dir(preset: str, seed: int, trigger: str, all_baselines: bool = False) -> Path:
    return CACHE / preset / f"s{seed}-{trigger.encode().hex()}{'-all' * all_baselines}"


def finished(root: Path) -> bool:
    return any(json.loads(p.read_text()).get("status") == "done" for p in root.glob("*/summary.json"))


def run_one(preset: str, seed: int, trigger: str, all_baselines: bool = False) -> Path:
    root = run_dir(preset, seed, trigger, all_baselines)
    if not finished(root):
        sets = [f"seed={seed}", f"attack.trigger={trigger}", f"attack.family={family(trigger)}", "train.threads=1",
                *([] if all_baselines else ["defense.baselines=[clean_ft]"])]
        subprocess.run([sys.executable, "-m", "locphylax_core.cli", "--runs", str(root), "run", preset, "--no-analyze",
                        *[a for s in sets for a in ("--set", s)]], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return root


def scores(root: Path) -> dict:
    summary = json.loads(sorted(root.glob("*/summary.json"))[-1].read_text())
    out = {}
    parts = {**PARTS, **{b: ("baselines", b) for b in summary.get("baselines") or {}}}
    for part, (where, key) in parts.items():
        block = (summary.get(where) or {}).get(key) or {}
        out[part] = {"asr": (block.get("asr") or {}).get("unknown"), "cacc": block.get("cacc")}
    out["seconds"] = (summary.get("seconds") or {}).get("total")  # the run's wall time, one thread
    return out


def spread(values: list) -> dict:
    xs = [v for v in values if v is not None]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "mean": statistics.fmean(xs), "min": min(xs), "max": max(xs)}


def runs_described(runs: list[dict]) -> str:
    """"seeds 0, 1 × triggers `cf`, `§`" for a full cross, else the seeds of each trigger."""
    seeds = {t: [r["seed"] for r in runs if r["trigger"] == t] for t in dict.fromkeys(r["trigger"] for r in runs)}
    if len({tuple(v) for v in seeds.values()}) == 1:
        return (f"seeds {', '.join(map(str, next(iter(seeds.values()))))} × triggers "
                + ", ".join(f"`{t}`" for t in seeds))
    return "; ".join(f"`{t}`: seed{'s' * (len(v) > 1)} {', '.join(map(str, v))}" for t, v in seeds.items())


def seconds_said(runs: list[dict]) -> str:
    took = [r["seconds"] for r in runs if r.get("seconds") is not None]
    return f" A run took {min(took):.0f}–{max(took):.0f} s." if took else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="live")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--triggers", nargs="+", default=TRIGGERS)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--all-baselines", action="store_true",
                    help="keep the preset's own baselines (the page runs only plain clean fine-tuning) and report each")
    ap.add_argument("--measured-only", action="store_true",
                    help="run nothing: summarise the cells whose runs are finished (say which are left out)")
    args = ap.parse_args(argv)
    cells = [(s, t) for t in args.triggers for s in args.seeds]
    if args.measured_only:
        missing = [c for c in cells if not finished(run_dir(args.preset, *c, args.all_baselines))]
        cells = [c for c in cells if c not in missing]
        if missing:
            print("left out (not run yet): " + ", ".join(f"seed {s} `{t}`" for s, t in missing))
        if not cells:
            print("nothing is measured yet")
            return 1
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        roots = list(pool.map(lambda c: run_one(args.preset, *c, args.all_baselines), cells))
    runs = [{"seed": s, "trigger": t, **scores(r)} for (s, t), r in zip(cells, roots)]
    parts = {**LABELS, **{p: f"baseline: {p}" for r in runs for p, v in r.items() if p not in LABELS and isinstance(v, dict)}}
    result = {"preset": args.preset, "machine": f"{cpu_name()} ({cpu_flags()})",
              "seeds": sorted({s for s, _ in cells}), "triggers": list(dict.fromkeys(t for _, t in cells)), "runs": runs,
              "range": {part: {"asr": spread([r.get(part, {}).get("asr") for r in runs]),
                               "cacc": spread([r.get(part, {}).get("cacc") for r in runs])} for part in parts},
              "command": f"python -m bench.live_range --preset {args.preset} --seeds {' '.join(map(str, args.seeds))} "
                         f"--triggers {' '.join(repr(t) for t in args.triggers)}" + " --all-baselines" * args.all_baselines
                         + " --measured-only" * args.measured_only}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"live_range_{args.preset}{'_all' * args.all_baselines}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"
    lines = [f"# The Live demo over seeds and room-style triggers (bench/live_range.py, preset `{args.preset}`)", "",
             f"Measured on {result['machine']}, one thread per run; {runs_described(runs)} ({len(runs)} runs). "
             "Hidden trigger's ASR % (CACC %)." + seconds_said(runs), "",
             "| | " + " | ".join(parts.values()) + " |", "| --- |" + " ---: |" * len(parts)]
    for stat in ("mean", "min", "max"):
        lines.append(f"| {stat} | " + " | ".join(
            f"{pct(result['range'][p]['asr'].get(stat))} ({pct(result['range'][p]['cacc'].get(stat))})" for p in parts) + " |")
    lines += ["", "| trigger | seed | " + " | ".join(parts.values()) + " |", "| --- | ---: |" + " ---: |" * len(parts)]
    for r in runs:
        lines.append(f"| `{r['trigger']}` | {r['seed']} | " + " | ".join(
            f"{pct(r.get(p, {}).get('asr'))} ({pct(r.get(p, {}).get('cacc'))})" for p in parts) + " |")
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
