"""Exceptions the CLI and the app show to users as they are: one clear message each."""


class LocphylaxError(Exception):
    """Base class: a user-facing problem with a message that says what to fix."""


class ConfigError(LocphylaxError, ValueError):
    """A configuration field has a bad value (the message names the field). ``fields`` maps each
    bad field's dotted name to its message, where the error came from validation."""

    fields: dict[str, str] = {}


class DataError(LocphylaxError, ValueError):
    """A data file is missing, malformed, or does not fit the task."""


class ModelLoadError(LocphylaxError, ValueError):
    """A model or checkpoint cannot be loaded safely (not a causal LM, corrupt, pickle-only...)."""


class RunError(LocphylaxError, RuntimeError):
    """A run folder is missing, corrupt, or cannot be resumed."""


class TrainingError(LocphylaxError, RuntimeError):
    """Training cannot go on: its loss is no longer a finite number (it diverged)."""


class Cancelled(Exception):
    """A stage stopped between two steps because its cancellation was asked for (the run's CANCEL
    file, the app's Stop): not an error; the run stays resumable."""
