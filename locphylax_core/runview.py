"""A read-only, typed view of one run folder: what the app shows, and nothing it could mutate.

:func:`open_run` never raises for a bad folder. A missing, half-written or corrupt file becomes a
``problems`` entry and an empty part of the view, so every page can say what is wrong instead of
crashing. Heavy arrays (projections, head-ablation grids) are read on demand by the functions
below, which return fresh numpy arrays and DataFrames on every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .registry import DEFENSES, LOCPHYLAX
from .runs import (SUMMARY_SCHEMA, RunDir, RunFileError, parse_metrics, probe_row_problem, read_json, read_jsonl,
                   read_run_file, state_problem, summary_problem)
from .config import MAX_CONFIG_BYTES, AttackConfig, load_yaml_text
from .errors import ConfigError

MAX_ARRAY_FILE_BYTES = 1 << 30  # a projection or a stage's stored probe states
STAGE_ROWS = (("victim", "victim"), ("stage1", "Locphylax Stage 1"), ("stage2", "Locphylax Stage 2"))
HEALTHY = ("done",)


@dataclass(frozen=True)
class RunView:
    """Everything small about a run, read once. ``health`` is one of: done, running, cancelled,
    failed, incomplete, corrupt."""

    run_id: str
    path: str
    health: str
    problems: tuple[str, ...] = ()
    status: str | None = None
    preset: str | None = None
    config: dict = field(default_factory=dict)
    config_yaml: str = ""
    summary: dict | None = None
    state: dict = field(default_factory=dict)
    metrics: tuple[dict, ...] = ()
    analysis: dict | None = None
    probe: tuple[dict, ...] = ()

    @property
    def label_words(self) -> list[str]:
        """Answer words indexed like predictions: the task's labels, then the canary if any."""
        return _label_words(self.config)

    @property
    def attack_trigger(self) -> str | None:
        """The attacker's trigger text (for display and evaluation only; the defense never gets it)."""
        from pydantic import ValidationError

        attack = self.config.get("attack", {})
        try:
            return AttackConfig.model_validate(attack).trigger_text
        except (ValidationError, TypeError, ValueError):
            trigger = attack.get("trigger") if isinstance(attack, dict) else None
            return trigger if isinstance(trigger, str) else None

    @property
    def finished(self) -> list[str]:
        return list(self.state.get("finished", []))

    @property
    def analysed(self) -> bool:
        """Some analysis exists (a running analysis writes each part as it finishes)."""
        return self.analysis is not None

    @property
    def analysis_complete(self) -> bool:
        return self.analysis is not None and bool(self.analysis.get("complete", True))

    @property
    def methods(self) -> list[str]:
        """locphylax first, then the baselines that have any row."""
        seen = {r.get("method") for r in self.metrics}
        return [LOCPHYLAX] + [m for m in self.config.get("defense", {}).get("baselines", []) if m in seen]


# ----------------------------------------------------------------------------------------------
# Shapes: what open_run checks before a page sees it. A part of the wrong shape is left out of the
# view and named in ``problems`` (the run is then "corrupt"), so a page gets well-shaped data or
# nothing, never a TypeError halfway through drawing.


