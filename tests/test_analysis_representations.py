"""Probe states of a finished micro run, recomputed states, and aligned 2-D projections."""

from __future__ import annotations

import numpy as np
import pytest

from locphylax_core.analysis.metrics import aggregation_metrics
from locphylax_core.analysis.representations import load_probe, project, stage_predictions, stage_states


def test_probe_and_stored_states(micro_run):
    run = micro_run.run
    probe = load_probe(run)
    assert probe and all(set(r) == {"text", "group", "label"} for r in probe)
    assert {r["group"] for r in probe} == {"clean:negative", "clean:positive", "unknown", "known:t1", "known:t2"}
    finished = run.read_state()["finished"]
    assert {"victim", "stage1", "stage2", "clean_ft/stage2", "no_cluster/stage2"} <= set(finished)
    for key in finished:
        X = stage_states(run, key)
        assert X.shape == (len(probe), micro_run.cfg.model.n_embd) and X.dtype == np.float32
        assert stage_states(run, key, after_final_norm=True).shape == X.shape
        pred = stage_predictions(run, key)
        assert pred.shape == (len(probe),) and set(pred.tolist()) <= {0, 1}


def test_recomputed_states_match_the_stored_ones(micro_run):
    run = micro_run.run
    for key in ("victim", "unlearn_single/stage2"):
        np.testing.assert_allclose(stage_states(run, key, layer=-1, batch_size=7), stage_states(run, key), atol=1e-4)
        np.testing.assert_allclose(stage_states(run, key, layer=-1, after_final_norm=True),
                                   stage_states(run, key, after_final_norm=True), atol=1e-4)
    mean = stage_states(run, "stage2", layer=0, position="mean")
    assert mean.shape == stage_states(run, "stage2").shape and np.isfinite(mean).all()
    with pytest.raises(ValueError):
        stage_states(run, "stage2", position="first")


def test_metrics_on_stored_states(micro_run):
    """The pieces fit together: probe groups, stored states and predictions into aggregation_metrics."""
    run = micro_run.run
    groups = [r["group"] for r in load_probe(run)]
    for key in ("victim", "stage2"):
        m = aggregation_metrics(stage_states(run, key), groups, stage_predictions(run, key))
        assert set(m["centroid_distance"]) == {f"unknown->{g}" for g in set(groups) - {"unknown"}}
        assert 0 <= m["unknown_nearest_known"] <= 1 and m["silhouette"] is not None
        assert m["aggregation_score"] is None or 0 <= m["aggregation_score"] <= 1


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_project_aligned_and_deterministic(micro_run, method):
    run = micro_run.run
    states = {k: stage_states(run, k) for k in ("victim", "stage1", "stage2")}
    a = project(states, method, seed=0)
    assert list(a) == list(states)
    for k in states:
        assert a[k].shape == (len(states[k]), 2) and np.isfinite(a[k]).all()
    b = project(states, method, seed=0)
    for k in states:
        np.testing.assert_array_equal(a[k], b[k])


def test_project_shares_one_coordinate_system():
    """Identical states in two stages land on identical points: one fit, one scaler."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 5))
    out = project({"a": X, "b": X.copy(), "c": X + 3.0}, "pca")
    np.testing.assert_allclose(out["a"], out["b"])
    assert not np.allclose(out["a"], out["c"])
    with pytest.raises(ValueError):
        project({"a": X, "b": X[:, :3]}, "pca")
    with pytest.raises(ValueError):
        project({"a": X}, "lda")
    assert project({}, "pca") == {}


@pytest.mark.slow  # ~20 s, nearly all of it numba compiling umap on first use
def test_project_umap_shapes():
    pytest.importorskip("umap")
    rng = np.random.default_rng(0)
    states = {"a": rng.normal(size=(15, 6)), "b": rng.normal(size=(15, 6))}
    out = project(states, "umap", seed=0)
    assert {k: v.shape for k, v in out.items()} == {"a": (15, 2), "b": (15, 2)}
