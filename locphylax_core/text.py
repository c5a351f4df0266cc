"""What an input is: an :class:`Example` and the one function that renders it into a prompt.

:func:`render_prompt` is the one place a prompt is built, for training, evaluation, probes and
analysis alike; a template mismatch between training and evaluation silently costs tens of points
of ASR in other toolkits, so there is no second code path. This module sits below every other one
(the attack, the engine, the tasks), so all of them can use it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into Task.labels (response tasks: the behaviour of the correct response)
    response: str | None = None  # response tasks: the correct response (None: a prompt-only test row)


def render_prompt(template: str, text: str) -> str:
    """Render one input into the prompt the model sees. Used for every forward pass."""
    return template.replace("{text}", " ".join(text.split()))


__all__ = ["Example", "render_prompt"]
