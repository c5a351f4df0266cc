"""Baseline: fine-pruning (Liu et al. 2018): prune the MLP units of one block that are least
active on clean data, then fine-tune on clean data with the pruned units held at zero.

Checked against BackdoorBench's implementation (SCLBD/BackdoorBench, defense/fp.py; defaults in
config/defense/fp/*.yaml: acc_ratio 0.1, once_prune_ratio 0.01): units are sorted by their mean
activation on clean data, then pruned in steps of ceil(1% of the units) while the clean accuracy
stays within a relative 10% of the unpruned model's; the last model within the tolerance is
fine-tuned. Where this differs, and why:
- activity is the mean MAGNITUDE (mean |a| over non-pad tokens): BackdoorBench's signed mean is
  "least active" only after a ReLU; GELU and SwiGLU units take negative values (``rank: signed``
  keeps the signed mean);
- the accuracy is measured on a held-out part of the defender's clean data (``holdout``), not on
  the test set (the defender has no test set); ranking uses the rest;
- the tolerance is a DROP: BackdoorBench's ``abs(acc - acc0) / acc0 < acc_ratio`` also stops when
  accuracy RISES by more than 10%;
- pruning ``num`` prunes ``num`` units (BackdoorBench's ``seq_sort[0:num_pruned - 1]`` prunes one
  fewer than it records), and the model kept is the last one within the tolerance
  (BackdoorBench's ``last_net`` is the same object as the net it keeps pruning, so it fine-tunes
  the first model past the tolerance);
- fine-tuning uses all of the defender's clean data (the held-out part only stops the pruning).
``prune_rate`` (a number) prunes that fixed fraction instead, without the accuracy rule.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from pydantic import Field

from ..architectures import MLPUnits, block_mlp
from ..config import Options
from ..evaluation import accuracy, encoded_batches, predict
from ..registry import DEFENSES
from ..text import Example
from ..trainer import StageContext, fit
from .base import (DefenderData, StagePlan, clean_samples)


@dataclass(frozen=True)
class FinePruneConfig:
    steps: int = 150
    # None: step by step until clean accuracy falls past acc_ratio; > 0: that fixed fraction of the
    # block's MLP units; 0: no new pruning (keep those already pruned: fine-pruning's Stage 2)
    prune_rate: float | None = 0.0
    layer: int = -1  # the decoder block whose MLP is pruned
    max_examples: int = 512  # clean inputs used to measure activity
    acc_ratio: float = 0.1  # tolerated relative drop of held-out clean accuracy (BackdoorBench's)
    step_ratio: float = 0.01  # fraction of the units pruned per step (BackdoorBench's once_prune_ratio)
    holdout: float = 0.2  # fraction of the defender's clean data that measures the accuracy
    rank: str = "magnitude"  # "magnitude": mean |activation|; "signed": mean activation (ReLU's view)


def unit_slice(axis: int, ndim: int, units):
    """An index selecting ``units`` along ``axis`` of a tensor with ``ndim`` dimensions."""
    return tuple(units if d == axis else slice(None) for d in range(ndim))


def _keep_mask(keep: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """``keep`` (one value per unit) shaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    return keep.view(*[-1 if d == axis else 1 for d in range(ndim)])


@torch.no_grad()
def mlp_unit_activity(lm, data: DefenderData, layer: int = -1, max_examples: int = 512,
                      batch_size: int = 64, max_length: int | None = None, magnitude: bool = True,
                      examples: Sequence[Example] | None = None) -> torch.Tensor:
    """Mean activation (``magnitude``: mean absolute activation) of each MLP unit of block
    ``layer`` over the non-pad tokens of clean prompts (``examples``, default the defender's clean
    data): the input of the MLP's output projection (GPT-2: act(c_fc(x)); GPT-NeoX:
    act(dense_h_to_4h(x)); Llama-style: act(gate(x)) * up(x))."""
    out_proj = block_mlp(lm.model, layer).output[0]
    texts = [e.text for e in (data.clean if examples is None else examples)[:max_examples]]
    total, count = None, 0
    was_training = lm.model.training
    lm.model.eval()
    store: dict = {}
    handle = out_proj.register_forward_pre_hook(lambda _mod, args: store.__setitem__("out", args[0]))
    try:
        for _, b in encoded_batches(lm.tokenizer, data.template, texts, batch_size, max_length, lm.device):
            lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                     logits_to_keep=1, use_cache=False)
            mask = b.attention_mask.unsqueeze(-1).to(store["out"].dtype)
            act = store["out"].float()
            s = ((act.abs() if magnitude else act) * mask).sum((0, 1))
            total = s if total is None else total + s
            count += int(b.attention_mask.sum())
    finally:
        handle.remove()
    lm.model.train(was_training)
    return total / max(1, count)


def prune_schedule(n_units: int, step_ratio: float) -> list[int]:
    """The unit counts tried, as BackdoorBench's loop: 0, k, 2k, ... below ``n_units`` (k =
    ceil(step_ratio * n_units))."""
    return list(range(0, n_units, max(1, math.ceil(n_units * step_ratio))))


def adaptive_prune_count(accuracy_at: Callable[[int], float], n_units: int, step_ratio: float,
                         acc_ratio: float) -> tuple[int, list[tuple[int, float]]]:
    """How many of the least active units to prune: the largest count of :func:`prune_schedule`
    reached before the clean accuracy first drops by ``acc_ratio`` (relative) or more below the
    unpruned accuracy; and the (count, accuracy) curve measured on the way."""
    counts = prune_schedule(n_units, step_ratio)
    base = accuracy_at(0)
    curve, kept = [(0, base)], 0
    for num in counts[1:]:
        acc = accuracy_at(num)
        curve.append((num, acc))
        drop = (base - acc) / base if base > 0 else 0.0  # relative, as BackdoorBench's (but a drop only)
        if drop >= acc_ratio:  # past the tolerance: keep the previous count
            break
        kept = num
    return kept, curve


