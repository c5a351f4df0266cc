"""The forward pass every stage shares, and one short training loop.

Prompts are left-padded, so the last position of every row is the answer position, and
position ids are computed from the attention mask, so a prompt's representation does not depend
on how much padding its batch needed. A :class:`Batch` knows where its own loss is: the answer
token at the last position here; a task kind may subclass it (response tasks: the response tokens
after the prompt, ``tasks/response.py``), so the engine never asks which kind of task it trains.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .architectures import decoder_blocks, final_norm
from .errors import ConfigError, TrainingError
from .precision import Bf16Setting, use_bf16


def set_torch_threads(n: int) -> int:
    """Use ``n`` CPU threads, at most as many as the CPUs this process may run on (a container,
    ``taskset`` or a test worker may allow fewer than the machine has: more threads than CPUs make
    torch's thread pool spin against itself, many times slower). Returns the number set."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = max(1, min(int(n), allowed))
    torch.set_num_threads(n)
    return n


class Cancelled(Exception):
    """Raised inside a training loop when the run's CANCEL file appears."""


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
    ctx = capture_output(hidden.module(model)) if hidden is not None else contextlib.nullcontext({})
    with ctx as store:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, logits_to_keep=1, use_cache=False)
    h = hidden.pool(store["out"], batch.attention_mask) if hidden is not None else None
    return out.logits[:, -1], h


def forward_loss(model, batch: Batch, hidden: HiddenSpec | None = None):
    """(cross-entropy of what ``batch`` is trained to produce, pooled hidden state or None): the
    batch says which positions' logits it needs and where its hidden state is read."""
    ctx = capture_output(hidden.module(model)) if hidden is not None else contextlib.nullcontext({})
    with ctx as store:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, logits_to_keep=batch.logits_to_keep(), use_cache=False)
    h = hidden.pool(store["out"], batch.attention_mask, batch.read_positions()) if hidden is not None else None
    return batch.output_loss(out.logits), h


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


