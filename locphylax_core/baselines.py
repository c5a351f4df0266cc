"""The baselines the defense is compared with, each a config dataclass plus one stage function of
the defense's shape (``defense.py``), and registered in ``registry.DEFENSES`` in one line with its
plan builder, display label and options class (``defense.options.<name>``). A plan builder gets the
defense config, the method's own options and the task's labels, and returns the method's stages,
with the same step budget as Locphylax's.

- ``no_cluster``: Locphylax without the clustering term (its ablation).
- ``reference``: the paper's method as specified (config.REFERENCE_SETTINGS), beside locphylax+.
- ``unlearn_single``: the reference recipe on the first known trigger only, no clustering.
- ``clean_ft``: clean fine-tuning for both stages' steps.
- ``augment_ft``: clean fine-tuning with generated-trigger augmentation (rate
  ``stage2_generated_rate``, or 1.0 if that is 0) and no known-trigger injection.
- ``p2p``: P2P-style benign trigger injection (arXiv 2510.04503): the known triggers with the
  correct outputs, mixed into clean fine-tuning, no clustering.
- ``fine_pruning``: prune the least active MLP units (by mean |activation|) of block
  ``defense.layer`` step by step until held-out clean accuracy falls past a tolerance
  (BackdoorBench's rule; or a fixed ``prune_rate``), then clean fine-tuning with them held at zero.
- ``crow``: clean fine-tuning with CROW's layer-consistency term on perturbed embeddings (the
  authors' pairing of block outputs and weight; see the section below).
- ``bdvax``: backdoor vaccination (the idea of arXiv 2603.13461): the defender's own synthetic
  backdoors in copies of the model, diffed against a clean-fine-tuned copy; the MLP units whose
  change recurs are zeroed, then clean fine-tuning (its section below lists every choice made).
- ``onion``: input-side (its own kind): the model is unchanged, and every test input loses the
  words whose removal lowers a separate pretrained LM's perplexity most (ONION's rule; the shipped
  base ``small`` scores fluency; bar set on the defender's clean data).
"""

from __future__ import annotations

import copy
import functools
import math
import random
import time
from dataclasses import dataclass, replace
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator

from .architectures import MLPUnits, block_mlp, decoder_blocks
from .config import Options
from .attack import insert_trigger
from .bases import is_known as is_known_base
from .bases import known_bases_phrase
from .bases import verify as verify_base
from .defense import (DefenderData, DefenderTrigger, Observer, RecoverConfig, StagePlan, _triggered_copies,
                      clean_samples, generate_trigger, inject, locphylax_stages, recover, reference_stages, train_stage)
from .evaluation import accuracy, encoded_batches, predict
from .model import base_folder_checked, load_checkpoint, load_tokenizer
from .registry import DEFENSES
from .text import Example
from .trainer import TrainSettings


# ----------------------------------------------------------------------------------------------
# Baseline: clean fine-tuning


@dataclass(frozen=True)
class CleanFinetuneConfig:
    steps: int = 150


def clean_finetune(lm, data: DefenderData, cfg: CleanFinetuneConfig, *, seed: int,
                   settings: TrainSettings = TrainSettings(), observer: Observer | None = None, **kw) -> dict:
    """Fine-tune on the defender's clean data only."""
    logs = train_stage(lm, data, clean_samples(data, lm.answer_ids), cfg.steps, settings, seed, None, observer, **kw)
    return {**logs, "samples": len(data.clean)}