def _num(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _vector(v) -> bool:
    return isinstance(v, list) and all(_num(x) for x in v)


def _grid(v) -> bool:
    """A non-empty rectangular list of rows of numbers (None: undefined)."""
    return (isinstance(v, list) and bool(v) and all(isinstance(r, list) and _vector(r) for r in v)
            and len({len(r) for r in v}) == 1 and bool(v[0]))


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _rel_file(v) -> bool:
    """A file name relative to the run folder that stays inside it."""
    return isinstance(v, str) and bool(v) and not Path(v).is_absolute() and ".." not in Path(v).parts


def _per_stage(check):
    def part(v):
        if not isinstance(v, dict):
            return "not a mapping"
        for stage, entry in v.items():
            problem = "not a mapping" if not isinstance(entry, dict) else check(entry)
            if problem:
                return f"{str(stage)[:40]}: {problem}"
        return None
    return part


def _aggregation_entry(m: dict) -> str | None:
    for k, v in m.items():
        if k == "centroid_distance":
            if not (v is None or (isinstance(v, dict) and all(_num(d) and d is not None for d in v.values()))):
                return "centroid_distance is not a mapping of numbers"
        elif not _num(v):
            return f"{str(k)[:40]} is not a number"
    return None


def _projection_entry(m: dict) -> str | None:
    if not _rel_file(m.get("file")):
        return "file is not a file name inside the run folder"
    if not (_strings(m.get("stages")) and m["stages"]):
        return "stages is not a list of stage names"
    return None


def _head_entry(m: dict) -> str | None:
    if not _grid(m.get("delta_cacc")):
        return "delta_cacc is not a grid of numbers"
    asr = m.get("delta_asr")
    if not (isinstance(asr, dict) and all(_grid(g) for g in asr.values())):
        return "delta_asr is not a mapping of grids of numbers"
    shape = (len(m["delta_cacc"]), len(m["delta_cacc"][0]))
    if any((len(g), len(g[0])) != shape for g in asr.values()):
        return "its grids differ in shape"
    return None


LENS_KEYS = ("target_triggered", "correct_triggered", "target_clean", "correct_clean")


def _lens_entry(m: dict) -> str | None:
    bad = [k for k in LENS_KEYS if not _vector(m.get(k))]
    return f"{bad[0]} is not a list of numbers" if bad else None


def _patching_entry(m: dict) -> str | None:
    for k in ("residual", "heads"):
        if not _grid(m.get(k)):
            return f"{k} is not a grid of numbers"
    if not _strings(m.get("roles")) or len(m["roles"]) != len(m["residual"][0]):
        return "roles is not one name per residual column"
    if not (m.get("logit_diff") is None or (isinstance(m["logit_diff"], dict)
                                            and all(_num(v) and v is not None for v in m["logit_diff"].values()))):
        return "logit_diff is not a mapping of numbers"
    return None


def _salience_entry(m: dict) -> str | None:
    for k in ("trigger_top1_rate", "n_scored"):
        if not _num(m.get(k)):
            return f"{k} is not a number"
    if not (m.get("method") is None or isinstance(m["method"], str)):
        return "method is not a string"
    ex = m.get("examples", [])
    if not (isinstance(ex, list) and all(isinstance(e, dict) and isinstance(e.get("text", ""), str) for e in ex)):
        return "examples is not a list of examples with a text"
    return None


def _casd(c) -> str | None:
    if c is None:
        return None
    if not isinstance(c, dict):
        return "not a mapping"
    if not (_strings(c.get("labels")) and _grid(c.get("matrix"))):
        return "labels or matrix has the wrong shape"
    if (len(c["matrix"]), len(c["matrix"][0])) != (len(c["labels"]),) * 2:
        return "the matrix is not one row and column per label"
    if not isinstance(c.get("metric", ""), str):
        return "metric is not a string"
    return None


def _localisation(c) -> str | None:
    if c is None:
        return None
    if not isinstance(c, dict):
        return "not a mapping"
    if not isinstance(c.get("available", False), bool) or not isinstance(c.get("reason", ""), (str, type(None))):
        return "available or reason has the wrong type"
    bad = [k for k in ("precision", "recall", "n_clean", "n_triggered", "trigger_top1_rate") if not _num(c.get(k))]
    return f"{bad[0]} is not a number" if bad else None


# part: (its value when absent or damaged, its check)
ANALYSIS_PARTS = {
    "aggregation": ({}, _per_stage(_aggregation_entry)),
    "projections": ({}, _per_stage(_projection_entry)),
    "head_ablation": ({}, _per_stage(_head_entry)),
    "casd": (None, _casd),
    "logit_lens": ({}, _per_stage(_lens_entry)),
    "patching": ({}, _per_stage(_patching_entry)),
    "salience": ({}, _per_stage(_salience_entry)),
    "localisation": (None, _localisation),
}


def checked_analysis(analysis: dict) -> tuple[dict, list[str]]:
    """``analysis`` with each part of the wrong shape replaced by its empty value, and what was wrong."""
    out, problems = dict(analysis), []
    if not isinstance(out.get("complete", True), bool):
        problems.append("analysis.json is damaged (complete is not true or false)")
        out["complete"] = True
    for part, (empty, check) in ANALYSIS_PARTS.items():
        if out.get(part) is None:
            out[part] = empty
            continue
        problem = check(out[part])
        if problem:
            problems.append(f"analysis.json is damaged ({part}: {problem}; left out)")
            out[part] = empty
    ha = out["head_ablation"]
    if ha:  # the Heads page sets the stages' grids side by side: one shape, one set of quantities
        first = next(iter(ha.values()))
        shape, triggers = (len(first["delta_cacc"]), len(first["delta_cacc"][0])), set(first["delta_asr"])
        if any((len(m["delta_cacc"]), len(m["delta_cacc"][0])) != shape or set(m["delta_asr"]) != triggers
               for m in ha.values()):
            problems.append("analysis.json is damaged (head_ablation: its stages differ in shape; left out)")
            out["head_ablation"] = {}
    return out, problems


def _config_problem(config: dict) -> str | None:
    """Why a run's config.yaml lacks the shape the views read (a full validation is the resume's job)."""
    for section in ("task", "model", "attack", "defense", "train", "eval"):
        if not isinstance(config.get(section, {}), dict):
            return f"{section} is not a mapping"
    if not isinstance(config.get("name", ""), (str, type(None))):
        return "name is not a string"
    task, defense = config.get("task", {}), config.get("defense", {})
    if not _strings(task.get("labels", [])) or not isinstance(task.get("template", ""), str):
        return "task.labels or task.template has the wrong type"
    if not isinstance(task.get("name", ""), str):
        return "task.name is not a string"
    if not _strings(defense.get("baselines", [])):
        return "defense.baselines is not a list of names"
    kt = defense.get("known_triggers", [])
    if not (isinstance(kt, list) and all(isinstance(k, dict) for k in kt)):
        return "defense.known_triggers is not a list of triggers"
    for k in ("canary", "known_target", "method"):
        if not isinstance(defense.get(k, ""), (str, type(None))):
            return f"defense.{k} is not a string"
    model = config.get("model", {})
    if not isinstance(model.get("source", ""), str) or not (model.get("n_positions") is None or (
            isinstance(model["n_positions"], int) and not isinstance(model["n_positions"], bool))):
        return "model.source or model.n_positions has the wrong type"
    analyses = (config.get("eval") or {}).get("analyses")
    if not (analyses is None or _strings(analyses)):
        return "eval.analyses is not a list of names"
    return None


def _unreadable(name: str, e: RunFileError) -> str:
    """A problem line for a run file that could not be read (the reason without the path)."""
    return f"{name} is {e.reason}" if e.reason.startswith("corrupt") else f"{name} is corrupt ({e.reason})"


def _label_words(config: dict) -> list[str]:
    task = config.get("task", {})
    words = list(task.get("labels", []))
    defense = config.get("defense", {})
    if defense.get("known_target") == "canary":
        words.append(defense.get("canary") or "canary")
    return words


def _load_json(folder: Path, name: str, problems: list[str], required: bool = True):
    try:
        return read_json(folder / name, within=folder)
    except RunFileError as e:
        if not e.missing:
            problems.append(_unreadable(name, e))
        elif required:
            problems.append(f"{name} is missing")
        return None


def _load_config(p: Path, problems: list[str]) -> tuple[dict, str]:
    name = RunDir.CONFIG
    try:
        data = read_run_file(RunDir(p).config_path, within=p, limit=MAX_CONFIG_BYTES)
    except RunFileError as e:
        problems.append(f"{name} is missing" if e.missing else _unreadable(name, e))
        return {}, ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"{name} is corrupt (not UTF-8; not a text file)")
        return {}, ""
    try:
        config = load_yaml_text(text, name)
    except ConfigError as e:  # too large, an alias bomb, nested too deeply or not YAML: the project's message
        problems.append(f"{name} is corrupt ({str(e)[:200]})")
        return {}, ""
    if not isinstance(config, dict):
        problems.append(f"{name} is not a mapping")
        return {}, ""
    problem = _config_problem(config)
    if problem:
        problems.append(f"{name} has the wrong shape ({problem})")
        return {}, text
    return config, text