class DistContext:
    """The processes of a multi-process launch (``accelerate launch`` / ``torchrun``): rank, world
    size, device and the collectives the training loop and the pipeline use."""

    def __init__(self, rank: int, world: int, device: torch.device, fsdp: bool = False,
                 fsdp_wrap: Sequence[str] = (), fsdp_reshard: bool = True):
        self.rank, self.world, self.device = rank, world, torch.device(device)
        # FSDP (accelerate launch with configs/accelerate/fsdp.yaml): training shards a copy of the
        # model over the ranks (see _fsdp_shard); fsdp_wrap: class names of the FSDP units (empty:
        # the decoder blocks)
        self.fsdp, self.fsdp_wrap, self.fsdp_reshard = fsdp, tuple(fsdp_wrap), fsdp_reshard

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        torch.distributed.barrier()

    def broadcast(self, obj):
        """``obj`` of rank 0, on every rank (any picklable object)."""
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.comm_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    @property
    def comm_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() != "gloo" else torch.device("cpu")

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; returns ``t``."""
        if t.device != self.comm_device:
            tmp = t.to(self.comm_device)
            torch.distributed.all_reduce(tmp)
            t.copy_(tmp)
        else:
            torch.distributed.all_reduce(t)
        return t

    def gather_rows(self, t: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Concatenate every rank's ``t`` (rank r holds ``sizes[r]`` rows) in rank order."""
        pad = max(sizes)
        buf = t.new_zeros((pad, *t.shape[1:]))
        buf[:t.shape[0]] = t
        buf = buf.to(self.comm_device)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        torch.distributed.all_gather(parts, buf)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(t.device)

    def sum_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients over ranks (what DDP's all-reduce does), one flat buffer per dtype.
        A parameter that has no gradient on any rank keeps none (AdamW skips it, as in one process)."""
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.comm_device)
        torch.distributed.all_reduce(has, op=torch.distributed.ReduceOp.MAX)
        chosen = [p for p, h in zip(params, has.tolist()) if h > 0]
        by_dtype: dict = {}
        for p in chosen:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = self.sum_(torch.cat([p.grad.reshape(-1) for p in group]))
            off = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[off:off + n].view_as(p.grad))
                off += n


_DIST: dict = {}


def distributed(device: str | None = None) -> DistContext | None:
    """The :class:`DistContext` of this process when it was started by ``accelerate launch`` (or
    ``torchrun``) with more than one process, else None (a plain single-process run, unchanged).
    The first call creates ``accelerate.Accelerator`` (which initialises the process group: gloo on
    CPU, NCCL on GPUs); ``device`` is ``train.device`` (cpu, cuda, auto)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if "ctx" not in _DIST:
        from accelerate import Accelerator
        cpu = device == "cpu" or not torch.cuda.is_available()
        acc = Accelerator(cpu=cpu)
        dev = torch.device("cpu") if cpu else acc.device
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if fsdp and os.environ.get("FSDP_VERSION", "2") != "2":
            raise ConfigError("FSDP launch: set fsdp_version: 2 in the accelerate config (fully_shard)")
        wrap = [c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()]
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0")
        _DIST["accelerator"] = acc
        _DIST["ctx"] = DistContext(acc.process_index, acc.num_processes, dev, fsdp, wrap, reshard)
    return _DIST["ctx"]


def _fsdp_shard(model, dist: DistContext):
    """A copy of ``model`` sharded with FSDP2 (``fully_shard``): each FSDP unit (the decoder blocks,
    or the modules whose class is named in the accelerate config's transformer_layer_cls_to_wrap)
    and the root. Parameters, gradients and AdamW's moments of the copy are split over the ranks;
    ``model`` itself keeps one full copy of the weights, which :func:`_fsdp_sync` refreshes for
    evaluation and checkpoints."""
    import copy

    from torch.distributed.fsdp import fully_shard
    if any(getattr(p, "_backward_hooks", None) for p in model.parameters()):
        raise ConfigError("FSDP launch: a stage with gradient hooks on its parameters (the fine_pruning baseline) "
                          "is not supported under FSDP; use configs/accelerate/ddp.yaml")
    work = copy.deepcopy(model)
    if dist.fsdp_wrap:
        units = [m for m in work.modules() if type(m).__name__ in dist.fsdp_wrap]
        if not units:
            blocks = decoder_blocks(work)
            raise ConfigError(f"FSDP launch: no module of class {list(dist.fsdp_wrap)} in "
                              f"{type(work).__name__}; its decoder block class is {type(blocks[0]).__name__} "
                              "(--fsdp_transformer_layer_cls_to_wrap)")
    else:
        units = list(decoder_blocks(work))
    for unit in units:
        fully_shard(unit, reshard_after_forward=dist.fsdp_reshard)
    fully_shard(work, reshard_after_forward=dist.fsdp_reshard)
    return work


def _fsdp_sync(work, model) -> None:
    """Copy the sharded copy's weights (gathered: a collective, every rank) into ``model``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(work, options=StateDictOptions(full_state_dict=True))
    model.load_state_dict(full)


def _chunks(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into ``parts`` contiguous pieces whose sizes differ by at most one."""
    n = hi - lo
    bounds = [lo + (n * i) // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def slice_rows(batch, a: int, b: int, n: int):
    """Rows ``a:b`` of a batch dataclass (every tensor field with ``n`` rows, nested batches too).
    The padded width is kept, so every row sees exactly the columns it had in the whole batch."""
    from dataclasses import fields, is_dataclass, replace
    upd = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            upd[f.name] = v[a:b]
        elif is_dataclass(v) and not isinstance(v, type):
            upd[f.name] = slice_rows(v, a, b, n)
    return replace(batch, **upd)


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def accumulate_step(model, batch, step: int, step_loss: StepLoss, grad_accum: int = 1,
                    dist: DistContext | None = None, autocast=contextlib.nullcontext, grad_scale: float = 1.0) -> dict:
    """Back-propagate one optimizer step's gradient into ``.grad`` by micro-batches; returns the
    step's logs (whole-batch values). With ``dist`` each rank back-propagates its shard's share,
    whose sum over ranks is the full-batch gradient (DDP: :meth:`DistContext.sum_grads`; FSDP,
    which averages, gets ``grad_scale`` = world size). See the comment above :class:`SplitLoss`."""
    n = batch.attention_mask.shape[0]
    world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
    if n < world:
        raise ConfigError(f"a batch of {n} rows cannot be shared by {world} processes; raise the batch size")
    if dist is not None and dist.fsdp and n // world < grad_accum:  # FSDP: every rank the same forwards
        raise ConfigError(f"train.grad_accum: {grad_accum} micro-batches per rank need at least {grad_accum} rows "
                          f"per rank; a batch of {n} rows over {world} ranks has {n // world}")
    shards = _chunks(0, n, world)
    lo, hi = shards[rank]
    micro = [(a, b) for a, b in _chunks(lo, hi, grad_accum) if b > a]
    split = getattr(step_loss, "split", None)
    if split is None:  # a mean over rows: weight each micro-batch by its share of the rows
        keys, acc = None, None
        for a, b in micro:
            with autocast():
                loss, logs = step_loss(model, slice_rows(batch, a, b, n), step)
            w = (b - a) / n
            (loss * (w * grad_scale)).backward()
            keys = keys or sorted(k for k, v in logs.items() if isinstance(v, (int, float)))
            vals = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64) * w
            acc = vals if acc is None else acc + vals
        if dist is not None:
            dist.sum_(acc)
        return dict(zip(keys, acc.tolist()))
    device = batch.attention_mask.device
    two_pass = len(micro) > 1
    parts, rngs = [], []
    for a, b in micro:
        mb = slice_rows(batch, a, b, n)
        if two_pass:  # pass 1: the states of every row, without autograd graphs
            rngs.append(_rng_state(device))
            with torch.no_grad(), autocast():
                r, s, c = split.rows(model, mb)
        else:
            with autocast():
                r, s, c = split.rows(model, mb)
        parts.append([mb, (b - a) / n, r, s, c])
    row_mean = torch.tensor([sum(w * float(r.detach()) for _, w, r, _, _ in parts)], dtype=torch.float64)
    if dist is not None:
        dist.sum_(row_mean)
    states = torch.cat([p[3].detach().float() for p in parts])
    consts = None if parts[0][4] is None else torch.cat([p[4].detach().float() for p in parts])
    if dist is not None:
        sizes = [b - a for a, b in shards]
        states = dist.gather_rows(states, sizes)
        consts = None if consts is None else dist.gather_rows(consts, sizes)
    leaf = states.requires_grad_(True)
    term, logs = split.term(leaf, consts, batch.groups, float(row_mean.item()), step)
    grad = (torch.autograd.grad(term, leaf)[0] if term.requires_grad else torch.zeros_like(leaf))[lo:hi]
    off = 0
    for i, (mb, w, r, s, _) in enumerate(parts):
        if two_pass:  # pass 2: the same forward (same dropout draws), with gradient
            _set_rng_state(rngs[i], device)
            with autocast():
                r, s, _ = split.rows(model, mb)
        k = s.shape[0]
        ((w * r + (s.float() * grad[off:off + k]).sum()) * grad_scale).backward()
        off += k
    return logs


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


def train_loop(model, data: Iterator[Batch], steps: int, lr: float, *, step_loss: StepLoss = answer_loss,
               weight_decay: float = 0.0, grad_clip: float = 1.0, warmup: int = 0, schedule: str = "constant",
               on_step: Callable[[int, dict], None] | None = None, every: int = 0,
               cancel_file: Path | None = None, progress=None, grad_accum: int = 1, bf16: bool = False,
               grad_checkpointing: bool = False, dist: DistContext | None | str = "auto",
               resume: "Resume | None" = None) -> dict:
    """AdamW over the trainable parameters for ``steps`` steps. ``on_step(step, logs)`` is called
    every ``every`` steps and after the last one (the pipeline evaluates there). Returns the last
    logs with ``tokens`` (non-pad tokens seen) and ``seconds``.

    ``grad_accum``: micro-batches per step (the step's batch is cut, the effective batch stays the
    iterator's); ``bf16``: bfloat16 autocast of the forward passes; ``grad_checkpointing``:
    activation checkpointing of the decoder blocks (non-reentrant, so a forward hook on a block, as
    the clustering loss uses, still sees a state with gradient); ``dist``: the process group
    (``"auto"``: :func:`distributed`); ``resume``: continue a long run from a saved step and
    checkpoint it as it goes (:class:`Resume`). With the defaults in one process, the loop is the
    plain one."""
    if dist == "auto":
        dist = distributed()
    if grad_accum < 1:
        raise ConfigError(f"train.grad_accum: must be >= 1 (got {grad_accum})")
    if grad_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", hasattr(model, "gradient_checkpointing_enable")):
            raise ConfigError(f"train.grad_checkpointing: {type(model).__name__} does not support it")
        set_checkpointing(model, True)
    try:
        return _train_loop(model, data, steps, lr, step_loss, weight_decay, grad_clip, warmup, schedule, on_step,
                           every, cancel_file, progress, grad_accum, bf16, dist, resume or Resume())
    finally:
        if grad_checkpointing:
            set_checkpointing(model, False)


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
    """What a long, resumable run (pretraining) adds to :func:`train_loop`: the step it continues
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


def _train_loop(model, data, steps, lr, step_loss, weight_decay, grad_clip, warmup, schedule, on_step, every,
                cancel_file, progress, grad_accum, bf16, dist, resume: Resume) -> dict:
    fsdp = dist is not None and dist.fsdp
    model_out = model  # the caller's model (FSDP: refreshed from the sharded copy we train)
    if fsdp:
        model = _fsdp_shard(model_out, dist)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = _autocast_factory(bf16, dist.device if dist is not None else
                                 (params[0].device if params else torch.device("cpu")))
    plain = grad_accum == 1 and dist is None
    # one fused kernel per step on a GPU (CPU keeps the default implementation, whose numbers the
    # bit-for-bit CPU results were measured with)
    fused = True if params and params[0].is_cuda and not fsdp else None
    opt = torch.optim.AdamW(_param_groups(params, weight_decay, resume.decay_matrices_only), lr=lr,
                            weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused)
    if resume.optimizer_state is not None:
        opt.load_state_dict(resume.optimizer_state)

    def lr_at(s):
        if s < warmup:
            return (s + 1) / warmup
        if schedule == "cosine":
            frac = (s - warmup) / max(1, steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0

    model.train()
    logs: dict = {}
    tokens, t0 = 0, time.perf_counter()
    for step in range(resume.start_step + 1, steps + 1):
        stop = cancel_file is not None and cancel_file.exists()
        if dist is not None:  # every rank stops at the same step
            stop = dist.any(stop)
        if stop:
            if resume.checkpoint is not None and step > resume.start_step + 1:
                resume.checkpoint(step - 1, opt)
            raise Cancelled(f"cancelled at step {step}")
        for g in opt.param_groups:  # the schedule is a function of the step alone, so a resumed run has it too
            g["lr"] = lr * lr_at(step - 1)
        batch = next(data)
        if plain:
            with autocast():
                loss, logs = step_loss(model, batch, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        else:
            opt.zero_grad(set_to_none=True)
            logs = accumulate_step(model, batch, step, step_loss, grad_accum, dist, autocast,
                                   grad_scale=float(dist.world) if fsdp else 1.0)
            if dist is not None and not fsdp:
                dist.sum_grads(params)
        check_finite_loss(logs, step)  # before the optimizer step: no NaN reaches the weights
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        tokens += int(batch.attention_mask.sum())
        if progress is not None:
            progress.advance(1, logs)
        if on_step is not None and every and (step % every == 0 or step == steps):
            if fsdp:  # the caller evaluates its own (full) model: bring it up to date
                _fsdp_sync(model, model_out)
                model_out.eval()
            model.eval()
            on_step(step, logs)
            model.train()
        if resume.checkpoint is not None and resume.every and (step % resume.every == 0 or step == steps):
            resume.checkpoint(step, opt)
    model.eval()
    if fsdp:
        _fsdp_sync(model, model_out)
        model_out.eval()
        del model, params, opt
    return {**logs, "tokens": tokens, "seconds": time.perf_counter() - t0}
