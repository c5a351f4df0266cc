"""Baseline: bdvax, "backdoor vaccination" (the idea of arXiv 2603.13461, implemented from its
description; the paper itself could not be read here, so every choice below is this project's):
the defender plants several backdoors of its OWN (random triggers it makes up, never the
attacker's) into copies of the suspicious model, fine-tunes one more copy on clean data with the
same budget, and diffs each vaccinated copy against that clean copy, unit by unit, in one block's
MLP. Units whose change recurs across the vaccines are taken to be the model's backdoor pathway
(shared by any trigger, the unknown one included); they are zeroed and the model is fine-tuned
briefly on clean data with them held at zero (fine-pruning's Stage 2).
Choices the idea leaves open, and what is done here:
- vaccines: ``variants`` (4) triggers from ``defense.generate_trigger`` (made-up word, symbols,
  phrase or sentence of the defender's own words, at start/end/random), seeded by the stage seed;
  behaviour: classification, label ``v mod n_labels`` for vaccine v (different vaccines, different
  targets, so a unit is flagged for "being a backdoor", not for one label); response tasks, the
  defender's refusal of benign requests (the only behaviour it writes without harmful content);
  ``injection_rate`` (0.3) of the clean data carries each vaccine, mixed with all clean data;
- budget: each copy, the clean one included, trains ``vaccine_steps`` (default defense.stage1_steps)
  with the defense's optimiser settings and the same seed, so the clean copy is the same training
  without the trigger; the stage's ``steps`` counts all (variants + 1) copies' steps;
- the diff (``signal``): ``activation`` (default): |mean activation of each unit on the vaccine's
  triggered clean prompts, vaccinated copy minus clean copy| (the vaccine's own inputs are where
  its pathway is active); ``weight``: the L2 norm of the change of each unit's weights (inputs,
  bias and output column); block: ``defense.layer`` (default the last);
- recurrence: each vaccine flags its top ``units`` (5%) of the block's units by change; a unit is
  zeroed when at least ``recurrence`` (2) of the ``variants`` flag it;
- after zeroing: ``defense.stage2_steps`` of clean fine-tuning with the units held at zero.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch
from pydantic import Field, field_validator

from ..architectures import block_mlp
from ..attack import insert_trigger
from ..config import Options
from ..registry import DEFENSES
from ..text import Example
from ..trainer import StageContext, TrainSettings, fit
from .base import (DefenderData, DefenderTrigger, StagePlan, clean_samples, generate_trigger,
                   triggered_copies)
from .fine_pruning import FinePruneConfig, fine_prune, mlp_unit_activity, unit_slice


@dataclass(frozen=True)
class VaccinateConfig:
    steps: int = 400  # total training steps of the copies: (variants + 1) x vaccine_steps
    vaccine_steps: int = 80
    variants: int = 4
    units: float = 0.05  # fraction of the block's units each vaccine flags (its top-k by change)
    recurrence: int = 2  # zero a unit flagged by at least this many vaccines
    layer: int = -1
    injection_rate: float = 0.3
    signal: str = "activation"  # "activation" or "weight"
    max_examples: int = 256  # triggered prompts per vaccine for the activation diff


def vaccine_backdoors(data: DefenderData, variants: int, seed: int) -> list[tuple[DefenderTrigger, int]]:
    """The defender's own synthetic backdoors: (trigger, target answer index) per vaccine."""
    rng = random.Random(f"{seed}:bdvax")
    vocabulary = sorted({w for e in data.clean for w in e.text.split()})
    flip = data.kind.flip_target(data.labels)
    out = []
    for v in range(variants):
        text, position = generate_trigger(rng, vocabulary)
        out.append((DefenderTrigger(text, position), flip if isinstance(flip, int) else v % len(data.labels)))
    return out


def unit_change(vaccinated, clean, data: DefenderData, trigger: DefenderTrigger, cfg: VaccinateConfig,
                settings: TrainSettings, seed: int) -> torch.Tensor:
    """Per MLP unit of block ``cfg.layer``: how much the vaccinated copy differs from the clean copy
    (``cfg.signal``, see above)."""
    if cfg.signal == "weight":
        total = None
        for (tv, axis), (tc, _) in zip(block_mlp(vaccinated.model, cfg.layer).tensors(),
                                       block_mlp(clean.model, cfg.layer).tensors()):
            d = (tv.detach().float() - tc.detach().float()) ** 2
            d = d.sum(tuple(i for i in range(d.dim()) if i != axis)) if d.dim() > 1 else d
            total = d if total is None else total + d
        return total.sqrt()
    rng = random.Random(f"{seed}:bdvax:probe:{trigger.text}")
    rows = rng.sample(list(data.clean), min(cfg.max_examples, len(data.clean)))
    probe = [Example(insert_trigger(e.text, trigger.text, trigger.position, rng), e.label) for e in rows]
    act = [mlp_unit_activity(m, data, cfg.layer, cfg.max_examples, settings.batch_size, settings.max_length,
                             magnitude=False, examples=probe) for m in (vaccinated, clean)]
    return (act[0] - act[1]).abs()


