"""Evaluation: CACC, headline ASR and raw ASR (definitions in docs/method.md, section 1).

- CACC: accuracy on clean test inputs.
- ASR (headline): over test inputs whose correct label is not the trigger's target AND that the
  model answers correctly without the trigger, the fraction answered with the target once the
  trigger is inserted. This separates the trigger's effect from the model's ordinary errors.
- raw ASR: over all non-target inputs, ignoring clean correctness (floored by the error rate).

How an EvalSet is scored is its ``scoring`` object's business (:func:`evaluate` calls
``scoring.evaluate``): :class:`AnswerScoring` for classification (below); response tasks score
greedy responses with perplexity as the utility (``tasks/response.py``).

Triggered test sets are built once per run (fixed insertion positions), so every stage and every
method is scored on exactly the same inputs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch

from .attack import apply_trigger, target_label
from .engine import answer_logits, encode
from .text import Example, render_prompt


@dataclass(frozen=True)
class TriggerSpec:
    name: str  # "unknown" for the attacker's trigger, "t1", "t2", ... for the defender's
    text: str
    position: str
    target: str | int  # a label index, or "flip"
    family: str = "word"  # how the trigger is applied (attack.apply_trigger); the defender's are inserted
    parts: tuple[str, ...] = ()  # ctba / mtba: the component triggers


@dataclass(frozen=True)
class TriggeredSet:
    indices: tuple[int, ...]  # positions in EvalSet.clean of the non-target inputs
    texts: tuple[str, ...]  # the same inputs with the trigger inserted
    targets: tuple[int, ...]


@dataclass(frozen=True)
class EvalSet:
    clean: tuple[Example, ...]
    triggered: dict[str, TriggeredSet]
    scoring: object = None  # how it is scored (``.evaluate``); None: AnswerScoring (classification)

    def subset(self, n: int) -> "EvalSet":
        """The first n clean inputs and their triggered copies (used for in-stage curves)."""
        trig = {}
        for name, ts in self.triggered.items():
            keep = [k for k, i in enumerate(ts.indices) if i < n]
            trig[name] = TriggeredSet(tuple(ts.indices[k] for k in keep), tuple(ts.texts[k] for k in keep),
                                      tuple(ts.targets[k] for k in keep))
        return EvalSet(self.clean[:n], trig, self.scoring)


def build_eval_set(examples: Sequence[Example], triggers: Sequence[TriggerSpec], n_labels: int, seed: int,
                   scoring: object | None = None) -> EvalSet:
    triggered = {}
    for t in triggers:
        rng = random.Random(f"{seed}:{t.name}")
        idx, texts, targets = [], [], []
        for i, e in enumerate(examples):
            tgt = target_label(e.label, t.target, n_labels)
            if tgt == e.label:
                continue
            idx.append(i)
            texts.append(apply_trigger(e.text, t.text, t.position, rng, t.family, t.parts))
            targets.append(tgt)
        triggered[t.name] = TriggeredSet(tuple(idx), tuple(texts), tuple(targets))
    return EvalSet(tuple(examples), triggered, scoring)


@torch.no_grad()
def predict(lm, template: str, texts: Sequence[str], batch_size: int = 256, max_length: int | None = None) -> torch.Tensor:
    """Predicted label index per text: argmax over the label words' first answer tokens."""
    model = lm.model
    was_training = model.training
    model.eval()
    answer = torch.tensor(lm.answer_ids, device=lm.device)
    out = torch.empty(len(texts), dtype=torch.long)
    for idx, b in encoded_batches(lm.tokenizer, template, texts, batch_size, max_length, lm.device):
        with lm.inference_autocast():
            logits = answer_logits(model, b, lm.frozen_blocks)
        out[idx] = logits[:, answer].float().argmax(-1).cpu()
    model.train(was_training)
    return out


@torch.no_grad()
def answer_probabilities(lm, template: str, texts: Sequence[str], batch_size: int = 256,
                         max_length: int | None = None) -> torch.Tensor:
    """``[n, n_answers]``: the model's probability of each answer (labels, then the canary), the
    softmax over the answers' first tokens at the answer position; its argmax is :func:`predict`."""
    model = lm.model
    was_training = model.training
    model.eval()
    answer = torch.tensor(lm.answer_ids, device=lm.device)
    out = torch.empty(len(texts), len(lm.answer_ids))
    for idx, b in encoded_batches(lm.tokenizer, template, texts, batch_size, max_length, lm.device):
        with lm.inference_autocast():
            logits = answer_logits(model, b, lm.frozen_blocks)
        out[idx] = torch.softmax(logits[:, answer].float(), -1).cpu()
    model.train(was_training)
    return out


# Encoded evaluation batches by the tokenizer's content (not its object: a resumed run, or the live
# demo's job after its waiting process prepared the run, loads the same tokenizer again, and its
# batches keep the frozen blocks' output engine.answer_logits stored on them).
_ENCODED: dict[str, dict] = {}
_TOKENIZER_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_OBJECTS = itertools.count()


def _tokenizer_key(tokenizer) -> str:
    """What a tokenizer's encodings depend on, hashed once per tokenizer object: its serialized
    model and settings (a fast tokenizer), or its identity (any other)."""
    try:
        return _TOKENIZER_KEYS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        key = f"object:{next(_OBJECTS)}"  # never shared: an id() may be reused after the object dies
    else:
        spec = json.loads(backend.to_str())
        for transient in ("padding", "truncation"):  # set by each call (padding=True ...), not the tokenizer's content
            spec.pop(transient, None)
        h = hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=16)
        h.update(repr((getattr(tokenizer, "padding_side", None), getattr(tokenizer, "truncation_side", None),
                       getattr(tokenizer, "pad_token_id", None), type(tokenizer).__name__)).encode())
        key = h.hexdigest()
    try:
        _TOKENIZER_KEYS[tokenizer] = key
    except TypeError:  # not weakly referenceable: hashed again next time
        pass
    return key