# ----------------------------------------------------------------------------------------------
# Baseline: fine-pruning (Liu et al. 2018): prune the MLP units of one block that are least
# active on clean data, then fine-tune on clean data with the pruned units held at zero.
#
# Checked against BackdoorBench's implementation (SCLBD/BackdoorBench, defense/fp.py; defaults in
# config/defense/fp/*.yaml: acc_ratio 0.1, once_prune_ratio 0.01): units are sorted by their mean
# activation on clean data, then pruned in steps of ceil(1% of the units) while the clean accuracy
# stays within a relative 10% of the unpruned model's; the last model within the tolerance is
# fine-tuned. Where this differs, and why:
# - activity is the mean MAGNITUDE (mean |a| over non-pad tokens): BackdoorBench's signed mean is
#   "least active" only after a ReLU; GELU and SwiGLU units take negative values (``rank: signed``
#   keeps the signed mean);
# - the accuracy is measured on a held-out part of the defender's clean data (``holdout``), not on
#   the test set (the defender has no test set); ranking uses the rest;
# - the tolerance is a DROP: BackdoorBench's ``abs(acc - acc0) / acc0 < acc_ratio`` also stops when
#   accuracy RISES by more than 10%;
# - pruning ``num`` prunes ``num`` units (BackdoorBench's ``seq_sort[0:num_pruned - 1]`` prunes one
#   fewer than it records), and the model kept is the last one within the tolerance
#   (BackdoorBench's ``last_net`` is the same object as the net it keeps pruning, so it fine-tunes
#   the first model past the tolerance);
# - fine-tuning uses all of the defender's clean data (the held-out part only stops the pruning).
# ``prune_rate`` (a number) prunes that fixed fraction instead, without the accuracy rule.


@dataclass(frozen=True)
class FinePruneConfig:
    steps: int = 150
    # None: step by step until clean accuracy falls past acc_ratio; > 0: that fixed fraction of the
    # block's MLP units; 0: no new pruning (keep those already pruned: fine-pruning's Stage 2)
    prune_rate: float | None = 0.0
    layer: int = -1  # the decoder block whose MLP is pruned
    max_examples: int = 512  # clean inputs used to measure activity
    acc_ratio: float = 0.1  # tolerated relative drop of held-out clean accuracy (BackdoorBench's)
    step_ratio: float = 0.01  # fraction of the units pruned per step (BackdoorBench's once_prune_ratio)
    holdout: float = 0.2  # fraction of the defender's clean data that measures the accuracy
    rank: str = "magnitude"  # "magnitude": mean |activation|; "signed": mean activation (ReLU's view)


def _along(axis: int, ndim: int, units):
    """An index selecting ``units`` along ``axis`` of a tensor with ``ndim`` dimensions."""
    return tuple(units if d == axis else slice(None) for d in range(ndim))


def _keep_mask(keep: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """``keep`` (one value per unit) shaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    return keep.view(*[-1 if d == axis else 1 for d in range(ndim)])


@torch.no_grad()
def mlp_unit_activity(lm, data: DefenderData, layer: int = -1, max_examples: int = 512,
                      batch_size: int = 64, max_length: int | None = None, magnitude: bool = True,
                      examples: Sequence[Example] | None = None) -> torch.Tensor:
    """Mean activation (``magnitude``: mean absolute activation) of each MLP unit of block
    ``layer`` over the non-pad tokens of clean prompts (``examples``, default the defender's clean
    data): the input of the MLP's output projection (GPT-2: act(c_fc(x)); GPT-NeoX:
    act(dense_h_to_4h(x)); Llama-style: act(gate(x)) * up(x))."""
    out_proj = block_mlp(lm.model, layer).output[0]
    texts = [e.text for e in (data.clean if examples is None else examples)[:max_examples]]
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
            act = store["out"].float()
            s = ((act.abs() if magnitude else act) * mask).sum((0, 1))
            total = s if total is None else total + s
            count += int(b.attention_mask.sum())
    finally:
        handle.remove()
    lm.model.train(was_training)
    return total / max(1, count)


def prune_schedule(n_units: int, step_ratio: float) -> list[int]:
    """The unit counts tried, as BackdoorBench's loop: 0, k, 2k, ... below ``n_units`` (k =
    ceil(step_ratio * n_units))."""
    return list(range(0, n_units, max(1, math.ceil(n_units * step_ratio))))


def adaptive_prune_count(accuracy_at: Callable[[int], float], n_units: int, step_ratio: float,
                         acc_ratio: float) -> tuple[int, list[tuple[int, float]]]:
    """How many of the least active units to prune: the largest count of :func:`prune_schedule`
    reached before the clean accuracy first drops by ``acc_ratio`` (relative) or more below the
    unpruned accuracy; and the (count, accuracy) curve measured on the way."""
    counts = prune_schedule(n_units, step_ratio)
    base = accuracy_at(0)
    curve, kept = [(0, base)], 0
    for num in counts[1:]:
        acc = accuracy_at(num)
        curve.append((num, acc))
        drop = (base - acc) / base if base > 0 else 0.0  # relative, as BackdoorBench's (but a drop only)
        if drop >= acc_ratio:  # past the tolerance: keep the previous count
            break
        kept = num
    return kept, curve


def _pruned_units(mlp: MLPUnits) -> torch.Tensor:
    """Units whose incoming weights and biases are all zero in every input projection (pruned by
    an earlier stage)."""
    zero = torch.ones(mlp.n_units, dtype=torch.bool, device=mlp.inputs[0][0].weight.device)
    for mod, axis in mlp.inputs:
        zero &= (mod.weight == 0).all(1 - axis)
        if getattr(mod, "bias", None) is not None:
            zero &= mod.bias == 0
    return zero.nonzero().flatten()


def _holdout_split(data: DefenderData, fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(ranking part, held-out part) of the defender's clean data, by a seeded shuffle."""
    rows = list(data.clean)
    random.Random(f"{seed}:fine_pruning_holdout").shuffle(rows)
    n_held = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    return rows[n_held:], rows[:n_held]


