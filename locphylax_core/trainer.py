"""One trainer for every training in the project: the clean model and the victim (owner side),
every defense stage and baseline, DPO poisoning, and pretraining all call :func:`fit`, with their
options in one :class:`TrainSettings`.

:func:`fit` does the set-up that each of them used to write for itself (seeding, the batch
iterator, LoRA or frozen parameters, merging the adapter back) and hands the loop to
:func:`engine.train_loop` (accumulation, bf16, checkpointing, the split whole-batch loss).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from .architectures import decoder_blocks, final_norm
from .config import LoraConfig, RunConfig
from .engine import Batch, Resume, Sample, StepLoss, answer_loss, batches, train_loop
from .model import merge_lora, with_lora
from .precision import Bf16Setting


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
        return {"grad_accum": t.grad_accum, "bf16": t.bf16, "grad_checkpointing": t.grad_checkpointing}


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


Data = Union[Sequence[Sample], Callable[[torch.Generator], Iterator[Batch]], Iterator[Batch]]


def fit(lm, data: Data, steps: int, settings: TrainSettings, *, step_loss: StepLoss = answer_loss,
        seed: int | None = None, kind=None, trainable: str = "all", after_layer: int = -1,
        observer: Callable[[int, dict], None] | None = None, cancel_file: Path | None = None, progress=None,
        dist="auto", resume: Resume | None = None) -> dict:
    """Train ``lm.model`` in place for ``steps`` steps and return the loop's last logs.

    ``data``: samples (encoded by the task ``kind``, shuffled by a generator seeded ``seed``), a
    function of that generator returning batches, or a ready iterator of batches. ``seed``: seeds
    torch and the generator first (None: the caller has seeded). ``trainable``: 'all',
    'after_layer' (only what follows block ``after_layer``) or 'lora' (a LoRA adapter of
    ``settings.lora``, or the default LoRA config). The adapter is merged back and frozen
    parameters are released even when training stops early. ``lm.model`` is swapped for the
    wrapped model while it trains, so an observer that reads ``lm.model`` sees what trains."""
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
    if kind is not None:
        it = batches(data, kind, lm.tokenizer, settings.batch_size, settings.max_length, lm.device, gen)
    elif callable(data):
        it = data(gen)
    else:
        it = data
    lora = settings.lora if settings.lora is not None else (LoraConfig(enabled=True) if trainable == "lora" else None)
    frozen = freeze_up_to(lm.model, after_layer) if trainable == "after_layer" else []
    if lora is not None:
        lm.model = with_lora(lm.model, lora)
    try:
        return train_loop(lm.model, it, steps, settings.lr, step_loss=step_loss, weight_decay=settings.weight_decay,
                          grad_clip=settings.grad_clip, warmup=settings.warmup, schedule=settings.schedule,
                          on_step=observer, every=settings.every, cancel_file=cancel_file, progress=progress,
                          grad_accum=settings.grad_accum, bf16=settings.bf16,
                          grad_checkpointing=settings.grad_checkpointing, dist=dist, resume=resume)
    finally:
        lm.model = merge_lora(lm.model)
        for p in frozen:
            p.requires_grad_(True)


__all__ = ["TrainSettings", "fit", "freeze_up_to", "stage_seed"]
