"""analyze_run on a micro run: analysis.json keys and arrays, figures, exports, the notebook."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from locphylax_core.analysis import analyze_run, export_figures, load_arrays
from locphylax_core.analysis import figures as F
from locphylax_core.analysis.representations import load_probe, stage_predictions
from locphylax_core.runs import RunDir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def analysed(micro_run, tmp_path_factory):
    """A copy of the shared micro run (so the shared folder stays as the pipeline left it), analysed."""
    dst = tmp_path_factory.mktemp("analysed") / micro_run.run.run_id
    shutil.copytree(micro_run.run.path, dst)
    run = RunDir(dst)
    result = analyze_run(run, methods=("pca", "tsne"), n_probe_heads=40)
    return run, result, micro_run


def test_analysis_json_keys_and_stages(analysed):
    run, result, micro = analysed
    stored = json.loads((run.path / "analysis.json").read_text())
    assert stored["schema"] == 1
    assert {"aggregation", "head_ablation", "casd", "projections", "seconds", "stages"} <= set(stored)
    finished = micro.run.read_state()["finished"]
    assert stored["stages"] == [k for k in finished if k != "clean"]
    assert set(stored["aggregation"]) == set(stored["stages"])
    for metrics in stored["aggregation"].values():
        assert {"centroid_distance", "unknown_nearest_known", "aggregation_score", "silhouette"} <= set(metrics)
    assert set(stored["head_ablation"]) == {"victim", "stage1", "stage2"}
    assert set(stored["projections"]) == {"pca", "tsne"}


def test_projection_arrays_are_aligned_per_stage(analysed):
    run, result, micro = analysed
    n_probe = len(load_probe(run))
    for method, info in result["projections"].items():
        arrays = load_arrays(run.path / info["file"])
        assert sorted(arrays) == sorted(k.replace("/", "__") for k in info["stages"])
        for a in arrays.values():
            assert a.shape == (n_probe, 2) and np.isfinite(a).all()


def test_head_arrays_shape_and_files(analysed):
    run, result, micro = analysed
    cfg = micro.cfg.model
    for key, h in result["head_ablation"].items():
        assert np.asarray(h["delta_cacc"]).shape == (cfg.n_layer, cfg.n_head)
        assert set(h["delta_asr"]) == {"unknown", "t1", "t2"}
        arrays = load_arrays(run.path / h["file"])
        np.testing.assert_allclose(arrays["delta_cacc"], np.asarray(h["delta_cacc"]), atol=1e-6)
        assert len(h["critical_heads"]) <= cfg.n_layer * cfg.n_head


def test_casd_block(analysed):
    _, result, _ = analysed
    c = result["casd"]
    m = np.asarray(c["matrix"])
    assert m.shape == (len(c["labels"]), len(c["labels"]))
    np.testing.assert_allclose(m, m.T)
    np.testing.assert_allclose(np.diag(m), 0)
    assert "stage2" in c["labels"] and "clean_ft" in c["labels"]


def test_figures_from_stored_arrays(analysed):
    run, result, micro = analysed
    probe = load_probe(run)
    info = result["projections"]["pca"]
    arrays = load_arrays(run.path / info["file"])
    coords = {k: arrays[k.replace("/", "__")] for k in info["stages"]}
    preds = {k: stage_predictions(run, k) for k in coords}
    fig = F.projection_figure(coords, probe, preds, micro.cfg.task.labels, "pca")
    groups = list(dict.fromkeys(r["group"] for r in probe))
    assert len(fig.data) == len(groups) and len(fig.frames) == len(coords)
    # hover carries the input text, its group and the answer
    first = fig.data[0]
    assert first.customdata[0][0] == [r["text"] for r in probe if r["group"] == groups[0]][0]
    assert first.customdata[0][2] in micro.cfg.task.labels
    table = F.projection_table(coords, probe, preds, micro.cfg.task.labels)
    assert len(table) == len(probe) * len(coords)

    before = np.array([[0.2, -0.1], [0.0, 0.4]])
    after = np.array([[0.1, -0.1], [0.0, 0.0]])
    hm = F.head_heatmaps(before, after)
    assert len(hm.data) == 3 and all(t.zmid == 0 for t in hm.data)
    np.testing.assert_allclose(np.asarray(hm.data[2].z), after - before)

    rows = run.read_metrics()
    curves = F.curve_table(rows, "locphylax")
    assert list(dict.fromkeys(curves["stage"])) == ["clean", "victim", "stage1", "stage2"]
    assert curves["global_step"].is_monotonic_increasing or curves.sort_values("global_step").shape == curves.shape
    cf = F.curves_figure(rows, ["locphylax", "clean_ft"])
    assert len(cf.layout.shapes) == 3  # stage boundaries: victim, stage1, stage2


def test_export_writes_standalone_html_and_csv(analysed, tmp_path):
    run, _, _ = analysed
    files = export_figures(run, tmp_path / "figs", method="pca")
    names = sorted(p.name for p in files)
    assert {"projection_pca.html", "projection_pca.csv", "heads_unknown.html", "curves.csv", "casd.csv"} <= set(names)
    html = (tmp_path / "figs" / "projection_pca.html").read_text()
    # standalone: plotly.js is inlined (megabytes), not loaded from a CDN at view time
    assert "<html>" in html and 'src="https://cdn.plot.ly' not in html and len(html) > 1_000_000


def test_notebook_reproduces_every_figure(analysed):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    run, _, _ = analysed
    nb = nbformat.read(ROOT / "notebooks" / "run_figures.ipynb", as_version=4)
    env_before = os.environ.get("LOCPHYLAX_RUN")
    os.environ["LOCPHYLAX_RUN"] = str(run.path)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        if env_before is None:
            os.environ.pop("LOCPHYLAX_RUN", None)
        else:
            os.environ["LOCPHYLAX_RUN"] = env_before
    last = nb.cells[-1].outputs[0]["text"]
    for name in ("projection_pca", "projection_tsne", "heads", "curves", "casd"):
        assert f"'{name}'" in last


def test_the_runs_eval_analyses_choose_the_parts_and_analyze_all_adds_the_rest(micro_run, tmp_path, monkeypatch):
    """A run configured like the live preset (eval.projections [pca], eval.analyses [heads]) gets
    those parts only; `locphylax analyze --all` asks for every one, and a --no-X flag still wins."""
    import yaml

    from locphylax_core import cli
    dst = tmp_path / "runs" / micro_run.run.run_id
    shutil.copytree(micro_run.run.path, dst)
    cfg = yaml.safe_load((dst / "config.yaml").read_text())
    cfg["eval"].update(projections=["pca"], analyses=["heads"], head_probe=8)
    (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = analyze_run(RunDir(dst))
    assert list(out["projections"]) == ["pca"] and out["head_ablation"]
    assert out["casd"] is None and not out["logit_lens"] and not out["patching"]
    asked = []

    def fake(run, **kw):
        asked.append(kw)
        return out
    monkeypatch.setattr(cli, "analyze_run", fake)
    for flags in ([], ["--all", "--no-heads"]):
        assert cli.main(["--runs", str(tmp_path / "runs"), "analyze", micro_run.run.run_id, *flags]) == 0
    parts = [{k: kw[k] for k in ("methods", "heads", "casd", "layers")} for kw in asked]
    assert parts[0] == {"methods": None, "heads": None, "casd": None, "layers": None}  # the run's own config
    assert parts[1] == {"methods": ["pca", "tsne", "umap"], "heads": False, "casd": True, "layers": True}