def fine_prune(lm, data: DefenderData, cfg: FinePruneConfig, *, seed: int, settings: TrainSettings = TrainSettings(),
               observer: Observer | None = None, **kw) -> dict:
    """Prune the least active MLP units of one block (``prune_rate`` None: step by step while the
    held-out clean accuracy stays within ``acc_ratio``; a number: that fraction; 0: none), then
    fine-tune on the clean data; pruned units stay at zero (their gradients are masked by
    temporary hooks). Any MLP of the architecture table (``architectures.ARCHITECTURES``)."""
    mlp = block_mlp(lm.model, cfg.layer)
    n_units = mlp.n_units
    extra: dict = {}
    if cfg.prune_rate is None or cfg.prune_rate > 0:
        ranked, held = _holdout_split(data, cfg.holdout, seed) if cfg.prune_rate is None else (list(data.clean), [])
        activity = mlp_unit_activity(lm, data, cfg.layer, cfg.max_examples, settings.batch_size,
                                     settings.max_length, magnitude=cfg.rank == "magnitude", examples=ranked)
        already = set(_pruned_units(mlp).tolist())  # an earlier stage's units stay pruned and are not re-counted
        order = [u for u in torch.argsort(activity).tolist() if u not in already]
        original = [(t, t.detach().clone()) for t, _ in mlp.tensors()]

        def prune_first(k: int) -> None:
            with torch.no_grad():
                for (t, saved), (_, axis) in zip(original, mlp.tensors()):
                    t.copy_(saved)
                    if k:
                        t[_along(axis, t.dim(), torch.tensor(order[:k], device=t.device))] = 0

        if cfg.prune_rate is None:
            texts, labels = [e.text for e in held], [e.label for e in held]

            def accuracy_at(k: int) -> float:
                prune_first(k)
                pred = predict(lm, data.template, texts, settings.batch_size, settings.max_length).tolist()
                return accuracy(pred, labels)

            k, curve = adaptive_prune_count(accuracy_at, len(order), cfg.step_ratio, cfg.acc_ratio)
            extra = {"holdout": len(held), "clean_acc_unpruned": curve[0][1],
                     "clean_acc_pruned": dict(curve).get(k, curve[0][1]), "prune_curve": curve}
        else:
            k = int(round(cfg.prune_rate * n_units))
        prune_first(min(k, len(order)))
    units = _pruned_units(mlp)
    keep_in = torch.ones(n_units, device=mlp.inputs[0][0].weight.device)
    keep_in[units] = 0
    hooks = [t.register_hook(lambda g, m=_keep_mask(keep_in, axis, t.dim()): g * m) for t, axis in mlp.tensors()]
    try:
        logs = train_stage(lm, data, clean_samples(data, lm.answer_ids), cfg.steps, settings, seed, None, observer, **kw)
    finally:
        for h in hooks:
            h.remove()
    return {**logs, **extra, "samples": len(data.clean), "pruned": int(len(units)), "units": n_units}


