"""The forward pass every stage shares, its batches and its losses (the loop is ``trainer.fit``).

Prompts are left-padded, so the last position of every row is the answer position, and
position ids are computed from the attention mask, so a prompt's representation does not depend
on how much padding its batch needed. A :class:`Batch` knows where its own loss is: the answer
token at the last position here; a task kind may subclass it (response tasks: the response tokens
after the prompt, ``tasks/response.py``), so the engine never asks which kind of task it trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module
from torch.utils.weak import WeakIdKeyDictionary
from transformers.masking_utils import create_causal_mask

from .architectures import arch_of, base_model, decoder_blocks, final_norm
from .errors import ConfigError


def set_torch_threads(n: int) -> int:
    """Use ``n`` CPU threads, at most as many as the CPUs this process may run on (a container,
    ``taskset`` or a test worker may allow fewer than the machine has: more threads than CPUs make
    torch's thread pool spin against itself, many times slower). Returns the number set."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = max(1, min(int(n), allowed))
    torch.set_num_threads(n)
    return n


@dataclass
class Batch:
    """Left-padded prompts whose loss is the answer token at the last position. Subclasses (a task
    kind's batches) override the three methods below."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor | None = None  # answer token id per row
    groups: torch.Tensor | None = None  # -1 clean, k >= 0: carries known trigger k
    pair: "Batch | None" = None  # the same rows without their trigger (for consistency terms)
    # answer_logits' stored block-k inputs of these rows: {"key": (k, lower weights' digest, ...), "states": ...}
    lower_states: dict = field(default_factory=dict, repr=False, compare=False)
    # forward_loss may start at the first adapted block from per-row stored inputs (train.reuse_frozen_states)
    reuse_frozen: bool = field(default=False, repr=False, compare=False)

    def logits_to_keep(self) -> int:
        """How many last positions' logits the loss needs (the output layer over the whole
        vocabulary is most of a small model's cost)."""
        return 1

    def output_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of what the batch is trained to produce, from the logits of its last
        positions ``[B, T', V]``."""
        return F.cross_entropy(logits[:, -1].float(), self.targets)

    def read_positions(self) -> torch.Tensor | None:
        """Where a pooled hidden state is read per row (None: the last position)."""
        return None


def encode(tokenizer, prompts: Sequence[str], max_length: int | None, device) -> Batch:
    enc = tokenizer(list(prompts), padding=True, return_tensors="pt", add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if max_length is not None and ids.shape[1] > max_length:
        ids, mask = ids[:, -max_length:], mask[:, -max_length:]  # keep the end: the answer position
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), pos.to(device))


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

    def pool(self, states: torch.Tensor, mask: torch.Tensor, prompt_last: torch.Tensor | None = None) -> torch.Tensor:
        """The state per row; ``prompt_last`` (``Batch.read_positions``, rows with a response
        appended): the last prompt token is that index, and 'mean' averages the prompt tokens only."""
        if prompt_last is not None:
            if self.token_position == "last":
                return states[torch.arange(states.shape[0], device=states.device), prompt_last]
            upto = torch.arange(states.shape[1], device=states.device)[None, :] <= prompt_last[:, None]
            mask = mask * upto
        elif self.token_position == "last":
            return states[:, -1]
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1)


def forward_answer(model, batch: Batch, hidden: HiddenSpec | None = None):
    """Logits at the answer position [B, V], and the pooled hidden state [B, d] if asked for."""
    k = _frozen_start(model, batch, hidden)
    ctx = capture_output(hidden.module(model)) if hidden is not None else contextlib.nullcontext({})
    with ctx as store:
        if k:
            logits = _output_from_block(model, batch, k, frozen_row_inputs(model, batch, k))
        else:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, logits_to_keep=1, use_cache=False).logits
    h = hidden.pool(store["out"], batch.attention_mask) if hidden is not None else None
    return logits[:, -1], h


class _StopForward(Exception):
    """Ends a forward pass once the inputs of the first block it needs are captured."""


