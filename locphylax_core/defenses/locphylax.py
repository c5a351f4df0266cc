"""Locphylax, the project's method (method.md): Stage 1 injects the defender's known triggers with a
clustering loss on final-layer states, Stage 2 recovers; and its variants, each registered in one
line: ``locphylax`` (the configured method: ``defense.method`` locphylax or locphylax+, whose
defaults the config applies), ``reference`` (the paper's method as specified,
config.REFERENCE_SETTINGS), ``no_cluster`` (its ablation without the clustering term) and
``unlearn_single`` (the reference recipe on the first known trigger only, no clustering).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from ..config import REFERENCE_SETTINGS
from ..engine import HiddenSpec, SplitLoss, answer_loss, forward_answer, forward_loss
from ..registry import DEFENSES, LOCPHYLAX
from ..trainer import StageContext, fit
from .base import (DefenderData, StagePlan, clean_samples, generated_copies, stage1_target,
                   triggered_copies)


# ----------------------------------------------------------------------------------------------
# The clustering loss and the alpha rule (method.md, section 2)


def cluster_loss(h: torch.Tensor, groups: torch.Tensor, centroids: Optional[dict] = None) -> torch.Tensor:
    """``sum_k mean_{i in I_k} ||h_i - mu_k||^2`` plus the cross-trigger terms
    ``sum_{k != j} mean_{i in I_k} ||h_i - mu_j||^2`` (for two triggers: t1 toward mu_t2 and t2
    toward mu_t1). ``groups[i]`` is the trigger index of row i, -1 for clean rows (ignored).

    Centroids are the batch means of each trigger's states, with gradient (the formula as
    written). If ``centroids`` is a dict, it holds running estimates that are used instead
    (see :class:`RunningCentroids`). Triggers absent from the batch contribute nothing.
    """
    present = [int(k) for k in torch.unique(groups) if k >= 0]
    if not present:
        return h.sum() * 0.0
    mus = {k: (centroids[k] if centroids is not None else h[groups == k].mean(0)) for k in present}
    total = h.new_zeros(())
    for k in present:
        hk = h[groups == k]
        for j in present:  # j == k: compactness; j != k: cross-trigger alignment
            total = total + ((hk - mus[j]) ** 2).sum(-1).mean()
    return total


class RunningCentroids:
    """Exponential moving averages of each trigger's mean state (detached): a steadier target
    than a batch mean when batches hold few triggered rows."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.mu: dict[int, torch.Tensor] = {}

    def update(self, h: torch.Tensor, groups: torch.Tensor) -> dict:
        for k in (int(k) for k in torch.unique(groups) if k >= 0):
            m = h[groups == k].mean(0).detach()
            self.mu[k] = m if k not in self.mu else self.momentum * self.mu[k] + (1 - self.momentum) * m
        return self.mu


def alpha_rule(l_inj: float, l_cluster: float) -> float:
    """``alpha = 10 ** (floor(log10 L_inj) - floor(log10 L_cluster))`` from the first batch that holds
    known-trigger rows (:class:`AlphaWeight`), so
    both terms start at the same order of magnitude. A zero clustering loss gives alpha = 1."""
    if l_cluster <= 0 or not math.isfinite(l_cluster) or l_inj <= 0:
        return 1.0
    return 10.0 ** (math.floor(math.log10(l_inj)) - math.floor(math.log10(l_cluster)))


class AlphaWeight:
    """The clustering term's weight over a stage: a fixed number, or ``auto`` (``value`` None
    until then): :func:`alpha_rule` on the losses of the first batch that holds known-trigger
    rows. A batch without them has a zero clustering loss, so it cannot set the scale (fixing
    alpha there would freeze it at 1 for the whole stage); its term is weighted 0 meanwhile."""

    def __init__(self, alpha: float | None):
        self.value = alpha

    def __call__(self, l_inj: float, l_cluster: float, groups: torch.Tensor) -> float:
        if self.value is None and bool((groups >= 0).any()):
            self.value = alpha_rule(l_inj, l_cluster)
        return 0.0 if self.value is None else self.value

    def logs(self) -> dict:
        return {} if self.value is None else {"alpha": self.value}


