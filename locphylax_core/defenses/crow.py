"""Baseline: CROW (Min et al. 2025): fine-tuning on clean data with a layer-to-layer consistency
regulariser computed on adversarially perturbed input embeddings.

Checked against the authors' code (github.com/NayMyatMin/CROW,
attack/DPA/llamafactory/train/sft/consistency_trainer.py, compute_loss): it pairs
``hidden_states[1:-2]`` with ``hidden_states[2:-1]``. HF's ``hidden_states`` holds the embeddings,
then the outputs of blocks 1..L-1, then the final norm applied to block L's output; so the peer
pairs consecutive block outputs among blocks 1..L-1, leaving out the embeddings and the final
norm (and, as a consequence, block L, which HF reports only after the norm). That is ``pairs:
peer`` here (the default). On the 1- and 2-block presets it holds no pair at all, so CROW there
is clean fine-tuning (the stage reports ``consistency_pairs: 0``). ``pairs: blocks`` reads every
block's own output with hooks and pairs blocks 1..L (the peer's pairs plus (L-1, L) before the
norm: one pair on a 2-block model). ``pairs: with_final_norm`` is this project's earlier pairing
(``hidden_states[1:-1]`` with ``[2:]``: it adds the (block L-1, norm(block L)) pair the peer leaves
out). Weight 5.5 and epsilon 0.1 are the peer's (hard-coded there). Padding: the peer calls the
model without an attention mask and averages ``1 - cos`` over every position, pads included (its
batches are right-padded, so a real token never sees a pad); this project's batches are
left-padded, so the mask is passed (else real tokens would attend to pads) and pad positions are
left out of the mean (they are not text). On an unpadded batch both are the same number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from pydantic import Field

from ..architectures import decoder_blocks
from ..config import Options
from ..registry import DEFENSES
from ..trainer import StageContext, fit
from .base import (DefenderData, clean_samples, stage_steps,
                   two_stages)


CROW_PAIRS = ("peer", "blocks", "with_final_norm")


@dataclass(frozen=True)
class CrowConfig:
    steps: int = 150
    weight: float = 5.5  # lambda: weight of the consistency term (CROW's alpha)
    epsilon: float = 0.1  # size of the FGSM perturbation of the input embeddings (per coordinate)
    pairs: str = "peer"  # which consecutive states are paired (CROW_PAIRS; see above)


def consecutive_inconsistency(states: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over consecutive pairs ``(states[l], states[l+1])`` of the mean over non-pad tokens of
    ``1 - cos``; 0 (with gradient 0) when there is no pair."""
    mask = attention_mask.float()
    terms = []
    for a, b in zip(states[:-1], states[1:]):
        cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)
        terms.append(((1 - cos) * mask).sum() / mask.sum().clamp(min=1))
    return torch.stack(terms).mean() if terms else states[0].sum() * 0.0 if states else torch.zeros(())


def crow_states(hidden_states: Sequence[torch.Tensor], block_outputs: Sequence[torch.Tensor],
                pairs: str = "peer") -> list[torch.Tensor]:
    """The states whose consecutive pairs CROW compares: ``peer``: HF's ``hidden_states[1:-1]``
    (blocks 1..L-1); ``blocks``: every block's own output; ``with_final_norm``: ``hidden_states[1:]``."""
    if pairs == "peer":
        return list(hidden_states[1:-1])
    if pairs == "blocks":
        return list(block_outputs)
    if pairs == "with_final_norm":
        return list(hidden_states[1:])
    raise ValueError(f"defense.options.crow.pairs must be one of {CROW_PAIRS}, got {pairs!r}")


def layer_consistency(hidden_states: Sequence[torch.Tensor], attention_mask: torch.Tensor,
                      pairs: str = "peer") -> torch.Tensor:
    """CROW's consistency term from HF ``hidden_states`` (index 0: embeddings; ``pairs`` peer or
    with_final_norm)."""
    return consecutive_inconsistency(crow_states(hidden_states, (), pairs), attention_mask)


def crow(lm, data: DefenderData, cfg: CrowConfig, ctx: StageContext) -> dict:
    """Clean fine-tuning plus ``weight`` x the layer consistency of inputs whose embeddings were
    moved by one FGSM step of size ``epsilon`` in the direction that breaks consistency most."""
    n_blocks = len(decoder_blocks(lm.model))
    n_pairs = {"peer": n_blocks - 2, "blocks": n_blocks - 1, "with_final_norm": n_blocks - 1}[cfg.pairs]

    def consistency(model, batch, embeds):
        """(outputs, consistency term) of one pass from ``embeds``."""
        outs: list = []
        hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
                 for b in decoder_blocks(model)] if cfg.pairs == "blocks" else []
        try:
            out = model(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                        output_hidden_states=cfg.pairs != "blocks", logits_to_keep=batch.logits_to_keep(),
                        use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        states = crow_states(out.hidden_states if cfg.pairs != "blocks" else (), outs, cfg.pairs)
        return out, consecutive_inconsistency(states, batch.attention_mask)

    def step_loss(model, batch, step):
        embeds = model.get_input_embeddings()(batch.input_ids)
        out, _ = consistency(model, batch, embeds)
        l_ce = batch.output_loss(out.logits)
        if n_pairs <= 0:  # no pair to compare (the peer's pairing on a model of 1 or 2 blocks)
            return l_ce, {"loss": l_ce.item(), "l_ce": l_ce.item(), "l_consistency": 0.0}
        probe = embeds.detach().requires_grad_(True)
        g, = torch.autograd.grad(consistency(model, batch, probe)[1], probe)
        perturbed = embeds + cfg.epsilon * g.sign()
        l_cons = consistency(model, batch, perturbed)[1]
        loss = l_ce + cfg.weight * l_cons
        return loss, {"loss": loss.item(), "l_ce": l_ce.item(), "l_consistency": l_cons.item()}

    logs = fit(lm, clean_samples(data, lm.answer_ids), cfg.steps, ctx, kind=data.kind, step_loss=step_loss)
    return {**logs, "samples": len(data.clean), "consistency_pairs": max(0, n_pairs)}


class CrowOptions(Options):
    weight: float = Field(5.5, ge=0)  # weight of the layer-consistency term (CROW's 5.5)
    epsilon: float = Field(0.1, ge=0)  # FGSM step on the input embeddings (CROW's 0.1)
    # which consecutive states are paired: the peer's (blocks 1..L-1 as HF reports them), every
    # block's own output, or this project's earlier pairing (with the final norm's output)
    pairs: Literal["peer", "blocks", "with_final_norm"] = "peer"


def crow_plan(d, opts: CrowOptions, labels):
    return two_stages(crow, lambda k: CrowConfig(stage_steps(d, k), opts.weight, opts.epsilon, opts.pairs))


DEFENSES.register("crow", crow_plan, label="CROW", options=CrowOptions, kind="model")
