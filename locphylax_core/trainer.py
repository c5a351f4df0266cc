"""One trainer for every training in the project: the clean model and the victim (owner side),
every defense stage and baseline, DPO poisoning, and pretraining all call :func:`fit`.

What a stage needs besides its model and data arrives as one :class:`StageContext`: its seed, its
optimisation settings (:class:`TrainSettings`), the observer that evaluates during training, the
progress sink, the cancellation and the process group. A stage passes the context on to
:func:`fit` whole, so nothing it forgets to thread (a plug-in defense included) loses
cancellation or progress.

:func:`fit` reads top to bottom as one loop (set-up, then for each step: cancellation, learning
rate, gradient, optimizer step, observation, checkpoint). Data parallelism and gradient
accumulation are one call beside it (:func:`distributed.accumulate_step`); a resumable long run
(pretraining) adds a :class:`Resume`.
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Protocol, Sequence, Union

import torch

from .architectures import decoder_blocks, final_norm
from .config import LoraConfig, RunConfig
from .distributed import DistContext, accumulate_step, distributed, fsdp_shard, fsdp_sync
from .engine import Batch, Sample, StepLoss, answer_loss, batches, frozen_row_inputs, reusable_lower_blocks
from .errors import Cancelled, ConfigError, TrainingError
from .model import adapter_state, merge_lora, with_lora
from .precision import Bf16Setting, use_bf16


def stage_seed(seed: int, key: str) -> int:
    """The seed of the stage ``key`` of a run seeded ``seed`` (so a resumed run draws what an
    uninterrupted one would)."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31 - 1)


@dataclass(frozen=True)
class TrainSettings:
    """Everything a training stage's optimisation needs, whoever trains."""

    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: Optional[int] = None
    every: int = 25  # evaluate (call the observer) every N steps and after the last
    lora: Optional[LoraConfig] = None  # a LoRA adapter is trained (and merged back) instead of the weights
    schedule: str = "constant"  # learning-rate schedule: "constant" or "cosine" (to 10%)
    warmup: int = 0
    grad_accum: int = 1  # micro-batches per step (the effective batch stays batch_size)
    bf16: Bf16Setting = False  # bfloat16 autocast of the training forward passes (auto: where native)
    grad_checkpointing: bool = False  # activation checkpointing of the decoder blocks
    reuse_frozen_states: bool = False  # run only the adapted blocks, from stored per-row inputs

    @classmethod
    def for_defense(cls, cfg: RunConfig, max_length: int | None) -> "TrainSettings":
        """What every defense stage and baseline of a run shares."""
        return cls(lr=cfg.defense.lr, batch_size=cfg.defense.batch_size, weight_decay=0.0,
                   grad_clip=cfg.train.grad_clip, max_length=max_length, every=cfg.eval.every,
                   lora=cfg.model.lora if cfg.model.lora.enabled else None, schedule=cfg.defense.schedule,
                   **cls._loop_options(cfg))

    @classmethod
    def for_owner(cls, cfg: RunConfig, max_length: int | None, from_scratch: bool) -> "TrainSettings":
        """The model owner's training: the clean model from scratch (train.lr, warm-up, no LoRA) or
        the victim from the clean model (attack.lr); cosine decay, so poisoning costs no CACC."""
        return cls(lr=cfg.train.lr if from_scratch else cfg.attack.lr, batch_size=cfg.train.batch_size,
                   weight_decay=cfg.train.weight_decay, grad_clip=cfg.train.grad_clip, max_length=max_length,
                   every=cfg.eval.clean_every if from_scratch else cfg.eval.every,
                   lora=cfg.model.lora if (cfg.model.lora.enabled and not from_scratch) else None,
                   schedule="cosine", warmup=cfg.train.warmup_steps if from_scratch else 0, **cls._loop_options(cfg))

    @staticmethod
    def _loop_options(cfg: RunConfig) -> dict:
        t = cfg.train
        return {"grad_accum": t.grad_accum, "bf16": t.bf16, "grad_checkpointing": t.grad_checkpointing,
                "reuse_frozen_states": t.reuse_frozen_states}


class Cancellation(Protocol):
    def requested(self) -> bool: ...


@dataclass(frozen=True)
class CancelFile:
    """Cancellation asked for by a file appearing (the run folder's CANCEL: ``locphylax cancel``,
    the app's Stop)."""

    path: Path

    def requested(self) -> bool:
        return self.path.exists()


