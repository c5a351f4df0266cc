"""The attacker: trigger insertion and SFT data poisoning (BadNets word, AddSent phrase, long
sentence). Only the pipeline's victim builder and the evaluator import the attack config; the
defense never sees it."""

from __future__ import annotations

import random
from typing import Sequence

from .tasks import Example


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


def target_label(label: int, target: str | int, n_labels: int) -> int:
    """The label a triggered input should produce: a fixed label index, or 'flip' (the next label)."""
    if target == "flip":
        return (label + 1) % n_labels
    return int(target)


def poison(examples: Sequence[Example], trigger: str, position: str, rate: float, target: int,
           seed: int) -> tuple[list[Example], int]:
    """Dirty-label poisoning: a ``rate`` fraction of the data, drawn from the inputs whose label is
    not the target, gets the trigger and the target label. Returns (data, number poisoned)."""
    rng = random.Random(seed)
    data = list(examples)
    candidates = [i for i, e in enumerate(data) if e.label != target]
    n = min(len(candidates), max(1, round(rate * len(data))))
    for i in rng.sample(candidates, n):
        data[i] = Example(insert_trigger(data[i].text, trigger, position, rng), target)
    return data, n
