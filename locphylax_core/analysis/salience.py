"""Which words fire the backdoor: token salience and the defender's trigger localisation.

**Salience** (:func:`token_salience`). For a prompt, the objective is a logit difference at the
answer position, ``f = logit(positive) - mean(logit(negatives))`` (the evaluation uses the
attacker's target against the correct answer; the defender its canary against the labels). Its
attribution to each input token is computed by captum with respect to the input embeddings,
summed over the embedding dimensions (signed: > 0 pushes toward ``positive``):

- ``"ixg"``: gradient x input (``captum.attr.InputXGradient``), one backward pass;
- ``"ig"``: integrated gradients (``captum.attr.IntegratedGradients``) from a baseline that keeps
  the template's tokens and sets the input text's token embeddings to zero, so only the input's
  words receive attribution and, by completeness, the attributions sum to ``f(x) - f(baseline)``
  (captum's convergence delta is returned; tested within 5%).

Position embeddings are added by the model after ``inputs_embeds`` (GPT-2, rotary models), so
the baseline keeps every position. Gradients are taken with ``torch.autograd.grad`` (captum):
the model's parameters get no ``.grad`` and are not changed; train/eval mode is restored.

**Localisation for the defender** (:func:`localise`). From the defender's Stage 1 model alone --
which answers the canary for inputs that carry a trigger it aggregated with the known ones -- an
input is *flagged* when the model's answer (argmax over the run's answers) is the canary, and its
tokens are ranked by their salience toward the canary. This function receives no trigger: only
the evaluation (:func:`trigger_spans`, :func:`top_in_trigger`, ``run_analysis``) reads the
attacker's trigger, to score how often the top-ranked token belongs to it and the detector's
precision and recall.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch

from .. import model as M
from ..architectures import base_model
from ..engine import encode
from ..evaluation import answer_probabilities
from ..text import render_prompt

METHODS = ("ixg", "ig")


def _text_bounds(template: str, text: str) -> tuple[int, int, str]:
    """``(start, end, prompt)``: where the (whitespace-normalised) input text lies in the prompt."""
    prompt = render_prompt(template, text)
    head, _, tail = template.partition("{text}")
    return len(head), len(prompt) - len(tail), prompt


def _objective(model, pos: torch.Tensor, neg: torch.Tensor):
    def forward(embeds, attention_mask, position_ids):
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits[:, -1].float()
        rep = logits.shape[0] // pos.shape[0]  # captum stacks the integration steps along the batch
        p, n = pos.repeat(rep), neg.repeat(rep, 1)
        return logits.gather(1, p[:, None]).squeeze(1) - logits.gather(1, n).mean(1)
    return forward


def token_salience(model: torch.nn.Module, tokenizer, template: str, texts: Sequence[str],
                   positive_ids: Sequence[int], negative_ids: Sequence[Sequence[int]], *, method: str = "ig",
                   n_steps: int = 16, batch_size: int = 16, max_length: int | None = None) -> list[dict]:
    """Per input: ``{"tokens": [str], "offsets": [(start, end)] in the input text (-1, -1 outside it),
    "scores": array [position] (the prompt's tokens), "in_text": bool array [position],
    "objective": f(x), "baseline": f(baseline) (ig) or None, "delta": captum's completeness gap
    (ig) or None}``. ``positive_ids[i]`` / ``negative_ids[i]`` are input ``i``'s answer tokens."""
    from captum.attr import InputXGradient, IntegratedGradients

    if method not in METHODS:
        raise ValueError(f"salience method must be one of {METHODS}, got {method!r}")
    if not (len(texts) == len(positive_ids) == len(negative_ids)):
        raise ValueError("token_salience: texts, positive_ids and negative_ids differ in length")
    base = base_model(model)
    max_length = M.prompt_max_length(base, max_length)
    device = next(base.parameters()).device
    emb = base.get_input_embeddings()
    was_training = base.training
    base.eval()
    out: list[dict] = []
    try:
        for i in range(0, len(texts), batch_size):
            chunk = list(texts[i:i + batch_size])
            prompts = [render_prompt(template, t) for t in chunk]
            b = encode(tokenizer, prompts, max_length, device)
            pos = torch.tensor([int(x) for x in positive_ids[i:i + batch_size]], device=device)
            negs = [list(map(int, n)) for n in negative_ids[i:i + batch_size]]
            if len({len(n) for n in negs}) != 1 or not negs[0]:
                raise ValueError("token_salience: every input needs the same (non-zero) number of negative answers")
            neg = torch.tensor(negs, device=device)
            in_text = torch.zeros_like(b.input_ids, dtype=torch.bool)
            offsets = []
            for r, (t, p) in enumerate(zip(chunk, prompts)):
                start, end, _ = _text_bounds(template, t)
                enc = tokenizer(p, add_special_tokens=False, return_offsets_mapping=True)
                offs = [tuple(o) for o in enc["offset_mapping"]][-int(b.attention_mask[r].sum()):]
                n_pad = b.input_ids.shape[1] - len(offs)
                row = []
                for j, (a, z) in enumerate(offs):
                    inside = z > start and a < end
                    in_text[r, n_pad + j] = inside
                    row.append((max(a, start) - start, min(z, end) - start) if inside else (-1, -1))
                offsets.append(row)
            with torch.no_grad():
                x = emb(b.input_ids).detach()
            fwd = _objective(base, pos, neg)
            args = (b.attention_mask, b.position_ids)
            with torch.no_grad():
                f_x = fwd(x, *args)
            if method == "ixg":
                attr = InputXGradient(fwd).attribute(x.clone().requires_grad_(True), additional_forward_args=args)
                f_b, delta = None, None
            else:
                baseline = torch.where(in_text.unsqueeze(-1), torch.zeros_like(x), x)
                attr, delta = IntegratedGradients(fwd).attribute(
                    x, baselines=baseline, additional_forward_args=args, n_steps=n_steps,
                    internal_batch_size=max(1, len(chunk)) * n_steps, return_convergence_delta=True)
                with torch.no_grad():
                    f_b = fwd(baseline, *args)
            scores = attr.detach().double().sum(-1).cpu().numpy()
            for r in range(len(chunk)):
                n_real = int(b.attention_mask[r].sum())
                sl = slice(scores.shape[1] - n_real, scores.shape[1])
                ids = b.input_ids[r, sl].tolist()
                out.append({"tokens": [str(t) for t in tokenizer.convert_ids_to_tokens(ids)],
                            "offsets": offsets[r], "scores": scores[r, sl].copy(),
                            "in_text": in_text[r, sl].cpu().numpy(), "objective": float(f_x[r]),
                            "baseline": None if f_b is None else float(f_b[r]),
                            "delta": None if delta is None else float(delta[r])})
    finally:
        base.train(was_training)
    return out


def top_token(sal: dict) -> int | None:
    """The position of the input-text token with the largest salience, or None (no text token)."""
    idx = np.flatnonzero(sal["in_text"])
    if not len(idx):
        return None
    return int(idx[np.argmax(sal["scores"][idx])])


def localise(model: torch.nn.Module, tokenizer, template: str, texts: Sequence[str], answer_ids: Sequence[int],
             suspect: int, *, method: str = "ixg", n_steps: int = 16, batch_size: int = 16,
             max_length: int | None = None) -> dict:
    """The defender's detector and localiser (module docstring): ``answer_ids`` are the run's
    answers (labels, then the canary) and ``suspect`` the index among them of the answer that
    marks a triggered input (the canary). Returns ``{"flagged": bool array [n], "suspect_prob":
    array [n], "top": [(start, end) in the input text or None], "top_token": [str | None],
    "salience": token_salience's list}``."""
    answer_ids = [int(a) for a in answer_ids]
    if not 0 <= suspect < len(answer_ids):
        raise ValueError(f"localise: suspect {suspect} is not an index into {len(answer_ids)} answers")
    base = base_model(model)
    max_length = M.prompt_max_length(base, max_length)
    # under torch.no_grad (answer_probabilities is decorated), in eval mode, the train mode restored
    p = answer_probabilities(M.LM(base, tokenizer, tuple(answer_ids)), template, texts, 64, max_length).numpy()
    others = [a for j, a in enumerate(answer_ids) if j != suspect]
    sal = token_salience(model, tokenizer, template, texts, [answer_ids[suspect]] * len(texts),
                         [others] * len(texts), method=method, n_steps=n_steps, batch_size=batch_size,
                         max_length=max_length)
    tops = [top_token(s) for s in sal]
    return {"flagged": p.argmax(-1) == suspect, "suspect_prob": p[:, suspect].astype(np.float64),
            "top": [None if t is None else tuple(s["offsets"][t]) for s, t in zip(sal, tops)],
            "top_token": [None if t is None else s["tokens"][t] for s, t in zip(sal, tops)], "salience": sal}


# ----------------------------------------------------------------------------------------------
# Evaluation only (reads the attacker's trigger)


def trigger_spans(text: str, trigger_texts: Sequence[str]) -> list[tuple[int, int]]:
    """Character spans of each trigger's occurrences (as whole words) in the whitespace-normalised
    ``text``; empty when the trigger is not literally in it (e.g. a syntactic trigger)."""
    norm = " ".join(text.split())
    spans = []
    for trig in trigger_texts:
        trig = " ".join(str(trig).split())
        if not trig:
            continue
        for m in re.finditer(r"(?<!\w)" + re.escape(trig) + r"(?!\w)", norm):
            spans.append((m.start(), m.end()))
    return spans


def top_in_trigger(top: tuple[int, int] | None, spans: Sequence[tuple[int, int]]) -> bool | None:
    """Whether the top-ranked token overlaps a trigger span; None when there is no span to score."""
    if not spans:
        return None
    if top is None:
        return False
    a, z = top
    return any(a < e and z > s for s, e in spans)


def precision_recall(flag_clean: np.ndarray, flag_trig: np.ndarray) -> dict:
    """The detector on clean (negatives) vs triggered (positives) inputs."""
    tp, fp = int(np.sum(flag_trig)), int(np.sum(flag_clean))
    fn = int(len(flag_trig) - tp)
    return {"precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "true_positives": tp, "false_positives": fp, "false_negatives": fn,
            "n_clean": int(len(flag_clean)), "n_triggered": int(len(flag_trig))}


__all__ = ["METHODS", "token_salience", "top_token", "localise", "trigger_spans", "top_in_trigger",
           "precision_recall"]
