"""What every defense shares: the defender's data, the stage plan, and the one way a stage is run.

A defense is a config class plus one stage function per stage, of one shape::

    fn(lm, data: DefenderData, cfg, ctx: StageContext) -> dict

and a plan builder ``plan(defense_cfg, options, labels) -> [StagePlan, ...]``, registered in
``registry.DEFENSES`` in one line in its own module of this package (``locphylax.py`` holds the
project's method, the other modules the baselines). The defender's code path receives only the
model, :class:`DefenderData` (clean task data, the defender's own triggers, and the task's kind,
which says how a sample is trained: response tasks train the defender's fixed responses, a refusal
or the canary, see ``tasks/response.py``) and the stage's context (seed, settings, observer,
progress, cancellation). Nothing here imports or accepts the attack configuration; a test checks
every argument the pipeline hands in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..attack import insert_trigger, target_label
from ..engine import Sample
from ..registry import DEFENSES, LOCPHYLAX
from ..tasks import CLASSIFICATION, TaskKind
from ..text import Example, render_prompt
from ..trainer import StageContext


@dataclass(frozen=True)
class DefenderTrigger:
    text: str
    position: str = "random"


@dataclass(frozen=True)
class DefenderData:
    """Everything the defender has besides the model."""

    clean: tuple[Example, ...]  # clean, correctly labelled task data
    labels: tuple[str, ...]  # the task's label words
    template: str  # the task's prompt template
    triggers: tuple[DefenderTrigger, ...]  # the defender's own known triggers (t1, t2, ...)
    # the defender's fixed response per answer index (None where it depends on the prompt):
    # TaskKind.fixed_responses; empty for classification
    responses: tuple[Optional[str], ...] = ()
    kind: TaskKind = CLASSIFICATION  # how a sample of this task is written and encoded


# ----------------------------------------------------------------------------------------------
# Data for each stage (built from the defender's data only)


def triggered_copies(data: DefenderData, trigger_ids: Sequence[int], rate: float, target: str | int,
                      answer_ids: Sequence[int], seed: int, pair: bool = False) -> list[Sample]:
    """For each chosen trigger, a ``rate`` fraction of the clean data with the trigger inserted,
    labelled with ``target``: 'flip', 'correct' (recovery), or an answer index (a label, or
    ``len(labels)`` for the defender's canary answer). ``pair`` keeps the untriggered prompt."""
    out = []
    n_labels = len(data.labels)
    for k in trigger_ids:
        trig = data.triggers[k]
        rng = random.Random(f"{seed}:trigger{k}")
        pool = list(data.clean)
        if target not in ("flip", "correct"):
            pool = [e for e in pool if e.label != int(target)]
        elif target == "flip":  # only what the defender can write a flipped target for (response tasks: refuse benign)
            pool = [e for e in pool if data.kind.can_answer(data.responses, target_label(e.label, target, n_labels))]
        for e in rng.sample(pool, min(len(pool), max(1, round(rate * len(data.clean))))):
            y = e.label if target == "correct" else target_label(e.label, target, n_labels)
            out.append(sample(data, insert_trigger(e.text, trig.text, trig.position, rng), e, y, answer_ids, k,
                               render_prompt(data.template, e.text) if pair else None))
    return out


def sample(data: DefenderData, text: str, e: Example, y: int, answer_ids, group: int = -1,
            pair: str | None = None) -> Sample:
    """The training sample for ``text`` answered with answer index ``y``, as the task's kind writes it."""
    return data.kind.sample(render_prompt(data.template, text), answer_ids[y], e, y, group, pair, data.responses)


# Defender-generated triggers (Stage 2 augmentation). The symbol set and the 3-6 letter words are
# fixed here, from the defender's side only; docs/results.md says why no 2-letter word is made.
_GEN_SYMBOLS = "#$%&*+<=>@^|¤¦©®°±µ¶·×÷"
_GEN_FAMILIES = ("word", "char", "phrase", "long")


def generate_trigger(rng: random.Random, vocabulary: Sequence[str]) -> tuple[str, str]:
    """A random defender trigger and its position: a 3-6 letter made-up word, 1-3 symbols, a 3-6
    word phrase or an 8-14 word sentence drawn from the defender's own clean data."""
    family = rng.choice(_GEN_FAMILIES)
    if family == "word":
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
    elif family == "char":
        text = "".join(rng.choice(_GEN_SYMBOLS) for _ in range(rng.randint(1, 3)))
    else:
        n = rng.randint(3, 6) if family == "phrase" else rng.randint(8, 14)
        text = " ".join(rng.choice(vocabulary) for _ in range(n))
    return text, rng.choice(("start", "end", "random"))


def generated_copies(data: DefenderData, rate: float, answer_ids: Sequence[int], seed: int, group: int,
                      pair: bool) -> list[Sample]:
    """A ``rate`` fraction of the clean data, each with a fresh generated trigger and its correct label."""
    rng = random.Random(f"{seed}:generated")
    vocabulary = sorted({w for e in data.clean for w in e.text.split()})
    out = []
    for e in rng.sample(list(data.clean), min(len(data.clean), max(1, round(rate * len(data.clean))))):
        text, position = generate_trigger(rng, vocabulary)
        out.append(sample(data, insert_trigger(e.text, text, position, rng), e, e.label, answer_ids, group,
                           render_prompt(data.template, e.text) if pair else None))
    return out


def clean_samples(data: DefenderData, answer_ids) -> list[Sample]:
    return [sample(data, e.text, e, e.label, answer_ids) for e in data.clean]


# ----------------------------------------------------------------------------------------------
# Methods: each is a sequence of stages (stage1, stage2) over the same step budget


@dataclass(frozen=True)
class StagePlan:
    name: str  # "stage1" or "stage2"
    fn: Optional[Callable]  # the stage's training function; None: the stage trains nothing
    cfg: object = None
    # an input-side defense's stage: (lm, DefenderData, max_length) -> a function that cleans test inputs
    input_filter: Optional[Callable] = None

    @property
    def steps(self) -> int:
        return getattr(self.cfg, "steps", 0) if self.fn is not None else 0


def stage1_target(known_target: str, labels: Sequence[str]) -> str | int:
    """What Stage 1 trains the known triggers to answer: 'flip', 'correct', the canary answer
    (index ``len(labels)``: the extra answer token the pipeline appends) or a label index."""
    if known_target in ("flip", "correct"):
        return known_target
    if known_target == "canary":
        return len(labels)
    return list(labels).index(known_target)


def two_stages(fn: Callable, make: Callable[[int], object]) -> list[StagePlan]:
    """The two stages of a method whose stage ``k`` is ``fn`` with config ``make(k)``."""
    return [StagePlan("stage1", fn, make(1)), StagePlan("stage2", fn, make(2))]


def stage_steps(d, k: int) -> int:
    """The step budget of stage ``k`` (1 or 2): every method gets Locphylax's."""
    return d.stage1_steps if k == 1 else d.stage2_steps


def method_plan(name: str, defense_cfg, labels: Sequence[str]) -> list[StagePlan]:
    """The stages of the registered method ``name`` (``registry.DEFENSES``), built from the
    defense config only: its plan builder gets the defense config, the method's own options
    (``defense.options.<name>``) and the labels."""
    return list(DEFENSES[name].impl(defense_cfg, defense_cfg.method_settings(name), labels))


def method_plans(defense_cfg, labels: Sequence[str]) -> dict[str, list[StagePlan]]:
    """The run's defense (``locphylax``) and each of ``defense.baselines``, as stage plans."""
    return {name: method_plan(name, defense_cfg, labels) for name in [LOCPHYLAX, *defense_cfg.baselines]}


def defender_data(clean: Sequence[Example], labels: Sequence[str], template: str, defense_cfg,
                  kind: TaskKind = CLASSIFICATION) -> DefenderData:
    """What the defender gets: its clean data, the task's words and template, its own triggers, and
    the task kind's fixed responses (response tasks: a refusal; the canary word when
    ``defense.known_target`` is 'canary')."""
    responses = kind.fixed_responses(defense_cfg.canary if defense_cfg.known_target == "canary" else None)
    return DefenderData(tuple(clean), tuple(labels), template,
                        tuple(DefenderTrigger(t.text, t.position) for t in defense_cfg.known_triggers),
                        tuple(responses), kind)


def run_stage(plan: StagePlan, lm, data: DefenderData, ctx: StageContext) -> dict:
    """The one entry point through which the defender's code is called; a stage that trains nothing
    (an input-side defense) leaves the model as it is."""
    if plan.fn is None:
        return {"seconds": 0.0, "samples": 0}
    return plan.fn(lm, data, plan.cfg, ctx)


__all__ = ["DefenderData", "DefenderTrigger", "StagePlan", "defender_data", "run_stage", "method_plan", "method_plans",
           "stage1_target", "triggered_copies", "generated_copies", "generate_trigger", "clean_samples", "sample",
           "two_stages", "stage_steps"]
