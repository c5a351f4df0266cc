"""The registries of tasks, attack paradigms and defenses: what the config accepts, what the CLI
and the app offer, what the pipeline runs, CASD compares and the exports draw.

Each entry is a name, a display label, an implementation and (optionally) a pydantic options
class, declared in the module that implements it and registered there in one line::

    DEFENSES.register("clean_ft", clean_ft_plan, label="clean fine-tuning")

This module imports nothing of the project, so every layer may read it. The built-in entries are
registered when ``locphylax_core`` is imported (its ``__init__`` imports the modules that declare
them); an entry registered later (a plug-in, a test) is seen everywhere from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    label: str  # what a person reads: tables, legends, the app's choices
    impl: T
    options: Optional[type] = None  # a pydantic model of the entry's own settings, or None
    kind: str = ""  # defenses: "model" (trains the model) or "input" (filters the inputs)


class Registry(Generic[T]):
    """Names -> entries, in registration order."""

    def __init__(self, what: str, field: str):
        self.what, self.field = what, field  # "defense", "defense.baselines": for error messages
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, impl: T, *, label: str, options: Optional[type] = None, kind: str = "",
                 replace: bool = False) -> Entry[T]:
        if not name or not isinstance(name, str):
            raise ValueError(f"a {self.what} needs a non-empty name, got {name!r}")
        if name in self._entries and not replace:
            raise ValueError(f"{self.what} {name!r} is already registered (pass replace=True to replace it)")
        entry = Entry(name, label, impl, options, kind)
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def __getitem__(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(self.unknown(name)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(list(self._entries.values()))

    def names(self) -> list[str]:
        return list(self._entries)

    def label(self, name: str) -> str:
        entry = self._entries.get(name)
        return entry.label if entry is not None else name

    def unknown(self, name: Any, with_field: bool = True) -> str:
        what = f"unknown {self.what} {name!r}; allowed: {self.names()}"
        return f"{self.field}: {what}" if with_field else what

    def check(self, name: Any) -> str:
        """``name`` if it is registered, else a ValueError (for a pydantic validator: the error
        formatter puts the field in front)."""
        if name not in self._entries:
            raise ValueError(self.unknown(name, with_field=False))
        return name


TASKS: Registry = Registry("task", "task.name")
PARADIGMS: Registry = Registry("attack paradigm", "attack.paradigm")
DEFENSES: Registry = Registry("defense", "defense.baselines")
# The config fields whose allowed values are a registry's names (the app's Setup page offers them).
FIELD_REGISTRIES = {"task.name": TASKS, "attack.paradigm": PARADIGMS, "defense.baselines": DEFENSES}

# The defense's own name where it sits beside the registered defenses (stage keys, curves, tables).
LOCPHYLAX = "locphylax"


def stage_key(method: str, stage: str) -> str:
    """A run's key for ``stage`` ("stage1", "stage2") of ``method``: Locphylax's own stages are
    plain (``stage2``), a registered defense's carry its name (``clean_ft/stage2``)."""
    return stage if method == LOCPHYLAX else f"{method}/{stage}"


__all__ = ["Entry", "Registry", "TASKS", "PARADIGMS", "DEFENSES", "FIELD_REGISTRIES", "LOCPHYLAX", "stage_key"]