def reusable_lower_blocks(model, frozen: int = 0) -> int:
    """How many leading decoder blocks' output scoring may store and reuse for ``model``: those
    before its first adapter, or ``frozen`` (``LM.frozen_blocks``, the blocks its run never adapts)
    for a model without adapters. 0 where nothing can be reused: an architecture whose forward
    the engine cannot restart at a block (``Arch.runs_from_block``), or an adapter on the
    embeddings. Which weights the stored output came from is checked by content on every use."""
    arch = arch_of(model)
    if arch is None or not arch.runs_from_block:
        return 0
    if any("lora_" in n for n, _ in base_model(model).get_input_embeddings().named_parameters()):
        return 0
    blocks = decoder_blocks(model)
    for i, block in enumerate(blocks):
        if any("lora_" in n for n, _ in block.named_parameters()):
            return i
    return frozen if 0 < frozen < len(blocks) else 0


_DIGESTS = WeakIdKeyDictionary()  # weight -> (its version, its digest); by identity, dies with it


def _tensor_digest(t: torch.Tensor) -> bytes:
    """The content hash of a weight, recomputed only after an in-place change (its version)."""
    hit = _DIGESTS.get(t)
    if hit is not None and hit[0] == t._version:
        return hit[1]
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.blake2b(data, digest_size=16).digest()
    _DIGESTS[t] = (t._version, digest)
    return digest


def _lower_key(model, k: int) -> tuple:
    """What the inputs of block k depend on: the embeddings' and blocks 0..k-1's weights (by
    content, so a copy of the model shares them), and the autocast dtype they were computed in."""
    h = hashlib.blake2b(digest_size=16)
    modules = [base_model(model).get_input_embeddings(), *decoder_blocks(model)[:k]]
    for mod in modules:
        for t in (*mod.parameters(), *mod.buffers()):
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(_tensor_digest(t))
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return k, h.hexdigest(), str(dtype)


def _block_inputs(model, batch: Batch, k: int) -> torch.Tensor:
    """The inputs of decoder block k for ``batch`` (the blocks above are not run)."""
    captured = {}

    def capture(_mod, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _StopForward

    handle = decoder_blocks(model)[k].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
              logits_to_keep=1, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["h"].detach()


def _output_from_block(model, batch: Batch, k: int, states: torch.Tensor, keep: int = 1) -> torch.Tensor:
    """The logits of the last ``keep`` positions ``[B, keep, V]`` from block k's inputs: the Llama
    forward from block k on, the same operations in the same order as the whole forward (so the
    same numbers)."""
    lm = base_model(model)
    inner = lm.model
    embeds_dtype = lm.get_input_embeddings().weight.dtype
    mask = create_causal_mask(config=inner.config, inputs_embeds=states.to(embeds_dtype),
                              attention_mask=batch.attention_mask, past_key_values=None,
                              position_ids=batch.position_ids)
    rotary = inner.rotary_emb(states, position_ids=batch.position_ids)
    h = states
    for block in inner.layers[k:inner.config.num_hidden_layers]:
        h = block(h, attention_mask=mask, position_embeddings=rotary, position_ids=batch.position_ids,
                  past_key_values=None, use_cache=False)
    return lm.lm_head(inner.norm(h)[:, -keep:])


def _hooked(modules) -> bool:
    """Whether a forward hook sits on any of ``modules`` or their parts (an ablation or a patch
    changes what the blocks compute, which their weights do not show), or on every module."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for top in modules for m in top.modules())


def answer_logits(model, batch: Batch, frozen: int = 0) -> torch.Tensor:
    """``forward_answer``'s logits ``[B, V]``, for scoring. Where the model's lower blocks are frozen
    (LoRA on the upper blocks only, as the real LM's presets train; ``frozen``: see
    :func:`reusable_lower_blocks`), the inputs of its first adapted block are kept on the batch and
    reused by every later model with the same lower weights (a victim, each stage of each
    defense, clean fine-tuning): scoring a fixed evaluation set then runs only the adapted blocks,
    with the same result as the whole forward."""
    k = reusable_lower_blocks(model, frozen) if not model.training else 0
    if k == 0 or torch.is_grad_enabled() or _hooked([base_model(model).get_input_embeddings(),
                                                     *decoder_blocks(model)[:k]]):
        return forward_answer(model, batch)[0]
    key = _lower_key(model, k)
    if batch.lower_states.get("key") != key:
        batch.lower_states = {"key": key, "states": _block_inputs(model, batch, k)}
    return _output_from_block(model, batch, k, batch.lower_states["states"])[:, -1]


def forward_loss(model, batch: Batch, hidden: HiddenSpec | None = None):
    """(cross-entropy of what ``batch`` is trained to produce, pooled hidden state or None): the
    batch says which positions' logits it needs and where its hidden state is read. A batch marked
    ``reuse_frozen`` on a model whose lower blocks are frozen runs only the blocks above them, from
    each row's stored inputs (:func:`frozen_row_inputs`)."""
    k = _frozen_start(model, batch, hidden)
    ctx = capture_output(hidden.module(model)) if hidden is not None else contextlib.nullcontext({})
    with ctx as store:
        if k:
            logits = _output_from_block(model, batch, k, frozen_row_inputs(model, batch, k), batch.logits_to_keep())
        else:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, logits_to_keep=batch.logits_to_keep(),
                           use_cache=False).logits
    h = hidden.pool(store["out"], batch.attention_mask, batch.read_positions()) if hidden is not None else None
    return batch.output_loss(logits), h