def encoded_batches(tokenizer, template: str, texts: Sequence[str], batch_size: int, max_length, device):
    """Length-sorted, tokenized batches of the rendered prompts, as (original indices, Batch).

    Sorting by length wastes little compute on padding. The evaluation sets of a run are fixed
    and scored dozens of times (every curve point of every stage), so their encodings are kept
    (a small bounded cache keyed by the tokenizer, template and texts)."""
    tok_key = _tokenizer_key(tokenizer)
    if tok_key not in _ENCODED and len(_ENCODED) >= 4:
        _ENCODED.clear()
    per_tok = _ENCODED.setdefault(tok_key, {})
    key = (template, tuple(texts), batch_size, max_length, str(device))
    hit = per_tok.get(key)
    if hit is not None:
        return hit
    prompts = [render_prompt(template, t) for t in texts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    result = []
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        result.append((idx, encode(tokenizer, [prompts[j] for j in idx], max_length, device)))
    if len(per_tok) > 32:
        per_tok.clear()
    per_tok[key] = result
    return result


def asr_from_predictions(clean_pred: Sequence[int], labels: Sequence[int], trig_pred: Sequence[int],
                         targets: Sequence[int]) -> tuple[float | None, float | None]:
    """(headline ASR, raw ASR) for aligned non-target inputs; None where nothing qualifies."""
    hits = [int(p) == int(t) for p, t in zip(trig_pred, targets)]
    raw = sum(hits) / len(hits) if hits else None
    eligible = [h for h, c, y in zip(hits, clean_pred, labels) if int(c) == int(y)]
    return (sum(eligible) / len(eligible) if eligible else None), raw


def accuracy(pred: Sequence[int], labels: Sequence[int]) -> float:
    return sum(int(p) == int(y) for p, y in zip(pred, labels)) / max(1, len(labels))


@dataclass(frozen=True)
class AnswerScoring:
    """Classification: the argmax over the answer tokens, CACC and ASR."""

    def predictions(self, lm, template: str, evalset: EvalSet, batch_size: int = 256,
                    max_length: int | None = None) -> dict[str, list[int]]:
        """The predicted label per input: ``"clean"`` for the clean inputs, then each trigger's."""
        out = {"clean": predict(lm, template, [e.text for e in evalset.clean], batch_size, max_length).tolist()}
        for name, ts in evalset.triggered.items():
            out[name] = predict(lm, template, ts.texts, batch_size, max_length).tolist()
        return out

    def score(self, evalset: EvalSet, preds: dict[str, list[int]]) -> dict:
        labels = [e.label for e in evalset.clean]
        clean_pred = preds["clean"]
        result = {"cacc": accuracy(clean_pred, labels), "asr": {}, "asr_raw": {}}
        for name, ts in evalset.triggered.items():
            asr, raw = asr_from_predictions([clean_pred[i] for i in ts.indices], [labels[i] for i in ts.indices],
                                            preds[name], ts.targets)
            result["asr"][name], result["asr_raw"][name] = asr, raw
        return result

    def evaluate(self, lm, template: str, evalset: EvalSet, batch_size: int = 256,
                 max_length: int | None = None) -> dict:
        return self.score(evalset, self.predictions(lm, template, evalset, batch_size, max_length))

    def evaluate_with_subset(self, lm, template: str, evalset: EvalSet, n: int, batch_size: int = 256,
                             max_length: int | None = None) -> tuple[dict, dict]:
        """The results on ``evalset`` and on ``evalset.subset(n)`` from one pass: the subset's inputs
        are the set's own first ones, so their predictions are read off the whole set's."""
        preds = self.predictions(lm, template, evalset, batch_size, max_length)
        sub = {"clean": preds["clean"][:n]}
        for name, ts in evalset.triggered.items():
            sub[name] = [p for p, i in zip(preds[name], ts.indices) if i < n]
        return self.score(evalset, preds), self.score(evalset.subset(n), sub)


def evaluate(lm, template: str, evalset: EvalSet, batch_size: int = 256, max_length: int | None = None) -> dict:
    """The evaluation result of ``lm`` on ``evalset``, by the set's own scoring."""
    scoring = evalset.scoring if evalset.scoring is not None else AnswerScoring()
    return scoring.evaluate(lm, template, evalset, batch_size, max_length)


def evaluate_with_subset(lm, template: str, evalset: EvalSet, n: int, batch_size: int = 256,
                         max_length: int | None = None) -> tuple[dict, dict]:
    """``(evaluate(evalset), evaluate(evalset.subset(n)))``, in one pass where the set's scoring
    can read the subset off the whole set (classification), else in two."""
    scoring = evalset.scoring if evalset.scoring is not None else AnswerScoring()
    if hasattr(scoring, "evaluate_with_subset"):
        return scoring.evaluate_with_subset(lm, template, evalset, n, batch_size, max_length)
    return (scoring.evaluate(lm, template, evalset, batch_size, max_length),
            scoring.evaluate(lm, template, evalset.subset(n), batch_size, max_length))
