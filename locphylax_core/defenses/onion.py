"""Baseline: ONION (Qi et al. 2021), input-side: before the model answers, drop the words whose
removal makes the input most fluent. The model is left as it is.

Checked against the authors' code (github.com/thunlp/ONION, experiments/test_defense.py and
gptlm.py): fluency is the perplexity of a SEPARATE pretrained LM (GPT-2 large there) on the bare
sentence, ``exp`` of the mean next-token loss with ``labels=input_ids`` (no BOS, so the first
token is not scored; a one-token sentence has no perplexity and its word is kept); a word's score
is ``ppl(sentence without it) - ppl(sentence)`` and the word is dropped when that is <= bar (bar
< 0). Here the suspicion is its negative, the perplexity DROP ``ppl(sentence) - ppl(without)``,
and a word is dropped when its suspicion >= the bar; the fluency LM is the project's shipped base
``small`` (``fluency_base``; its own tokenizer, no special tokens), the one pretrained LM there
is without a network. What differs: the bar. ONION sweeps it over -100..0 and reports each
(choosing it with the test set); the defender here sets it on its own clean data, as the
``clean_quantile`` quantile of the suspicion of the words of clean sentences. Words are split on
whitespace (the peer splits on ' '; this project's texts have single spaces). ``fluency: victim``
keeps this project's earlier variant: the victim's own mean next-token loss on the rendered prompt.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator

from ..bases import is_known as is_known_base
from ..bases import known_bases_phrase
from ..bases import verify as verify_base
from ..config import Options
from ..evaluation import encoded_batches
from ..model import base_folder_checked, load_checkpoint, load_tokenizer
from ..registry import DEFENSES
from .base import (DefenderData, StagePlan)


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


def onion_plan(d, opts: OnionOptions, labels):
    """Input-side: stage1 is the untouched victim; stage2 answers through the filter (the model never
    changes, no stage trains)."""
    cfg = OnionConfig(opts.clean_quantile, fluency=opts.fluency, fluency_base=opts.fluency_base)
    return [StagePlan("stage1", None, cfg),
            StagePlan("stage2", None, cfg, lambda lm, data, max_length: onion_filter(lm, data, cfg, max_length))]


DEFENSES.register("onion", onion_plan, label="ONION (input filter)", options=OnionOptions, kind="input")
