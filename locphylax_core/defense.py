"""The defense: Locphylax Stage 1 (exploratory injection with a clustering loss) and Stage 2
(recovery), and the baselines, each a config dataclass plus one function of the same shape::

    fn(lm, data: DefenderData, cfg, *, seed, observer=None, ...) -> dict

The defender's code path receives only the model and :class:`DefenderData` (clean task data and
the defender's own triggers). Generative tasks (jailbreak, refusal) train responses instead of
answer tokens: their DefenderData carries ``responses``, the defender's fixed response per answer
index (a refusal; the canary), and Stage 1's known-trigger targets are 'canary' (the canary
response), 'correct' (the clean response) or 'flip' (a refusal of a benign request; harmful requests
get no flipped copy): see ``generative.py``. Nothing here imports or accepts the attack configuration; a test
checks every argument the pipeline hands in.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch

from .attack import insert_trigger, target_label
from .engine import (HiddenSpec, Sample, SplitLoss, batches, decoder_blocks, final_norm,
                     forward_answer, forward_loss, output_loss, train_loop)
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
    # generative tasks: the defender's response for each fixed answer index (None where the answer
    # depends on the prompt): generative.fixed_responses; empty for classification
    responses: tuple[Optional[str], ...] = ()


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
        elif target == "flip" and data.responses:  # generative: only what has a fixed opposite (refuse benign)
            pool = [e for e in pool if data.responses[target_label(e.label, target, n_labels)] is not None]
        for e in rng.sample(pool, min(len(pool), max(1, round(rate * len(data.clean))))):
            y = e.label if target == "correct" else target_label(e.label, target, n_labels)
            out.append(_sample(data, insert_trigger(e.text, trig.text, trig.position, rng), e, y, answer_ids, k,
                               render_prompt(data.template, e.text) if pair else None))
    return out


def _sample(data: DefenderData, text: str, e: Example, y: int, answer_ids, group: int = -1,
            pair: str | None = None) -> Sample:
    """The training sample for ``text`` answered with answer index ``y``; for a generative task
    with a response: the clean one when ``y`` is the example's own label, else the fixed one."""
    if not data.responses:
        return Sample(render_prompt(data.template, text), answer_ids[y], group, pair)
    response = e.response if y == e.label else data.responses[y]
    return Sample(render_prompt(data.template, text), answer_ids[y], group, pair, response)


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


def _clean_samples(data: DefenderData, answer_ids) -> list[Sample]:
    return [_sample(data, e.text, e, e.label, answer_ids) for e in data.clean]


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
    schedule: str = "constant"  # learning-rate schedule of every stage: "constant" or "cosine" (to 10%)
    grad_accum: int = 1  # micro-batches per step (engine.train_loop; the effective batch stays batch_size)
    bf16: bool = False  # bfloat16 autocast of the training forward passes
    grad_checkpointing: bool = False  # activation checkpointing of the decoder blocks while training


