"""The defense: Locphylax Stage 1 (exploratory injection with a clustering loss) and Stage 2
(recovery), and the baselines, each a config dataclass plus one function of the same shape::

    fn(lm, data: DefenderData, cfg, *, seed, observer=None, ...) -> dict

The defender's code path receives only the model and :class:`DefenderData` (clean task data and
the defender's own triggers). Nothing here imports or accepts the attack configuration; a test
checks every argument the pipeline hands in.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

from .attack import insert_trigger, target_label
from .engine import HiddenSpec, Sample, batches, forward_answer, train_loop
from .tasks import Example, render_prompt


@dataclass(frozen=True)
class DefenderTrigger:
    text: str
    position: str = "random"


@dataclass(frozen=True)
class DefenderData:
    """Everything the defender has besides the model."""

    clean: tuple[Example, ...]  # clean, correctly labelled task data
    labels: tuple[str, ...]  # the task's label words
    template: str  # the task's prompt template
    triggers: tuple[DefenderTrigger, ...]  # the defender's own known triggers (t1, t2, ...)


Observer = Callable[[int, dict], None]  # (step, training logs); returns nothing to the defense


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
    """``alpha = 10 ** (floor(log10 L_inj) - floor(log10 L_cluster))`` from the first batch, so
    both terms start at the same order of magnitude. A zero clustering loss gives alpha = 1."""
    if l_cluster <= 0 or not math.isfinite(l_cluster) or l_inj <= 0:
        return 1.0
    return 10.0 ** (math.floor(math.log10(l_inj)) - math.floor(math.log10(l_cluster)))


# ----------------------------------------------------------------------------------------------
# Data for each stage (built from the defender's data only)


def _triggered_copies(data: DefenderData, trigger_ids: Sequence[int], rate: float, target: str | int,
                      answer_ids: Sequence[int], seed: int) -> list[Sample]:
    """For each chosen trigger, a ``rate`` fraction of the clean data with the trigger inserted,
    labelled with ``target`` ('flip', a label index, or 'correct' for recovery)."""
    out = []
    n_labels = len(data.labels)
    for k in trigger_ids:
        trig = data.triggers[k]
        rng = random.Random(f"{seed}:trigger{k}")
        pool = list(data.clean)
        if target not in ("flip", "correct"):
            pool = [e for e in pool if e.label != int(target)]
        for e in rng.sample(pool, min(len(pool), max(1, round(rate * len(data.clean))))):
            y = e.label if target == "correct" else target_label(e.label, target, n_labels)
            out.append(Sample(render_prompt(data.template, insert_trigger(e.text, trig.text, trig.position, rng)),
                              answer_ids[y], k))
    return out


def _clean_samples(data: DefenderData, answer_ids) -> list[Sample]:
    return [Sample(render_prompt(data.template, e.text), answer_ids[e.label]) for e in data.clean]


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings shared by every defense stage."""

    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: Optional[int] = None
    every: int = 25
    lora: Optional[object] = None  # a config.LoraConfig with enabled=True, or None


def _run(lm, samples, steps, settings: TrainSettings, seed, step_loss=None, observer=None, **kw) -> dict:
    from .model import merge_lora, with_lora
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data_iter = batches(samples, lm.tokenizer, settings.batch_size, settings.max_length, lm.device, gen)
    if settings.lora is not None:
        lm.model = with_lora(lm.model, settings.lora)
    try:
        extra = {"step_loss": step_loss} if step_loss is not None else {}
        logs = train_loop(lm.model, data_iter, steps, settings.lr, weight_decay=settings.weight_decay,
                          grad_clip=settings.grad_clip, on_step=observer, every=settings.every, **extra, **kw)
    finally:
        lm.model = merge_lora(lm.model)
    return logs


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


def inject(lm, data: DefenderData, cfg: InjectConfig, *, seed: int, settings: TrainSettings = TrainSettings(),
           observer: Observer | None = None, **kw) -> dict:
    """Train ``L = L_inj + alpha * L_cluster`` on the defender's clean data mixed with copies that
    carry the known triggers and the defender's target."""
    samples = _clean_samples(data, lm.answer_ids) + _triggered_copies(
        data, cfg.trigger_ids, cfg.injection_rate, cfg.target, lm.answer_ids, seed)
    state = {"alpha": 0.0 if not cfg.cluster else (None if cfg.alpha == "auto" else float(cfg.alpha))}
    running = RunningCentroids(cfg.centroid_momentum) if cfg.centroid == "running" else None

    def step_loss(model, batch, step):
        need_h = cfg.cluster
        logits, h = forward_answer(model, batch, cfg.hidden if need_h else None)
        l_inj = torch.nn.functional.cross_entropy(logits.float(), batch.targets)
        if not need_h:
            return l_inj, {"loss": l_inj.item(), "l_inj": l_inj.item()}
        h = h.float()
        cents = running.update(h, batch.groups) if running is not None else None
        l_cl = cluster_loss(h, batch.groups, cents)
        if state["alpha"] is None:  # fixed from the first batch's losses
            state["alpha"] = alpha_rule(l_inj.item(), l_cl.item())
        loss = l_inj + state["alpha"] * l_cl
        return loss, {"loss": loss.item(), "l_inj": l_inj.item(), "l_cluster": l_cl.item(), "alpha": state["alpha"]}

    logs = _run(lm, samples, cfg.steps, settings, seed, step_loss, observer, **kw)
    return {**logs, "alpha": state["alpha"], "samples": len(samples)}