class _Never:
    def requested(self) -> bool:
        return False


NEVER_CANCELLED: Cancellation = _Never()

Observer = Callable[[int, dict], None]  # (step, training logs): evaluates; returns nothing to the stage


class Progress(Protocol):
    def advance(self, n: int, logs: dict) -> None: ...


class Reporter:
    """The progress sink of a run or a pretraining (a :class:`Progress`); the CLI draws bars from it,
    the app reads progress.json instead."""

    def stage_started(self, key: str, total_steps: int) -> None: ...
    def advance(self, n: int, logs: dict) -> None: ...
    def stage_finished(self, key: str, result: dict) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass(frozen=True)
class StageContext:
    """What a stage gets besides its model and data, as one object (peft's and nanoGPT's shape:
    settings as data). The pipeline makes one per stage; a stage hands it to :func:`fit` whole.

    ``seed``: the stage's own seed (``stage_seed(run seed, stage key)``; None: the caller has seeded
    torch). ``observer(step, logs)``: called every ``settings.every`` steps and after the last (the
    pipeline evaluates there). ``progress.advance(1, logs)``: after every step. ``cancel``: asked
    between two steps; a stage with a loop of its own calls :meth:`check_cancelled`. ``dist``: the
    process group (``"auto"``: :func:`distributed.distributed`)."""

    seed: Optional[int] = None
    settings: TrainSettings = field(default_factory=TrainSettings)
    observer: Optional[Observer] = None
    progress: Optional[Progress] = None
    cancel: Cancellation = NEVER_CANCELLED
    dist: Union[DistContext, None, str] = "auto"
    key: str = ""  # the stage's key in its run (stage1, clean_ft/stage2, ...), for messages
    # called with a LoRA stage's adapter weights (peft names) once it trained, before they are merged
    adapter_sink: Optional[Callable[[dict], None]] = None
    # train nothing: only store the frozen blocks' output for the rows of the batches this stage
    # would draw (train.reuse_frozen_states), so that the stage itself, run later, finds them stored
    warm_rows_only: bool = False

    def replace(self, **changes) -> "StageContext":
        return replace(self, **changes)

    def check_cancelled(self, step: int) -> None:
        """Raise :class:`Cancelled` when cancellation was asked for (a loop of a stage's own)."""
        if self.cancel.requested():
            raise Cancelled(f"cancelled at step {step}")

    def advance(self, logs: dict) -> None:
        if self.progress is not None:
            self.progress.advance(1, logs)


def freeze_up_to(model, layer: int) -> list[torch.nn.Parameter]:
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


def check_finite_loss(logs: dict, step: int) -> None:
    """Stop training whose loss is no longer a finite number: every later step would turn more
    weights into NaN, and the stage would end "done" with a broken model. Every step loss logs
    its whole-batch value as ``loss`` (the same on every rank, so all ranks stop together)."""
    loss = logs.get("loss")
    if isinstance(loss, (int, float)) and not math.isfinite(loss):
        raise TrainingError(f"the training loss is {loss} at step {step}, not a finite number: training diverged, "
                            "and the stage's weights are not saved. Lower the learning rate of the stage "
                            "(train.lr, attack.lr or defense.lr) or the loss weights (defense.alpha, "
                            "defense.consistency_weight)")


