"""Locphylax core: trigger-agnostic backdoor removal (Backdoor Collapse) for language models.

The public interface (what the app, the notebooks and scripts use):

- configuration: :func:`load_config`, :class:`RunConfig`, :func:`list_presets`
- the registries of tasks, attack paradigms and defenses: :mod:`.registry` (``TASKS``, ``PARADIGMS``, ``DEFENSES``)
- running: :func:`start_run`, :func:`resume_run`, :class:`Reporter`; without a run folder:
  :func:`build_experiment` (data, no model) and :func:`run_method` (one method on one victim)
- the run store: :class:`RunDir`, :func:`list_runs`, :func:`find_run`
- background jobs (what the app starts): :mod:`.jobs` (``launch``, ``job_status``, ``list_jobs``, ``cancel``)
- a read-only view of a run for display: :mod:`.runview` (``open_run``, ``results_table``, ...)
- errors: :class:`LocphylaxError` and its subclasses

This package never imports Streamlit.
"""

from . import defenses, paradigms, tasks  # noqa: F401  (they register the built-in defenses, paradigms and tasks)
from .config import RunConfig, list_presets, load_config
from .errors import ConfigError, DataError, LocphylaxError, ModelLoadError, RunError
from .experiment import build_experiment, run_method
from .pipeline import resume_run, start_run
from .trainer import Reporter
from .registry import DEFENSES, PARADIGMS, TASKS
from .runs import RunDir, find_run, list_runs

__version__ = "0.1.0"

__all__ = ["RunConfig", "load_config", "list_presets", "start_run", "resume_run", "Reporter", "RunDir",
           "build_experiment", "run_method", "TASKS", "PARADIGMS", "DEFENSES",
           "list_runs", "find_run", "LocphylaxError", "ConfigError", "DataError", "ModelLoadError", "RunError"]
