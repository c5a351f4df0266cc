"""How much the unknown-trigger states aggregate with the known triggers' states.

Groups follow the probe set: ``clean:<label>``, ``unknown``, ``known:<name>``. Distances are
Euclidean in the space of ``X`` as given (no standardisation: pass what you want measured).

Why a label-controlled measure: at the last prompt token everything the model answers with the
same label sits together, so "the unknown trigger is near the known triggers" can be nothing more
than "both are predicted positive" (docs/findings.md, "What the representations showed").
``unknown_nearest_known_same_pred`` and ``aggregation_score`` therefore compare an unknown point
only with reference points the model gave the SAME predicted label:

- the clean reference for predicted label ``p`` is the centroid of all clean points (any clean
  group) predicted ``p``;
- the known reference for ``p`` is, per known trigger, the centroid of that trigger's points
  predicted ``p``.

``aggregation_score`` (the headline number, in [0, 1]): for each predicted label ``p`` that
unknown points carry and for which both references exist,

    r_p     = d(U_p, K_p) / d(U_p, C_p)
    score_p = clip(1 - r_p, 0, 1)

with ``U_p`` the centroid of the unknown points predicted ``p``, ``K_p`` the nearest known-trigger
centroid for ``p`` and ``C_p`` the clean centroid for ``p``; the score is the mean of ``score_p``
weighted by the number of unknown points predicted ``p``. 1: the unknown trigger sits on a known
trigger; 0: it is at least as close to clean inputs with the same answer as to any known trigger.
Because ``K_p`` and ``C_p`` share the unknown points' predicted label, a representation that
encodes only the answer puts them in the same place and gives ``r_p`` near 1, i.e. a score near 0.
Centroids (not per-point distances) are used so that a cluster lying exactly on a known trigger
scores 1 whatever its spread.

A metric that cannot be computed (a group missing, too few points, no predictions) is ``None``.
Rows of ``X`` containing NaN/inf are dropped first.
"""

from __future__ import annotations

import numpy as np

UNKNOWN = "unknown"


def _is_known(g: str) -> bool:
    return g.startswith("known:")


def _is_clean(g: str) -> bool:
    return g.startswith("clean:")


def _centroids(X: np.ndarray, groups: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    mask = np.ones(len(X), bool) if mask is None else mask
    return {g: X[(groups == g) & mask].mean(0) for g in dict.fromkeys(groups[mask].tolist())}


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b))


def _nearest_is_known(points: np.ndarray, refs: dict[str, np.ndarray]) -> np.ndarray:
    names = list(refs)
    C = np.stack([refs[n] for n in names])
    nearest = np.linalg.norm(points[:, None, :] - C[None], axis=-1).argmin(1)
    return np.array([_is_known(names[i]) for i in nearest], bool)


def _separation(X: np.ndarray, groups: np.ndarray) -> tuple[float | None, float | None]:
    """Silhouette and Davies-Bouldin of backdoor (unknown + known:*) = 1 vs clean = 0."""
    from sklearn.metrics import davies_bouldin_score, silhouette_score
    keep = np.array([g == UNKNOWN or _is_known(g) or _is_clean(g) for g in groups], bool)
    y = np.array([0 if _is_clean(g) else 1 for g in groups[keep]])
    Xk = X[keep]
    out = []
    for score in (silhouette_score, davies_bouldin_score):
        try:  # sklearn raises on one label, or as many labels as points
            v = float(score(Xk, y))
            out.append(v if np.isfinite(v) else None)
        except ValueError:
            out.append(None)
    return out[0], out[1]


def _same_pred(X: np.ndarray, groups: np.ndarray, preds: np.ndarray) -> tuple[float | None, float | None]:
    """(unknown_nearest_known_same_pred, aggregation_score); see the module docstring."""
    unknown = groups == UNKNOWN
    clean = np.array([_is_clean(g) for g in groups], bool)
    hits, n_counted = 0, 0
    weighted, weight = 0.0, 0
    for p in np.unique(preds[unknown]):
        same = preds == p
        if not (clean & same).any():
            continue
        c_ref = X[clean & same].mean(0)
        k_refs = {g: c for g, c in _centroids(X, groups, same).items() if _is_known(g)}
        if not k_refs:
            continue
        pts = X[unknown & same]
        hits += int(_nearest_is_known(pts, {**k_refs, "clean": c_ref}).sum())
        n_counted += len(pts)
        u = pts.mean(0)
        d_known = min(_dist(u, k) for k in k_refs.values())
        d_clean = _dist(u, c_ref)
        if d_clean > 0:
            score = float(np.clip(1.0 - d_known / d_clean, 0.0, 1.0))
        elif d_known > 0:
            score = 0.0  # on the clean reference itself
        else:
            continue  # references coincide: the label is all there is, nothing to measure
        weighted += score * len(pts)
        weight += len(pts)
    return (hits / n_counted if n_counted else None), (weighted / weight if weight else None)


def aggregation_metrics(X: np.ndarray, groups: list[str], preds: np.ndarray | None = None) -> dict:
    """Aggregation of the unknown trigger's states with the known triggers' (module docstring).

    Returns ``centroid_distance`` ({"unknown->G": float} for every other group G present),
    ``unknown_nearest_known`` (fraction of unknown points whose nearest group centroid, among all
    other groups, is a known trigger), ``silhouette`` and ``davies_bouldin`` (backdoor vs clean),
    ``unknown_nearest_known_same_pred`` and ``aggregation_score`` (label-controlled; ``None``
    without ``preds``), and ``n_unknown``.
    """
    X = np.asarray(X, dtype=np.float64)
    X = X.reshape(len(X), -1) if X.ndim != 2 else X
    groups = np.asarray(list(groups), dtype=object)
    if len(groups) != len(X):
        raise ValueError(f"{len(X)} rows but {len(groups)} groups")
    if preds is not None:
        preds = np.asarray(preds).reshape(-1)
        if len(preds) != len(X):
            raise ValueError(f"{len(X)} rows but {len(preds)} predictions")
    finite = np.isfinite(X).all(1)
    X, groups = X[finite], groups[finite]
    preds = preds[finite] if preds is not None else None

    out: dict = {"centroid_distance": None, "unknown_nearest_known": None, "silhouette": None,
                 "davies_bouldin": None, "unknown_nearest_known_same_pred": None, "aggregation_score": None,
                 "n_unknown": int((groups == UNKNOWN).sum())}
    if len(X) == 0:
        return out
    out["silhouette"], out["davies_bouldin"] = _separation(X, groups)
    if not out["n_unknown"]:
        return out
    cents = _centroids(X, groups)
    others = {g: c for g, c in cents.items() if g != UNKNOWN}
    out["centroid_distance"] = {f"unknown->{g}": _dist(cents[UNKNOWN], c) for g, c in sorted(others.items())}
    if others:
        out["unknown_nearest_known"] = float(_nearest_is_known(X[groups == UNKNOWN], others).mean())
    if preds is not None:
        out["unknown_nearest_known_same_pred"], out["aggregation_score"] = _same_pred(X, groups, preds)
    return out