# ----------------------------------------------------------------------------------------------
# Stage 2: recovery fine-tuning


@dataclass(frozen=True)
class RecoverConfig:
    steps: int = 150
    trigger_ids: tuple[int, ...] = (0, 1)
    injection_rate: float = 0.3


def recover(lm, data: DefenderData, cfg: RecoverConfig, *, seed: int, settings: TrainSettings = TrainSettings(),
            observer: Observer | None = None, **kw) -> dict:
    """Fine-tune on the correction set: known-trigger copies with their clean, correct labels,
    plus the clean data."""
    samples = _clean_samples(data, lm.answer_ids) + _triggered_copies(
        data, cfg.trigger_ids, cfg.injection_rate, "correct", lm.answer_ids, seed)
    logs = _run(lm, samples, cfg.steps, settings, seed, None, observer, **kw)
    return {**logs, "samples": len(samples)}


# ----------------------------------------------------------------------------------------------
# Baseline: clean fine-tuning


@dataclass(frozen=True)
class CleanFinetuneConfig:
    steps: int = 150


def clean_finetune(lm, data: DefenderData, cfg: CleanFinetuneConfig, *, seed: int,
                   settings: TrainSettings = TrainSettings(), observer: Observer | None = None, **kw) -> dict:
    """Fine-tune on the defender's clean data only."""
    logs = _run(lm, _clean_samples(data, lm.answer_ids), cfg.steps, settings, seed, None, observer, **kw)
    return {**logs, "samples": len(data.clean)}


# ----------------------------------------------------------------------------------------------
# Methods: each is a sequence of (stage name, function, config) over the same step budget


@dataclass(frozen=True)
class StagePlan:
    name: str  # "stage1" or "stage2"
    fn: Callable
    cfg: object


def method_plans(defense_cfg, labels: Sequence[str]) -> dict[str, list[StagePlan]]:
    """The defense and its baselines, built from the defense config only."""
    d = defense_cfg
    target = d.known_target if d.known_target == "flip" else list(labels).index(d.known_target)
    hidden = HiddenSpec(d.layer, d.after_final_norm, d.token_position)
    all_ids = tuple(range(len(d.known_triggers)))
    s1 = InjectConfig(steps=d.stage1_steps, trigger_ids=all_ids, target=target, injection_rate=d.injection_rate,
                      cluster=True, alpha=d.alpha, hidden=hidden, centroid=d.centroid,
                      centroid_momentum=d.centroid_momentum)
    s2 = RecoverConfig(steps=d.stage2_steps, trigger_ids=all_ids, injection_rate=d.injection_rate)
    plans = {"locphylax": [StagePlan("stage1", inject, s1), StagePlan("stage2", recover, s2)]}
    builders = {
        "no_cluster": lambda: [StagePlan("stage1", inject, replace(s1, cluster=False)), StagePlan("stage2", recover, s2)],
        "unlearn_single": lambda: [StagePlan("stage1", inject, replace(s1, cluster=False, trigger_ids=(0,))),
                                   StagePlan("stage2", recover, replace(s2, trigger_ids=(0,)))],
        "clean_ft": lambda: [StagePlan("stage1", clean_finetune, CleanFinetuneConfig(d.stage1_steps)),
                             StagePlan("stage2", clean_finetune, CleanFinetuneConfig(d.stage2_steps))],
    }
    for name in d.baselines:
        plans[name] = builders[name]()
    return plans


def defender_data(clean: Sequence[Example], labels: Sequence[str], template: str, defense_cfg) -> DefenderData:
    return DefenderData(tuple(clean), tuple(labels), template,
                        tuple(DefenderTrigger(t.text, t.position) for t in defense_cfg.known_triggers))


def run_stage(plan: StagePlan, lm, data: DefenderData, *, seed: int, settings: TrainSettings,
              observer: Observer | None = None, **kw) -> dict:
    """The one entry point through which the pipeline calls the defender's code."""
    return plan.fn(lm, data, plan.cfg, seed=seed, settings=settings, observer=observer, **kw)


__all__ = ["DefenderData", "DefenderTrigger", "cluster_loss", "alpha_rule", "RunningCentroids", "InjectConfig",
           "inject", "RecoverConfig", "recover", "CleanFinetuneConfig", "clean_finetune", "method_plans",
           "defender_data", "run_stage", "TrainSettings", "StagePlan"]