def _freeze_up_to(model, layer: int) -> list[torch.nn.Parameter]:
    """Freeze every parameter except the decoder blocks after ``layer``, the final norm and the
    output head; returns the parameters it froze. With tied input/output embeddings (GPT-2) the
    head is the embedding matrix, so that stays trainable too."""
    blocks = decoder_blocks(model)
    keep = {id(p) for b in list(blocks)[(layer % len(blocks)) + 1:] for p in b.parameters()}
    norm = final_norm(model)
    if norm is not None:
        keep |= {id(p) for p in norm.parameters()}
    keep |= {id(p) for p in model.get_output_embeddings().parameters()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _run(lm, samples, steps, settings: TrainSettings, seed, step_loss=None, observer=None,
         trainable: str = "all", after_layer: int = -1, **kw) -> dict:
    """Train ``lm`` in place. ``trainable``: 'all', 'after_layer' (only what follows block
    ``after_layer``) or 'lora' (a LoRA adapter, merged back at the end)."""
    from .config import LoraConfig
    from .model import merge_lora, with_lora
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data_iter = batches(samples, lm.tokenizer, settings.batch_size, settings.max_length, lm.device, gen)
    lora = settings.lora if settings.lora is not None else (LoraConfig(enabled=True) if trainable == "lora" else None)
    frozen = _freeze_up_to(lm.model, after_layer) if trainable == "after_layer" else []
    if lora is not None:
        lm.model = with_lora(lm.model, lora)
    try:
        extra = {"step_loss": step_loss} if step_loss is not None else {}
        logs = train_loop(lm.model, data_iter, steps, settings.lr, weight_decay=settings.weight_decay,
                          grad_clip=settings.grad_clip, schedule=settings.schedule, on_step=observer,
                          every=settings.every, grad_accum=settings.grad_accum, bf16=settings.bf16,
                          grad_checkpointing=settings.grad_checkpointing, **extra, **kw)
    finally:
        lm.model = merge_lora(lm.model)
        for p in frozen:
            p.requires_grad_(True)
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
        l_inj, h = forward_loss(model, batch, cfg.hidden if need_h else None)
        if not need_h:
            return l_inj, {"loss": l_inj.item(), "l_inj": l_inj.item()}
        h = h.float()
        cents = running.update(h, batch.groups) if running is not None else None
        l_cl = cluster_loss(h, batch.groups, cents)
        if state["alpha"] is None:  # fixed from the first batch's losses
            state["alpha"] = alpha_rule(l_inj.item(), l_cl.item())
        loss = l_inj + state["alpha"] * l_cl
        return loss, {"loss": loss.item(), "l_inj": l_inj.item(), "l_cluster": l_cl.item(), "alpha": state["alpha"]}

    if cfg.cluster:  # grad accumulation / data parallelism: centroids of the whole batch (engine.SplitLoss)
        def rows(model, batch):
            l_inj, h = forward_loss(model, batch, cfg.hidden)
            return l_inj, h.float(), None

        def term(h, _consts, groups, l_inj, step):
            cents = running.update(h, groups) if running is not None else None
            l_cl = cluster_loss(h, groups, cents)
            if state["alpha"] is None:
                state["alpha"] = alpha_rule(l_inj, l_cl.item())
            t = state["alpha"] * l_cl
            return t, {"loss": l_inj + t.item(), "l_inj": l_inj, "l_cluster": l_cl.item(), "alpha": state["alpha"]}

        step_loss.split = SplitLoss(rows, term)

    logs = _run(lm, samples, cfg.steps, settings, seed, step_loss, observer, **kw)
    return {**logs, "alpha": state["alpha"], "samples": len(samples)}


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
    samples = _clean_samples(data, lm.answer_ids) + _triggered_copies(
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
    logs = _run(lm, samples, cfg.steps, settings, seed, step_loss, observer, trainable=cfg.trainable,
                after_layer=cfg.hidden.layer, **kw)
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
# Baseline: fine-pruning (Liu et al. 2018): prune the MLP units of one block that are least
# active on clean data, then fine-tune on clean data with the pruned units held at zero


@dataclass(frozen=True)
class FinePruneConfig:
    steps: int = 150
    prune_rate: float = 0.0  # fraction of the block's MLP units to prune first (0: keep those already pruned)
    layer: int = -1  # the decoder block whose MLP is pruned
    max_examples: int = 512  # clean inputs used to measure activity


@dataclass
class MLPUnits:
    """The intermediate units of one block's MLP, whatever the architecture: ``inputs`` are the
    projections that produce the units (``(module, unit_axis)`` of their weight; a unit is one
    output of each), ``output`` the projection that reads them. Unit ``i`` is pruned by zeroing
    its output row/column (and bias) in every input projection and its column/row in the output
    projection; its activation is the output projection's input."""

    mlp: torch.nn.Module
    inputs: list  # [(module, unit_axis of module.weight)]
    output: tuple  # (module, unit_axis of module.weight)

    @property
    def n_units(self) -> int:
        mod, axis = self.inputs[0]
        return mod.weight.shape[axis]

    def tensors(self):
        """``(tensor, unit_axis)`` of every weight and bias that holds a unit's parameters."""
        out = []
        for mod, axis in self.inputs:
            out.append((mod.weight, axis))
            if getattr(mod, "bias", None) is not None:
                out.append((mod.bias, 0))
        mod, axis = self.output
        out.append((mod.weight, axis))
        return out


# block.mlp's layout per architecture: (input projections, output projection). GPT-2's Conv1D
# stores weight as [in, out], nn.Linear as [out, in].
_MLP_LAYOUTS = (
    (("c_fc",), "c_proj", 1, 0),  # GPT-2: c_proj(act(c_fc(x)))
    (("dense_h_to_4h",), "dense_4h_to_h", 0, 1),  # GPT-NeoX
    (("gate_proj", "up_proj"), "down_proj", 0, 1),  # Llama / Qwen2 / Mistral: down(act(gate(x)) * up(x))
)


def _block_mlp(model, layer: int) -> MLPUnits:
    block = decoder_blocks(model)[layer]
    mlp = getattr(block, "mlp", None)
    for ins, out, in_axis, out_axis in _MLP_LAYOUTS:
        if mlp is not None and all(hasattr(mlp, n) for n in (*ins, out)):
            return MLPUnits(mlp, [(getattr(mlp, n), in_axis) for n in ins], (getattr(mlp, out), out_axis))
    from .errors import ConfigError
    raise ConfigError("defense.baselines: fine_pruning needs a GPT-2 (mlp.c_fc / c_proj), GPT-NeoX "
                      "(mlp.dense_h_to_4h / dense_4h_to_h) or Llama-style (mlp.gate_proj / up_proj / down_proj) "
                      f"MLP; this model's block is {type(block).__name__}")


def _along(axis: int, ndim: int, units):
    """An index selecting ``units`` along ``axis`` of a tensor with ``ndim`` dimensions."""
    return tuple(units if d == axis else slice(None) for d in range(ndim))


def _keep_mask(keep: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """``keep`` (one value per unit) shaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    return keep.view(*[-1 if d == axis else 1 for d in range(ndim)])


@torch.no_grad()
def mlp_unit_activity(lm, data: DefenderData, layer: int = -1, max_examples: int = 512,
                      batch_size: int = 64, max_length: int | None = None) -> torch.Tensor:
    """Mean activation of each MLP unit of block ``layer`` over the non-pad tokens of clean prompts:
    the input of the MLP's output projection (GPT-2: act(c_fc(x)); GPT-NeoX: act(dense_h_to_4h(x));
    Llama-style: act(gate(x)) * up(x))."""
    from .evaluation import encoded_batches
    out_proj = _block_mlp(lm.model, layer).output[0]
    texts = [e.text for e in data.clean[:max_examples]]
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
            s = (store["out"].float() * mask).sum((0, 1))
            total = s if total is None else total + s
            count += int(b.attention_mask.sum())
    finally:
        handle.remove()
    lm.model.train(was_training)
    return total / max(1, count)


def _pruned_units(mlp: MLPUnits) -> torch.Tensor:
    """Units whose incoming weights and biases are all zero in every input projection (pruned by
    an earlier stage)."""
    zero = torch.ones(mlp.n_units, dtype=torch.bool, device=mlp.inputs[0][0].weight.device)
    for mod, axis in mlp.inputs:
        zero &= (mod.weight == 0).all(1 - axis)
        if getattr(mod, "bias", None) is not None:
            zero &= mod.bias == 0
    return zero.nonzero().flatten()


def fine_prune(lm, data: DefenderData, cfg: FinePruneConfig, *, seed: int, settings: TrainSettings = TrainSettings(),
               observer: Observer | None = None, **kw) -> dict:
    """Prune (if ``prune_rate`` > 0) the least active MLP units of one block, then fine-tune on
    the clean data; pruned units stay at zero (their gradients are masked by temporary hooks).
    Any MLP layout of :data:`_MLP_LAYOUTS` (GPT-2, GPT-NeoX, Llama / Qwen2 / Mistral)."""
    mlp = _block_mlp(lm.model, cfg.layer)
    n_units = mlp.n_units
    if cfg.prune_rate > 0:
        activity = mlp_unit_activity(lm, data, cfg.layer, cfg.max_examples, settings.batch_size,
                                     settings.max_length)
        k = int(round(cfg.prune_rate * n_units))
        units = torch.argsort(activity)[:k]
        with torch.no_grad():
            for t, axis in mlp.tensors():
                t[_along(axis, t.dim(), units)] = 0
    units = _pruned_units(mlp)
    keep_in = torch.ones(n_units, device=mlp.inputs[0][0].weight.device)
    keep_in[units] = 0
    hooks = [t.register_hook(lambda g, m=_keep_mask(keep_in, axis, t.dim()): g * m) for t, axis in mlp.tensors()]
    try:
        logs = _run(lm, _clean_samples(data, lm.answer_ids), cfg.steps, settings, seed, None, observer, **kw)
    finally:
        for h in hooks:
            h.remove()
    return {**logs, "samples": len(data.clean), "pruned": int(len(units)), "units": n_units}


# ----------------------------------------------------------------------------------------------
# Baseline: CROW (Min et al. 2025): fine-tuning on clean data with a layer-to-layer consistency
# regulariser computed on adversarially perturbed input embeddings


@dataclass(frozen=True)
class CrowConfig:
    steps: int = 150
    weight: float = 1.0  # lambda: weight of the consistency term
    epsilon: float = 0.1  # size of the FGSM perturbation of the input embeddings (per coordinate)


def layer_consistency(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over consecutive layer pairs and non-pad tokens of ``1 - cos(h_l, h_{l+1})``."""
    mask = attention_mask.float()
    terms = []
    for a, b in zip(hidden_states[1:-1], hidden_states[2:]):  # the block outputs (index 0: embeddings)
        cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
        terms.append(((1 - cos) * mask).sum() / mask.sum().clamp(min=1))
    return torch.stack(terms).mean() if terms else hidden_states[0].sum() * 0.0


def crow(lm, data: DefenderData, cfg: CrowConfig, *, seed: int, settings: TrainSettings = TrainSettings(),
         observer: Observer | None = None, **kw) -> dict:
    """Clean fine-tuning plus ``weight`` x the layer consistency of inputs whose embeddings were
    moved by one FGSM step of size ``epsilon`` in the direction that breaks consistency most."""

    def hidden(model, batch, embeds):  # generative batches (labels set) need every position's logits
        return model(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                     output_hidden_states=True, logits_to_keep=1 if batch.labels is None else 0, use_cache=False)

    def step_loss(model, batch, step):
        embeds = model.get_input_embeddings()(batch.input_ids)
        out = hidden(model, batch, embeds)
        l_ce = output_loss(out.logits, batch)
        probe = embeds.detach().requires_grad_(True)
        g, = torch.autograd.grad(layer_consistency(hidden(model, batch, probe).hidden_states, batch.attention_mask),
                                 probe)
        perturbed = embeds + cfg.epsilon * g.sign()
        l_cons = layer_consistency(hidden(model, batch, perturbed).hidden_states, batch.attention_mask)
        loss = l_ce + cfg.weight * l_cons
        return loss, {"loss": loss.item(), "l_ce": l_ce.item(), "l_consistency": l_cons.item()}

    logs = _run(lm, _clean_samples(data, lm.answer_ids), cfg.steps, settings, seed, step_loss, observer, **kw)
    return {**logs, "samples": len(data.clean)}


# ----------------------------------------------------------------------------------------------
# Baseline: ONION (Qi et al. 2021), input-side: before the model answers, drop the words whose
# removal makes the input most fluent. The model is left as it is; fluency is the model's own
# next-token loss (there is no separate clean LM here). The bar is set on the defender's clean
# data: a word is dropped when its removal lowers the loss more than it does for all but
# (1 - clean_quantile) of the words of clean sentences.


@dataclass(frozen=True)
class OnionConfig:
    clean_quantile: float = 0.95
    max_examples: int = 300  # clean sentences used to set the bar


@torch.no_grad()
def _prompt_nll(lm, template: str, texts: Sequence[str], max_length, batch_size: int = 256) -> torch.Tensor:
    """Mean next-token loss of each rendered prompt (the model's own fluency score)."""
    from .evaluation import encoded_batches
    out = torch.empty(len(texts))
    for idx, b in encoded_batches(lm.tokenizer, template, list(texts), batch_size, max_length, lm.device):
        logits = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                          use_cache=False).logits[:, :-1].float()
        tgt = b.input_ids[:, 1:]
        mask = (b.attention_mask[:, 1:] * b.attention_mask[:, :-1]).float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
        out[idx] = ((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu()
    return out


def onion_suspicion(lm, template: str, texts: Sequence[str], max_length=None) -> list[list[float]]:
    """Per text, per word: loss of the whole text minus loss without that word (> 0: the word
    makes the text less fluent)."""
    variants, owner = list(texts), []
    for t_i, t in enumerate(texts):
        words = t.split()
        for w_i in range(len(words)):
            variants.append(" ".join(words[:w_i] + words[w_i + 1:]))
            owner.append(t_i)
    nll = _prompt_nll(lm, template, variants, max_length)
    scores: list[list[float]] = [[] for _ in texts]
    for k, t_i in enumerate(owner):
        scores[t_i].append(float(nll[t_i] - nll[len(texts) + k]))
    return scores


def onion_filter(lm, data: DefenderData, cfg: OnionConfig, max_length=None):
    """A function that cleans input texts, its bar set on the defender's clean sentences."""
    import numpy as np
    clean_scores = [s for row in onion_suspicion(lm, data.template, [e.text for e in data.clean[:cfg.max_examples]],
                                                 max_length) for s in row]
    bar = float(np.quantile(clean_scores, cfg.clean_quantile)) if clean_scores else 0.0

    def clean_inputs(texts: Sequence[str]) -> list[str]:
        out = []
        for t, scores in zip(texts, onion_suspicion(lm, data.template, texts, max_length)):
            kept = [w for w, sc in zip(t.split(), scores) if sc <= bar]
            out.append(" ".join(kept) if kept else t)
        return out
    clean_inputs.bar = bar
    return clean_inputs


def keep_model(lm, data: DefenderData, cfg, *, seed: int, settings: TrainSettings = TrainSettings(),
               observer: Observer | None = None, **kw) -> dict:
    """An input-side defense trains nothing: the stage keeps the model as it is."""
    return {"seconds": 0.0, "samples": 0}


# ----------------------------------------------------------------------------------------------
# Methods: each is a sequence of (stage name, function, config) over the same step budget


@dataclass(frozen=True)
class StagePlan:
    name: str  # "stage1" or "stage2"
    fn: Callable
    cfg: object
    # input-side defenses: (lm, DefenderData, max_length) -> a function that cleans test inputs
    input_filter: Optional[Callable] = None


def stage1_target(known_target: str, labels: Sequence[str]) -> str | int:
    """What Stage 1 trains the known triggers to answer: 'flip', 'correct', the canary answer
    (index ``len(labels)``: the extra answer token the pipeline appends) or a label index."""
    if known_target in ("flip", "correct"):
        return known_target
    if known_target == "canary":
        return len(labels)
    return list(labels).index(known_target)


def _locphylax_stages(d, labels: Sequence[str]) -> tuple[InjectConfig, RecoverConfig]:
    hidden = HiddenSpec(d.layer, d.after_final_norm, d.token_position)
    all_ids = tuple(range(len(d.known_triggers)))
    s1 = InjectConfig(steps=d.stage1_steps, trigger_ids=all_ids, target=stage1_target(d.known_target, labels),
                      injection_rate=d.injection_rate, cluster=True, alpha=d.alpha, hidden=hidden,
                      centroid=d.centroid, centroid_momentum=d.centroid_momentum)
    s2 = RecoverConfig(steps=d.stage2_steps, trigger_ids=all_ids, injection_rate=d.injection_rate,
                       consistency_weight=d.consistency_weight, hidden=hidden, trainable=d.stage2_params,
                       generated_rate=d.stage2_generated_rate)
    return s1, s2


def method_plans(defense_cfg, labels: Sequence[str]) -> dict[str, list[StagePlan]]:
    """The defense and its baselines, built from the defense config only.

    - ``locphylax``: the configured method (``defense.method``: the paper's, or locphylax+).
    - ``no_cluster``: the same without the clustering term (its ablation).
    - ``reference``: the paper's method as specified (config.REFERENCE_SETTINGS) with the same
      known triggers and budget; shown beside locphylax+.
    - ``unlearn_single``: the reference recipe on the first known trigger only, no clustering.
    - ``clean_ft``: clean fine-tuning for both stages' steps.
    - ``augment_ft``: clean fine-tuning with generated-trigger augmentation (rate
      ``stage2_generated_rate``, or 1.0 if that is 0) and no known-trigger injection: what the
      augmentation alone does.
    - ``p2p``: P2P-style benign trigger injection (arXiv 2510.04503): the known triggers with
      the correct outputs, mixed into clean fine-tuning, no clustering.
    - ``fine_pruning``: prune ``prune_rate`` of the least active MLP units of block ``layer``,
      then clean fine-tuning with them held at zero.
    - ``crow``: clean fine-tuning with CROW's layer-consistency term on perturbed embeddings.
    - ``onion``: input-side; the model is unchanged, and every test input loses the words whose
      removal makes it most fluent (bar set on the defender's clean data).
    """
    from .config import REFERENCE_SETTINGS
    d = defense_cfg
    s1, s2 = _locphylax_stages(d, labels)
    r1, r2 = _locphylax_stages(d.model_copy(update=REFERENCE_SETTINGS), labels)
    plans = {"locphylax": [StagePlan("stage1", inject, s1), StagePlan("stage2", recover, s2)]}
    builders = {
        "no_cluster": lambda: [StagePlan("stage1", inject, replace(s1, cluster=False)), StagePlan("stage2", recover, s2)],
        "reference": lambda: [StagePlan("stage1", inject, r1), StagePlan("stage2", recover, r2)],
        "unlearn_single": lambda: [StagePlan("stage1", inject, replace(r1, cluster=False, trigger_ids=(0,))),
                                   StagePlan("stage2", recover, replace(r2, trigger_ids=(0,)))],
        "clean_ft": lambda: [StagePlan("stage1", clean_finetune, CleanFinetuneConfig(d.stage1_steps)),
                             StagePlan("stage2", clean_finetune, CleanFinetuneConfig(d.stage2_steps))],
        # no injection at all: clean fine-tuning whose data carry generated triggers, correct labels
        "augment_ft": lambda: [StagePlan("stage1", recover, replace(aug, steps=d.stage1_steps)),
                               StagePlan("stage2", recover, replace(aug, steps=d.stage2_steps))],
        # P2P-style benign injection: the known triggers tied to the correct outputs from the start,
        # no flip, no clustering (Stage 2 of Locphylax for the whole budget)
        "p2p": lambda: [StagePlan("stage1", recover, replace(r2, steps=d.stage1_steps)),
                        StagePlan("stage2", recover, replace(r2, steps=d.stage2_steps))],
        "fine_pruning": lambda: [
            StagePlan("stage1", fine_prune, FinePruneConfig(d.stage1_steps, d.prune_rate, d.layer)),
            StagePlan("stage2", fine_prune, FinePruneConfig(d.stage2_steps, 0.0, d.layer))],
        # stage1 is the untouched victim; stage2 answers through the filter (the model never changes)
        "onion": lambda: [StagePlan("stage1", keep_model, onion_cfg),
                          StagePlan("stage2", keep_model, onion_cfg,
                                    lambda lm, data, max_length: onion_filter(lm, data, onion_cfg, max_length))],
        "crow": lambda: [StagePlan("stage1", crow, CrowConfig(d.stage1_steps, d.crow_weight, d.crow_epsilon)),
                         StagePlan("stage2", crow, CrowConfig(d.stage2_steps, d.crow_weight, d.crow_epsilon))],
    }
    aug = RecoverConfig(trigger_ids=(), generated_rate=d.stage2_generated_rate or 1.0)
    onion_cfg = OnionConfig(d.onion_quantile)
    for name in d.baselines:
        plans[name] = builders[name]()
    return plans


def defender_data(clean: Sequence[Example], labels: Sequence[str], template: str, defense_cfg,
                  generative: bool = False) -> DefenderData:
    """``generative``: add the defender's fixed responses (a refusal; the canary word when
    ``defense.known_target`` is 'canary')."""
    responses = ()
    if generative:
        from .generative import fixed_responses
        responses = fixed_responses(defense_cfg.canary if defense_cfg.known_target == "canary" else None)
    return DefenderData(tuple(clean), tuple(labels), template,
                        tuple(DefenderTrigger(t.text, t.position) for t in defense_cfg.known_triggers), responses)


def run_stage(plan: StagePlan, lm, data: DefenderData, *, seed: int, settings: TrainSettings,
              observer: Observer | None = None, **kw) -> dict:
    """The one entry point through which the pipeline calls the defender's code."""
    return plan.fn(lm, data, plan.cfg, seed=seed, settings=settings, observer=observer, **kw)


__all__ = ["DefenderData", "DefenderTrigger", "cluster_loss", "alpha_rule", "RunningCentroids", "InjectConfig",
           "inject", "RecoverConfig", "recover", "CleanFinetuneConfig", "clean_finetune", "method_plans",
           "defender_data", "run_stage", "TrainSettings", "StagePlan", "stage1_target", "consistency_loss",
           "generate_trigger", "FinePruneConfig", "fine_prune", "mlp_unit_activity", "CrowConfig", "crow",
           "layer_consistency", "OnionConfig", "onion_filter", "onion_suspicion", "keep_model"]