def _load_probe(p: Path, problems: list[str]) -> list[dict]:
    name = RunDir.PROBE
    try:
        rows, bad = read_jsonl(RunDir(p).probe_path, within=p, strict=True)
    except RunFileError as e:
        if not e.missing:
            problems.append(_unreadable(name, e))
        return []
    if bad:
        problems.append(f"{name} is corrupt (line {bad[0]} is not JSON)")
        return []
    for line, row in rows:
        problem = probe_row_problem(row)
        if problem:
            problems.append(f"{name} is corrupt (line {line}: {problem})")
            return []
    return [row for _, row in rows]


def _load_metrics(p: Path, problems: list[str]) -> list[dict]:
    name = RunDir.METRICS
    try:
        rows, _ = read_jsonl(RunDir(p).metrics_path, within=p)  # a line cut by a kill mid-write is left out
    except RunFileError as e:
        if not e.missing:
            problems.append(_unreadable(name, e))
        return []
    metrics, bad = parse_metrics(rows)
    if bad:
        problems.append(f"{name} is damaged ({len(bad)} row{'s' * (len(bad) > 1)} of the wrong shape left "
                        f"out; {bad[0]})")
    return metrics


def open_run(path: str | Path) -> RunView:
    """Read a run folder into a :class:`RunView`; never raises for a bad folder. Every file is read
    through the run store's safe reader (regular files inside the folder, of bounded size and
    nesting) and checked for the shape its readers rely on; a damaged part is left out and named in
    ``problems``."""
    p = Path(path)
    problems: list[str] = []
    if not p.is_dir():
        return RunView(p.name, str(p), "corrupt", (f"{p} is not a folder",))
    config, config_yaml = _load_config(p, problems)
    state = _load_json(p, RunDir.STATE, problems)
    state_bad = state_problem(state) if state is not None else None
    if state_bad:
        problems.append(f"{RunDir.STATE} is not a mapping" if state_bad == "not a mapping"
                        else f"{RunDir.STATE} has the wrong shape ({state_bad})")
    state = {} if state is None or state_bad else state
    summary = _load_json(p, RunDir.SUMMARY, problems, required=bool(state.get("finished")))
    if summary is not None and (not isinstance(summary, dict) or summary.get("schema") != SUMMARY_SCHEMA):
        problems.append(f"{RunDir.SUMMARY} has an unknown schema")
        summary = None
    elif summary is not None and summary_problem(summary):
        problems.append(f"{RunDir.SUMMARY} is corrupt ({summary_problem(summary)})")
        summary = None
    analysis = _load_json(p, RunDir.ANALYSIS, problems, required=False)
    if analysis is not None and not isinstance(analysis, dict):
        problems.append(f"{RunDir.ANALYSIS} is not a mapping")
        analysis = None
    elif analysis is not None:
        analysis, damaged = checked_analysis(analysis)
        problems += damaged
    metrics = _load_metrics(p, problems)
    probe = _load_probe(p, problems)
    n_words = len(_label_words(config))
    bad = next((i for i, r in enumerate(probe, 1) if not 0 <= r["label"] < n_words), None)
    if bad is not None:  # an answer no page could name (without a readable config, none can be named)
        if config:
            problems.append(f"{RunDir.PROBE} is corrupt (line {bad}: label {probe[bad - 1]['label']} is not one of the "
                            f"run's {n_words} answers)")
        probe = []
    status = state.get("status")
    if any(w in x for x in problems for w in ("corrupt", "not a mapping", "unknown schema", "damaged", "wrong shape")):
        health = "corrupt"
    elif f"{RunDir.CONFIG} is missing" in problems or f"{RunDir.STATE} is missing" in problems:
        health = "incomplete"
    elif status in ("done", "running", "cancelled", "failed", "prepared"):
        health = status
    else:
        health = "incomplete"
    return RunView(run_id=p.name, path=str(p), health=health, problems=tuple(problems), status=status,
                   preset=state.get("preset") or config.get("name"), config=config, config_yaml=config_yaml,
                   summary=summary, state=state, metrics=tuple(metrics), analysis=analysis, probe=tuple(probe))