# Training on a model whose lower blocks are frozen (LoRA on the upper blocks only): a row's inputs
# of the first adapted block are the same at every step, in every stage and for every model with
# those lower weights, so they are computed once per row (alone, unpadded: the same numbers whatever
# batch the row comes in, so a resumed run repeats an uninterrupted one) and kept while they fit.
ROW_STATES_MAX_BYTES = 2 * 2**30
_ROW_STATES: dict = {"key": None, "rows": {}, "bytes": 0}


def _frozen_start(model, batch: Batch, hidden: HiddenSpec | None) -> int:
    """The block ``forward_loss`` starts at for ``batch`` (0: the whole forward)."""
    if not batch.reuse_frozen:
        return 0
    k = reusable_lower_blocks(model)
    if k == 0:
        return 0
    lower = [base_model(model).get_input_embeddings(), *decoder_blocks(model)[:k]]
    if any(p.requires_grad for m in lower for p in m.parameters()) or _hooked(lower):
        return 0
    if hidden is not None and not hidden.after_final_norm and hidden.layer % len(decoder_blocks(model)) < k:
        return 0  # the state it reads is below the first block run
    if model.training and (getattr(base_model(model).config, "attention_dropout", 0.0)
                           or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for top in lower for m in top.modules())):
        return 0  # a random lower forward cannot be stored
    return k


def frozen_row_inputs(model, batch: Batch, k: int) -> torch.Tensor:
    """The inputs of block ``k`` for ``batch`` ``[B, T, d]``, each row's from the store (computed
    once, without gradient, from the row alone); padding positions are zero (no real token
    attends to them). The store holds the rows of one set of lower weights (by content) at a time."""
    key = _lower_key(model, k)
    store = _ROW_STATES
    if store["key"] != key:
        store.update(key=key, rows={}, bytes=0)
    real = batch.attention_mask.bool()
    out = None
    for i in range(batch.input_ids.shape[0]):
        ids, pos = batch.input_ids[i, real[i]], batch.position_ids[i, real[i]]
        row_key = ids.cpu().numpy().tobytes() + b"|" + pos.cpu().numpy().tobytes()
        h = store["rows"].get(row_key)
        if h is None:
            with torch.no_grad():
                h = _block_inputs(model, Batch(ids[None], torch.ones_like(ids)[None], pos[None]), k)[0]
            size = h.numel() * h.element_size()
            if store["bytes"] + size <= ROW_STATES_MAX_BYTES:
                store["rows"][row_key] = h
                store["bytes"] += size
        if out is None:
            out = h.new_zeros((*batch.input_ids.shape, h.shape[-1]))
        out[i, real[i]] = h
    return out


@dataclass
class Sample:
    prompt: str
    target: int  # answer token id
    group: int = -1  # -1 clean, k: carries known trigger k
    pair: str | None = None  # the same prompt without the trigger, when a loss needs it
    response: str | None = None  # response tasks: the response trained after the prompt


