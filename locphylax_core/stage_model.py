"""A stage's model, loaded from a run folder to answer and explain sentences typed by the user.

:mod:`runview` only reads a run's files; this module loads a stage's checkpoint (:func:`load_stage_model`)
and runs it: the answer it gives (:func:`answer`, :func:`answer_with_probability`), how much of a long
input it reads (:func:`input_cut`), which words push it to that answer (:func:`sentence_salience`), its
attention patterns (:func:`sentence_attention`) and the defender's detector on Stage 1
(:func:`localise_sentence`). Every function takes the run's :class:`~runview.RunView`, for its prompt
template, answer words and limits. The models are for inference only: never trained here.
:class:`StageModels` keeps loaded models within a memory budget (the app holds one per process).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

import numpy as np

from . import model as M
from .analysis.layers import attention_patterns
from .analysis.salience import localise, token_salience
from .evaluation import answer_probabilities, predict
from .registry import TASKS
from .runs import RunDir
from .runview import RunView, has_canary
from .tasks import CLASSIFICATION, Task
from .text import render_prompt


def load_stage_model(view: RunView, stage: str):
    """The checkpoint of ``stage`` as an ``LM`` ready to answer (eval mode, CPU). Loaded from
    safetensors only; the caller must treat it as read-only."""
    run = RunDir(view.path)
    ckpt = run.checkpoint(stage)
    tokenizer = M.load_tokenizer(str(run.tokenizer_dir))
    task_cfg = view.config.get("task", {})
    name = task_cfg.get("name", "task")
    kind = TASKS[name].impl.kind if name in TASKS else CLASSIFICATION
    task = Task(name, task_cfg.get("template", "{text}"), tuple(task_cfg.get("labels", [])), (), (), kind)
    defense = view.config.get("defense", {})
    ids = M.run_answer_ids(tokenizer, task,
                           defense.get("canary", "unsure") if defense.get("known_target") == "canary" else None)
    model = M.load_checkpoint(ckpt, "cpu").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return M.LM(model, tokenizer, ids)


def model_bytes(lm) -> int:
    """The memory of ``lm``'s weights and buffers."""
    tensors = [*lm.model.parameters(), *lm.model.buffers()]
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())  # tied weights once


class StageModels:
    """Loaded stage models, shared by every session of a process and never trained: the least
    recently used is dropped once together they hold more than ``budget_bytes``. A count alone would
    not do: a tiny model's weights take 6 MB and the real LM's 538 MB. The one model just asked
    for is always kept, even when it alone exceeds the budget."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._models: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()  # loads one at a time: two sessions asking at once load once

    def __contains__(self, key: Hashable) -> bool:
        return key in self._models

    def held_bytes(self) -> int:
        return sum(size for _, size in self._models.values())

    def get(self, key: Hashable, load: Callable[[], object]):
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key][0]
            lm = load()
            self._models[key] = (lm, model_bytes(lm))
            while len(self._models) > 1 and self.held_bytes() > self.budget:
                self._models.popitem(last=False)
            return lm


def answer(view: RunView, lm, texts: Sequence[str]) -> list[str]:
    """The answer word ``lm`` gives to each text, with the run's own prompt template (a prompt
    longer than the model's positions keeps its end, as the run's evaluation does: :func:`input_cut`)."""
    import torch

    template = view.config.get("task", {}).get("template", "{text}")
    with torch.no_grad():
        pred = predict(lm, template, list(texts), max_length=_limit(view, lm))
    words = view.label_words
    return [words[int(i)] for i in pred]


def answer_with_probability(view: RunView, lm, texts: Sequence[str]) -> list[tuple[str, float]]:
    """The answer word ``lm`` gives to each text and the probability it puts on it (among the
    run's answer words), with the run's own prompt template."""
    import torch
    template = view.config.get("task", {}).get("template", "{text}")
    with torch.no_grad():
        probs = answer_probabilities(lm, template, list(texts), max_length=_limit(view, lm))
    words = view.label_words
    return [(words[int(p.argmax())], float(p.max())) for p in probs]


def _template(view: RunView) -> str:
    return view.config.get("task", {}).get("template", "{text}")


def _max_length(view: RunView) -> int | None:
    model = view.config.get("model", {})
    return model.get("n_positions") if model.get("source") == "embedded" else None


def _limit(view: RunView, lm) -> int | None:
    """The most prompt tokens ``lm`` reads: the run's own limit (the pipeline's ``max_length``)."""
    return M.prompt_max_length(lm.model, _max_length(view))


def input_cut(view: RunView, lm, text: str) -> int:
    """How many tokens of ``text``'s prompt lie beyond the model's positions: that many are cut from
    its start (0: it fits), as the run's evaluation encodes a prompt (``engine.encode``)."""
    limit = _limit(view, lm)
    if limit is None:
        return 0
    n = len(lm.tokenizer(render_prompt(_template(view), text), add_special_tokens=False)["input_ids"])
    return max(0, n - limit)


def sentence_salience(view: RunView, lm, text: str, method: str = "ig", n_steps: int = 32) -> dict:
    """Which words of ``text`` push ``lm`` toward the answer it gives: ``{"answer": word,
    "tokens", "scores" [position], "in_text" [position], "cut": tokens cut from its start}``
    (integrated gradients by default; the objective is that answer's logit minus the mean of the
    other answers'). A prompt longer than the model's positions keeps its end (the answer position)."""
    import torch

    limit = _limit(view, lm)
    with torch.no_grad():
        probs = answer_probabilities(lm, _template(view), [text], max_length=limit)[0]
    k = int(probs.argmax())
    ids = list(lm.answer_ids)
    others = [a for j, a in enumerate(ids) if j != k]
    s = token_salience(lm.model, lm.tokenizer, _template(view), [text], [ids[k]], [others], method=method,
                       n_steps=n_steps, max_length=limit)[0]
    return {"answer": view.label_words[k], "probability": float(probs[k]), "tokens": s["tokens"],
            "scores": np.asarray(s["scores"]), "in_text": np.asarray(s["in_text"]),
            "cut": input_cut(view, lm, text)}


def sentence_attention(view: RunView, lm, text: str) -> dict:
    """Every head's attention pattern on ``text``: ``{"pattern": [layer, head, query, key],
    "tokens"}`` (a TransformerLens bridge over a copy of the model: the shared ``lm`` is untouched)."""
    r = attention_patterns(lm.model, lm.tokenizer, _template(view), text, max_length=_max_length(view))
    r["tokens"] = [t.replace("Ġ", " ") for t in r["tokens"]]
    return r


def localise_sentence(view: RunView, stage1_lm, text: str) -> dict:
    """The defender's detector on ``text`` with the Stage 1 model: ``{"flagged": bool,
    "canary_probability", "top_token": the word pushing hardest toward the canary}``. Needs a
    run whose defense trained a canary (:func:`has_canary`)."""
    if not has_canary(view):
        raise ValueError("this run's defense trains no canary answer (defense.known_target), so Stage 1 marks "
                         "no input as triggered")
    n_labels = len(view.config.get("task", {}).get("labels", []))
    r = localise(stage1_lm.model, stage1_lm.tokenizer, _template(view), [text], list(stage1_lm.answer_ids),
                 n_labels, max_length=_max_length(view))
    tok = r["top_token"][0]
    return {"flagged": bool(r["flagged"][0]), "canary_probability": float(r["suspect_prob"][0]),
            "top_token": None if tok is None else tok.replace("Ġ", " ").strip()}

__all__ = ["load_stage_model", "answer", "answer_with_probability", "input_cut", "sentence_salience",
           "sentence_attention", "localise_sentence"]