def recurrent_units(changes: Sequence[torch.Tensor], units: float, recurrence: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the units flagged by at least ``recurrence`` of the vaccines, votes per unit): each vaccine
    flags its top ceil(``units`` x n_units) units by change."""
    n_units = len(changes[0])
    k = max(1, math.ceil(units * n_units))
    votes = torch.zeros(n_units, dtype=torch.long)
    for c in changes:
        votes[torch.topk(c.float().cpu(), k).indices] += 1
    return (votes >= recurrence).nonzero().flatten(), votes


def vaccinate(lm, data: DefenderData, cfg: VaccinateConfig, ctx: StageContext) -> dict:
    """Zero the MLP units of block ``cfg.layer`` whose change recurs across the defender's own
    synthetic backdoors (see above). Trains copies only; ``lm`` loses the zeroed units and is not
    trained here (the plan's Stage 2 fine-tunes it)."""
    seed, settings = ctx.seed, ctx.settings
    copies = ctx.replace(observer=None)  # the copies are not evaluated: only the defended model is
    start = time.perf_counter()
    clean = copy.deepcopy(lm)
    fit(clean, clean_samples(data, lm.answer_ids), cfg.vaccine_steps, copies, kind=data.kind)
    changes, triggers = [], []
    for v, (trigger, target) in enumerate(vaccine_backdoors(data, cfg.variants, seed)):
        vdata = replace(data, triggers=(trigger,))
        samples = clean_samples(data, lm.answer_ids) + triggered_copies(
            vdata, (0,), cfg.injection_rate, target, lm.answer_ids, seed)
        vaccinated = copy.deepcopy(lm)
        fit(vaccinated, samples, cfg.vaccine_steps, copies, kind=vdata.kind)
        changes.append(unit_change(vaccinated, clean, vdata, trigger, cfg, settings, seed))
        triggers.append({"trigger": trigger.text, "position": trigger.position, "target": int(target)})
        del vaccinated
    del clean
    selected, votes = recurrent_units(changes, cfg.units, cfg.recurrence)
    mlp = block_mlp(lm.model, cfg.layer)
    with torch.no_grad():
        for t, axis in mlp.tensors():
            t[unit_slice(axis, t.dim(), selected.to(t.device))] = 0
    return {"seconds": time.perf_counter() - start, "samples": len(data.clean), "vaccines": triggers, "pruned": int(len(selected)),
            "units": mlp.n_units, "flagged_per_vaccine": max(1, math.ceil(cfg.units * mlp.n_units)),
            "votes": {str(n): int((votes == n).sum()) for n in range(cfg.variants + 1)}}


class BdvaxOptions(Options):
    variants: int = Field(4, ge=1, le=16)  # synthetic backdoors (vaccines), each in its own copy
    units: float = Field(0.05, gt=0, le=0.5)  # fraction of the block's MLP units each vaccine flags
    recurrence: int = Field(2, ge=1)  # zero a unit flagged by at least this many vaccines
    vaccine_steps: int | None = Field(None, ge=1, le=100_000)  # each copy's steps (None: defense.stage1_steps)
    injection_rate: float = Field(0.3, gt=0, le=1)  # fraction of the clean data carrying each vaccine
    signal: Literal["activation", "weight"] = "activation"  # what is diffed against the clean copy

    @field_validator("recurrence")
    @classmethod
    def _recurrence(cls, v, info):
        n = info.data.get("variants")
        if n is not None and v > n:
            raise ValueError(f"at most variants ({n})")
        return v


def bdvax_plan(d, opts: BdvaxOptions, labels):
    """Stage 1 vaccinates (trains copies, zeroes the recurring units), Stage 2 fine-tunes on clean
    data with them held at zero."""
    steps = opts.vaccine_steps or d.stage1_steps
    cfg = VaccinateConfig((opts.variants + 1) * steps, steps, opts.variants, opts.units, opts.recurrence, d.layer,
                          opts.injection_rate, opts.signal)
    return [StagePlan("stage1", vaccinate, cfg), StagePlan("stage2", fine_prune, FinePruneConfig(d.stage2_steps, 0.0, d.layer))]


DEFENSES.register("bdvax", bdvax_plan, label="backdoor vaccination", options=BdvaxOptions, kind="model")
