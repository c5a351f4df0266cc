"""The forward pass every stage shares, and one short training loop.

Prompts are left-padded, so the last position of every row is the answer position, and
position ids are computed from the attention mask, so a prompt's representation does not depend
on how much padding its batch needed. The loss is the causal-LM cross-entropy on the answer token
(the prompt tokens are masked, as in SFT with prompt masking).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .errors import ConfigError


class Cancelled(Exception):
    """Raised inside a training loop when the run's CANCEL file appears."""


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor | None = None  # answer token id per row
    groups: torch.Tensor | None = None  # -1 clean, k >= 0: carries known trigger k
    pair: "Batch | None" = None  # the same rows without their trigger (for consistency terms)


def encode(tokenizer, prompts: Sequence[str], max_length: int | None, device) -> Batch:
    enc = tokenizer(list(prompts), padding=True, return_tensors="pt", add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if max_length is not None and ids.shape[1] > max_length:
        ids, mask = ids[:, -max_length:], mask[:, -max_length:]  # keep the end: the answer position
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), pos.to(device))


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder blocks of any HF causal LM (GPT-2, Llama, NeoX, Qwen, ... and peft wraps)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = getattr(base.config, "num_hidden_layers", None)
    for mod in base.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise ConfigError(f"cannot find the {n} decoder blocks of {type(base).__name__}")


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm"):
        mod = base
        try:
            for p in path.split("."):
                mod = getattr(mod, p)
            return mod
        except AttributeError:
            continue
    return None


@contextlib.contextmanager
def capture_output(module: torch.nn.Module):
    """Temporarily record a module's output (the hook is removed on exit)."""
    store: dict = {}

    def hook(_mod, _inp, out):
        store["out"] = out[0] if isinstance(out, tuple) else out

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@dataclass(frozen=True)
class HiddenSpec:
    """Which hidden state a stage reads: block ``layer``'s output (or the final norm's), at the
    last prompt token or averaged over the prompt."""

    layer: int = -1
    after_final_norm: bool = False
    token_position: str = "last"

    def module(self, model) -> torch.nn.Module:
        if self.after_final_norm:
            norm = final_norm(model)
            if norm is None:
                raise ConfigError("defense.after_final_norm: this architecture has no final norm module")
            return norm
        blocks = decoder_blocks(model)
        if not -len(blocks) <= self.layer < len(blocks):
            raise ConfigError(f"defense.layer: {self.layer} is out of range for a model with {len(blocks)} blocks")
        return blocks[self.layer]

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.token_position == "last":
            return states[:, -1]
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1)


def forward_answer(model, batch: Batch, hidden: HiddenSpec | None = None):
    """Logits at the answer position [B, V], and the pooled hidden state [B, d] if asked for."""
    ctx = capture_output(hidden.module(model)) if hidden is not None else contextlib.nullcontext({})
    with ctx as store:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, logits_to_keep=1, use_cache=False)
    h = hidden.pool(store["out"], batch.attention_mask) if hidden is not None else None
    return out.logits[:, -1], h


@dataclass
class Sample:
    prompt: str
    target: int  # answer token id
    group: int = -1  # -1 clean, k: carries known trigger k
    pair: str | None = None  # the same prompt without the trigger, when a loss needs it


def batches(samples: Sequence[Sample], tokenizer, batch_size: int, max_length, device, generator) -> Iterator[Batch]:
    """Endless shuffled batches, epoch after epoch, from a seeded generator (reproducible)."""
    n = len(samples)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            chunk = [samples[j] for j in order[i:i + batch_size]]
            b = encode(tokenizer, [s.prompt for s in chunk], max_length, device)
            b.targets = torch.tensor([s.target for s in chunk], device=device)
            b.groups = torch.tensor([s.group for s in chunk], device=device)
            if any(s.pair is not None for s in chunk):
                b.pair = encode(tokenizer, [s.pair or s.prompt for s in chunk], max_length, device)
            yield b


StepLoss = Callable[[torch.nn.Module, Batch, int], tuple[torch.Tensor, dict]]


def answer_loss(model, batch: Batch, _step: int):
    logits, _ = forward_answer(model, batch)
    loss = F.cross_entropy(logits.float(), batch.targets)
    return loss, {"loss": loss.item()}


def _next_token_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy of each position's prediction of the next non-pad token."""
    nxt = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), nxt.reshape(-1), ignore_index=-100)


def lm_loss(model, batch: Batch, _step: int):
    """Next-token cross-entropy over every non-pad token (language-model pretraining)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits.float()
    loss = _next_token_loss(logits, batch)
    return loss, {"loss": loss.item(), "l_lm": loss.item()}


def answer_and_lm_loss(lm_weight: float) -> StepLoss:
    """Answer cross-entropy plus ``lm_weight`` x next-token loss on the prompt tokens. Used to
    train the embedded model from scratch: the dense language-modelling signal gets a tiny
    model off the "always one label" plateau that the one-token answer loss alone can sit on
    for hundreds of steps."""

    def step_loss(model, batch: Batch, _step: int):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=False)
        logits = out.logits.float()
        l_answer = F.cross_entropy(logits[:, -1], batch.targets)
        l_lm = _next_token_loss(logits, batch)
        loss = l_answer + lm_weight * l_lm
        return loss, {"loss": loss.item(), "l_answer": l_answer.item(), "l_lm": l_lm.item()}

    return step_loss


def train_loop(model, data: Iterator[Batch], steps: int, lr: float, *, step_loss: StepLoss = answer_loss,
               weight_decay: float = 0.0, grad_clip: float = 1.0, warmup: int = 0, schedule: str = "constant",
               on_step: Callable[[int, dict], None] | None = None, every: int = 0,
               cancel_file: Path | None = None, progress=None) -> dict:
    """AdamW over the trainable parameters for ``steps`` steps. ``on_step(step, logs)`` is called
    every ``every`` steps and after the last one (the pipeline evaluates there). Returns the last
    logs with ``tokens`` (non-pad tokens seen) and ``seconds``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))

    def lr_at(s):
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "cosine":
            frac = (s - warmup) / max(1, steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    logs: dict = {}
    tokens, t0 = 0, time.perf_counter()
    for step in range(1, steps + 1):
        if cancel_file is not None and cancel_file.exists():
            raise Cancelled(f"cancelled at step {step}")
        batch = next(data)
        loss, logs = step_loss(model, batch, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        tokens += int(batch.attention_mask.sum())
        if progress is not None:
            progress.advance(1, logs)
        if on_step is not None and every and (step % every == 0 or step == steps):
            model.eval()
            on_step(step, logs)
            model.train()
    model.eval()
    return {**logs, "tokens": tokens, "seconds": time.perf_counter() - t0}
