"""Locphylax core: trigger-agnostic backdoor removal (Backdoor Collapse) for language models.

The public interface (what the app, the notebooks and scripts use):

- configuration: :func:`load_config`, :class:`RunConfig`, :func:`list_presets`
- running: :func:`start_run`, :func:`resume_run`, :class:`Reporter`
- the run store: :class:`RunDir`, :func:`list_runs`, :func:`find_run`
- background jobs (what the app starts): :mod:`.jobs` (``launch``, ``job_status``, ``list_jobs``, ``cancel``)
- a read-only view of a run for display: :mod:`.runview` (``open_run``, ``results_table``, ...)
- errors: :class:`LocphylaxError` and its subclasses

This package never imports Streamlit.
"""

from .config import RunConfig, list_presets, load_config
from .errors import ConfigError, DataError, LocphylaxError, ModelLoadError, RunError
from .pipeline import Reporter, resume_run, start_run
from .runs import RunDir, find_run, list_runs

__version__ = "0.1.0"

__all__ = ["RunConfig", "load_config", "list_presets", "start_run", "resume_run", "Reporter", "RunDir",
           "list_runs", "find_run", "LocphylaxError", "ConfigError", "DataError", "ModelLoadError", "RunError"]