def run_file(view: RunView, name: str) -> bytes:
    """The bytes of one of the run's files (``config.yaml``, ``summary.json``...), for a download:
    only a regular file inside the run folder, of bounded size (RunFileError otherwise: a link to
    ``/etc/passwd`` is refused, not served)."""
    folder = Path(view.path)
    return read_run_file(folder / name, within=folder)


def run_stamp(path: str | Path) -> tuple:
    """Modification times and sizes of the files a view reads: a cache key that changes when the
    run does (a growing metrics.jsonl, a new analysis.json)."""
    p = Path(path)
    out = []
    for name in (RunDir.STATE, RunDir.SUMMARY, RunDir.METRICS, RunDir.ANALYSIS, RunDir.CONFIG):
        try:
            st = (p / name).stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Tables


def _pct(x) -> float | None:
    return None if x is None else round(100.0 * float(x), 1)


def results_table(view: RunView) -> pd.DataFrame:
    """One row per finished stage and baseline: CACC and ASR (unknown, known triggers) in %, seconds."""
    s = view.summary or {}
    rows = []
    secs = s.get("seconds", {})
    entries = [(label, s.get("stages", {}).get(key), secs.get(key), key) for key, label in STAGE_ROWS]
    entries += [(DEFENSES.label(m), r, secs.get(m), m) for m, r in (s.get("baselines") or {}).items()]
    for label, r, sec, key in entries:
        if not r:
            continue
        row = {"run": view.run_id, "row": label, "key": key, "CACC %": _pct(r.get("cacc"))}
        if (r.get("utility") or {}).get("name") == "perplexity":  # response tasks: no CACC, perplexity instead
            value = r["utility"].get("value")
            row["perplexity"] = None if value is None else round(float(value), 2)
        for trig, v in (r.get("asr") or {}).items():
            row[f"ASR {trig} %"] = _pct(v)
        row["seconds"] = sec
        rows.append(row)
    return pd.DataFrame(rows)


