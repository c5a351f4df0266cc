"""What the Live demo can promise: its preset over several seeds and room-style triggers (a word, a
phrase, a symbol), each run exactly as the page starts it (its trigger and family, the contrast
baseline plain clean fine-tuning), so that the page can state the measured range in advance and
show where a run sits in it.

    .venv/bin/python -m bench.live_range                      # live: seeds 0-4 x cf, a phrase, a symbol
    .venv/bin/python -m bench.live_range --seeds 0 1 --jobs 2  # fewer, two at a time
    .venv/bin/python -m bench.live_range --preset demo --triggers cf --all-baselines  # the README's demo table

One thread per run (two runs at a time on 2 cores), so a run's numbers do not depend on the load;
finished runs are kept under bench/.cache/live_range/ and not run again. Writes
bench/results/live_range_<preset>.json (read by the app's Live demo page) and .md. The runs already
in that file for other cells are kept, each with the machine that measured it (a cell measured now
replaces its old row), so cells measured on different machines add up to one range that names them;
``--fresh`` starts the file anew.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import RESULTS, ROOT
from bench.shipped_victim import cpu_flags, cpu_name
from locphylax_core import ConfigError, load_config
from locphylax_core.config import load_run_config
from locphylax_core.runs import atomic_write_json, atomic_write_text, new_run_id, read_record
from locphylax_core.shipped_victims import victim_fingerprint

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


def cell_sets(seed: int, trigger: str, all_baselines: bool = False) -> list[str]:
    """The cell's overrides of the preset: as the page starts it (its trigger and family, the contrast
    baseline plain clean fine-tuning), one thread."""
    return [f"seed={seed}", f"attack.trigger={trigger}", f"attack.family={family(trigger)}", "train.threads=1",
            *([] if all_baselines else ["defense.baselines=[clean_ft]"])]


def finished_run(root: Path, cfg) -> Path | None:
    """The cell's finished run of exactly this configuration (a run under other settings, such as
    an earlier version of the preset, does not count)."""
    for run in sorted(root.glob("*/"), reverse=True):
        state = read_record(run / "state.json") or {}
        if state.get("status") == "done" and state.get("config_sha256") == cfg.sha256():
            return run
    return None


def reuse_victim(root: Path, cfg) -> str | None:
    """A new run of ``cfg`` that starts from the clean model and victim of an earlier run of the cell
    whose victim is this very one (same seed, model, task, attack and train settings:
    ``victim_fingerprint``), as a run resumed after its victim: only the defense and the baselines
    run, with what a run from the start would give (each stage has its own seed and starts from its
    parent's saved weights). Its id, or None."""
    for run in sorted(root.glob("*/"), reverse=True):
        state = read_record(run / "state.json") or {}
        if not {"clean", "victim"} <= set(state.get("finished", [])):
            continue
        try:
            old = load_run_config(run / "config.yaml")
        except ConfigError:
            continue
        if victim_fingerprint(old) != victim_fingerprint(cfg):
            continue
        run_id = new_run_id(cfg.name)
        shutil.copytree(run, root / run_id, ignore=shutil.ignore_patterns("analysis.json", "*.lock", "CANCEL"))
        keep = ("clean", "victim")
        atomic_write_text(root / run_id / "config.yaml", cfg.to_yaml())
        atomic_write_json(root / run_id / "state.json", {
            **state, "status": "cancelled", "config_sha256": cfg.sha256(), "finished": list(keep),
            "results": {k: v for k, v in state["results"].items() if k in keep},
            "seconds": {k: v for k, v in state.get("seconds", {}).items() if k in keep}})
        return run_id
    return None


def run_one(preset: str, seed: int, trigger: str, all_baselines: bool = False, reuse: bool = False) -> Path:
    root = run_dir(preset, seed, trigger, all_baselines)
    sets = cell_sets(seed, trigger, all_baselines)
    cfg = load_config(preset, sets)
    run = finished_run(root, cfg)
    if run is None:
        reused = reuse_victim(root, cfg) if reuse else None
        args = ["resume", reused] if reused else ["run", preset, "--no-analyze", *[a for s in sets for a in ("--set", s)]]
        subprocess.run([sys.executable, "-m", "locphylax_core.cli", "--runs", str(root), *args], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = finished_run(root, cfg)
    return run


def scores(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
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


def kept_runs(path: Path, preset: str, measured_now: set) -> list[dict]:
    """The runs of other cells in an earlier results file of ``preset``, each naming its machine."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict) or old.get("preset") != preset:
        return []
    return [{**r, "machine": r.get("machine") or old.get("machine", "machine not recorded"),
             "command": r.get("command") or old.get("command", "not recorded")}
            for r in old.get("runs", []) if (r.get("seed"), r.get("trigger")) not in measured_now]


def trigger_rank(trigger: str) -> int:
    return TRIGGERS.index(trigger) if trigger in TRIGGERS else len(TRIGGERS)


def machines_said(runs: list[dict]) -> str:
    """The machine of every run: one name, or each with its number of runs."""
    counts = {m: sum(r["machine"] == m for r in runs) for m in dict.fromkeys(r["machine"] for r in runs)}
    if len(counts) == 1:
        return next(iter(counts))
    return "; ".join(f"{n} run{'s' * (n != 1)} on {m}" for m, n in counts.items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="live")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--triggers", nargs="+", default=TRIGGERS)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--all-baselines", action="store_true",
                    help="keep the preset's own baselines (the page runs only plain clean fine-tuning) and report each")
    ap.add_argument("--reuse-victims", action="store_true",
                    help="start a cell from the victim of an earlier run of it with the same victim settings (a "
                         "changed defense: only the defense and baselines run again)")
    ap.add_argument("--fresh", action="store_true",
                    help="do not keep the runs of other cells already in the results file")
    ap.add_argument("--measured-only", action="store_true",
                    help="run nothing: summarise the cells whose runs are finished (say which are left out)")
    args = ap.parse_args(argv)
    cells = [(s, t) for t in args.triggers for s in args.seeds]
    if args.measured_only:
        missing = [c for c in cells if finished_run(run_dir(args.preset, *c, args.all_baselines),
                                                     load_config(args.preset, cell_sets(*c, args.all_baselines))) is None]
        cells = [c for c in cells if c not in missing]
        if missing:
            print("left out (not run yet): " + ", ".join(f"seed {s} `{t}`" for s, t in missing))
        if not cells:
            print("nothing is measured yet")
            return 1
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        roots = list(pool.map(lambda c: run_one(args.preset, *c, args.all_baselines, args.reuse_victims), cells))
    here = f"{cpu_name()} ({cpu_flags()})"
    command = (f"python -m bench.live_range --preset {args.preset} --seeds {' '.join(map(str, args.seeds))} "
               f"--triggers {' '.join(repr(t) for t in args.triggers)}" + " --all-baselines" * args.all_baselines
               + " --measured-only" * args.measured_only)
    name = f"live_range_{args.preset}{'_all' * args.all_baselines}"
    runs = [{"seed": s, "trigger": t, "machine": here, "command": command, **scores(r)} for (s, t), r in zip(cells, roots)]
    if not args.fresh:
        runs = kept_runs(args.out / f"{name}.json", args.preset, set(cells)) + runs
    runs.sort(key=lambda r: (trigger_rank(r["trigger"]), r["seed"]))
    parts = {**LABELS, **{p: f"baseline: {p}" for r in runs for p, v in r.items() if p not in LABELS and isinstance(v, dict)}}
    result = {"preset": args.preset, "machine": machines_said(runs),
              "seeds": sorted({r["seed"] for r in runs}), "triggers": list(dict.fromkeys(r["trigger"] for r in runs)),
              "runs": runs,
              "range": {part: {"asr": spread([r.get(part, {}).get("asr") for r in runs]),
                               "cacc": spread([r.get(part, {}).get("cacc") for r in runs])} for part in parts},
              "commands": list(dict.fromkeys(r["command"] for r in runs))}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"
    several = len({r["machine"] for r in runs}) > 1
    lines = [f"# The Live demo over seeds and room-style triggers (bench/live_range.py, preset `{args.preset}`)", "",
             f"Measured {'' if several else 'on '}{result['machine']}, one thread per run; {runs_described(runs)} ({len(runs)} runs). "
             "Hidden trigger's ASR % (CACC %)." + seconds_said(runs), "",
             "| | " + " | ".join(parts.values()) + " |", "| --- |" + " ---: |" * len(parts)]
    for stat in ("mean", "min", "max"):
        lines.append(f"| {stat} | " + " | ".join(
            f"{pct(result['range'][p]['asr'].get(stat))} ({pct(result['range'][p]['cacc'].get(stat))})" for p in parts) + " |")
    lines += ["", "| trigger | seed | " + " | ".join(parts.values()) + " |" + " machine |" * several,
              "| --- | ---: |" + " ---: |" * len(parts) + " --- |" * several]
    for r in runs:
        lines.append(f"| `{r['trigger']}` | {r['seed']} | " + " | ".join(
            f"{pct(r.get(p, {}).get('asr'))} ({pct(r.get(p, {}).get('cacc'))})" for p in parts) + " |"
            + f" {r['machine']} |" * several)
    lines += ["", "Reproduce: " + "; ".join(f"`{c}`" for c in result["commands"])]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