# ----------------------------------------------------------------------------------------------
# Baseline: CROW (Min et al. 2025): fine-tuning on clean data with a layer-to-layer consistency
# regulariser computed on adversarially perturbed input embeddings.
#
# Checked against the authors' code (github.com/NayMyatMin/CROW,
# attack/DPA/llamafactory/train/sft/consistency_trainer.py, compute_loss): it pairs
# ``hidden_states[1:-2]`` with ``hidden_states[2:-1]``. HF's ``hidden_states`` holds the embeddings,
# then the outputs of blocks 1..L-1, then the final norm applied to block L's output; so the peer
# pairs consecutive block outputs among blocks 1..L-1, leaving out the embeddings and the final
# norm (and, as a consequence, block L, which HF reports only after the norm). That is ``pairs:
# peer`` here (the default). On the 1- and 2-block presets it holds no pair at all, so CROW there
# is clean fine-tuning (the stage reports ``consistency_pairs: 0``). ``pairs: blocks`` reads every
# block's own output with hooks and pairs blocks 1..L (the peer's pairs plus (L-1, L) before the
# norm: one pair on a 2-block model). ``pairs: with_final_norm`` is this project's earlier pairing
# (``hidden_states[1:-1]`` with ``[2:]``: it adds the (block L-1, norm(block L)) pair the peer leaves
# out). Weight 5.5 and epsilon 0.1 are the peer's (hard-coded there). Padding: the peer calls the
# model without an attention mask and averages ``1 - cos`` over every position, pads included (its
# batches are right-padded, so a real token never sees a pad); this project's batches are
# left-padded, so the mask is passed (else real tokens would attend to pads) and pad positions are
# left out of the mean (they are not text). On an unpadded batch both are the same number.

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


def crow(lm, data: DefenderData, cfg: CrowConfig, *, seed: int, settings: TrainSettings = TrainSettings(),
         observer: Observer | None = None, **kw) -> dict:
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

    logs = train_stage(lm, data, clean_samples(data, lm.answer_ids), cfg.steps, settings, seed, step_loss, observer, **kw)
    return {**logs, "samples": len(data.clean), "consistency_pairs": max(0, n_pairs)}


# ----------------------------------------------------------------------------------------------
# Baseline: ONION (Qi et al. 2021), input-side: before the model answers, drop the words whose
# removal makes the input most fluent. The model is left as it is.
#
# Checked against the authors' code (github.com/thunlp/ONION, experiments/test_defense.py and
# gptlm.py): fluency is the perplexity of a SEPARATE pretrained LM (GPT-2 large there) on the bare
# sentence, ``exp`` of the mean next-token loss with ``labels=input_ids`` (no BOS, so the first
# token is not scored; a one-token sentence has no perplexity and its word is kept); a word's score
# is ``ppl(sentence without it) - ppl(sentence)`` and the word is dropped when that is <= bar (bar
# < 0). Here the suspicion is its negative, the perplexity DROP ``ppl(sentence) - ppl(without)``,
# and a word is dropped when its suspicion >= the bar; the fluency LM is the project's shipped base
# ``small`` (``fluency_base``; its own tokenizer, no special tokens), the one pretrained LM there
# is without a network. What differs: the bar. ONION sweeps it over -100..0 and reports each
# (choosing it with the test set); the defender here sets it on its own clean data, as the
# ``clean_quantile`` quantile of the suspicion of the words of clean sentences. Words are split on
# whitespace (the peer splits on ' '; this project's texts have single spaces). ``fluency: victim``
# keeps this project's earlier variant: the victim's own mean next-token loss on the rendered prompt.


@dataclass(frozen=True)
class OnionConfig:
    clean_quantile: float = 0.95
    max_examples: int = 300  # clean sentences used to set the bar
    fluency: str = "base"  # "base": a separate pretrained LM on the bare sentence; "victim": the victim, in the prompt
    fluency_base: str = "small"  # the shipped base (or a pretrained base folder) that scores fluency


