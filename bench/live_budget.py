"""Can the live demo train less? The live preset with smaller step budgets, batches or larger
learning rates, and what each does to the story (victim, Stage 1, Stage 2, clean fine-tuning).

Each variant is ``locphylax run live --no-analyze`` with the contrast baseline only and one
thread, so the numbers do not depend on how many cores are free; only CACC and ASR are compared
(a variant's seconds depend on the machine's load). Seed 0, trigger ``cf``.

    .venv/bin/python -m bench.live_budget            # runs every variant (about 5 minutes idle)
    .venv/bin/python -m bench.live_budget --from DIR # the table from run folders already in DIR

Writes bench/results/live_budget.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "live_budget.md"
COMMON = ["--set", "defense.baselines=[clean_ft]", "--set", "train.threads=1"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "base": ("the live preset: victim 60 steps, stages 40 + 40, batch 64", []),
    "a30": ("victim 30 steps at lr 0.005, stages 25 + 25",
            ["attack.steps=30", "attack.lr=0.005", "defense.stage1_steps=25", "defense.stage2_steps=25"]),
    "b32": ("batch 32 everywhere, same steps", ["train.batch_size=32", "defense.batch_size=32"]),
    "c32": ("batch 32, victim 40 steps, stages 30 + 30",
            ["train.batch_size=32", "defense.batch_size=32", "attack.steps=40", "defense.stage1_steps=30",
             "defense.stage2_steps=30"]),
    "d40": ("victim 40 steps, stages 25 + 25 at defense lr 0.003",
            ["attack.steps=40", "defense.stage1_steps=25", "defense.stage2_steps=25", "defense.lr=0.003"]),
    "e40": ("victim 40 steps, stages 30 + 20", ["attack.steps=40", "defense.stage1_steps=30", "defense.stage2_steps=20"]),
}
ROWS = (("victim", "stages", "victim"), ("Stage 1", "stages", "stage1"), ("Stage 2", "stages", "stage2"),
        ("clean FT", "baselines", "clean_ft"))


def run_variant(root: Path, name: str, sets: list[str]) -> None:
    args = [a for s in sets for a in ("--set", s)]
    subprocess.run([sys.executable, "-m", "locphylax_core.cli", "--runs", str(root / name), "run", "live",
                    "--no-analyze", *COMMON, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def summary(root: Path, name: str) -> dict | None:
    """The variant's summary, with its run's configuration under ``config``."""
    found = sorted((root / name).glob("*/summary.json"))
    if not found:
        return None
    return {**json.loads(found[-1].read_text()),
            "config": yaml.safe_load((found[-1].parent / "config.yaml").read_text())}


def pct(block: dict | None, key: str) -> str:
    if not block:
        return "–"
    v = block.get("cacc") if key == "cacc" else (block.get("asr") or {}).get(key)
    return "–" if v is None else f"{100 * v:.1f}"


def table(root: Path) -> str:
    head = ("| variant | what changes | " + " | ".join(f"{r} CACC / ASR" for r, _, _ in ROWS)
            + " | steps on the headline path |\n| --- | --- |" + " ---: |" * (len(ROWS) + 1) + "\n")
    lines = []
    for name, (what, _) in VARIANTS.items():
        s = summary(root, name)
        if s is None:
            continue
        cells = [f"{pct(s.get(part, {}).get(key), 'cacc')} / {pct(s.get(part, {}).get(key), 'unknown')}"
                 for _, part, key in ROWS]
        cfg = s.get("config") or {}
        steps = "–"
        if cfg:
            a, d = cfg["attack"]["steps"], cfg["defense"]["stage1_steps"] + cfg["defense"]["stage2_steps"]
            steps = str(a + 2 * d)
        lines.append(f"| `{name}` | {what} | " + " | ".join(cells) + f" | {steps} |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="source", default=None, help="a folder with one run store per variant")
    args = ap.parse_args()
    root = Path(args.source) if args.source else Path(tempfile.mkdtemp(prefix="live_budget_"))
    if not args.source:
        for name, (_, sets) in VARIANTS.items():
            run_variant(root, name, sets)
    OUT.write_text("# Smaller budgets for the live demo (bench/live_budget.py)\n\n"
                   "Seed 0, trigger `cf`, one thread; CACC / unknown-trigger ASR in %. The headline path is "
                   "victim + Stage 1 + Stage 2 + clean fine-tuning (Stage 1 + Stage 2 steps).\n\n"
                   + table(root), encoding="utf-8")
    print(OUT.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
