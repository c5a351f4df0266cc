"""What several benchmarks share: where results go, one mean ± sd, one CSV writer."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
RESULTS = ROOT / "bench" / "results"


def mean_sd(xs) -> tuple[float | None, float | None]:
    """Mean and sample sd of the values that are not None ((None, None) if none is; sd 0.0 for one)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` as a CSV (the columns of every row, in first-seen order), written atomically;
    nothing is written for no rows."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name("." + path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