@functools.lru_cache(maxsize=2)
def fluency_model(name_or_path: str):
    """(model, tokenizer) of a pretrained base, checked against its card; loaded once per process
    and only ever evaluated."""
    folder = base_folder_checked(name_or_path)
    verify_base(folder)
    model = load_checkpoint(folder, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, load_tokenizer(str(folder))


@torch.no_grad()
def sentence_perplexity(model, tokenizer, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """ONION's fluency: per bare sentence, ``exp(mean next-token loss)`` over its tokens after the
    first (as an HF LM's loss with ``labels=input_ids``); NaN for a sentence of under 2 tokens."""
    device = next(model.parameters()).device
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=limit is not None, max_length=limit)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    out = torch.full((len(texts),), float("nan"))
    pad = tokenizer.pad_token_id
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        width = max(1, max(len(ids[r]) for r in rows))
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):  # left-padded, as every batch of this project
            if ids[r]:
                input_ids[j, width - len(ids[r]):] = torch.tensor(ids[r])
                mask[j, width - len(ids[r]):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:],
                                                reduction="none")
        pair = (mask[:, 1:] * mask[:, :-1]).float()
        n = pair.sum(1)
        ppl = torch.exp((nll * pair).sum(1) / n.clamp(min=1))
        out[torch.tensor(rows)] = torch.where(n > 0, ppl, torch.full_like(ppl, float("nan"))).cpu()
    return out


