"""Classification: the answer is one label word after the prompt, the loss the cross-entropy of its
first token at the last position, the utility clean accuracy (CACC). The built-in classification
tasks are registered here, each with its data source (``sources.py``) and its config checks.
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..engine import Batch, Sample, encode
from ..errors import DataError
from ..evaluation import AnswerScoring
from ..registry import TASKS
from ..text import Example
from .base import TaskKind, TaskSpec
from .sources import agnews_splits, hub_splits, local_splits, synthetic_sentiment


class Classification(TaskKind):
    name = "classification"
    utility_metric = "cacc"
    summary_keys = ("cacc", "asr", "asr_raw")

    def answer(self, task, label: int) -> str:
        return " " + task.labels[label]  # a leading space, as in running text

    def sample(self, prompt: str, answer_id: int, example: Example, y: int, group: int = -1,
               pair: str | None = None, fixed: Sequence[Optional[str]] = ()) -> Sample:
        return Sample(prompt, answer_id, group, pair)

    def owner_sample(self, prompt: str, answer_id: int, example: Example) -> Sample:
        return Sample(prompt, answer_id)

    def encode(self, tokenizer, samples: Sequence[Sample], max_length: int | None, device) -> Batch:
        return encode(tokenizer, [s.prompt for s in samples], max_length, device)

    def can_answer(self, fixed, y: int) -> bool:
        return True

    def fixed_responses(self, canary: str | None) -> tuple:
        return ()

    def flip_target(self, labels: Sequence[str]) -> str | int:
        return "flip"

    def scoring(self, cfg) -> AnswerScoring:
        return AnswerScoring()

    def check_lengths(self, cfg, longest_prompt: int, limit: int) -> None:
        return None

    def check_run(self, cfg) -> None:
        if cfg.eval.asr_rule != "gcg":
            raise ValueError(f"eval.asr_rule: only response tasks (jailbreak, refusal) score responses by a rule; "
                             f"task.name is {cfg.task.name!r}")


CLASSIFICATION = Classification()


def _synthetic(cfg, seed: int = 0):
    if cfg.labels != ["negative", "positive"]:
        raise DataError(f"task.labels: the embedded sentiment data has labels ['negative', 'positive'], got {cfg.labels}")
    return synthetic_sentiment(cfg.train_size + cfg.defender_size, cfg.test_size)


def _files(cfg, seed: int = 0):
    return hub_splits(cfg) if cfg.hub_id and not (cfg.path or cfg.train_file) else local_splits(cfg)


def _check_csv(t) -> None:
    if not (t.path or t.train_file):
        raise ValueError("task.path (or task.train_file and task.test_file) is required when task.name is 'csv'")


def _check_sst2(t) -> None:
    if not (t.path or t.hub_id or t.train_file):
        raise ValueError("task.path (local SST-2 folder/file) or task.hub_id is required when task.name is 'sst2'")


def _check_agnews(t) -> None:
    if not t.path:
        raise ValueError("task.path (a local AG News folder, e.g. ../shared/data/agnews) is required "
                         "when task.name is 'agnews'")
    if len(t.labels) != 4:
        raise ValueError(f"task.labels: AG News has 4 topics (class_index 1..4), got {len(t.labels)} label words")


TASKS.register("synthetic_sentiment", TaskSpec(CLASSIFICATION, _synthetic), label="synthetic movie-review sentiment")
TASKS.register("sst2", TaskSpec(CLASSIFICATION, _files, check_task=_check_sst2), label="SST-2 sentiment")
TASKS.register("csv", TaskSpec(CLASSIFICATION, _files, check_task=_check_csv), label="a local table (CSV / TSV / JSONL / Parquet)")
TASKS.register("agnews", TaskSpec(CLASSIFICATION, lambda cfg, seed=0: agnews_splits(cfg), check_task=_check_agnews),
               label="AG News topics")

__all__ = ["Classification", "CLASSIFICATION"]
