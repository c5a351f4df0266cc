"""Distribution: the processes of a multi-process launch (``accelerate launch`` / ``torchrun``),
FSDP sharding, and one optimizer step's gradient by micro-batches over the ranks
(:func:`accumulate_step`). The training loop (``trainer.fit``) uses these; a plain
single-process run with ``grad_accum = 1`` never does.

One optimizer step always sees the whole batch the data iterator yields (``batch_size`` rows).
With ``grad_accum = k`` and ``world`` processes, process r takes the r-th of ``world``
contiguous shards of the batch (every process draws the same seeded batch, so the union of the
shards is exactly the single-process batch) and cuts it into k contiguous micro-batches of about
``batch_size / (world * k)`` rows. A micro-batch's loss is weighted by its share of the batch's
rows and the gradients are summed over micro-batches and processes, so a loss that is a mean
over rows gets exactly the full-batch gradient (up to floating-point order). A loss that is not
a mean over rows declares its structure with :class:`engine.SplitLoss` (docs/scale.md,
"Gradient accumulation, bf16, checkpointing").
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import fields, is_dataclass, replace
from typing import Sequence

import torch

from .architectures import decoder_blocks
from .engine import StepLoss
from .errors import ConfigError


class DistContext:
    """The processes of a multi-process launch (``accelerate launch`` / ``torchrun``): rank, world
    size, device and the collectives the training loop and the pipeline use."""

    def __init__(self, rank: int, world: int, device: torch.device, fsdp: bool = False,
                 fsdp_wrap: Sequence[str] = (), fsdp_reshard: bool = True):
        self.rank, self.world, self.device = rank, world, torch.device(device)
        # FSDP (accelerate launch with configs/accelerate/fsdp.yaml): training shards a copy of the
        # model over the ranks (see fsdp_shard); fsdp_wrap: class names of the FSDP units (empty:
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


def fsdp_shard(model, dist: DistContext):
    """A copy of ``model`` sharded with FSDP2 (``fully_shard``): each FSDP unit (the decoder blocks,
    or the modules whose class is named in the accelerate config's transformer_layer_cls_to_wrap)
    and the root. Parameters, gradients and AdamW's moments of the copy are split over the ranks;
    ``model`` itself keeps one full copy of the weights, which :func:`fsdp_sync` refreshes for
    evaluation and checkpoints."""
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


def fsdp_sync(work, model) -> None:
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
    upd = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            upd[f.name] = v[a:b]
        elif is_dataclass(v) and not isinstance(v, type):
            upd[f.name] = slice_rows(v, a, b, n)
    return replace(batch, **upd)


def rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device: torch.device) -> None:
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
            rngs.append(rng_state(device))
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
            set_rng_state(rngs[i], device)
            with autocast():
                r, s, _ = split.rows(model, mb)
        k = s.shape[0]
        ((w * r + (s.float() * grad[off:off + k]).sum()) * grad_scale).backward()
        off += k
    return logs


__all__ = ["DistContext", "distributed", "fsdp_shard", "fsdp_sync", "slice_rows", "accumulate_step"]