def consistency_loss(h: torch.Tensor, h_clean: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``mean_{i triggered} mean_d (h_i - sg(h_clean_i))^2``: the representation-recovery term of
    Stage 2 (CROW-like). ``h_clean[i]`` is the same sentence without its trigger; it is a fixed
    target (no gradient). Clean rows (group -1) contribute nothing."""
    rows = groups >= 0
    if not bool(rows.any()):
        return h.sum() * 0.0
    return ((h[rows] - h_clean[rows].detach()) ** 2).mean()


# ----------------------------------------------------------------------------------------------
# Stage 1: exploratory backdoor injection


@dataclass(frozen=True)
class InjectConfig:
    steps: int = 150
    trigger_ids: tuple[int, ...] = (0, 1)  # which of DefenderData.triggers to inject
    target: str | int = "flip"  # "flip" or a label index
    injection_rate: float = 0.3
    cluster: bool = True  # False: the "without clustering" ablation (alpha = 0)
    alpha: str | float = "auto"
    hidden: HiddenSpec = HiddenSpec()
    centroid: str = "batch"  # "batch" or "running"
    centroid_momentum: float = 0.9


def inject(lm, data: DefenderData, cfg: InjectConfig, ctx: StageContext) -> dict:
    """Train ``L = L_inj + alpha * L_cluster`` on the defender's clean data mixed with copies that
    carry the known triggers and the defender's target."""
    samples = clean_samples(data, lm.answer_ids) + triggered_copies(
        data, cfg.trigger_ids, cfg.injection_rate, cfg.target, lm.answer_ids, ctx.seed)
    alpha = AlphaWeight(0.0 if not cfg.cluster else (None if cfg.alpha == "auto" else float(cfg.alpha)))
    running = RunningCentroids(cfg.centroid_momentum) if cfg.centroid == "running" else None

    def step_loss(model, batch, step):
        need_h = cfg.cluster
        l_inj, h = forward_loss(model, batch, cfg.hidden if need_h else None)
        if not need_h:
            return l_inj, {"loss": l_inj.item(), "l_inj": l_inj.item()}
        h = h.float()
        cents = running.update(h, batch.groups) if running is not None else None
        l_cl = cluster_loss(h, batch.groups, cents)
        loss = l_inj + alpha(l_inj.item(), l_cl.item(), batch.groups) * l_cl
        return loss, {"loss": loss.item(), "l_inj": l_inj.item(), "l_cluster": l_cl.item(), **alpha.logs()}

    if cfg.cluster:  # grad accumulation / data parallelism: centroids of the whole batch (engine.SplitLoss)
        def rows(model, batch):
            l_inj, h = forward_loss(model, batch, cfg.hidden)
            return l_inj, h.float(), None

        def term(h, _consts, groups, l_inj, step):
            cents = running.update(h, groups) if running is not None else None
            l_cl = cluster_loss(h, groups, cents)
            t = alpha(l_inj, l_cl.item(), groups) * l_cl
            return t, {"loss": l_inj + t.item(), "l_inj": l_inj, "l_cluster": l_cl.item(), **alpha.logs()}

        step_loss.split = SplitLoss(rows, term)

    logs = fit(lm, samples, cfg.steps, ctx, kind=data.kind, step_loss=step_loss)
    return {**logs, "alpha": alpha.value, "samples": len(samples)}


# ----------------------------------------------------------------------------------------------
# Stage 2: recovery fine-tuning


@dataclass(frozen=True)
class RecoverConfig:
    steps: int = 150
    trigger_ids: tuple[int, ...] = (0, 1)
    injection_rate: float = 0.3
    # CROW-style representation recovery: + weight * mean ||h(triggered x) - sg(h(x))||^2 / d,
    # pulling each known-triggered input's state to the same sentence's clean state.
    consistency_weight: float = 0.0
    hidden: HiddenSpec = HiddenSpec()
    trainable: str = "all"  # "all", "after_layer" (after hidden.layer) or "lora"
    generated_rate: float = 0.0  # fraction of clean samples also seen with a generated trigger


def recover(lm, data: DefenderData, cfg: RecoverConfig, ctx: StageContext) -> dict:
    """Fine-tune on the correction set: known-trigger copies with their clean, correct labels,
    plus the clean data (and, if asked, the representation-consistency term)."""
    pair = cfg.consistency_weight > 0
    samples = clean_samples(data, lm.answer_ids) + triggered_copies(
        data, cfg.trigger_ids, cfg.injection_rate, "correct", lm.answer_ids, ctx.seed, pair=pair)
    if cfg.generated_rate > 0:
        samples += generated_copies(data, cfg.generated_rate, lm.answer_ids, ctx.seed, len(data.triggers), pair)
    step_loss = answer_loss  # the plain answer loss unless the consistency term is asked for
    if pair:
        def step_loss(model, batch, step):
            l_ce, h = forward_loss(model, batch, cfg.hidden)
            rows = batch.groups >= 0
            if not bool(rows.any()):
                return l_ce, {"loss": l_ce.item(), "l_ce": l_ce.item(), "l_consistency": 0.0}
            with torch.no_grad():
                _, h_clean = forward_answer(model, batch.pair, cfg.hidden)
            l_cons = consistency_loss(h.float(), h_clean.float(), batch.groups)
            loss = l_ce + cfg.consistency_weight * l_cons
            return loss, {"loss": loss.item(), "l_ce": l_ce.item(), "l_consistency": l_cons.item()}

        def rows(model, batch):  # accumulation / data parallelism: the term over the whole batch
            l_ce, h = forward_loss(model, batch, cfg.hidden)
            h_clean = h.detach()
            if bool((batch.groups >= 0).any()):
                with torch.no_grad():
                    _, h_clean = forward_answer(model, batch.pair, cfg.hidden)
            return l_ce, h.float(), h_clean.float()

        def term(h, h_clean, groups, l_ce, step):
            l_cons = consistency_loss(h, h_clean, groups)
            t = cfg.consistency_weight * l_cons
            return t, {"loss": l_ce + t.item(), "l_ce": l_ce, "l_consistency": l_cons.item()}

        step_loss.split = SplitLoss(rows, term)
    logs = fit(lm, samples, cfg.steps, ctx, kind=data.kind, step_loss=step_loss, trainable=cfg.trainable,
               after_layer=cfg.hidden.layer)
    return {**logs, "samples": len(samples)}


def locphylax_stages(d, labels: Sequence[str]) -> tuple[InjectConfig, RecoverConfig]:
    """Stage 1 and Stage 2 of the configured method (``defense.method``: the paper's, or locphylax+)."""
    hidden = HiddenSpec(d.layer, d.after_final_norm, d.token_position)
    all_ids = tuple(range(len(d.known_triggers)))
    s1 = InjectConfig(steps=d.stage1_steps, trigger_ids=all_ids, target=stage1_target(d.known_target, labels),
                      injection_rate=d.injection_rate, cluster=True, alpha=d.alpha, hidden=hidden,
                      centroid=d.centroid, centroid_momentum=d.centroid_momentum)
    s2 = RecoverConfig(steps=d.stage2_steps, trigger_ids=all_ids, injection_rate=d.injection_rate,
                       consistency_weight=d.consistency_weight, hidden=hidden, trainable=d.stage2_params,
                       generated_rate=d.stage2_generated_rate)
    return s1, s2


def reference_stages(d, labels: Sequence[str]) -> tuple[InjectConfig, RecoverConfig]:
    """The paper's method as method.md specifies it (config.REFERENCE_SETTINGS), with the same known
    triggers and budget."""
    return locphylax_stages(d.model_copy(update=REFERENCE_SETTINGS), labels)


# ----------------------------------------------------------------------------------------------
# The plans, registered in one line each


def locphylax_plan(d, _opts, labels) -> list[StagePlan]:
    s1, s2 = locphylax_stages(d, labels)
    return [StagePlan("stage1", inject, s1), StagePlan("stage2", recover, s2)]


def no_cluster_plan(d, _opts, labels):
    s1, s2 = locphylax_stages(d, labels)
    return [StagePlan("stage1", inject, replace(s1, cluster=False)), StagePlan("stage2", recover, s2)]


def reference_plan(d, _opts, labels):
    r1, r2 = reference_stages(d, labels)
    return [StagePlan("stage1", inject, r1), StagePlan("stage2", recover, r2)]


def unlearn_single_plan(d, _opts, labels):
    r1, r2 = reference_stages(d, labels)
    return [StagePlan("stage1", inject, replace(r1, cluster=False, trigger_ids=(0,))),
            StagePlan("stage2", recover, replace(r2, trigger_ids=(0,)))]


DEFENSES.register(LOCPHYLAX, locphylax_plan, label="Locphylax", kind="model")
DEFENSES.register("unlearn_single", unlearn_single_plan, label="single-trigger unlearning", kind="model")
DEFENSES.register("no_cluster", no_cluster_plan, label="Locphylax without clustering", kind="model")
DEFENSES.register("reference", reference_plan, label="Locphylax (paper reference)", kind="model")

__all__ = ["cluster_loss", "alpha_rule", "AlphaWeight", "RunningCentroids", "consistency_loss", "InjectConfig", "inject",
           "RecoverConfig", "recover", "locphylax_stages", "reference_stages", "locphylax_plan", "reference_plan",
           "no_cluster_plan", "unlearn_single_plan"]
