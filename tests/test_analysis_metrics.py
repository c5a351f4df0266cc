"""aggregation_metrics on synthetic Gaussian clusters whose answers are known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from locphylax_core.analysis.metrics import aggregation_metrics

D = 16
CENTRES = {"clean:negative": -10 * np.eye(D)[0], "clean:positive": 10 * np.eye(D)[0],
           "known:t1": 10 * np.eye(D)[1], "known:t2": -10 * np.eye(D)[1]}


def cluster(rng, centre, n=40, sd=0.5, exact=False):
    pts = rng.normal(0, sd, (n, D))
    if exact:  # centroid exactly at `centre`
        pts -= pts.mean(0)
    return pts + centre


def build(unknown_centre, seed=0, exact=False):
    rng = np.random.default_rng(seed)
    blocks = {g: cluster(rng, c) for g, c in CENTRES.items()}
    if unknown_centre is not None:
        blocks["unknown"] = cluster(rng, unknown_centre, exact=exact)
    X = np.concatenate(list(blocks.values()))
    groups = [g for g, b in blocks.items() for _ in range(len(b))]
    return X, groups


def test_unknown_on_a_known_trigger():
    X, groups = build(None)
    t1 = X[np.array(groups) == "known:t1"].mean(0)
    X, groups = build(t1, exact=True)
    m = aggregation_metrics(X, groups, None)
    assert m["unknown_nearest_known"] == 1.0
    assert m["centroid_distance"]["unknown->known:t1"] == pytest.approx(0.0, abs=1e-9)
    assert set(m["centroid_distance"]) == {f"unknown->{g}" for g in CENTRES}
    assert m["centroid_distance"]["unknown->known:t2"] == pytest.approx(20.0, abs=0.5)
    assert m["n_unknown"] == 40
    assert m["aggregation_score"] is None and m["unknown_nearest_known_same_pred"] is None  # no preds


def test_unknown_far_on_the_clean_side():
    m = aggregation_metrics(*build(3 * CENTRES["clean:negative"]), None)
    assert m["unknown_nearest_known"] == 0.0
    assert m["centroid_distance"]["unknown->clean:negative"] == pytest.approx(20.0, abs=0.5)


def test_separation_scores():
    rng = np.random.default_rng(1)
    far = 50 * np.eye(D)[2]
    blocks = {"clean:negative": cluster(rng, np.eye(D)[0]), "clean:positive": cluster(rng, -np.eye(D)[0]),
              "unknown": cluster(rng, far), "known:t1": cluster(rng, far + np.eye(D)[1]),
              "known:t2": cluster(rng, far - np.eye(D)[1])}
    X = np.concatenate(list(blocks.values()))
    groups = [g for g, b in blocks.items() for _ in range(len(b))]
    m = aggregation_metrics(X, groups, None)
    assert m["silhouette"] > 0.9 and m["davies_bouldin"] < 0.2
    # the same points with shuffled groups: no separation left
    mixed = aggregation_metrics(X, list(np.random.default_rng(2).permutation(groups)), None)
    assert abs(mixed["silhouette"]) < 0.1 and mixed["davies_bouldin"] > 3


def label_only_world(seed=0, n=60, d=32):
    """States encode the predicted label only: everything predicted 1 at P, everything predicted 0 at N.
    Half of clean:positive is mispredicted, which pulls its group centroid to the middle."""
    rng = np.random.default_rng(seed)
    P, N = 10 * np.eye(d)[0], -10 * np.eye(d)[0]
    spec = [("clean:negative", 0, n), ("clean:positive", 1, n // 2), ("clean:positive", 0, n // 2),
            ("known:t1", 1, n), ("known:t2", 1, n), ("unknown", 1, n)]
    X = np.concatenate([rng.normal(0, 1, (k, d)) + (P if p else N) for _, p, k in spec])
    groups = [g for g, _, k in spec for _ in range(k)]
    preds = np.concatenate([np.full(k, p) for _, p, k in spec])
    return X, groups, preds


def test_label_control():
    """The unrestricted measure calls a label-only representation fully aggregated; the controlled ones do not."""
    X, groups, preds = label_only_world()
    m = aggregation_metrics(X, groups, preds)
    assert m["unknown_nearest_known"] == 1.0
    assert m["aggregation_score"] < 0.5
    # ... while an unknown trigger sitting exactly on a known one, apart from same-label clean inputs, scores 1
    g = np.array(groups)
    X2 = X.copy()
    u, t1 = g == "unknown", g == "known:t1"
    X2[t1] += 10 * np.eye(32)[1]
    X2[u] += X2[t1].mean(0) - X2[u].mean(0)
    m2 = aggregation_metrics(X2, groups, preds)
    assert m2["aggregation_score"] == pytest.approx(1.0)
    assert m2["unknown_nearest_known_same_pred"] == 1.0
    # ... and one sitting exactly on the same-label clean centroid scores 0
    X3 = X.copy()
    X3[u] += X3[(preds == 1) & np.char.startswith(g.astype(str), "clean:")].mean(0) - X3[u].mean(0)
    X3[t1] += 10 * np.eye(32)[1]
    X3[g == "known:t2"] += 10 * np.eye(32)[2]
    m3 = aggregation_metrics(X3, groups, preds)
    assert m3["aggregation_score"] == 0.0
    assert m3["unknown_nearest_known_same_pred"] == 0.0


def test_same_pred_needs_both_references():
    X, groups, preds = label_only_world()
    g = np.array(groups)
    preds = preds.copy()
    preds[g == "unknown"] = 0  # no known-trigger point is predicted 0: nothing to compare with
    m = aggregation_metrics(X, groups, preds)
    assert m["aggregation_score"] is None and m["unknown_nearest_known_same_pred"] is None
    assert m["unknown_nearest_known"] is not None


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_tiny_inputs_do_not_crash(n):
    groups = ["unknown", "known:t1", "clean:negative"][:n]
    X = np.arange(n * 4, dtype=float).reshape(n, 4)
    m = aggregation_metrics(X, groups, np.zeros(n, int))
    assert set(m) >= {"centroid_distance", "unknown_nearest_known", "silhouette", "davies_bouldin",
                      "unknown_nearest_known_same_pred", "aggregation_score"}
    if n < 3:
        assert m["silhouette"] is None  # one class, or as many labels as points


def test_missing_groups_and_nan():
    X, groups = build(CENTRES["known:t1"])
    keep = [i for i, g in enumerate(groups) if g != "unknown"]
    m = aggregation_metrics(X[keep], [groups[i] for i in keep], None)
    assert m["centroid_distance"] is None and m["unknown_nearest_known"] is None and m["n_unknown"] == 0
    assert m["silhouette"] is not None
    X = X.copy()
    X[0, 3] = np.nan
    X[-1, 0] = np.inf
    m = aggregation_metrics(X, groups, None)
    assert m["n_unknown"] == 39 and m["unknown_nearest_known"] == 1.0
    assert all(math.isfinite(v) for v in m["centroid_distance"].values())
    with pytest.raises(ValueError):
        aggregation_metrics(X, groups[:-1], None)