def batches(samples: Sequence[Sample], kind, tokenizer, batch_size: int, max_length, device,
            generator) -> Iterator[Batch]:
    """Endless shuffled batches, epoch after epoch, from a seeded generator (reproducible), each
    encoded by the task kind (``kind.encode``: ``tasks.base.TaskKind``)."""
    n = len(samples)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            chunk = [samples[j] for j in order[i:i + batch_size]]
            b = kind.encode(tokenizer, chunk, max_length, device)
            b.targets = torch.tensor([s.target for s in chunk], device=device)
            b.groups = torch.tensor([s.group for s in chunk], device=device)
            if any(s.pair is not None for s in chunk):
                b.pair = encode(tokenizer, [s.pair or s.prompt for s in chunk], max_length, device)
            yield b


StepLoss = Callable[[torch.nn.Module, Batch, int], tuple[torch.Tensor, dict]]


def answer_loss(model, batch: Batch, _step: int):
    loss, _ = forward_loss(model, batch)
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
        l_answer = batch.output_loss(logits)  # response tasks: the next-token term covers the prompt too
        l_lm = _next_token_loss(logits, batch)
        loss = l_answer + lm_weight * l_lm
        return loss, {"loss": loss.item(), "l_answer": l_answer.item(), "l_lm": l_lm.item()}

    step_loss.split = _lm_split(lm_weight, with_answer=True)  # exact under accumulation
    return step_loss


# ----------------------------------------------------------------------------------------------
# Gradient accumulation and data parallelism (docs/scale.md, "Multi-GPU (accelerate)")
#
# One optimizer step always sees the whole batch the data iterator yields (``batch_size`` rows).
# With ``grad_accum = k`` and ``world`` processes, process r takes the r-th of ``world``
# contiguous shards of the batch (every process draws the same seeded batch, so the union of the
# shards is exactly the single-process batch) and cuts it into k contiguous micro-batches of about
# ``batch_size / (world * k)`` rows. A micro-batch's loss is weighted by its share of the batch's
# rows and the gradients are summed over micro-batches and processes, so a loss that is a mean
# over rows gets exactly the full-batch gradient (up to floating-point order).
#
# A loss that is not a mean over rows (the clustering loss: centroids; the token-averaged LM loss)
# declares its structure with :class:`SplitLoss`; its batch-level term is computed on the states of
# the union of all micro-batches and processes, so it too equals the full-batch value (section
# "Gradient accumulation, bf16, checkpointing" of docs/scale.md).


@dataclass
class SplitLoss:
    """``L = mean_rows(l_i) + T(S, C, groups)``: a per-row mean plus a term of the whole batch's
    per-row ``states`` S (with gradient) and ``consts`` C (no gradient, or None).

    ``rows(model, batch) -> (mean of l_i over batch rows, S [b, ...] float, C [b, ...] | None)``
    ``term(S, C, groups, row_mean: float, step) -> (T, logs)``; ``logs`` are the step's logs
    (``loss`` included), ``row_mean`` the full batch's mean of l_i.

    Under accumulation / data parallelism, :func:`accumulate_step` computes S for every row of the
    batch (all micro-batches, gathered from every process, without autograd graphs), takes
    ``g = dT/dS`` on that union, and back-propagates ``sum_i g_i . S_i`` micro-batch by micro-batch:
    the exact full-batch gradient with the memory of one micro-batch (gradient caching, Gao et al.
    2021), at the cost of one extra forward without gradient per micro-batch when k > 1."""

    rows: Callable
    term: Callable


def _next_token_sums(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed next-token cross-entropy over its non-pad targets, and their count."""
    nxt = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), nxt, ignore_index=-100, reduction="none")
    return ce.sum(1), (nxt != -100).sum(1).float()


def _lm_split(weight: float, with_answer: bool) -> SplitLoss:
    """The token-averaged next-token loss (and the answer loss) as a :class:`SplitLoss`: the
    states are each row's summed token loss, the consts its token count, so the mean over the
    tokens of the whole batch is exact under accumulation."""

    def rows(model, batch):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, use_cache=False).logits.float()
        l_answer = batch.output_loss(logits) if with_answer else logits.new_zeros(())
        s, c = _next_token_sums(logits, batch)
        return l_answer, s, c

    def term(s, c, _groups, row_mean, _step):
        l_lm = s.sum() / c.sum().clamp(min=1)
        t = weight * l_lm
        logs = {"loss": row_mean + t.item(), "l_lm": l_lm.item()}
        if with_answer:
            logs["l_answer"] = row_mean
        return t, logs

    return SplitLoss(rows, term)


lm_loss.split = _lm_split(1.0, with_answer=False)