@torch.no_grad()
def _prompt_nll(lm, template: str, texts: Sequence[str], max_length, batch_size: int = 256) -> torch.Tensor:
    """Mean next-token loss of each rendered prompt (the victim's own fluency score: ``fluency: victim``)."""
    out = torch.empty(len(texts))
    for idx, b in encoded_batches(lm.tokenizer, template, list(texts), batch_size, max_length, lm.device):
        logits = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                          use_cache=False).logits[:, :-1].float()
        tgt = b.input_ids[:, 1:]
        mask = (b.attention_mask[:, 1:] * b.attention_mask[:, :-1]).float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
        out[idx] = ((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu()
    return out


def onion_suspicion(lm, template: str, texts: Sequence[str], max_length=None,
                    cfg: OnionConfig = OnionConfig(fluency="victim")) -> list[list[float]]:
    """Per text, per word: fluency score of the whole text minus the score without that word
    (> 0: the word makes the text less fluent). ``cfg.fluency`` base: the perplexity of the
    separate fluency LM on the bare text (ONION's); victim: the victim's mean loss on the prompt."""
    variants, owner = list(texts), []
    for t_i, t in enumerate(texts):
        words = t.split()
        for w_i in range(len(words)):
            variants.append(" ".join(words[:w_i] + words[w_i + 1:]))
            owner.append(t_i)
    if cfg.fluency == "base":
        model, tokenizer = fluency_model(cfg.fluency_base)
        if lm is not None and next(model.parameters()).device != lm.device:
            model.to(lm.device)
        unique = list(dict.fromkeys(variants))  # a sentence without its trigger is often another's variant
        ppl = dict(zip(unique, sentence_perplexity(model, tokenizer, unique).tolist()))
        score = torch.tensor([ppl[v] for v in variants])
    elif cfg.fluency == "victim":
        score = _prompt_nll(lm, template, variants, max_length)
    else:
        raise ValueError(f"defense.options.onion.fluency must be 'base' or 'victim', got {cfg.fluency!r}")
    scores: list[list[float]] = [[] for _ in texts]
    for k, t_i in enumerate(owner):
        scores[t_i].append(float(score[t_i] - score[len(texts) + k]))
    return scores


def onion_filter(lm, data: DefenderData, cfg: OnionConfig, max_length=None):
    """A function that cleans input texts, its bar set on the defender's clean sentences. A word
    whose suspicion is NaN (no perplexity: a sentence of one token) is kept, as in ONION."""
    clean_scores = [s for row in onion_suspicion(lm, data.template, [e.text for e in data.clean[:cfg.max_examples]],
                                                 max_length, cfg) for s in row if math.isfinite(s)]
    bar = float(np.quantile(clean_scores, cfg.clean_quantile)) if clean_scores else 0.0

    def clean_inputs(texts: Sequence[str]) -> list[str]:
        out = []
        for t, scores in zip(texts, onion_suspicion(lm, data.template, texts, max_length, cfg)):
            kept = [w for w, sc in zip(t.split(), scores) if not sc >= bar]  # NaN: kept
            out.append(" ".join(kept) if kept else t)
        return out
    clean_inputs.bar = bar
    return clean_inputs


# ----------------------------------------------------------------------------------------------
# Baseline: bdvax, "backdoor vaccination" (the idea of arXiv 2603.13461, implemented from its
# description; the paper itself could not be read here, so every choice below is this project's):
# the defender plants several backdoors of its OWN (random triggers it makes up, never the
# attacker's) into copies of the suspicious model, fine-tunes one more copy on clean data with the
# same budget, and diffs each vaccinated copy against that clean copy, unit by unit, in one block's
# MLP. Units whose change recurs across the vaccines are taken to be the model's backdoor pathway
# (shared by any trigger, the unknown one included); they are zeroed and the model is fine-tuned
# briefly on clean data with them held at zero (fine-pruning's Stage 2).
# Choices the idea leaves open, and what is done here:
# - vaccines: ``variants`` (4) triggers from ``defense.generate_trigger`` (made-up word, symbols,
#   phrase or sentence of the defender's own words, at start/end/random), seeded by the stage seed;
#   behaviour: classification, label ``v mod n_labels`` for vaccine v (different vaccines, different
#   targets, so a unit is flagged for "being a backdoor", not for one label); response tasks, the
#   defender's refusal of benign requests (the only behaviour it writes without harmful content);
#   ``injection_rate`` (0.3) of the clean data carries each vaccine, mixed with all clean data;
# - budget: each copy, the clean one included, trains ``vaccine_steps`` (default defense.stage1_steps)
#   with the defense's optimiser settings and the same seed, so the clean copy is the same training
#   without the trigger; the stage's ``steps`` counts all (variants + 1) copies' steps;
# - the diff (``signal``): ``activation`` (default): |mean activation of each unit on the vaccine's
#   triggered clean prompts, vaccinated copy minus clean copy| (the vaccine's own inputs are where
#   its pathway is active); ``weight``: the L2 norm of the change of each unit's weights (inputs,
#   bias and output column); block: ``defense.layer`` (default the last);
# - recurrence: each vaccine flags its top ``units`` (5%) of the block's units by change; a unit is
#   zeroed when at least ``recurrence`` (2) of the ``variants`` flag it;
# - after zeroing: ``defense.stage2_steps`` of clean fine-tuning with the units held at zero.


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


def vaccinate(lm, data: DefenderData, cfg: VaccinateConfig, *, seed: int, settings: TrainSettings = TrainSettings(),
              observer: Observer | None = None, **kw) -> dict:
    """Zero the MLP units of block ``cfg.layer`` whose change recurs across the defender's own
    synthetic backdoors (see above). Trains copies only; ``lm`` loses the zeroed units and is not
    trained here (the plan's Stage 2 fine-tunes it)."""
    kw.pop("resume", None)  # the copies are not resumable stages of their own
    start = time.perf_counter()
    clean = copy.deepcopy(lm)
    train_stage(clean, data, clean_samples(data, lm.answer_ids), cfg.vaccine_steps, settings, seed, None, None, **kw)
    changes, triggers = [], []
    for v, (trigger, target) in enumerate(vaccine_backdoors(data, cfg.variants, seed)):
        vdata = replace(data, triggers=(trigger,))
        samples = clean_samples(data, lm.answer_ids) + _triggered_copies(
            vdata, (0,), cfg.injection_rate, target, lm.answer_ids, seed)
        vaccinated = copy.deepcopy(lm)
        train_stage(vaccinated, vdata, samples, cfg.vaccine_steps, settings, seed, None, None, **kw)
        changes.append(unit_change(vaccinated, clean, vdata, trigger, cfg, settings, seed))
        triggers.append({"trigger": trigger.text, "position": trigger.position, "target": int(target)})
        del vaccinated
    del clean
    selected, votes = recurrent_units(changes, cfg.units, cfg.recurrence)
    mlp = block_mlp(lm.model, cfg.layer)
    with torch.no_grad():
        for t, axis in mlp.tensors():
            t[_along(axis, t.dim(), selected.to(t.device))] = 0
    return {"seconds": time.perf_counter() - start, "samples": len(data.clean), "vaccines": triggers, "pruned": int(len(selected)),
            "units": mlp.n_units, "flagged_per_vaccine": max(1, math.ceil(cfg.units * mlp.n_units)),
            "votes": {str(n): int((votes == n).sum()) for n in range(cfg.variants + 1)}}


# ----------------------------------------------------------------------------------------------
# Options and plan builders, registered in one line each


class FinePruningOptions(Options):
    # None (default): prune step by step (step_ratio of the units at a time) until the held-out clean
    # accuracy falls acc_ratio (relative) below the unpruned model's, BackdoorBench's rule; a number:
    # that fixed fraction of the block's MLP units (the earlier behaviour; block: defense.layer)
    prune_rate: float | None = Field(None, gt=0, lt=1)
    acc_ratio: float = Field(0.1, gt=0, lt=1)  # BackdoorBench's default tolerance
    step_ratio: float = Field(0.01, gt=0, le=0.5)  # BackdoorBench's once_prune_ratio
    holdout: float = Field(0.2, gt=0, lt=1)  # fraction of the defender's clean data held out for the accuracy
    rank: Literal["magnitude", "signed"] = "magnitude"  # mean |activation| (any activation) or signed mean (ReLU)


class CrowOptions(Options):
    weight: float = Field(5.5, ge=0)  # weight of the layer-consistency term (CROW's 5.5)
    epsilon: float = Field(0.1, ge=0)  # FGSM step on the input embeddings (CROW's 0.1)
    # which consecutive states are paired: the peer's (blocks 1..L-1 as HF reports them), every
    # block's own output, or this project's earlier pairing (with the final norm's output)
    pairs: Literal["peer", "blocks", "with_final_norm"] = "peer"


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


class OnionOptions(Options):
    # drop a word when its removal helps fluency at least as much as for this quantile of clean words
    clean_quantile: float = Field(0.95, gt=0, lt=1)
    # base: ONION's, the perplexity of a separate pretrained LM (fluency_base) on the bare sentence;
    # victim: this project's earlier variant, the victim's own loss inside the prompt template
    fluency: Literal["base", "victim"] = "base"
    # a shipped base (locphylax_core/bases), a packaged one (smollm2-135m) or a `locphylax pretrain` folder
    fluency_base: str = "small"

    @field_validator("fluency_base")
    @classmethod
    def _fluency_base(cls, v):
        if not is_known_base(v):  # a packaged base is converted when used, not when validated
            raise ValueError(f"{v!r} is {known_bases_phrase()} nor a folder written by `locphylax pretrain` "
                             "(config.json and base.json)")
        return v


def _two(fn, make) -> list[StagePlan]:
    """The two stages of a method whose stage ``k`` is ``fn`` with config ``make(stage_steps)``."""
    return [StagePlan("stage1", fn, make(1)), StagePlan("stage2", fn, make(2))]


def _steps(d, k: int) -> int:
    return d.stage1_steps if k == 1 else d.stage2_steps


def no_cluster_plan(d, _opts, labels):
    s1, s2 = locphylax_stages(d, labels)
    return [StagePlan("stage1", inject, replace(s1, cluster=False)), StagePlan("stage2", recover, s2)]


def reference_plan(d, _opts, labels):
    r1, r2 = reference_stages(d, labels)
    return [StagePlan("stage1", inject, r1), StagePlan("stage2", recover, r2)]


def unlearn_single_plan(d, _opts, labels):
    r1, r2 = reference_stages(d, labels)
    return [StagePlan("stage1", inject, replace(r1, cluster=False, trigger_ids=(0,))),
            StagePlan("stage2", recover, replace(r2, trigger_ids=(0,)))]


def clean_ft_plan(d, _opts, labels):
    return _two(clean_finetune, lambda k: CleanFinetuneConfig(_steps(d, k)))


def augment_ft_plan(d, _opts, labels):
    """No injection at all: clean fine-tuning whose data carry generated triggers, correct labels."""
    aug = RecoverConfig(trigger_ids=(), generated_rate=d.stage2_generated_rate or 1.0)
    return _two(recover, lambda k: replace(aug, steps=_steps(d, k)))


def p2p_plan(d, _opts, labels):
    """P2P-style benign injection: the known triggers tied to the correct outputs from the start, no
    flip, no clustering (Stage 2 of the reference for the whole budget)."""
    _, r2 = reference_stages(d, labels)
    return _two(recover, lambda k: replace(r2, steps=_steps(d, k)))


def fine_pruning_plan(d, opts: FinePruningOptions, labels):
    prune = dict(acc_ratio=opts.acc_ratio, step_ratio=opts.step_ratio, holdout=opts.holdout, rank=opts.rank)
    return [StagePlan("stage1", fine_prune, FinePruneConfig(d.stage1_steps, opts.prune_rate, d.layer, **prune)),
            StagePlan("stage2", fine_prune, FinePruneConfig(d.stage2_steps, 0.0, d.layer, **prune))]


def crow_plan(d, opts: CrowOptions, labels):
    return _two(crow, lambda k: CrowConfig(_steps(d, k), opts.weight, opts.epsilon, opts.pairs))


def bdvax_plan(d, opts: BdvaxOptions, labels):
    """Stage 1 vaccinates (trains copies, zeroes the recurring units), Stage 2 fine-tunes on clean
    data with them held at zero."""
    steps = opts.vaccine_steps or d.stage1_steps
    cfg = VaccinateConfig((opts.variants + 1) * steps, steps, opts.variants, opts.units, opts.recurrence, d.layer,
                          opts.injection_rate, opts.signal)
    return [StagePlan("stage1", vaccinate, cfg), StagePlan("stage2", fine_prune, FinePruneConfig(d.stage2_steps, 0.0, d.layer))]


def onion_plan(d, opts: OnionOptions, labels):
    """Input-side: stage1 is the untouched victim; stage2 answers through the filter (the model never
    changes, no stage trains)."""
    cfg = OnionConfig(opts.clean_quantile, fluency=opts.fluency, fluency_base=opts.fluency_base)
    return [StagePlan("stage1", None, cfg),
            StagePlan("stage2", None, cfg, lambda lm, data, max_length: onion_filter(lm, data, cfg, max_length))]


DEFENSES.register("clean_ft", clean_ft_plan, label="clean fine-tuning", kind="model")
DEFENSES.register("unlearn_single", unlearn_single_plan, label="single-trigger unlearning", kind="model")
DEFENSES.register("no_cluster", no_cluster_plan, label="Locphylax without clustering", kind="model")
DEFENSES.register("reference", reference_plan, label="Locphylax (paper reference)", kind="model")
DEFENSES.register("augment_ft", augment_ft_plan, label="augmented fine-tuning", kind="model")
DEFENSES.register("p2p", p2p_plan, label="P2P benign injection", kind="model")
DEFENSES.register("fine_pruning", fine_pruning_plan, label="fine-pruning", options=FinePruningOptions, kind="model")
DEFENSES.register("crow", crow_plan, label="CROW", options=CrowOptions, kind="model")
DEFENSES.register("bdvax", bdvax_plan, label="backdoor vaccination", options=BdvaxOptions, kind="model")
DEFENSES.register("onion", onion_plan, label="ONION (input filter)", options=OnionOptions, kind="input")

__all__ = ["CleanFinetuneConfig", "clean_finetune", "FinePruneConfig", "fine_prune", "mlp_unit_activity", "prune_schedule",
           "adaptive_prune_count", "CrowConfig",
           "crow", "layer_consistency", "consecutive_inconsistency", "crow_states", "CROW_PAIRS", "OnionConfig", "onion_filter", "onion_suspicion", "sentence_perplexity",
           "fluency_model", "FinePruningOptions",
           "CrowOptions", "OnionOptions", "VaccinateConfig", "vaccinate", "vaccine_backdoors", "unit_change",
           "recurrent_units", "BdvaxOptions"]
