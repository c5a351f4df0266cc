r"""CASD, the Cross Activation Shift Distance (docs/method.md, section 3).

For a base model ``M`` (here the victim) and a training ``A`` that turns it into ``M_A``:

- layer means: ``act(M)[l] = (1/N) sum_i (1/T_i) sum_t h_l(x_i)[t]``, the output of decoder block
  ``l`` averaged over the ``T_i`` non-pad tokens of probe prompt ``x_i`` and then over the ``N``
  prompts (every prompt weighs the same, whatever its length);
- the shift of training ``A``: ``s_A[l] = act(M_A)[l] - act(M)[l]``, one vector per layer;
- CASD between trainings ``A`` and ``B``, over the ``L`` layers:

  ``metric='cosine'`` (default)::

      CASD(A, B) = (1/L) sum_l (1 - <s_A[l], s_B[l]> / (|s_A[l]|_2 |s_B[l]|_2))

  ``metric='l1'``::

      CASD(A, B) = (1/L) sum_l |s_A[l] - s_B[l]|_1 / ((|s_A[l]|_1 + |s_B[l]|_1) / 2)

Both are 0 for identical shifts, symmetric, and lie in [0, 2]. The cosine form compares only
directions (how much each training moved a layer does not count); the L1 form also counts
magnitude, normalised per layer so that a layer with large activations does not dominate.
Degenerate layers: two zero shifts are at distance 0; a zero shift against a non-zero one is at
distance 1 (cosine) or 2 (L1).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .. import model as M
from ..config import load_run_config
from ..architectures import decoder_blocks
from ..engine import capture_output, encode
from ..errors import RunError
from ..runs import RunDir
from ..registry import DEFENSES, LOCPHYLAX, stage_key
from ..text import render_prompt
from .representations import load_probe

METRICS = ("cosine", "l1")


def default_trainings() -> dict[str, str]:
    """Locphylax's two stages and every registered defense's final stage, by label -> stage key."""
    return {"stage1": "stage1", "stage2": "stage2",
            **{e.name: stage_key(e.name, "stage2") for e in DEFENSES if e.name != LOCPHYLAX}}


def layer_means(model, tokenizer, template: str, texts: list[str], batch_size: int = 128,
                max_length: int | None = None) -> np.ndarray:
    """Mean output of every decoder block on the rendered prompts, ``[n_layers, d]`` float64:
    the mean over each prompt's non-pad tokens, then over prompts. The model is left as it was
    (the hooks are temporary, train/eval mode is restored, no gradients)."""
    blocks = decoder_blocks(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: the means must not depend on a random mask
    sums, n = None, 0
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                b = encode(tokenizer, [render_prompt(template, t) for t in texts[i:i + batch_size]], max_length, device)
                with contextlib.ExitStack() as stack:
                    stores = [stack.enter_context(capture_output(blk)) for blk in blocks]
                    model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                          logits_to_keep=1, use_cache=False)
                m = b.attention_mask.unsqueeze(-1).double()  # [B, T, 1]
                per_prompt = torch.stack([(s["out"].double() * m).sum(1) / m.sum(1).clamp(min=1) for s in stores])
                batch_sum = per_prompt.sum(1).cpu()  # [L, d]
                sums = batch_sum if sums is None else sums + batch_sum
                n += b.input_ids.shape[0]
    finally:
        model.train(was_training)
    if sums is None:
        raise ValueError("layer_means needs at least one text")
    return (sums / n).numpy()


def shift(base_means: np.ndarray, trained_means: np.ndarray) -> np.ndarray:
    """The activation shift of a training: ``trained - base``, ``[n_layers, d]``."""
    base_means, trained_means = np.asarray(base_means, np.float64), np.asarray(trained_means, np.float64)
    if base_means.shape != trained_means.shape:
        raise ValueError(f"shape mismatch: {base_means.shape} vs {trained_means.shape}")
    return trained_means - base_means


def _per_layer(s) -> np.ndarray:
    """``[n_layers, d]`` float64; a 1-D shift is one layer, extra axes are flattened per layer."""
    s = np.atleast_2d(np.asarray(s, np.float64))
    return s.reshape(s.shape[0], -1)


def casd(s_a: np.ndarray, s_b: np.ndarray, metric: str = "cosine") -> float:
    """The distance between two shifts ``[n_layers, d]`` (formulas in the module docstring)."""
    a, b = _per_layer(s_a), _per_layer(s_b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if metric == "cosine":
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        denom = na * nb
        cos = np.divide((a * b).sum(1), denom, out=np.zeros(len(a)), where=denom > 0)
        per_layer = 1.0 - np.clip(cos, -1.0, 1.0)
        per_layer[(na == 0) & (nb == 0)] = 0.0  # two layers that did not move are the same shift
    elif metric == "l1":
        scale = (np.abs(a).sum(1) + np.abs(b).sum(1)) / 2
        per_layer = np.divide(np.abs(a - b).sum(1), scale, out=np.zeros(len(a)), where=scale > 0)
    else:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return float(per_layer.mean())


def casd_matrix(shifts: dict[str, np.ndarray], metric: str = "cosine") -> tuple[list[str], np.ndarray]:
    """Pairwise CASD between the shifts, in the dict's order: symmetric with a zero diagonal."""
    labels = list(shifts)
    D = np.zeros((len(labels), len(labels)))
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            D[i, j] = D[j, i] = casd(shifts[labels[i]], shifts[labels[j]], metric)
    return labels, D


def run_casd(run: RunDir, trainings: dict[str, str] | None = None, metric: str = "cosine", *,
             batch_size: int = 128, device: str = "cpu", device_map=None, dtype=None) -> dict:
    """CASD between the trainings of a run, each relative to the ``victim`` checkpoint.

    ``trainings`` maps a label to a stage key; the default covers Locphylax's two stages and the
    baselines' final stages, restricted to those whose checkpoints exist. The probe texts are the
    run's probe set (all groups), rendered with the run's template. Returns ``labels``, ``matrix``
    (``casd_matrix``), ``metric`` and ``shifts_norm`` ({label: Frobenius norm of the shift over all
    layers}, how far each training moved the activations).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if trainings is None:
        trainings = {k: v for k, v in default_trainings().items() if run.checkpoint(v).is_dir()}
    missing = [v for v in trainings.values() if not run.checkpoint(v).is_dir()]
    if missing or not run.checkpoint("victim").is_dir():
        raise RunError(f"{run.path}: missing checkpoints {missing or ['victim']}")
    template = load_run_config(run.config_path).task.template
    tokenizer = M.load_tokenizer(str(run.tokenizer_dir))
    texts = [row["text"] for row in load_probe(run)]

    def means(key: str) -> np.ndarray:
        # one checkpoint at a time, read through hooks (no copy); device_map as stage_states
        model = M.load_checkpoint(run.checkpoint(key), device, device_map=device_map, dtype=dtype)
        return layer_means(model, tokenizer, template, texts, batch_size, M.model_max_positions(model))

    base = means("victim")
    shifts = {label: shift(base, means(key)) for label, key in trainings.items()}
    labels, D = casd_matrix(shifts, metric)
    return {"labels": labels, "matrix": D, "metric": metric,
            "shifts_norm": {label: float(np.linalg.norm(s)) for label, s in shifts.items()}}
