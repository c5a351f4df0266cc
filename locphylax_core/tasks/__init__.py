"""Tasks: the protocol (``base``), its two kinds (``classification``, ``response``) with the tasks
they register, and the data sources (``sources``). Importing the package registers the built-in
tasks in ``registry.TASKS``."""

from . import classification, response  # noqa: F401  (register the built-in tasks)
from .base import Task, TaskKind, TaskSpec, load_task, split_train, task_spec
from .classification import CLASSIFICATION, Classification
from .response import RESPONSE, Response
from .sources import embedded_corpus, read_table, resolve_data_path, rows_to_examples, synthetic_sentiment

__all__ = ["Task", "TaskKind", "TaskSpec", "load_task", "split_train", "task_spec", "Classification", "Response",
           "CLASSIFICATION", "RESPONSE", "embedded_corpus", "read_table", "resolve_data_path", "rows_to_examples",
           "synthetic_sentiment"]
