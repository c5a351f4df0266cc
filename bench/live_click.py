"""The Live demo's click, from the command line: what the app's waiting job process does before the
click (the run prepared up to plain clean fine-tuning, the backdoor planted or loaded from a
shipped victim, and the rows the defense will train on stored), then the click (the run resumed in
the same process, as the standby becomes the job), timed stage by stage. The baseline in the same
run is the tiny model's preset `live` on the same path.

    .venv/bin/python -m bench.live_click                           # live-smollm2 and live, trigger cf
    .venv/bin/python -m bench.live_click --presets live-smollm2 --set defense.stage1_steps=30

The browser path (`bench/app_live_demo.py`) adds the page and the analyses; this one isolates the
training and scoring the headline waits for. Writes bench/results/live_click.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS
from bench.shipped_victim import cpu_flags, cpu_name
from locphylax_core import load_config
from locphylax_core.pipeline import resume_run, start_run
from locphylax_core.registry import stage_key
from locphylax_core.runs import RunDir
from locphylax_core.trainer import Reporter

AHEAD = stage_key("clean_ft", "stage2")  # what the page's waiting process runs before the click


class StageClock(Reporter):
    """When each stage finished, in seconds from the clock's start."""

    def __init__(self):
        self.t0, self.done = time.perf_counter(), {}

    def stage_finished(self, key, result):
        self.done[key] = time.perf_counter() - self.t0


def click(preset: str, trigger: str, sets: list[str]) -> dict:
    cfg = load_config(preset, [*sets, f"attack.trigger={trigger}"])
    root = Path(tempfile.mkdtemp(prefix="live_click_"))
    t0 = time.perf_counter()
    run, _ = start_run(cfg, root, stop_after=AHEAD)
    prepared = time.perf_counter() - t0
    clock = StageClock()
    summary = resume_run(RunDir(run.path), reporter=clock)
    state = run.read_state()
    return {"preset": preset, "prepared_s": prepared, "headline_s": clock.done.get("stage2"),
            "stage1_s": clock.done.get("stage1"), "all_s": time.perf_counter() - clock.t0,
            "seconds": state["seconds"], "summary": summary,
            "shipped": state["results"]["victim"].get("shipped_victim"), "threads": torch.get_num_threads()}


def _pct(block, key="unknown"):
    v = (block or {}).get("asr", {}).get(key) if key else (block or {}).get("cacc")
    return "n/a" if v is None else f"{100 * v:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["live-smollm2", "live"])
    ap.add_argument("--trigger", default="cf")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every preset")
    ap.add_argument("--out", default="live_click.md", help="file name under bench/results")
    args = ap.parse_args(argv)
    rows = []
    for preset in args.presets:
        rows.append(click(preset, args.trigger, args.set))
        r = rows[-1]
        print(f"{preset}: prepared {r['prepared_s']:.1f} s; click -> Stage 1 {r['stage1_s']:.1f} s, "
              f"headline {r['headline_s']:.1f} s, every stage {r['all_s']:.1f} s", flush=True)
    lines = ["# The Live demo's click from the command line (bench/live_click.py)", "",
             f"Measured on {cpu_name()} ({cpu_flags()}), torch {torch.__version__}, {rows[0]['threads']} thread{'s' * (rows[0]['threads'] != 1)}; "
             f"trigger `{args.trigger}`, seed 0" + (f"; overrides {', '.join(args.set)}" if args.set else "") + ".",
             "The waiting process prepares the run (the victim, plain clean fine-tuning, the defense's rows stored); "
             "the click resumes it in the same process. Seconds of wall time.", "",
             "| preset | victim | prepared before the click | click → Stage 1 done | click → headline (Stage 2 done) | "
             "click → every stage | victim ASR (CACC) | Stage 1 | Stage 2 | clean fine-tuning |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        s = r["summary"]
        st, ft = s["stages"], s["baselines"].get("clean_ft")
        lines.append(f"| `{r['preset']}` | {'shipped `' + r['shipped'] + '`' if r['shipped'] else 'trained'} | "
                     f"{r['prepared_s']:.1f} | {r['stage1_s']:.1f} | {r['headline_s']:.1f} | {r['all_s']:.1f} | "
                     f"{_pct(st['victim'])} ({_pct(st['victim'], None)}) | {_pct(st['stage1'])} ({_pct(st['stage1'], None)}) | "
                     f"{_pct(st['stage2'])} ({_pct(st['stage2'], None)}) | {_pct(ft)} ({_pct(ft, None)}) |")
    lines += ["", "Per stage (seconds, training and scoring and saving):", ""]
    for r in rows:
        lines.append(f"- `{r['preset']}`: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()))
    (RESULTS / args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
