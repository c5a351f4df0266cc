"""``locphylax analyze RUN``: every analysis of a run, stored with it.

Writes ``runs/<id>/analysis.json`` (atomically, last) and the arrays it refers to under
``runs/<id>/analysis/``::

    analysis.json
      schema: 1
      stages: [stage keys analysed]
      aggregation: {stage: {centroid_distance, unknown_nearest_known, unknown_nearest_known_same_pred,
                            silhouette, davies_bouldin, aggregation_score, ...}}
      head_ablation: {stage: {delta_asr: {trigger: [[...]]}, delta_cacc: [[...]], base, critical_heads,
                              critical_layers, n_layers, n_heads, file}}
      casd: {labels, matrix, metric, shifts_norm}
      projections: {method: {file, stages, seconds}}
      logit_lens: {stage: {target_triggered, correct_triggered, target_clean, correct_clean: [layer], file}}
      patching: {stage: {residual: [[layer, role]], heads: [[layer, head]], roles, logit_diff, file}}
      salience: {stage: {trigger_top1_rate, n_scored, method, examples}}
      localisation: {available, precision, recall, auc, trigger_top1_rate, ...} (or {available: false, reason})
      seconds: {aggregation, projections, head_ablation, casd, lens_patching_salience, localisation, layers, total}
    analysis/projection_<method>.safetensors   one [n_probe, 2] array per stage
    analysis/heads_<stage>.safetensors         delta_asr_<trigger>, delta_cacc  [layer, head]
    analysis/layers_<stage>.safetensors        patching_residual [layer, role], patching_heads [layer, head],
                                               lens_<quantity> [layer]

The head arrays are small and also inline in the JSON; projections are only in the files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import RunError
from ..registry import DEFENSES, LOCPHYLAX
from ..runs import RunDir, atomic_write_json, read_json
from . import figures as F
from ..config import load_run_config
from .casd import run_casd
from .heads import run_head_ablation
from .layer_run import LayerProbe, analyse_checkpoint, layer_keys, run_localisation
from .metrics import aggregation_metrics
from .representations import load_probe, project, stage_predictions, stage_states

ANALYSIS_SCHEMA = 1
HEAD_KEYS = ("victim", "stage1", "stage2")


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    tmp.replace(path)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    return load_file(str(path))


def analysed_stages(run: RunDir) -> list[str]:
    """Finished stages with stored probe states, in run order, without the clean model."""
    state = run.read_state()
    return [k for k in state.get("finished", []) if k != "clean" and run.hidden(k).is_file()]


def analyze_run(run: RunDir | str | Path, methods: Sequence[str] | None = None, heads: bool | None = None,
                casd: bool | None = None, n_probe_heads: int | None = None, seed: int = 0, batched_heads: bool = False,
                progress: Callable[[str], None] | None = None, layers: bool | None = None,
                n_probe_layers: int | None = None) -> dict:
    """Every analysis of a run, written to ``analysis.json`` after each part (``complete`` is False
    until the last), so a page can draw each plot as soon as its data exists. The parts run
    cheapest and most-shown first: aggregation, the projections other than UMAP, the head sweep,
    CASD, the layer analyses (logit lens and patching, salience, localisation), then UMAP (its
    first use in a process compiles numba code for tens of seconds). ``methods``, ``heads``,
    ``casd``, ``layers`` and ``n_probe_heads`` left at None follow the run's own config
    (``eval.projections``, ``eval.analyses``, ``eval.head_probe``)."""

    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    say = progress or (lambda _msg: None)
    t_all = time.perf_counter()
    if None in (methods, n_probe_heads, heads, casd, layers):  # the run's own settings (its eval section)
        ev = load_run_config(run.config_path).eval
        methods = ev.projections if methods is None else methods
        n_probe_heads = ev.head_probe if n_probe_heads is None else n_probe_heads
        heads, casd, layers = (("heads" in ev.analyses) if heads is None else heads,
                               ("casd" in ev.analyses) if casd is None else casd,
                               ("layers" in ev.analyses) if layers is None else layers)
    stages = analysed_stages(run)
    if not stages:
        raise RunError(f"{run.path}: no finished stage with stored probe states to analyse")
    probe = load_probe(run)
    groups = [r["group"] for r in probe]
    out: dict = {"schema": ANALYSIS_SCHEMA, "run_id": run.run_id, "stages": stages, "seconds": {},
                 "complete": False, "projections": {}, "head_ablation": {}, "casd": None,
                 "logit_lens": {}, "patching": {}, "salience": {}, "localisation": None}

    def written() -> None:  # the part just finished is readable at once (atomic replace)
        atomic_write_json(run.analysis_path, _jsonable(out))

    say("aggregation metrics")
    t0 = time.perf_counter()
    states = {k: stage_states(run, k) for k in stages}
    preds = {k: stage_predictions(run, k) for k in stages}
    out["aggregation"] = {k: aggregation_metrics(states[k], groups, preds[k]) for k in stages}
    out["seconds"]["aggregation"] = round(time.perf_counter() - t0, 3)

    written()

    def projection(method: str) -> None:
        say(f"projection: {method}")
        t1 = time.perf_counter()
        coords = project(states, method, seed=seed)
        rel = RunDir.analysis_file(f"projection_{method}")
        _save_arrays(run.path / rel, {RunDir.file_key(k): v.astype(np.float32) for k, v in coords.items()})
        out["projections"][method] = {"file": rel, "stages": stages, "seconds": round(time.perf_counter() - t1, 3)}
        out["seconds"]["projections"] = round(out["seconds"].get("projections", 0.0) + time.perf_counter() - t1, 3)
        written()

    for method in [m for m in methods if m != "umap"]:
        projection(method)

    if heads:
        head_parts(run, out, stages, n_probe_heads, batched_heads, written, say)

    if casd:
        say("CASD")
        t0 = time.perf_counter()
        c = run_casd(run)
        out["casd"] = {"labels": c["labels"], "matrix": np.asarray(c["matrix"]).tolist(), "metric": c["metric"],
                       "shifts_norm": c["shifts_norm"]}
        out["seconds"]["casd"] = round(time.perf_counter() - t0, 3)
        written()

    if layers:
        layer_parts(run, out, stages, n_probe_layers, written, say)

    if "umap" in methods:
        projection("umap")
    out["seconds"]["total"] = round(time.perf_counter() - t_all, 3)
    out["complete"] = True
    written()
    return out


def head_parts(run: RunDir, out: dict, stages: Sequence[str], n_probe: int | None, batched: bool, written,
               say) -> None:
    """The head sweep of the victim and the defense's stages (analysis/heads_<stage>.safetensors
    holds the arrays; the JSON has them too), written when done."""
    keys = [k for k in HEAD_KEYS if k in stages]
    say(f"head ablation: {', '.join(keys)}")
    t0 = time.perf_counter()
    # Naive (one forward per head) on CPU: bench/results/head_ablation.md measured the batched
    # sweep at 0.7x its speed there (stacking copies saves no FLOPs on a compute-bound CPU).
    results = run_head_ablation(run, keys=keys, n_probe=n_probe, batched=batched) if keys else {}
    for key, r in results.items():
        rel = RunDir.analysis_file(f"heads_{RunDir.file_key(key)}")
        arrays = {"delta_cacc": np.asarray(r["delta_cacc"], np.float32),
                  **{f"delta_asr_{n}": np.asarray(a, np.float32) for n, a in r["delta_asr"].items()}}
        _save_arrays(run.path / rel, arrays)
        out["head_ablation"][key] = {
            "delta_asr": {n: np.asarray(a).tolist() for n, a in r["delta_asr"].items()},
            "delta_cacc": np.asarray(r["delta_cacc"]).tolist(), "base": r["base"],
            "critical_heads": r["critical_heads"], "critical_layers": r["critical_layers"],
            "n_layers": r["n_layers"], "n_heads": r["n_heads"], "n_eligible": r.get("n_eligible"),
            "file": rel, "seconds": r.get("seconds")}
    out["seconds"]["head_ablation"] = round(time.perf_counter() - t0, 3)
    written()


def layer_parts(run: RunDir, out: dict, stages: Sequence[str], n_probe: int | None, written, say) -> None:
    """The logit lens and patching maps, then salience, then localisation, each written as soon
    as it exists (analysis/layers_<stage>.safetensors holds the maps; the JSON has them too)."""
    t0 = time.perf_counter()
    probe = LayerProbe(run, n_probe)
    skip = _layer_skip(probe)
    if skip:
        out["localisation"] = {"available": False, "reason": skip}
        out["seconds"]["layers"] = round(time.perf_counter() - t0, 3)
        written()
        return
    keys = layer_keys(run, stages)
    for key in keys:  # each checkpoint loaded once; its maps readable as soon as they exist
        say(f"logit lens, activation patching and salience: {key}")
        r = analyse_checkpoint(probe, key)
        lens, patch = r["logit_lens"], r["patching"]
        rel = RunDir.analysis_file(f"layers_{RunDir.file_key(key)}")
        _save_arrays(run.path / rel, {"patching_residual": np.asarray(patch["residual"], np.float32),
                                      "patching_heads": np.asarray(patch["heads"], np.float32),
                                      **{f"lens_{k}": np.asarray(lens[k], np.float32) for k in LENS_KEYS}})
        out["logit_lens"][key] = {**{k: lens[k] for k in LENS_KEYS}, "n_layers": lens["n_layers"],
                                  "n_inputs": lens["n_inputs"], "file": rel}
        out["patching"][key] = {**patch, "file": rel}
        out["salience"][key] = r["salience"]
        written()
    out["seconds"]["lens_patching_salience"] = round(time.perf_counter() - t0, 3)
    t1 = time.perf_counter()
    say("trigger localisation")
    out["localisation"] = run_localisation(probe)
    out["seconds"]["localisation"] = round(time.perf_counter() - t1, 3)
    out["seconds"]["layers"] = round(time.perf_counter() - t0, 3)
    written()


LENS_KEYS = ("target_triggered", "correct_triggered", "target_clean", "correct_clean")


def _layer_skip(probe: LayerProbe) -> str | None:
    if not probe.classification:
        return "the layer analyses score classification answers; this run's task generates responses"
    if not probe.triggered:
        return "the evaluation set has no triggered input of the attacker's trigger"
    return None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def export_figures(run: RunDir | str | Path, folder: str | Path | None = None, method: str = "tsne") -> list[Path]:
    """Write every figure of an analysed run as standalone HTML + CSV (default: analysis/figures/)."""
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    a = read_json(run.analysis_path)
    if not isinstance(a, dict) or not isinstance(a.get("projections", {}), dict):
        raise RunError(f"{run.analysis_path}: corrupt (not an analysis; `locphylax analyze` writes it again)")
    folder = Path(folder) if folder else run.figures_dir
    labels = load_run_config(run.config_path).task.labels
    probe = load_probe(run)
    written: list[Path] = []
    if method in a["projections"]:
        arrays = load_arrays(run.path / a["projections"][method]["file"])
        coords = {k: arrays[RunDir.file_key(k)] for k in a["projections"][method]["stages"]}
        preds = {k: stage_predictions(run, k) for k in coords}
        written += F.export(F.projection_figure(coords, probe, preds, labels, method),
                            F.projection_table(coords, probe, preds, labels), folder / f"projection_{method}")
    ha = a.get("head_ablation") or {}
    if "victim" in ha and "stage2" in ha:
        # None in the JSON = undefined (no eligible input): NaN in the arrays
        before = np.array(ha["victim"]["delta_asr"]["unknown"], dtype=float)
        after = np.array(ha["stage2"]["delta_asr"]["unknown"], dtype=float)
        written += F.export(F.head_heatmaps(before, after), F.head_table({"victim": before, "stage2": after,
                                                                          "difference": after - before}),
                            folder / "heads_unknown")
    pa, lens = a.get("patching") or {}, a.get("logit_lens") or {}
    if "victim" in pa and "stage2" in pa:
        for part, x_labels in (("residual", pa["victim"]["roles"]), ("heads", None)):
            before = np.array(pa["victim"][part], dtype=float)
            after = np.array(pa["stage2"][part], dtype=float)
            labels_x = x_labels or [f"h{h}" for h in range(before.shape[1])]
            written += F.export(F.patching_heatmaps(before, after, x_labels=labels_x),
                                F.patching_table({"victim": before, "stage2": after, "difference": after - before},
                                                 labels_x), folder / f"patching_{part}")
    if lens:
        shown = {k: {q: np.array(v[q], dtype=float) for q in LENS_KEYS} for k, v in lens.items()
                 if k in ("victim", "stage1", "stage2")}
        written += F.export(F.logit_lens_figure(shown), F.logit_lens_table(shown), folder / "logit_lens")
    rows = run.read_metrics()
    methods = [e.name for e in DEFENSES if e.name == LOCPHYLAX or any(r.get("method") == e.name for r in rows)]
    import pandas as pd
    written += F.export(F.curves_figure(rows, methods),
                        pd.concat([F.curve_table(rows, m) for m in methods], ignore_index=True), folder / "curves")
    if a.get("casd"):
        written += F.export(F.casd_figure(a["casd"]["labels"], a["casd"]["matrix"], a["casd"]["metric"]),
                            F.casd_table(a["casd"]["labels"], a["casd"]["matrix"]), folder / "casd")
    return written