def compare_table(views: Sequence[RunView]) -> pd.DataFrame:
    """The results tables of several runs stacked, with each run's preset and attack trigger."""
    parts = []
    for v in views:
        t = results_table(v)
        if t.empty:
            continue
        attack = v.config.get("attack", {})
        t.insert(1, "preset", v.preset)
        t.insert(2, "attack", f"{attack.get('family', '?')}: {v.attack_trigger}")
        t.insert(3, "method", v.config.get("defense", {}).get("method", "locphylax"))
        parts.append(t)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def aggregation_table(view: RunView) -> pd.DataFrame:
    """Per analysed stage: the headline aggregation score and the centroid distances."""
    agg = (view.analysis or {}).get("aggregation") or {}
    rows = []
    for stage, m in agg.items():
        if not isinstance(m, dict):
            continue
        row = {"stage": stage, **{k: v for k, v in m.items() if isinstance(v, (int, float)) or v is None}}
        row.update({f"distance {pair}": d for pair, d in (m.get("centroid_distance") or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# Arrays, read on demand


def _arrays(view: RunView, rel: str) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file of the run: only a regular file inside the run folder
    (ValueError otherwise, and for a file that is not safetensors)."""
    from safetensors.numpy import load
    folder = Path(view.path)
    try:
        data = read_run_file(folder / rel, within=folder, limit=MAX_ARRAY_FILE_BYTES)
        return dict(load(data))
    except RunFileError as e:
        raise ValueError(f"{rel}: {e.reason}") from None
    except Exception as e:  # safetensors' own error for a truncated or foreign file
        raise ValueError(f"{rel}: not a readable safetensors file ({type(e).__name__})") from None


def projection(view: RunView, method: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(coords, predictions) per analysed stage for ``method`` (pca, tsne, umap). KeyError when the
    analysis has none; ValueError when its files are damaged (missing arrays, wrong shapes)."""
    info = ((view.analysis or {}).get("projections") or {}).get(method)
    if not info:
        raise KeyError(f"no {method} projection in this run's analysis")
    arrays = _arrays(view, info["file"])
    coords = {}
    for k in info["stages"]:
        a = arrays.get(RunDir.file_key(k))
        if a is None or a.ndim != 2 or a.shape[1] != 2 or len(a) != len(view.probe):
            raise ValueError(f"{info['file']}: stage {k!r} has no {len(view.probe)} x 2 coordinates")
        coords[k] = a
    preds, run = {}, RunDir(view.path)
    for k in info["stages"]:
        rel = run.hidden(k).relative_to(run.path).as_posix()
        if run.hidden(k).is_file():
            pred = _arrays(view, rel).get("pred")
            if pred is not None and pred.ndim == 1 and len(pred) == len(view.probe):
                pred = pred.astype(np.int64)
                if ((pred >= 0) & (pred < len(view.label_words))).all():  # else: answers no page can name
                    preds[k] = pred
    return coords, preds


def probe_search(view: RunView, query: str) -> list[int]:
    """Indices of the probe inputs whose text contains every word of ``query`` (case-insensitive;
    an empty query finds nothing)."""
    words = query.lower().split()
    if not words:
        return []
    return [i for i, r in enumerate(view.probe) if all(w in str(r.get("text", "")).lower() for w in words)]


def probe_rows(view: RunView, indices: Sequence[int], preds: dict[str, np.ndarray],
               stages: Sequence[str]) -> pd.DataFrame:
    """One row per probe input in ``indices`` (out-of-range ones left out): its index, group, text,
    correct answer and the stored answer at each of ``stages`` (None where a stage stored none)."""
    words = view.label_words
    rows = []
    for i in dict.fromkeys(int(i) for i in indices):
        if not 0 <= i < len(view.probe):
            continue
        r = view.probe[i]
        row = {"index": i, "group": r.get("group"), "text": r.get("text"), "correct": words[int(r["label"])]
               if 0 <= int(r.get("label", -1)) < len(words) else None}
        for k in stages:
            p = preds.get(k)
            row[k] = words[int(p[i])] if p is not None and i < len(p) and 0 <= int(p[i]) < len(words) else None
        rows.append(row)
    return pd.DataFrame(rows, columns=["index", "group", "text", "correct", *stages])


def analysis_left_out(view: RunView, part: str) -> bool:
    """True when the run's own config leaves analysis ``part`` (heads, casd, layers) out
    (``eval.analyses``; the live preset keeps only what its page draws)."""
    analyses = (view.config.get("eval") or {}).get("analyses")
    return isinstance(analyses, list) and part not in analyses


def stages_with_model(view: RunView) -> list[str]:
    """The finished stages whose checkpoint is stored (so a typed sentence can be answered)."""
    run = RunDir(view.path)
    return [k for k in view.finished if run.checkpoint(k).is_dir()]


def head_grids(view: RunView, stage: str) -> dict[str, np.ndarray]:
    """``[layer, head]`` arrays of one stage's head ablation: ``delta_cacc`` and ``delta_asr_<trigger>``
    (NaN where no input qualified)."""
    ha = ((view.analysis or {}).get("head_ablation") or {}).get(stage)
    if not ha:
        raise KeyError(f"no head ablation for stage {stage!r}")
    out = {"delta_cacc": np.array(ha["delta_cacc"], dtype=float)}
    for trig, grid in ha["delta_asr"].items():
        out[f"delta_asr_{trig}"] = np.array(grid, dtype=float)
    return out


def critical_heads(view: RunView, stage: str, top: int = 5, trigger: str = "unknown") -> pd.DataFrame:
    """The heads whose ablation moves ``trigger``'s ASR most (largest |ΔASR|), with ΔASR and ΔCACC in
    points. Heads with no qualifying input (NaN) are left out."""
    grids = head_grids(view, stage)
    asr_col = f"ΔASR {trigger} (points)"
    asr = grids.get(f"delta_asr_{trigger}")
    rows = []
    if asr is not None:
        flat = [(layer, head, asr[layer, head], grids["delta_cacc"][layer, head])
                for layer in range(asr.shape[0]) for head in range(asr.shape[1]) if np.isfinite(asr[layer, head])]
        flat.sort(key=lambda t: -abs(t[2]))
        rows = [{"layer": a, "head": b, asr_col: round(100 * c, 1), "ΔCACC (points)": round(100 * d, 1)}
                for a, b, c, d in flat[:top]]
    return pd.DataFrame(rows, columns=["layer", "head", asr_col, "ΔCACC (points)"])


def curve_rows(view: RunView) -> list[dict]:
    """metrics.jsonl rows (a fresh list each call: callers may not share or change them)."""
    return [dict(r) for r in view.metrics]


# ----------------------------------------------------------------------------------------------
# Layer analyses: the stored maps


def layer_maps(view: RunView, stage: str) -> dict:
    """One stage's stored layer analyses: ``residual`` ``[layer, role]`` and ``heads``
    ``[layer, head]`` patching restorations (NaN where undefined), ``roles``, ``logit_diff`` and the
    logit lens ``lens`` (``{target_triggered, correct_triggered, target_clean, correct_clean:
    [layer]}``). KeyError when the run's analysis has none for ``stage``."""
    a = view.analysis or {}
    patch, lens = (a.get("patching") or {}).get(stage), (a.get("logit_lens") or {}).get(stage)
    if not patch or not lens:
        raise KeyError(f"no layer analyses for stage {stage!r}")
    keys = ("target_triggered", "correct_triggered", "target_clean", "correct_clean")
    return {"residual": np.array(patch["residual"], dtype=float), "heads": np.array(patch["heads"], dtype=float),
            "roles": [str(r) for r in patch["roles"]], "logit_diff": dict(patch.get("logit_diff") or {}),
            "lens": {k: np.array(lens[k], dtype=float) for k in keys}}


def layer_stages(view: RunView) -> list[str]:
    """The stages with stored layer analyses, in the analysis's order."""
    a = view.analysis or {}
    both = set((a.get("patching") or {})) & set((a.get("logit_lens") or {}))
    return [k for k in (a.get("patching") or {}) if k in both]


def salience_table(view: RunView) -> pd.DataFrame:
    """Per stage: how often the top-salience token of a triggered probe input is the trigger."""
    rows = []
    for stage, r in ((view.analysis or {}).get("salience") or {}).items():
        rate = r.get("trigger_top1_rate")
        rows.append({"stage": stage, "trigger ranked first": None if rate is None else round(100 * rate, 1),
                     "inputs": r.get("n_scored"), "method": r.get("method")})
    return pd.DataFrame(rows, columns=["stage", "trigger ranked first", "inputs", "method"])


def localisation_summary(view: RunView) -> dict | None:
    """The stored ``localisation`` block (the defender's detector), or None."""
    loc = (view.analysis or {}).get("localisation")
    return dict(loc) if isinstance(loc, dict) else None


def has_canary(view: RunView) -> bool:
    """The run's defense trains a canary answer (``defense.known_target``), so its Stage 1 model
    marks the inputs it takes as triggered."""
    return view.config.get("defense", {}).get("known_target") == "canary"


__all__ = ["RunView", "analysis_left_out", "probe_search", "probe_rows", "stages_with_model", "layer_maps",
           "layer_stages", "salience_table", "localisation_summary", "has_canary", "open_run", "run_file", "run_stamp",
           "results_table", "compare_table", "aggregation_table", "projection", "head_grids", "critical_heads",
           "curve_rows", "HEALTHY"]
