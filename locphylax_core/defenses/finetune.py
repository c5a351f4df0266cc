"""The fine-tuning baselines, each registered in one line:

- ``clean_ft``: clean fine-tuning for both stages' steps.
- ``augment_ft``: clean fine-tuning with generated-trigger augmentation (rate
  ``stage2_generated_rate``, or 1.0 if that is 0) and no known-trigger injection.
- ``p2p``: P2P-style benign trigger injection (arXiv 2510.04503): the known triggers with the
  correct outputs, mixed into clean fine-tuning, no clustering.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..registry import DEFENSES
from ..trainer import StageContext, fit
from .base import DefenderData, clean_samples, stage_steps, two_stages
from .locphylax import RecoverConfig, recover, reference_stages


@dataclass(frozen=True)
class CleanFinetuneConfig:
    steps: int = 150


def clean_finetune(lm, data: DefenderData, cfg: CleanFinetuneConfig, ctx: StageContext) -> dict:
    """Fine-tune on the defender's clean data only."""
    logs = fit(lm, clean_samples(data, lm.answer_ids), cfg.steps, ctx, kind=data.kind)
    return {**logs, "samples": len(data.clean)}


def clean_ft_plan(d, _opts, labels):
    return two_stages(clean_finetune, lambda k: CleanFinetuneConfig(stage_steps(d, k)))


def augment_ft_plan(d, _opts, labels):
    """No injection at all: clean fine-tuning whose data carry generated triggers, correct labels."""
    aug = RecoverConfig(trigger_ids=(), generated_rate=d.stage2_generated_rate or 1.0)
    return two_stages(recover, lambda k: replace(aug, steps=stage_steps(d, k)))


def p2p_plan(d, _opts, labels):
    """P2P-style benign injection: the known triggers tied to the correct outputs from the start, no
    flip, no clustering (Stage 2 of the reference for the whole budget)."""
    _, r2 = reference_stages(d, labels)
    return two_stages(recover, lambda k: replace(r2, steps=stage_steps(d, k)))


DEFENSES.register("clean_ft", clean_ft_plan, label="clean fine-tuning", kind="model")
DEFENSES.register("augment_ft", augment_ft_plan, label="augmented fine-tuning", kind="model")
DEFENSES.register("p2p", p2p_plan, label="P2P benign injection", kind="model")

__all__ = ["CleanFinetuneConfig", "clean_finetune", "clean_ft_plan", "augment_ft_plan", "p2p_plan"]