def _pruned_units(mlp: MLPUnits) -> torch.Tensor:
    """Units whose incoming weights and biases are all zero in every input projection (pruned by
    an earlier stage)."""
    zero = torch.ones(mlp.n_units, dtype=torch.bool, device=mlp.inputs[0][0].weight.device)
    for mod, axis in mlp.inputs:
        zero &= (mod.weight == 0).all(1 - axis)
        if getattr(mod, "bias", None) is not None:
            zero &= mod.bias == 0
    return zero.nonzero().flatten()


def _holdout_split(data: DefenderData, fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(ranking part, held-out part) of the defender's clean data, by a seeded shuffle."""
    rows = list(data.clean)
    random.Random(f"{seed}:fine_pruning_holdout").shuffle(rows)
    n_held = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    return rows[n_held:], rows[:n_held]


def fine_prune(lm, data: DefenderData, cfg: FinePruneConfig, ctx: StageContext) -> dict:
    """Prune the least active MLP units of one block (``prune_rate`` None: step by step while the
    held-out clean accuracy stays within ``acc_ratio``; a number: that fraction; 0: none), then
    fine-tune on the clean data; pruned units stay at zero (their gradients are masked by
    temporary hooks). Any MLP of the architecture table (``architectures.ARCHITECTURES``)."""
    seed, settings = ctx.seed, ctx.settings
    mlp = block_mlp(lm.model, cfg.layer)
    n_units = mlp.n_units
    extra: dict = {}
    if cfg.prune_rate is None or cfg.prune_rate > 0:
        ranked, held = _holdout_split(data, cfg.holdout, seed) if cfg.prune_rate is None else (list(data.clean), [])
        activity = mlp_unit_activity(lm, data, cfg.layer, cfg.max_examples, settings.batch_size,
                                     settings.max_length, magnitude=cfg.rank == "magnitude", examples=ranked)
        already = set(_pruned_units(mlp).tolist())  # an earlier stage's units stay pruned and are not re-counted
        order = [u for u in torch.argsort(activity).tolist() if u not in already]
        original = [(t, t.detach().clone()) for t, _ in mlp.tensors()]

        def prune_first(k: int) -> None:
            with torch.no_grad():
                for (t, saved), (_, axis) in zip(original, mlp.tensors()):
                    t.copy_(saved)
                    if k:
                        t[unit_slice(axis, t.dim(), torch.tensor(order[:k], device=t.device))] = 0

        if cfg.prune_rate is None:
            texts, labels = [e.text for e in held], [e.label for e in held]

            def accuracy_at(k: int) -> float:
                prune_first(k)
                pred = predict(lm, data.template, texts, settings.batch_size, settings.max_length).tolist()
                return accuracy(pred, labels)

            k, curve = adaptive_prune_count(accuracy_at, len(order), cfg.step_ratio, cfg.acc_ratio)
            extra = {"holdout": len(held), "clean_acc_unpruned": curve[0][1],
                     "clean_acc_pruned": dict(curve).get(k, curve[0][1]), "prune_curve": curve}
        else:
            k = int(round(cfg.prune_rate * n_units))
        prune_first(min(k, len(order)))
    units = _pruned_units(mlp)
    keep_in = torch.ones(n_units, device=mlp.inputs[0][0].weight.device)
    keep_in[units] = 0
    hooks = [t.register_hook(lambda g, m=_keep_mask(keep_in, axis, t.dim()): g * m) for t, axis in mlp.tensors()]
    try:
        logs = fit(lm, clean_samples(data, lm.answer_ids), cfg.steps, ctx, kind=data.kind)
    finally:
        for h in hooks:
            h.remove()
    return {**logs, **extra, "samples": len(data.clean), "pruned": int(len(units)), "units": n_units}


class FinePruningOptions(Options):
    # None (default): prune step by step (step_ratio of the units at a time) until the held-out clean
    # accuracy falls acc_ratio (relative) below the unpruned model's, BackdoorBench's rule; a number:
    # that fixed fraction of the block's MLP units (the earlier behaviour; block: defense.layer)
    prune_rate: float | None = Field(None, gt=0, lt=1)
    acc_ratio: float = Field(0.1, gt=0, lt=1)  # BackdoorBench's default tolerance
    step_ratio: float = Field(0.01, gt=0, le=0.5)  # BackdoorBench's once_prune_ratio
    holdout: float = Field(0.2, gt=0, lt=1)  # fraction of the defender's clean data held out for the accuracy
    rank: Literal["magnitude", "signed"] = "magnitude"  # mean |activation| (any activation) or signed mean (ReLU)


def fine_pruning_plan(d, opts: FinePruningOptions, labels):
    prune = dict(acc_ratio=opts.acc_ratio, step_ratio=opts.step_ratio, holdout=opts.holdout, rank=opts.rank)
    return [StagePlan("stage1", fine_prune, FinePruneConfig(d.stage1_steps, opts.prune_rate, d.layer, **prune)),
            StagePlan("stage2", fine_prune, FinePruneConfig(d.stage2_steps, 0.0, d.layer, **prune))]


DEFENSES.register("fine_pruning", fine_pruning_plan, label="fine-pruning", options=FinePruningOptions, kind="model")
