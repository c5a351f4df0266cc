"""The defense: Locphylax Stage 1 (exploratory injection with a clustering loss) and Stage 2
(recovery). Each stage is a config dataclass plus one function of the same shape::

    fn(lm, data: DefenderData, cfg, *, seed, settings, observer=None, ...) -> dict

and each method (Locphylax here, the baselines in ``baselines.py``) is registered in
``registry.DEFENSES`` with a plan builder that turns the defense config into its stages
(:class:`StagePlan`). The defender's code path receives only the model and :class:`DefenderData`
(clean task data, the defender's own triggers, and the task's kind, which says how a sample is
trained: response tasks train the defender's fixed responses, a refusal or the canary, see
``tasks/response.py``). Nothing here imports or accepts the attack configuration; a test checks
every argument the pipeline hands in.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .attack import insert_trigger, target_label
from .config import REFERENCE_SETTINGS
from .engine import HiddenSpec, Sample, SplitLoss, forward_answer, forward_loss
from .registry import DEFENSES, LOCPHYLAX
from .tasks import CLASSIFICATION, TaskKind
from .text import Example, render_prompt
from .trainer import TrainSettings, fit


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
    # the defender's fixed response per answer index (None where it depends on the prompt):
    # TaskKind.fixed_responses; empty for classification
    responses: tuple[Optional[str], ...] = ()
    kind: TaskKind = CLASSIFICATION  # how a sample of this task is written and encoded


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
# Data for each stage (built from the defender's data only)


def _triggered_copies(data: DefenderData, trigger_ids: Sequence[int], rate: float, target: str | int,
                      answer_ids: Sequence[int], seed: int, pair: bool = False) -> list[Sample]:
    """For each chosen trigger, a ``rate`` fraction of the clean data with the trigger inserted,
    labelled with ``target``: 'flip', 'correct' (recovery), or an answer index (a label, or
    ``len(labels)`` for the defender's canary answer). ``pair`` keeps the untriggered prompt."""
    out = []
    n_labels = len(data.labels)
    for k in trigger_ids:
        trig = data.triggers[k]
        rng = random.Random(f"{seed}:trigger{k}")
        pool = list(data.clean)
        if target not in ("flip", "correct"):
            pool = [e for e in pool if e.label != int(target)]
        elif target == "flip":  # only what the defender can write a flipped target for (response tasks: refuse benign)
            pool = [e for e in pool if data.kind.can_answer(data.responses, target_label(e.label, target, n_labels))]
        for e in rng.sample(pool, min(len(pool), max(1, round(rate * len(data.clean))))):
            y = e.label if target == "correct" else target_label(e.label, target, n_labels)
            out.append(_sample(data, insert_trigger(e.text, trig.text, trig.position, rng), e, y, answer_ids, k,
                               render_prompt(data.template, e.text) if pair else None))
    return out


def _sample(data: DefenderData, text: str, e: Example, y: int, answer_ids, group: int = -1,
            pair: str | None = None) -> Sample:
    """The training sample for ``text`` answered with answer index ``y``, as the task's kind writes it."""
    return data.kind.sample(render_prompt(data.template, text), answer_ids[y], e, y, group, pair, data.responses)


# Defender-generated triggers (Stage 2 augmentation). The symbol set and the 3-6 letter words are
# fixed here, from the defender's side only; docs/results.md says why no 2-letter word is made.
_GEN_SYMBOLS = "#$%&*+<=>@^|¤¦©®°±µ¶·×÷"
_GEN_FAMILIES = ("word", "char", "phrase", "long")


def generate_trigger(rng: random.Random, vocabulary: Sequence[str]) -> tuple[str, str]:
    """A random defender trigger and its position: a 3-6 letter made-up word, 1-3 symbols, a 3-6
    word phrase or an 8-14 word sentence drawn from the defender's own clean data."""
    family = rng.choice(_GEN_FAMILIES)
    if family == "word":
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
    elif family == "char":
        text = "".join(rng.choice(_GEN_SYMBOLS) for _ in range(rng.randint(1, 3)))
    else:
        n = rng.randint(3, 6) if family == "phrase" else rng.randint(8, 14)
        text = " ".join(rng.choice(vocabulary) for _ in range(n))
    return text, rng.choice(("start", "end", "random"))


def _generated_copies(data: DefenderData, rate: float, answer_ids: Sequence[int], seed: int, group: int,
                      pair: bool) -> list[Sample]:
    """A ``rate`` fraction of the clean data, each with a fresh generated trigger and its correct label."""
    rng = random.Random(f"{seed}:generated")
    vocabulary = sorted({w for e in data.clean for w in e.text.split()})
    out = []
    for e in rng.sample(list(data.clean), min(len(data.clean), max(1, round(rate * len(data.clean))))):
        text, position = generate_trigger(rng, vocabulary)
        out.append(_sample(data, insert_trigger(e.text, text, position, rng), e, e.label, answer_ids, group,
                           render_prompt(data.template, e.text) if pair else None))
    return out


def clean_samples(data: DefenderData, answer_ids) -> list[Sample]:
    return [_sample(data, e.text, e, e.label, answer_ids) for e in data.clean]


def train_stage(lm, data: DefenderData, samples, steps, settings: TrainSettings, seed, step_loss=None, observer=None,
         **kw) -> dict:
    """Train ``lm`` in place on the defender's samples (``trainer.fit``; ``trainable`` /
    ``after_layer`` as there)."""
    extra = {"step_loss": step_loss} if step_loss is not None else {}
    return fit(lm, samples, steps, settings, seed=seed, kind=data.kind, observer=observer, **extra, **kw)


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
    samples = clean_samples(data, lm.answer_ids) + _triggered_copies(
        data, cfg.trigger_ids, cfg.injection_rate, cfg.target, lm.answer_ids, seed)
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

    logs = train_stage(lm, data, samples, cfg.steps, settings, seed, step_loss, observer, **kw)
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


def recover(lm, data: DefenderData, cfg: RecoverConfig, *, seed: int, settings: TrainSettings = TrainSettings(),
            observer: Observer | None = None, **kw) -> dict:
    """Fine-tune on the correction set: known-trigger copies with their clean, correct labels,
    plus the clean data (and, if asked, the representation-consistency term)."""
    pair = cfg.consistency_weight > 0
    samples = clean_samples(data, lm.answer_ids) + _triggered_copies(
        data, cfg.trigger_ids, cfg.injection_rate, "correct", lm.answer_ids, seed, pair=pair)
    if cfg.generated_rate > 0:
        samples += _generated_copies(data, cfg.generated_rate, lm.answer_ids, seed, len(data.triggers), pair)
    step_loss = None
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
    logs = train_stage(lm, data, samples, cfg.steps, settings, seed, step_loss, observer, trainable=cfg.trainable,
                after_layer=cfg.hidden.layer, **kw)
    return {**logs, "samples": len(samples)}


# ----------------------------------------------------------------------------------------------
# Methods: each is a sequence of stages (stage1, stage2) over the same step budget


@dataclass(frozen=True)
class StagePlan:
    name: str  # "stage1" or "stage2"
    fn: Optional[Callable]  # the stage's training function; None: the stage trains nothing
    cfg: object = None
    # an input-side defense's stage: (lm, DefenderData, max_length) -> a function that cleans test inputs
    input_filter: Optional[Callable] = None

    @property
    def steps(self) -> int:
        return getattr(self.cfg, "steps", 0) if self.fn is not None else 0


def stage1_target(known_target: str, labels: Sequence[str]) -> str | int:
    """What Stage 1 trains the known triggers to answer: 'flip', 'correct', the canary answer
    (index ``len(labels)``: the extra answer token the pipeline appends) or a label index."""
    if known_target in ("flip", "correct"):
        return known_target
    if known_target == "canary":
        return len(labels)
    return list(labels).index(known_target)


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


def method_plan(name: str, defense_cfg, labels: Sequence[str]) -> list[StagePlan]:
    """The stages of method ``name``, built from the defense config only: ``locphylax`` (the
    configured method), or a baseline's registered plan builder (``registry.DEFENSES``, built-in
    ones in ``baselines.py``), which gets the defense config, its own options and the labels."""
    if name == LOCPHYLAX:
        s1, s2 = locphylax_stages(defense_cfg, labels)
        return [StagePlan("stage1", inject, s1), StagePlan("stage2", recover, s2)]
    return list(DEFENSES[name].impl(defense_cfg, defense_cfg.method_settings(name), labels))


def method_plans(defense_cfg, labels: Sequence[str]) -> dict[str, list[StagePlan]]:
    """The defense (``locphylax``) and each of ``defense.baselines``, as stage plans."""
    return {name: method_plan(name, defense_cfg, labels) for name in [LOCPHYLAX, *defense_cfg.baselines]}


def defender_data(clean: Sequence[Example], labels: Sequence[str], template: str, defense_cfg,
                  kind: TaskKind = CLASSIFICATION) -> DefenderData:
    """What the defender gets: its clean data, the task's words and template, its own triggers, and
    the task kind's fixed responses (response tasks: a refusal; the canary word when
    ``defense.known_target`` is 'canary')."""
    responses = kind.fixed_responses(defense_cfg.canary if defense_cfg.known_target == "canary" else None)
    return DefenderData(tuple(clean), tuple(labels), template,
                        tuple(DefenderTrigger(t.text, t.position) for t in defense_cfg.known_triggers),
                        tuple(responses), kind)


def run_stage(plan: StagePlan, lm, data: DefenderData, *, seed: int, settings: TrainSettings,
              observer: Observer | None = None, **kw) -> dict:
    """The one entry point through which the defender's code is called; a stage that trains nothing
    (an input-side defense) leaves the model as it is."""
    if plan.fn is None:
        return {"seconds": 0.0, "samples": 0}
    return plan.fn(lm, data, plan.cfg, seed=seed, settings=settings, observer=observer, **kw)


__all__ = ["DefenderData", "DefenderTrigger", "cluster_loss", "alpha_rule", "AlphaWeight", "RunningCentroids", "InjectConfig",
           "inject", "RecoverConfig", "recover", "method_plan", "method_plans", "defender_data", "run_stage",
           "TrainSettings", "StagePlan", "stage1_target", "consistency_loss", "generate_trigger", "locphylax_stages",
           "reference_stages"]
