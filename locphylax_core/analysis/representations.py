"""Probe-set representations of a run's stages and their 2-D projections.

The stored states (``hidden/<key>.safetensors``, see docs/run_store.md) cover the default view,
the last decoder block at the last prompt token; any other layer or pooling is recomputed from the
stage checkpoint with the same prompt rendering and forward pass as the pipeline.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import model as M
from ..config import load_run_config
from ..engine import HiddenSpec, encode, forward_answer
from ..errors import RunError
from ..runs import RunDir, probe_row_problem, read_jsonl
from ..text import render_prompt

POSITIONS = ("last", "mean")
METHODS = ("pca", "tsne", "umap")


def warm_up(n: int = 256, width: int = 128) -> None:
    """Fit every projection once on random rows of about a live run's size: numba compiles UMAP's
    kernels into ``NUMBA_CACHE_DIR`` (tens of seconds on 2 cores), so a job started afterwards
    loads them instead of compiling on the way to its plots."""
    rows = np.random.default_rng(0).standard_normal((n, width))
    for method in METHODS:
        project({"a": rows[: n // 2], "b": rows[n // 2:]}, method, seed=0)


def load_probe(run: RunDir) -> list[dict]:
    """The run's fixed probe set: one dict per row with ``text``, ``group`` and ``label``."""
    path = run.probe_path
    rows, bad = read_jsonl(path, strict=True)  # RunFileError: missing, not a regular file, too large...
    if bad:
        raise RunError(f"{path}: corrupt (line {bad[0]} is not JSON)")
    for line, row in rows:
        problem = probe_row_problem(row)
        if problem:
            raise RunError(f"{path}: corrupt (line {line}: {problem})")
    return [row for _, row in rows]


def _stored(run: RunDir, key: str, name: str) -> np.ndarray:
    from safetensors.numpy import load_file
    path = run.hidden(key)
    if not path.is_file():
        raise RunError(f"{path}: no stored probe states for stage {key!r}")
    return load_file(str(path))[name]


def stage_states(run: RunDir, key: str, layer: int | None = None, position: str = "last",
                 after_final_norm: bool = False, *, batch_size: int = 64, device: str = "cpu",
                 device_map=None, dtype=None) -> np.ndarray:
    """Probe-set hidden states of stage ``key``, ``[n_probe, d]`` float32, rows in probe order.

    ``layer=None`` means the last block. The default view (last block or final norm, last prompt
    token) is read from the stored states; any other ``layer`` or ``position='mean'`` (average over
    the prompt's non-pad tokens) is recomputed from the stage checkpoint. ``after_final_norm``
    reads the final norm's output, whatever ``layer`` says.

    The checkpoint is loaded once and read through a forward hook on the one module (no copy of
    the weights); ``device_map='auto'`` (with e.g. ``dtype='bfloat16'``) spreads a model too big
    for one device over the visible ones, inputs going to the embedding's device (docs/scale.md).
    """
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    if layer is None and position == "last":
        return _stored(run, key, "final_norm" if after_final_norm else "last_block").astype(np.float32)
    ckpt = run.checkpoint(key)
    if not ckpt.is_dir():
        raise RunError(f"{ckpt}: no checkpoint for stage {key!r}")
    template = load_run_config(run.config_path).task.template
    tokenizer = M.load_tokenizer(str(run.tokenizer_dir))
    model = M.load_checkpoint(ckpt, device, device_map=device_map, dtype=dtype)
    spec = HiddenSpec(-1 if layer is None else layer, after_final_norm, position)
    max_length = M.model_max_positions(model)  # as the pipeline: embedded n_positions, or the HF context
    prompts = [render_prompt(template, row["text"]) for row in load_probe(run)]
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = encode(tokenizer, prompts[i:i + batch_size], max_length, input_device(model))
            _, h = forward_answer(model, batch, spec)
            out.append(h.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.hidden_size), np.float32)


def input_device(model) -> torch.device:
    """Where a model's inputs go: the input embedding's device (the first of a model spread by
    ``device_map``), else its first parameter's."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def stage_predictions(run: RunDir, key: str) -> np.ndarray:
    """Predicted label index per probe row, as stored with the stage's states."""
    return _stored(run, key, "pred").astype(np.int64)


def project(states: dict[str, np.ndarray], method: str = "pca", seed: int = 0) -> dict[str, np.ndarray]:
    """Project every stage's states to 2-D in ONE shared coordinate system.

    All stages' rows are concatenated, standardised with one shared ``StandardScaler`` and
    embedded by a single fit; the result is split back per stage (same keys, same row order).
    Why: the same probe input at two stages is then a comparable point, so movement between
    stages is movement, not an artefact of separate fits (separate PCA/t-SNE fits have arbitrary
    signs, rotations and scales). Cost: the fit sees ``n_stages x n`` points, and each stage's
    picture depends on which other stages were passed in.

    Methods: ``pca`` (sklearn PCA), ``tsne`` (sklearn TSNE, ``init='pca'``, perplexity
    ``min(30, (N-1)/3)``), ``umap`` (umap-learn, ``n_neighbors=min(15, N-1)``); N is the total
    number of rows (at least 3). Deterministic for a fixed ``seed``.
    """
    from sklearn.preprocessing import StandardScaler

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not states:
        return {}
    keys = list(states)
    arrays = [np.asarray(states[k], dtype=np.float64).reshape(len(states[k]), -1) for k in keys]
    if len({a.shape[1] for a in arrays}) != 1:
        raise ValueError(f"all stages need the same state width, got {[a.shape[1] for a in arrays]}")
    X = np.concatenate(arrays)
    n = len(X)
    if n < 3:
        raise ValueError(f"project needs at least 3 points in all, got {n}")
    X = StandardScaler().fit_transform(X)
    if method == "pca":
        from sklearn.decomposition import PCA
        k = min(2, X.shape[1])
        Y = PCA(n_components=k, random_state=seed).fit_transform(X)
        if k < 2:  # a 1-wide state: pad the second axis so callers always get [n, 2]
            Y = np.pad(Y, ((0, 0), (0, 2 - k)))
    elif method == "tsne":
        from sklearn.manifold import TSNE
        Y = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, (n - 1) / 3)).fit_transform(X)
    else:
        import umap
        # n_jobs=1: a seeded UMAP is single-threaded anyway (umap warns otherwise)
        Y = umap.UMAP(n_components=2, random_state=seed, n_neighbors=max(2, min(15, n - 1)), n_jobs=1).fit_transform(X)
    bounds = np.cumsum([0] + [len(a) for a in arrays])
    return {k: np.asarray(Y[bounds[i]:bounds[i + 1]], dtype=np.float64) for i, k in enumerate(keys)}
