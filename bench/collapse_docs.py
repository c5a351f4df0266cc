"""Writes the measured tables and figures of the collapse benchmark into docs/results.md.

The document's prose is written by hand; the generated parts sit between
``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers and are replaced on every run, so the
numbers in the document are always the ones in ``bench/results/collapse_*.csv``.
Figures are standalone plotly HTML files under ``docs/figures/``.
"""

from __future__ import annotations

import csv
import re
import statistics
from collections import defaultdict
from pathlib import Path

from bench.common import RESULTS, ROOT

RES = RESULTS
DOC = ROOT / "docs" / "results.md"
FIG = ROOT / "docs" / "figures"

ROW_ORDER = [("victim", "victim", "victim"), ("default", "locphylax", "stage1"), ("default", "locphylax", "stage2"),
             ("ref", "locphylax", "stage2"), ("default", "no_cluster", "stage2"), ("default", "unlearn_single", "stage2"),
             ("default", "clean_ft", "stage2")]


METRICS = ["cacc", "asr_unknown", "asr_known", "asr_raw_unknown"]  # the scored columns of a runs CSV


def read_runs_csv(path: Path) -> list[dict]:
    """The rows of a runs CSV (collapse.py's per-stage rows) typed back as ``run_cell`` made them:
    ints, floats, None for n/a."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["seed"] = int(r["seed"])
        for k in ("seconds", *METRICS):
            r[k] = float(r[k]) if r[k] != "" else None
    return rows


def _read(name: str) -> list[dict]:
    """The rows of a summary CSV, its ``*_mean``, ``*_sd`` and ``n`` columns as floats; [] when absent."""
    path = RES / name
    if not path.is_file():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            if k.endswith(("_mean", "_sd")) or k in ("n",):
                r[k] = float(v) if v not in ("", None) else None
    return rows


def _latest(pattern: str, key: tuple[str, ...]) -> list[dict]:
    """Rows of every CSV matching ``pattern``; where two files hold the same key, the newer wins
    (the benchmark can be run per preset, in separate processes)."""
    rows: dict[tuple, dict] = {}
    for path in sorted(RES.glob(pattern), key=lambda p: (p.stat().st_mtime, p.name)):
        for r in _read(path.name):
            rows[tuple(r[k] for k in key)] = r
    # tables list presets in one fixed order, whatever order the files were written in
    order = {p: i for i, p in enumerate(("demo", "sst2", "agnews"))}
    return sorted(rows.values(), key=lambda r: order.get(r.get("preset"), len(order)))


def pct(mean, sd=None, signed=False) -> str:
    if mean is None:
        return "–"
    s = f"{100 * mean:+.1f}" if signed else f"{100 * mean:.1f}"
    return s if sd is None else f"{s} ± {100 * sd:.1f}"


def pct_of(r: dict, metric: str, sd: bool = True, signed: bool = False) -> str:
    """``metric`` of a summary row as a percentage, with its sd where the row pools more than one
    measurement (a single one has no spread to show, not a spread of 0)."""
    return pct(r[f"{metric}_mean"], r[f"{metric}_sd"] if sd and int(r["n"]) > 1 else None, signed)


def _label(variant: str, method: str, stage: str, default_name: str) -> str:
    if method == "victim":
        return "victim (before any defense)"
    if method == "locphylax":
        name = default_name if variant.startswith("default") else "locphylax (paper reference)"
        return f"{name}, {'Stage 1' if stage == 'stage1' else 'Stage 2'}"
    return {"no_cluster": "without clustering", "unlearn_single": "single-trigger unlearning",
            "clean_ft": "clean fine-tuning"}[method] + " (Stage 2 budget)"


def _pick(rows, preset, variant_prefix, method, stage, **extra):
    for r in rows:
        if (r["preset"] == preset and r["method"] == method and r["stage"] == stage
                and (method == "victim" or r["variant"].startswith(variant_prefix))
                and all(r.get(k) == v for k, v in extra.items())):
            return r
    return None


def headline_table(rows: list[dict], default_name: str) -> str:
    out = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        n = int(_pick(rows, preset, "", "victim", "victim")["n"])
        out.append(f"\n**{preset}** ({n} victims: report triggers × seeds; mean ± sd over all of them)\n")
        out.append("| row | CACC % | ΔCACC vs victim (points) | unknown ASR % | known ASR % | raw unknown ASR % |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for variant, method, stage in ROW_ORDER:
            r = _pick(rows, preset, variant, method, stage)
            if r is None:
                continue
            out.append(f"| {_label(r['variant'], method, stage, default_name)} | {pct_of(r, 'cacc')} | "
                       f"{pct_of(r, 'dcacc', signed=True)} | **{pct_of(r, 'asr_unknown')}** | "
                       f"{pct(r['asr_known_mean'])} | {pct(r['asr_raw_unknown_mean'])} |")
    return "\n".join(out)


def targets_table(rows: list[dict]) -> str:
    out = ["| preset | default Stage 2 unknown ASR % (target ≤ 5) | ΔCACC points (target ≥ −1) | "
           "margin vs clean FT (target ≥ 20) | margin vs single-trigger unlearning (target ≥ 20) |",
           "| --- | ---: | ---: | ---: | ---: |"]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        d = _pick(rows, preset, "default", "locphylax", "stage2")
        c = _pick(rows, preset, "default", "clean_ft", "stage2")
        u = _pick(rows, preset, "default", "unlearn_single", "stage2")
        if d is None:
            continue

        def mark(ok):
            return "met" if ok else "**missed**"
        a, dc = d["asr_unknown_mean"], d["dcacc_mean"]
        mc = (c["asr_unknown_mean"] - a) if c else None
        mu = (u["asr_unknown_mean"] - a) if u else None
        out.append(f"| {preset} | {pct(a)} ({mark(a <= 0.05)}) | {pct(dc, signed=True)} ({mark(dc >= -0.01)}) | "
                   f"{pct(mc, signed=True)} ({mark(mc is not None and mc >= 0.20)}) | "
                   f"{pct(mu, signed=True)} ({mark(mu is not None and mu >= 0.20)}) |")
    return "\n".join(out)


def family_table(rows: list[dict], default_name: str) -> str:
    methods = [("default", "locphylax", default_name), ("ref", "locphylax", "reference"),
               ("default", "no_cluster", "no clustering"), ("default", "unlearn_single", "unlearn single"),
               ("default", "clean_ft", "clean FT")]
    # the issue-6 baselines, where they were measured
    methods += [("default", m, name) for m, name in (("p2p", "P2P"), ("fine_pruning", "fine-pruning"),
                                                      ("crow", "CROW"), ("onion", "ONION"))
                if any(r["method"] == m for r in rows)]
    out = ["| preset | family | n | victim ASR | " + " | ".join(m[2] for m in methods) + " |",
           "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in methods) + " |"]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for fam in dict.fromkeys(r["family"] for r in rows if r["preset"] == preset):
            v = _pick(rows, preset, "", "victim", "victim", family=fam)
            cells = []
            for variant, method, _ in methods:
                r = _pick(rows, preset, variant, method, "stage2", family=fam)
                cells.append(pct_of(r, "asr_unknown") if r else "–")
            out.append(f"| {preset} | {fam} | {int(v['n'])} | {pct(v['asr_unknown_mean'])} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def baselines6_table(rows: list[dict], default_name: str) -> str:
    """The issue-6 baselines against the default, every column from the same victims (variants
    default+new and default+onion were computed together, apart from the report's own cells)."""
    methods = [("default+new", "locphylax", default_name), ("default+new", "p2p", "P2P"),
               ("default+new", "fine_pruning", "fine-pruning"), ("default+new", "crow", "CROW"),
               ("default+onion", "onion", "ONION")]
    out = ["| preset | family | n | victim ASR | " + " | ".join(m[2] for m in methods) + " | CACC: victim → "
           + " / ".join(m[2] for m in methods) + " |",
           "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in methods) + " | --- |"]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for fam in dict.fromkeys(r["family"] for r in rows if r["preset"] == preset):
            v = next((r for r in rows if r["preset"] == preset and r["family"] == fam and r["method"] == "victim"
                      and r["variant"] == "default+new"), None)
            if v is None:
                continue
            cells, caccs = [], []
            for variant, method, _ in methods:
                r = next((x for x in rows if x["preset"] == preset and x["family"] == fam and x["variant"] == variant
                          and x["method"] == method and x["stage"] == "stage2"), None)
                cells.append(pct_of(r, "asr_unknown") if r else "–")
                caccs.append(pct(r["cacc_mean"]) if r else "–")
            out.append(f"| {preset} | {fam} | {int(v['n'])} | {pct(v['asr_unknown_mean'])} | " + " | ".join(cells)
                       + f" | {pct(v['cacc_mean'])} → " + " / ".join(caccs) + " |")
    return "\n".join(out)


def faithful_table(old_runs: list[dict], new_runs: list[dict]) -> str:
    """Issue 17: each baseline with its earlier rules (variant ``earlier``) and made faithful to its
    peer's code (variant ``faithful``), plus the vaccination peer bdvax, on the same victims:
    unknown-trigger ASR after Stage 2 (CACC), in %, one row per victim of the faithful runs (the
    earlier value where that victim was run under the earlier rules too), then per family the mean
    over the victims run under both."""
    cells = {(r["preset"], r["trigger"], r["seed"]) for r in new_runs}
    old_variant = {"fine_pruning": "earlier", "crow": "earlier", "onion": "earlier"}
    # variants whose name does not start with "default" run the paper's method (collapse.run_config),
    # so their "locphylax" rows are the reference, not the shipped locphylax+
    cols = [("locphylax", "reference (paper)"), ("fine_pruning", "fine-pruning"), ("crow", "CROW"),
            ("onion", "ONION"), ("bdvax", "bdvax")]

    def pick(runs, cell, method, variant=None):
        r = next((x for x in runs if (x["preset"], x["trigger"], x["seed"]) == cell and x["method"] == method
                  and x["stage"] == ("victim" if method == "victim" else "stage2")
                  and (variant is None or x["variant"] == variant)), None)
        return r

    def show(r):
        return "–" if r is None else f"{100 * float(r['asr_unknown']):.1f} ({100 * float(r['cacc']):.1f})"

    def cell_text(old, new):
        return show(new) if old is None else f"{show(old)} → {show(new)}"

    def mean(rows):
        rows = [r for r in rows if r is not None]
        return None if not rows else {k: sum(float(r[k]) for r in rows) / len(rows) for k in ("asr_unknown", "cacc")}

    out = ["| family | seed | trigger | victim ASR (CACC) | " + " | ".join(n for _, n in cols) + " |",
           "| --- | ---: | --- | ---: | " + " | ".join("---:" for _ in cols) + " |"]
    by_family: dict[str, list[tuple]] = {}
    for cell in sorted(cells, key=lambda c: (c[0], c[2], c[1])):
        v = pick(new_runs, cell, "victim")
        fam = v["family"] if v else "?"
        by_family.setdefault(fam, []).append(cell)
        texts = []
        for method, _ in cols:
            new = pick(new_runs, cell, method)
            old = pick(old_runs, cell, method, old_variant[method]) if method in old_variant else None
            texts.append(cell_text(old, new))
        out.append(f"| {fam} | {int(float(cell[2]))} | `{cell[1][:24]}` | "
                   f"{cell_text(None, v)} | " + " | ".join(texts) + " |")
    for fam, fam_cells in by_family.items():
        both = [c for c in fam_cells if pick(old_runs, c, "onion", "earlier") is not None]
        if len(both) < 2:
            continue
        texts = []
        for method, _ in cols:
            new = mean([pick(new_runs, c, method) for c in both])
            old = (mean([pick(old_runs, c, method, old_variant[method]) for c in both]) if method in old_variant
                   else None)
            texts.append(cell_text(old, new))
        out.append(f"| **{fam}, mean** | {len(both)} seeds | | {show(mean([pick(new_runs, c, 'victim') for c in both]))}"
                   f" | " + " | ".join(texts) + " |")
    return "\n".join(out)


DEFENSES = [("locphylax", None), ("reference", "reference (paper)"), ("no_cluster", "no clustering"),
            ("unlearn_single", "unlearn single"), ("clean_ft", "clean FT"), ("p2p", "P2P"),
            ("fine_pruning", "fine-pruning"), ("crow", "CROW"), ("onion", "ONION"), ("bdvax", "bdvax")]


def defenses_table(by_family: list[dict], overall: list[dict], default_name: str) -> str:
    """Families x defenses: unknown-trigger ASR after Stage 2 (mean ± sd over seeds) of every
    defense, all on the same victims (variant default+all), one table per preset, with the mean
    over every family and the clean accuracy after each defense."""
    # a table measured before a defense existed shows no column for it
    names = [(m, name or default_name) for m, name in DEFENSES if any(r["method"] == m for r in by_family)]
    head = ("| family | n | victim | " + " | ".join(n for _, n in names) + " |\n"
            "| --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " |")
    out = []
    for preset in dict.fromkeys(r["preset"] for r in by_family):
        # the caption says so when no family has a spread (pct_of then shows each value alone)
        fams = [r for r in by_family if r["preset"] == preset]
        one_seed = all(int(r["n"]) == 1 for r in fams)
        spread = "one seed, so no spread" if one_seed else "mean ± sd over seeds"
        out += [f"\n**{preset}**: unknown-trigger ASR % after Stage 2 ({spread}; lower is better)\n", head]

        def line(label, rows, metric="asr_unknown", sd=True):
            def cell(method):
                r = next((x for x in rows if x["method"] == method
                          and x["stage"] == ("victim" if method == "victim" else "stage2")), None)
                if r is None:
                    return "–"
                return pct_of(r, metric, sd)
            n = next((int(x["n"]) for x in rows if x["method"] == "victim"), 0)
            return f"| {label} | {n} | {cell('victim')} | " + " | ".join(cell(m) for m, _ in names) + " |"

        for fam in dict.fromkeys(r["family"] for r in fams):
            out.append(line(fam, [r for r in fams if r["family"] == fam]))
        rest = [r for r in overall if r["preset"] == preset]
        if rest:
            out.append(line("**all families**", rest))
            out.append(line("CACC % (all families)", rest, "cacc", sd=False))
    return "\n".join(out)


BASE_ROWS = [("victim", "victim", "victim (before any defense)"), ("locphylax", "stage1", None),
             ("locphylax", "stage2", None),
             # the best lever of the tune split on the base (collapse_base-levers), run on the report
             # triggers as a candidate; not shipped (docs/pretraining.md)
             ("locphylax", "stage2", "candidate: canary + generated triggers in Stage 2", "canary+generated=1"),
             ("reference", "stage2", "locphylax (paper reference)"),
             ("no_cluster", "stage2", "without clustering"), ("unlearn_single", "stage2", "single-trigger unlearning"),
             ("clean_ft", "stage2", "clean fine-tuning"), ("p2p", "stage2", "P2P"),
             ("fine_pruning", "stage2", "fine-pruning"), ("crow", "stage2", "CROW"), ("onion", "stage2", "ONION")]
SCRATCH_EQUIV = {"reference": ("ref", "locphylax")}  # the from-scratch report ran the reference as its own variant


def paired_table(runs: list[dict], default_name: str) -> str:
    """Per preset, each defense against the shipped default on the same victims: the mean of
    (other - default) unknown-trigger ASR after Stage 2 ± its standard error over the cells, and on
    how many cells the default leaves less. A victim is its (preset, model, seed, trigger,
    position): rows of different models never pair."""
    after: dict[str, dict[tuple, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))  # preset, victim, method
    for r in runs:
        if r["stage"] == "stage2" and r["asr_unknown"] not in ("", None):
            victim = (r["model"], r["seed"], r["trigger"], r["position"])
            after[r["preset"]][victim][r["method"]] = float(r["asr_unknown"])
    out = [f"| preset | defense | {default_name} leaves less by (points, mean ± s.e.) | cells where it leaves less |",
           "| --- | --- | ---: | ---: |"]
    for preset, victims in after.items():
        for method, name in DEFENSES[1:]:
            d = [asr[method] - asr["locphylax"] for asr in victims.values() if method in asr and "locphylax" in asr]
            if len(d) < 2:
                continue
            se = statistics.stdev(d) / len(d) ** 0.5
            out.append(f"| {preset} | {name} | {100 * statistics.fmean(d):+.1f} ± {100 * se:.1f} | "
                       f"{sum(x > 0 for x in d)} of {len(d)} |")
    return "\n".join(out)


def real_lm_table(runs: list[dict], default_name: str) -> str:
    """Every cell of the real-LM report, one line per victim (no mean hides a cell): the victim's
    CACC and unknown-trigger ASR, then each defense's unknown ASR after Stage 2 with its CACC,
    and a last line of means over the victims that every column has."""
    # a cell whose variant is not a `default...` one has the paper's method as its main method
    # (collapse.run_config): that is the reference
    runs = [{**r, "method": "reference"} if not r["variant"].startswith("default") and r["method"] == "locphylax"
            else r for r in runs]
    names = [(m, name or default_name) for m, name in DEFENSES if any(r["method"] == m for r in runs)]
    out = ["| preset | seed | family | trigger | victim CACC / ASR | "
           f"{default_name} after Stage 1 | " + " | ".join(f"{n} ASR (CACC)" for _, n in names) + " |",
           "| --- | ---: | --- | --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in runs:
        key = (r["preset"], int(r["seed"]), r["family"], r["trigger"], r["position"])
        if r["stage"] in ("victim", "stage2"):
            cells[key][r["method"]] = r
        elif r["stage"] == "stage1" and r["method"] == "locphylax":
            cells[key]["stage1"] = r

    def f(x) -> str:
        return "–" if x in ("", None) else f"{100 * float(x):.1f}"

    # means per seed: the seeds may have run on different CPUs (and precisions), so none is pooled
    sums: dict[int, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    order = ["word", "phrase", "long", "char"]  # the report's family order, then any other family
    seeds = sorted({k[1] for k in cells})

    def mean_line(seed: int) -> None:
        by_method = sums[seed]
        n = len(by_method["victim"])
        if n < 2:
            return

        def mean(m, i):
            xs = [x[i] for x in by_method[m]]
            return f"{100 * statistics.fmean(xs):.1f}" if len(xs) == n else "–"
        label = f"**mean of {n}**" + (f" (seed {seed})" if len(seeds) > 1 else "")
        out.append(f"| {label} | | | | {mean('victim', 0)} / {mean('victim', 1)} | "
                   f"{mean('stage1', 1)} ({mean('stage1', 0)}) | "
                   + " | ".join(f"{mean(m, 1)} ({mean(m, 0)})" for m, _ in names) + " |")

    previous = None
    for (preset, seed, family, trigger, position), by in sorted(
            cells.items(), key=lambda kv: (kv[0][0], kv[0][1], order.index(kv[0][2]) if kv[0][2] in order else 9)):
        v = by.get("victim")
        if v is None:
            continue
        if previous is not None and seed != previous:
            mean_line(previous)
        previous = seed
        shown = trigger if len(trigger) <= 24 else trigger[:22] + "…"
        s1 = by.get("stage1")
        line = (f"| {preset} | {seed} | {family} | `{shown}` @{position} | {f(v['cacc'])} / {f(v['asr_unknown'])} | "
                + ("– |" if s1 is None else f"{f(s1['asr_unknown'])} ({f(s1['cacc'])}) |"))
        sums[seed]["victim"].append((float(v["cacc"]), float(v["asr_unknown"] or 0)))
        if s1 is not None:
            sums[seed]["stage1"].append((float(s1["cacc"]), float(s1["asr_unknown"] or 0)))
        for m, _ in names:
            r = by.get(m)
            line += " – |" if r is None else f" {f(r['asr_unknown'])} ({f(r['cacc'])}) |"
            if r is not None:
                sums[seed][m].append((float(r["cacc"]), float(r["asr_unknown"] or 0)))
        out.append(line)
    if previous is not None:
        mean_line(previous)
    return "\n".join(out)


# the known-trigger sets of the study (collapse.VARIANTS), as the table names them
KNOWN_SETS = {"triggers=1": "1 word: `vx`", "triggers=1phrase": "1 phrase: `as seen on channel four`",
              "ref": "2, a word and a phrase: `vx`, `as seen on channel four` (the default)",
              "triggers=2words": "2 words: `vx`, `qz`",
              "triggers=2phrases": "2 phrases: `as seen on channel four`, `the weather was mild all week long`",
              "triggers=4": "4: the two words and the two phrases", "triggers=8": "8: four words and four phrases"}


def known_trigger_table(runs: list[dict]) -> str:
    """The known-trigger study: the paper's method with each set of known triggers on the same
    victims, one line per set (means over the victims, each victim's value listed), with the
    known triggers' ASR after Stage 1 (did the injection take?) and the change from the default set."""
    by: dict[str, dict[tuple, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
    victims = set()
    for r in runs:
        if r["variant"] not in KNOWN_SETS:
            continue
        key = (r["preset"], int(r["seed"]), r["trigger"])
        victims.add(key)
        by[r["variant"]][key]["victim" if r["method"] == "victim" else r["stage"]] = r

    def values(variant, stage, metric):
        return [float(c[stage][metric]) for c in by[variant].values() if stage in c and c[stage][metric] != ""]

    def show(xs):
        if not xs:
            return "–"
        m = f"{100 * statistics.fmean(xs):.1f}"
        return m if len(xs) == 1 else f"{m} ({', '.join(f'{100 * x:.1f}' for x in xs)})"
    ref = values("ref", "stage2", "asr_unknown")
    out = ["| known triggers | victims | unknown ASR % after Stage 1 | known ASR % after Stage 1 | "
           "unknown ASR % after Stage 2 | Δ vs the default set (points) | CACC % after Stage 2 |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for variant in sorted(by, key=list(KNOWN_SETS).index):
        s2 = values(variant, "stage2", "asr_unknown")
        delta = (f"{100 * (statistics.fmean(s2) - statistics.fmean(ref)):+.1f}"
                 if s2 and ref and variant != "ref" else "")
        out.append(f"| {KNOWN_SETS[variant]} | {len(by[variant])} | {show(values(variant, 'stage1', 'asr_unknown'))} | "
                   f"{show(values(variant, 'stage1', 'asr_known'))} | {show(s2)} | {delta} | "
                   f"{show(values(variant, 'stage2', 'cacc'))} |")
    return "\n".join(out)


def learning_rate_table(runs: list[dict]) -> str:
    """The defense learning rate on the real LM, chosen on the tune trigger: each method at each
    rate on the same victim, with its known triggers' ASR after Stage 1 (did the injection take?)."""
    lrs = {"ref": 5e-4, "default": 5e-4, "default+clean_ft": 5e-4}
    names = {"locphylax": "reference (paper)", "clean_ft": "clean fine-tuning (its first 100 steps as Stage 1)"}
    cells: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in runs:
        variant = r["variant"]
        lr = lrs.get(variant) or next((float(p[3:]) for p in re.split(r"[+:]", variant) if p.startswith("lr=")), None)
        if lr is None or r["method"] == "victim":
            continue
        method = names.get(r["method"], r["method"]) if not variant.startswith("default") or r["method"] != "locphylax" \
            else "locphylax+"
        cells[(method, lr, r["trigger"], int(r["seed"]))][r["stage"]] = r
    out = ["| method | learning rate | trigger (seed) | unknown ASR % after Stage 1 | known ASR % after Stage 1 | "
           "unknown ASR % after Stage 2 | CACC % after Stage 2 |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]

    def p(r, k):
        return "–" if r is None or r.get(k, "") in ("", None) else f"{100 * float(r[k]):.1f}"
    for (method, lr, trigger, seed), st in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        s1, s2 = st.get("stage1"), st.get("stage2")
        out.append(f"| {method} | {lr:g} | `{trigger}` ({seed}) | {p(s1, 'asr_unknown')} | {p(s1, 'asr_known')} | "
                   f"{p(s2, 'asr_unknown')} | {p(s2, 'cacc')} |")
    return "\n".join(out)


def _row(rows, method, stage, variant_prefix="default"):
    return next((r for r in rows if r["method"] == method and r["stage"] == stage
                 and (method == "victim" or r["variant"].startswith(variant_prefix))), None)


def _read_runs(pattern: str) -> list[dict]:
    return [r for path in sorted(RES.glob(pattern)) for r in read_runs_csv(path)]


def cell_summary(runs: list[dict], cells: set[tuple]) -> list[dict]:
    """Summary rows (the ``*_mean``, ``*_sd``, ``n`` of collapse.py's summary CSVs) of the run rows
    whose (preset, trigger, seed) is in ``cells``: a comparison over the same victims only.
    ΔCACC is paired: each row's CACC minus its own victim's."""
    sel = [r for r in runs if (r["preset"], r["trigger"], r["seed"]) in cells]
    victim = {(r["preset"], r["trigger"], r["seed"], r["variant"]): float(r["cacc"])
              for r in sel if r["method"] == "victim"}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in sel:
        groups[(r["preset"], r["model"], r["variant"], r["method"], r["stage"])].append(r)
    out = []
    for (preset, model, variant, method, stage), rs in groups.items():
        row = {"preset": preset, "model": model, "variant": variant, "method": method, "stage": stage,
               "n": float(len(rs)), "failed_cells": 0}
        values = {"cacc": [float(r["cacc"]) for r in rs], "asr_unknown": [float(r["asr_unknown"]) for r in rs],
                  "dcacc": [float(r["cacc"]) - victim[(r["preset"], r["trigger"], r["seed"], r["variant"])]
                            for r in rs]}
        for k, v in values.items():
            row[f"{k}_mean"] = statistics.fmean(v)
            row[f"{k}_sd"] = statistics.stdev(v) if len(v) > 1 else 0.0
        out.append(row)
    return out


def base_vs_scratch_table(base: list[dict], scratch: list[dict], default_name: str) -> str:
    """Per preset and defense: unknown-trigger ASR and the paired CACC change on the pretrained
    base (every defense on the same victims) beside the same report triggers and seeds from
    scratch (``scratch`` restricted to those cells by :func:`cell_summary`; '–' where a defense
    was not run there)."""
    out = []
    for preset in dict.fromkeys(r["preset"] for r in base):
        b = [r for r in base if r["preset"] == preset]
        sc = [r for r in scratch if r["preset"] == preset]
        victim = max((r for r in b if r["method"] == "victim"), key=lambda r: r["n"])  # the variant with most cells
        nb = int(victim["n"])
        ns = _row(sc, "victim", "victim")
        out += [f"\n**{preset}**: {nb} victims on the pretrained base, {int(ns['n']) if ns else 0} from scratch "
                "(the same report triggers and seeds; mean ± sd)\n",
                "| row | base: unknown ASR % | base: CACC % | base: ΔCACC | scratch: unknown ASR % | scratch: ΔCACC |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for method, stage, label, *variant_of_base in BASE_ROWS:
            rb = victim if method == "victim" else _row(b, method, stage, *variant_of_base)
            variant, m = SCRATCH_EQUIV.get(method, ("default", method))
            rs = None if variant_of_base else _row(sc, m, stage, variant)
            if rb is None and rs is None:
                continue
            label = label or f"{default_name}, {'Stage 1' if stage == 'stage1' else 'Stage 2'}"
            if rb is not None and int(rb["n"]) != nb:
                label += f" ({int(rb['n'])} of the victims)"
            cell = lambda r, k, sd=True, signed=False: "–" if r is None else pct_of(r, k, sd, signed)  # noqa: E731
            out.append(f"| {label} | **{cell(rb, 'asr_unknown')}** | {cell(rb, 'cacc')} | "
                       f"{cell(rb, 'dcacc', False, True)} | {cell(rs, 'asr_unknown')} | {cell(rs, 'dcacc', False, True)} |")
        failed = int(float(b[0].get("failed_cells") or 0)) if b else 0
        if failed:
            out.append(f"\n{failed} cell(s) of {preset} failed twice and are not in these means "
                       "(bench/results/collapse_*_failed.csv).")
    return "\n".join(out)


def base_targets_table(rows: list[dict]) -> str:
    """The targets of issue 13 on the pretrained base: the default at most 5% unknown ASR, CACC
    within 1 point of the victim, at least 20 points better than every baseline on the same victims."""
    out = ["| preset | default Stage 2 unknown ASR % (target ≤ 5) | ΔCACC points (target ≥ −1) | "
           "best baseline | margin over it (target ≥ 20) |", "| --- | ---: | ---: | --- | ---: |"]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        sel = [r for r in rows if r["preset"] == preset]
        d = _row(sel, "locphylax", "stage2")
        if d is None:
            continue
        others = [r for r in sel if r["stage"] == "stage2" and r["method"] not in ("locphylax", "reference")
                  and r["asr_unknown_mean"] is not None]  # the paper's own method is no baseline
        best = min(others, key=lambda r: r["asr_unknown_mean"]) if others else None

        def mark(ok):
            return "met" if ok else "**missed**"
        a, dc = d["asr_unknown_mean"], d["dcacc_mean"]
        margin = best["asr_unknown_mean"] - a if best else None
        out.append(f"| {preset} | {pct(a)} ({mark(a <= 0.05)}) | {pct(dc, signed=True)} ({mark(dc >= -0.01)}) | "
                   f"{best['method'] if best else '–'} ({pct(best['asr_unknown_mean']) if best else '–'}) | "
                   f"{pct(margin, signed=True)} ({mark(margin is not None and margin >= 0.20)}) |")
    return "\n".join(out)


LEVER_ROUNDS = [  # (file tag, title, the variant whose locphylax row is that round's reference)
    ("levers", "Round 1: every single lever, seed 0, constant learning rate", "ref+baselines"),
    ("levers-generated", "Round 1b: generated-trigger augmentation, seed 0, constant learning rate", None),
    ("levers-round2", "Round 2: seeds 0 and 1, cosine learning-rate schedule for every method", "cosine+baselines"),
    ("levers-pretrained", "Model lever: LM-pretrained model (tune trigger `cf`, seed 0; the clean model stayed at chance)", "ref+baselines"),
    ("levers-size", "Model lever: 4 layers x 256 (tune trigger `cf`, seed 0)", "ref+baselines"),
]


def lever_table(rounds: list[tuple[str, list[dict], dict | None]]) -> str:
    """Per round: Stage-2 unknown ASR and CACC change of each setting, beside that round's
    reference (the paper's method on the same victims)."""
    out = []
    for title, rows, ref in rounds:
        out += [f"\n**{title}**\n", "| setting | n | unknown ASR % after Stage 2 | Δ vs reference (points) | "
                "ΔCACC vs victim | known ASR % after Stage 1 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        s1 = {(r["variant"], r["method"]): r for r in rows if r["stage"] == "stage1"}
        entries = sorted((r for r in rows if r["stage"] == "stage2"),
                         key=lambda r: (r["method"] != "locphylax", r["asr_unknown_mean"]))
        for r in entries:
            name = r["variant"] if r["method"] == "locphylax" else f"baseline: {r['method']}"
            if ref is not None and r is ref:
                name = "**reference: the paper's method**"
            gain = r["asr_unknown_mean"] - ref["asr_unknown_mean"] if ref else None
            k = s1.get((r["variant"], r["method"]))
            out.append(f"| {name} | {int(r['n'])} | {pct_of(r, 'asr_unknown')} | "
                       f"{pct(gain, signed=True)} | {pct_of(r, 'dcacc', signed=True)} | "
                       f"{pct(k['asr_known_mean']) if k else '–'} |")
    return "\n".join(out)


def _lever_rounds() -> list:
    rounds, round1_ref = [], None
    for tag, title, ref_variant in LEVER_ROUNDS:
        rows = _read(f"collapse_{tag}_summary.csv")
        if not rows:
            continue
        ref = next((r for r in rows if r["variant"] == ref_variant and r["method"] == "locphylax"
                    and r["stage"] == "stage2"), None) if ref_variant else round1_ref
        if tag == "levers":
            round1_ref = ref
        rounds.append((title, rows, ref))
    return rounds


def figures(report: list[dict], levers: list[dict], default_name: str) -> list[str]:
    import plotly.graph_objects as go
    FIG.mkdir(parents=True, exist_ok=True)
    made = []
    if report:
        names = [("default", "locphylax", default_name), ("ref", "locphylax", "locphylax (reference)"),
                 ("default", "no_cluster", "no clustering"), ("default", "unlearn_single", "unlearn single"),
                 ("default", "clean_ft", "clean FT")]
        for preset in dict.fromkeys(r["preset"] for r in report):
            fams = list(dict.fromkeys(r["family"] for r in report if r["preset"] == preset))
            fig = go.Figure()
            v = [_pick(report, preset, "", "victim", "victim", family=f) for f in fams]
            fig.add_bar(name="victim", x=fams, y=[100 * r["asr_unknown_mean"] for r in v])
            for variant, method, label in names:
                rs = [_pick(report, preset, variant, method, "stage2", family=f) for f in fams]
                if all(rs):
                    fig.add_bar(name=label, x=fams, y=[100 * r["asr_unknown_mean"] for r in rs],
                                error_y=dict(type="data", array=[100 * r["asr_unknown_sd"] for r in rs]))
            fig.add_hline(y=5, line_dash="dot", annotation_text="target 5%")
            fig.update_layout(barmode="group", title=f"{preset}: unknown-trigger ASR after Stage 2, by trigger family",
                              yaxis_title="ASR %", template="plotly_white")
            path = FIG / f"collapse_{preset}_by_family.html"
            fig.write_html(str(path), include_plotlyjs="cdn", div_id=path.stem)  # fixed id: same bytes each run
            made.append(path.name)
    if levers:
        for preset in dict.fromkeys(r["preset"] for r in levers):
            rs = sorted((r for r in levers if r["preset"] == preset and r["stage"] == "stage2" and r["model"] == "preset"),
                        key=lambda r: r["asr_unknown_mean"])
            names = [r["variant"] if r["method"] == "locphylax" else r["method"] for r in rs]
            fig = go.Figure(go.Bar(x=[100 * r["asr_unknown_mean"] for r in rs], y=names, orientation="h",
                                   error_x=dict(type="data", array=[100 * r["asr_unknown_sd"] for r in rs]),
                                   customdata=[100 * r["dcacc_mean"] for r in rs],
                                   hovertemplate="%{y}: ASR %{x:.1f}%, ΔCACC %{customdata:+.1f}<extra></extra>"))
            fig.update_layout(title=f"{preset}, tune triggers: unknown ASR after Stage 2 per lever setting",
                              xaxis_title="ASR %", template="plotly_white", height=30 * len(rs) + 150)
            path = FIG / f"levers_{preset}.html"
            fig.write_html(str(path), include_plotlyjs="cdn", div_id=path.stem)  # fixed id: same bytes each run
            made.append(path.name)
    return made


def _replace_block(text: str, name: str, body: str) -> str:
    # the body between the markers may be empty (a block placed by hand before its first run)
    pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n)(?:.*?\n)?(<!-- END {re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        return text + f"\n<!-- BEGIN {name} -->\n{body}\n<!-- END {name} -->\n"
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def write_docs() -> None:
    from locphylax_core.config import load_config
    default_name = load_config("demo").defense.method
    report = _latest("collapse_report*_summary.csv", ("preset", "model", "variant", "method", "stage"))
    report_fam = _latest("collapse_report*_by_family.csv", ("preset", "model", "family", "variant", "method", "stage"))
    levers = _read("collapse_levers_summary.csv")
    text = DOC.read_text() if DOC.is_file() else "# Backdoor collapse: measured results\n"
    if report:
        text = _replace_block(text, "targets", targets_table(report))
        text = _replace_block(text, "headline", headline_table(report, default_name))
        text = _replace_block(text, "families", family_table(report_fam, default_name))
    attack_fam = _read("collapse_families_by_family.csv")  # split `families` (issue 6), all seeds in one file
    if attack_fam:
        text = _replace_block(text, "attack-families", family_table(attack_fam, default_name))
    new_baselines = _read("collapse_baselines6-demo_by_family.csv")  # the issue-6 baselines on the same victims
    if new_baselines:
        text = _replace_block(text, "baselines-issue6", baselines6_table(new_baselines, default_name))
    faithful = _read_runs("collapse_faithful-demo*_runs.csv")  # issue 17: the corrected baselines, same victims
    if faithful:
        text = _replace_block(text, "baselines-faithful",
                              faithful_table(_read_runs("collapse_earlier-demo*_runs.csv"), faithful))
    table = _read("collapse_table-gpu_by_family.csv")  # every defense on the same victims (issue 6)
    if table:
        text = _replace_block(text, "families-defenses",
                              defenses_table(table, _read("collapse_table-gpu_summary.csv"), default_name))
    base = _latest("collapse_base-report*_summary.csv", ("preset", "model", "variant", "method", "stage"))
    if base:  # issue 13: the report triggers on the pretrained bases, every defense on the same victims
        base_runs = _read_runs("collapse_base-report*_runs.csv")
        cells = {(r["preset"], r["trigger"], r["seed"]) for r in base_runs}
        scratch = cell_summary([r for r in _read_runs("collapse_report*_runs.csv") if r["model"] == "preset"], cells)
        text = _replace_block(text, "base-targets", base_targets_table(base))
        text = _replace_block(text, "base-vs-scratch", base_vs_scratch_table(base, scratch, default_name))
    base_table = _read("collapse_base-table_by_family.csv")
    if base_table:
        text = _replace_block(text, "base-families-defenses",
                              defenses_table(base_table, _read("collapse_base-table_summary.csv"), default_name))
        text = _replace_block(text, "base-table-paired",
                              paired_table(_read_runs("collapse_base-table_runs.csv"), default_name))
    real_lm = _read_runs("collapse_smollm2-report*_runs.csv")  # issue 33: the real pretrained LM
    if real_lm:
        text = _replace_block(text, "smollm2-report", real_lm_table(real_lm, default_name))
    real_lm = _read_runs("collapse_smollm2-lr2e-3-report*_runs.csv")  # the same at the tuned learning rate
    if real_lm:
        text = _replace_block(text, "smollm2-lr2e-3-report", real_lm_table(real_lm, default_name))
    study = _read_runs("collapse_smollm2-known-triggers*_runs.csv")  # issue 33: how many known triggers, which kind
    if study:
        text = _replace_block(text, "smollm2-known-triggers", known_trigger_table(study))
    # the same study at the tuned rate: the default set is the reference's run at 2e-3 on `cf`
    study = _read_runs("collapse_smollm2-kt-lr2e-3-*_runs.csv")
    if study:
        default_set = [{**r, "variant": "ref"} for r in _read_runs("collapse_smollm2-tune-lr=2e-3-avx2_runs.csv")]
        text = _replace_block(text, "smollm2-known-triggers-lr2e-3", known_trigger_table(default_set + study))
    tune = [r for r in _read_runs("collapse_smollm2-known-triggers*_runs.csv") if r["variant"] == "ref"] + \
        _read_runs("collapse_smollm2-tune-*_runs.csv")  # issue 33: the defense's learning rate, on `cf`
    if tune:
        text = _replace_block(text, "smollm2-tune-lr", learning_rate_table(tune))
    rounds = _lever_rounds()
    if rounds:
        text = _replace_block(text, "levers", lever_table(rounds))
    figs = figures(report_fam, levers, default_name)
    if figs:
        text = _replace_block(text, "figures", "\n".join(f"- [{f}](figures/{f})" for f in figs))
    DOC.parent.mkdir(parents=True, exist_ok=True)
    tmp = DOC.with_name(".results.md.tmp")
    tmp.write_text(text)
    tmp.replace(DOC)


if __name__ == "__main__":  # python -m bench.collapse_docs (the same as python -m bench.collapse docs)
    write_docs()