def _autocast_factory(bf16: Bf16Setting, device: torch.device):
    """bfloat16 autocast for the forward passes (losses stay float32: every step loss casts its
    logits and states with .float()), on CUDA, and on CPU where torch supports it; ``auto`` only
    where the device computes in bf16 (:func:`precision.use_bf16`)."""
    if not use_bf16(bf16, device):
        return contextlib.nullcontext
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise ConfigError(f"train.bf16: torch {torch.__version__} has no bfloat16 autocast on {device.type}")
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def set_checkpointing(model, on: bool) -> None:
    """Activation checkpointing of an HF model's decoder blocks, non-reentrant: the checkpointed
    forward runs with autograd on, so a forward hook on a block (the clustering loss's capture)
    gets a state with gradient; the reentrant variant would hand it a state computed under
    no_grad and the clustering gradient would silently be lost."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


@dataclass
class Resume:
    """What a long, resumable run (pretraining) adds to :func:`fit`: the step it continues
    after and the optimizer state saved there (``torch.optim.AdamW.state_dict()``), a
    ``checkpoint(step, optimizer)`` callback called every ``every`` steps, after the last step and
    when the run is cancelled (between two steps, so the checkpoint is whole), and weight decay on
    the weight matrices only (not on norms and biases, as is usual for pretraining). The data
    iterator passed with it must already stand at ``start_step``."""

    start_step: int = 0
    optimizer_state: dict | None = None
    checkpoint: Callable[[int, torch.optim.Optimizer], None] | None = None
    every: int = 0
    decay_matrices_only: bool = False


def _param_groups(params, weight_decay: float, matrices_only: bool):
    if not matrices_only:
        return params
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


Data = Union[Sequence[Sample], Callable[[torch.Generator], Iterator[Batch]], Iterator[Batch]]


def fit(lm, data: Data, steps: int, ctx: StageContext, *, step_loss: StepLoss = answer_loss, kind=None,
        trainable: str = "all", after_layer: int = -1, resume: Resume | None = None) -> dict:
    """Train ``lm.model`` in place for ``steps`` steps with ``ctx.settings`` (AdamW over the
    trainable parameters) and return the last step's logs with ``tokens`` (non-pad tokens seen)
    and ``seconds``.

    ``data``: samples (encoded by the task ``kind``, shuffled by a generator seeded ``ctx.seed``),
    a function of that generator returning batches, or a ready iterator of batches.
    ``trainable``: 'all', 'after_layer' (only what follows block ``after_layer``) or 'lora' (a
    LoRA adapter of ``settings.lora``, or the default LoRA config). The adapter is merged back and
    frozen parameters are released even when training stops early. ``lm.model`` is swapped for the
    wrapped model while it trains, so an observer that reads ``lm.model`` sees what trains.

    ``settings.grad_accum``: micro-batches per step; ``settings.bf16``: bfloat16 autocast of the
    forward passes; ``settings.grad_checkpointing``: activation checkpointing of the decoder blocks
    (non-reentrant, so a forward hook on a block, as the clustering loss uses, still sees a state
    with gradient); ``resume``: continue a long run from a saved step and checkpoint it as it goes.
    With the defaults in one process, the loop is the plain one."""
    s = ctx.settings
    dist = distributed() if ctx.dist == "auto" else ctx.dist
    resume = resume or Resume()
    if s.grad_accum < 1:
        raise ConfigError(f"train.grad_accum: must be >= 1 (got {s.grad_accum})")
    # --- set-up: seed, batches, what trains
    gen = None
    if ctx.seed is not None:
        gen = torch.Generator().manual_seed(ctx.seed)
        torch.manual_seed(ctx.seed)
    if kind is not None:
        it = batches(data, kind, lm.tokenizer, s.batch_size, s.max_length, lm.device, gen)
    elif callable(data):
        it = data(gen)
    else:
        it = data
    if s.reuse_frozen_states and dist is None:
        it = _reusing_frozen_states(it)
    lora = s.lora if s.lora is not None else (LoraConfig(enabled=True) if trainable == "lora" else None)
    frozen = freeze_up_to(lm.model, after_layer) if trainable == "after_layer" else []
    if lora is not None:
        lm.model = with_lora(lm.model, lora)
    checkpointing = False
    try:
        if s.grad_checkpointing:
            if not getattr(lm.model, "supports_gradient_checkpointing",
                           hasattr(lm.model, "gradient_checkpointing_enable")):
                raise ConfigError(f"train.grad_checkpointing: {type(lm.model).__name__} does not support it")
            set_checkpointing(lm.model, checkpointing := True)
        if ctx.warm_rows_only:
            return _warm_rows(lm.model, it, steps, s, ctx)
        logs = _loop(lm.model, it, steps, s, step_loss, ctx, dist, resume)
        if ctx.adapter_sink is not None and lora is not None:
            ctx.adapter_sink(adapter_state(lm.model))
        return logs
    finally:
        if checkpointing:
            set_checkpointing(lm.model, False)
        lm.model = merge_lora(lm.model)
        for p in frozen:
            p.requires_grad_(True)


def _warm_rows(model, data: Iterator[Batch], steps: int, s: TrainSettings, ctx: StageContext) -> dict:
    """:func:`fit` with ``ctx.warm_rows_only``: the stage's own batches (the same seeded draw), their
    rows' inputs of the first adapted block stored (under the stage's autocast, as it will read
    them), nothing trained."""
    t0 = time.perf_counter()
    k = reusable_lower_blocks(model)
    params = list(model.parameters())
    autocast = _autocast_factory(s.bf16, params[0].device if params else torch.device("cpu"))
    with torch.no_grad(), autocast():
        for step in range(1, steps + 1 if k else 1):
            ctx.check_cancelled(step)
            frozen_row_inputs(model, next(data), k)
    return {"tokens": 0, "seconds": time.perf_counter() - t0, "warmed_steps": steps if k else 0}


def _reusing_frozen_states(it: Iterator[Batch]) -> Iterator[Batch]:
    """The batches marked so that ``engine.forward_loss`` starts at the first adapted block."""
    for b in it:
        b.reuse_frozen = True
        if b.pair is not None:
            b.pair.reuse_frozen = True
        yield b


def _loop(model, data: Iterator[Batch], steps: int, s: TrainSettings, step_loss: StepLoss, ctx: StageContext,
          dist: DistContext | None, resume: Resume) -> dict:
    """The optimisation loop of :func:`fit`."""
    fsdp = dist is not None and dist.fsdp
    model_out = model  # the caller's model (FSDP: refreshed from the sharded copy we train)
    if fsdp:
        model = fsdp_shard(model_out, dist)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = _autocast_factory(s.bf16, dist.device if dist is not None else
                                 (params[0].device if params else torch.device("cpu")))
    plain = s.grad_accum == 1 and dist is None
    # one fused kernel per step on a GPU (CPU keeps the default implementation, whose numbers the
    # bit-for-bit CPU results were measured with)
    fused = True if params and params[0].is_cuda and not fsdp else None
    opt = torch.optim.AdamW(_param_groups(params, s.weight_decay, resume.decay_matrices_only), lr=s.lr,
                            weight_decay=s.weight_decay, betas=(0.9, 0.95), fused=fused)
    if resume.optimizer_state is not None:
        opt.load_state_dict(resume.optimizer_state)

    def lr_at(step):
        if step < s.warmup:
            return (step + 1) / s.warmup
        if s.schedule == "cosine":
            frac = (step - s.warmup) / max(1, steps - s.warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0

    model.train()
    logs: dict = {}
    tokens, t0 = 0, time.perf_counter()
    for step in range(resume.start_step + 1, steps + 1):
        stop = ctx.cancel.requested()
        if dist is not None:  # every rank stops at the same step
            stop = dist.any(stop)
        if stop:
            if resume.checkpoint is not None and step > resume.start_step + 1:
                resume.checkpoint(step - 1, opt)
            raise Cancelled(f"cancelled at step {step}")
        for g in opt.param_groups:  # the schedule is a function of the step alone, so a resumed run has it too
            g["lr"] = s.lr * lr_at(step - 1)
        batch = next(data)
        if plain:
            with autocast():
                loss, logs = step_loss(model, batch, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        else:
            opt.zero_grad(set_to_none=True)
            logs = accumulate_step(model, batch, step, step_loss, s.grad_accum, dist, autocast,
                                   grad_scale=float(dist.world) if fsdp else 1.0)
            if dist is not None and not fsdp:
                dist.sum_grads(params)
        check_finite_loss(logs, step)  # before the optimizer step: no NaN reaches the weights
        torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        tokens += int(batch.attention_mask.sum())
        ctx.advance(logs)
        if ctx.observer is not None and s.every and (step % s.every == 0 or step == steps):
            if fsdp:  # the caller evaluates its own (full) model: bring it up to date
                fsdp_sync(model, model_out)
                model_out.eval()
            model.eval()
            ctx.observer(step, logs)
            model.train()
        if resume.checkpoint is not None and resume.every and (step % resume.every == 0 or step == steps):
            resume.checkpoint(step, opt)
    model.eval()
    if fsdp:
        fsdp_sync(model, model_out)
        model_out.eval()
        del model, params, opt
    return {**logs, "tokens": tokens, "seconds": time.perf_counter() - t0}


__all__ = ["TrainSettings", "StageContext", "CancelFile", "NEVER_CANCELLED", "Observer", "Progress", "Reporter", "Resume", "fit",
           "freeze_up_to", "stage_seed", "set_checkpointing", "check_finite_loss"]
