"""The task protocol: what a task is (a template, a verbalizer, train and test examples) and what
its *kind* owns: how an answer is written, how a training sample is encoded and scored by the
loss, how a model is evaluated and what its utility metric is. Classification
(``classification.py``) and response generation (``response.py``) are the two kinds; the engine,
the evaluator and the defense call the kind's methods and never ask which one they hold.

A task is registered once (``registry.TASKS``) with a :class:`TaskSpec`: its kind, its loader and
the configuration hooks it needs (defaults, checks); :func:`load_task` reads the registry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

from ..engine import Batch, Sample
from ..errors import DataError
from ..registry import TASKS
from ..text import Example


class TaskKind:
    """How a kind of task answers, trains and is scored: the protocol that
    ``classification.Classification`` and ``response.Response`` implement."""

    name: str  # "classification" / "response"
    utility_metric: str  # what summary.json's ``cacc`` / ``utility`` hold: "cacc" or "perplexity"
    summary_keys: tuple[str, ...]  # the evaluation keys a stage's summary block keeps

    def answer(self, task: "Task", label: int) -> str:
        """The answer text that follows the prompt for ``label``."""
        raise NotImplementedError

    def sample(self, prompt: str, answer_id: int, example: Example, y: int, group: int = -1,
               pair: str | None = None, fixed: Sequence[Optional[str]] = ()) -> Sample:
        """The defender's training sample of ``prompt`` answered with answer index ``y`` (``fixed``:
        the defender's fixed response per answer index, :meth:`fixed_responses`)."""
        raise NotImplementedError

    def owner_sample(self, prompt: str, answer_id: int, example: Example) -> Sample:
        """The model owner's training sample of a (possibly poisoned) example."""
        raise NotImplementedError

    def encode(self, tokenizer, samples: Sequence[Sample], max_length: int | None, device) -> Batch:
        """The batch of ``samples`` (its class knows its own loss positions: ``engine.Batch``)."""
        raise NotImplementedError

    def can_answer(self, fixed: Sequence[Optional[str]], y: int) -> bool:
        """Whether the defender can write a training target for answer index ``y``."""
        raise NotImplementedError

    def fixed_responses(self, canary: str | None) -> tuple:
        """The defender's fixed response per answer index (None where it depends on the prompt)."""
        raise NotImplementedError

    def flip_target(self, labels: Sequence[str]) -> str | int:
        """What a known trigger's 'flip' is measured against in evaluation."""
        raise NotImplementedError

    def scoring(self, cfg) -> Any:
        """The object that evaluates a model on an EvalSet of this kind (``.evaluate(lm, template,
        evalset, batch_size, max_length) -> dict``)."""
        raise NotImplementedError

    def check_lengths(self, cfg, longest_prompt: int, limit: int) -> None:
        """Raise DataError when the longest test prompt leaves no room for what must follow it."""
        raise NotImplementedError

    def check_run(self, cfg) -> None:
        """Raise ValueError (naming the field) for a run configuration this kind cannot score."""
        raise NotImplementedError


@dataclass(frozen=True)
class Task:
    name: str
    template: str
    labels: tuple[str, ...]  # the verbalizer: label index -> answer word
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    kind: TaskKind

    def answer(self, label: int) -> str:
        return self.kind.answer(self, label)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its kind, its loader ``(task_cfg, seed) -> (train, test)`` and optional
    configuration hooks, each called by ``config`` while validating:

    - ``task_defaults(data) -> data``: defaults of the task section (before validation);
    - ``check_task(task_cfg)``: raise ValueError for a task section this task cannot use;
    - ``run_defaults(data) -> data``: defaults elsewhere in the run (e.g. the attack target);
    - ``check_run(run_cfg)``: raise ValueError for a combination this task cannot run.
    ``attack_response(task_cfg) -> (example -> response)``: response tasks: the attacker's target."""

    kind: TaskKind
    load: Callable[..., tuple[list[Example], list[Example]]]
    task_defaults: Optional[Callable[[dict], dict]] = None
    check_task: Optional[Callable[[Any], None]] = None
    run_defaults: Optional[Callable[[dict], dict]] = None
    check_run: Optional[Callable[[Any], None]] = None
    attack_response: Optional[Callable[[Any], Callable]] = None


def task_spec(name: str) -> TaskSpec:
    return TASKS[name].impl


def load_task(cfg, seed: int = 0) -> Task:
    """Build the task: the registered loader's examples, cut to ``max_words``, shuffled and
    subsampled deterministically to train_size + defender_size / test_size."""
    spec = task_spec(cfg.name)
    train, test = spec.load(cfg, seed)
    if cfg.max_words:
        train = [replace(e, text=" ".join(e.text.split()[:cfg.max_words])) for e in train]
        test = [replace(e, text=" ".join(e.text.split()[:cfg.max_words])) for e in test]
    rng = random.Random(seed)
    train, test = list(train), list(test)
    rng.shuffle(train)
    rng.shuffle(test)
    need = cfg.train_size + cfg.defender_size
    train = train[:need]
    if len(train) < cfg.defender_size + 10:
        raise DataError(f"task: only {len(train)} training rows, fewer than task.defender_size "
                        f"({cfg.defender_size}) + 10; lower task.defender_size")
    return Task(cfg.name, cfg.template, tuple(cfg.labels), tuple(train), tuple(test[:cfg.test_size]), spec.kind)


def split_train(task: Task, defender_size: int) -> tuple[list[Example], list[Example]]:
    """(model-owner training data, the defender's clean data): disjoint."""
    return list(task.train[defender_size:]), list(task.train[:defender_size])


__all__ = ["TaskKind", "Task", "TaskSpec", "task_spec", "load_task", "split_train"]
