"""The public entry points for building and defending without a run folder:

- :func:`build_experiment` turns a configuration into its data: the task, the owner's and the
  defender's splits, the trigger specs, the evaluation, curve and probe sets. It loads no model and
  no tokenizer (so an analysis that only needs the evaluation set never loads weights twice).
- :func:`run_method` runs one registered method (``locphylax`` or a baseline) on a victim, stage by
  stage, with the defender's data and settings only.

The pipeline (``pipeline.py``), the analyses and the benchmarks all build on these two.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

from .config import RunConfig
from .defense import DefenderData, StagePlan, defender_data, method_plan, run_stage, stage1_target
from .errors import DataError
from .evaluation import EvalSet, TriggeredSet, TriggerSpec, build_eval_set
from .registry import stage_key
from .tasks import Task, load_task, split_train, task_spec
from .text import Example
from .trainer import TrainSettings, stage_seed

ATTACK = "attack"


@dataclass
class Experiment:
    cfg: RunConfig
    task: Task
    owner_train: list[Example]  # the model owner's training data (poisoned for the victim)
    defender: DefenderData  # the only data the defense receives
    evalset: EvalSet
    curve_set: EvalSet
    probe: list[dict]  # fixed probe set: text, group, label


def attack_trigger_spec(cfg: RunConfig) -> TriggerSpec:
    a = cfg.attack
    return TriggerSpec("unknown", a.trigger_text, a.position, cfg.task.labels.index(a.target), a.family,
                       tuple(a.trigger_parts))


def known_trigger_specs(cfg: RunConfig) -> list[TriggerSpec]:
    """The defender's triggers as evaluated: ASR toward what Stage 1 trains them to answer (the
    flip for 'flip' and for 'correct', where there is no other target to measure; what a flip is
    depends on the task's kind)."""
    d = cfg.defense
    target = stage1_target(d.known_target, cfg.task.labels)
    target = "flip" if target == "correct" else target
    if target == "flip":
        target = task_spec(cfg.task.name).kind.flip_target(cfg.task.labels)
    return [TriggerSpec(f"t{i + 1}", t.text, t.position, target) for i, t in enumerate(d.known_triggers)]


def _probe_set(cfg: RunConfig, evalset: EvalSet) -> list[dict]:
    n = cfg.eval.probe_per_group
    probe = []
    for label, word in enumerate(cfg.task.labels):
        picked = [e for e in evalset.clean if e.label == label][:n]
        probe += [{"text": e.text, "group": f"clean:{word}", "label": e.label} for e in picked]
    for name, ts in evalset.triggered.items():
        group = "unknown" if name == "unknown" else f"known:{name}"
        probe += [{"text": t, "group": group, "label": evalset.clean[i].label}
                  for i, t in list(zip(ts.indices, ts.texts))[:n]]
    return probe


def build_experiment(cfg: RunConfig) -> Experiment:
    """The run's data, built deterministically from ``cfg`` (no model, no tokenizer)."""
    task = load_task(cfg.task, cfg.seed)
    owner_train, defender_clean = split_train(task, cfg.task.defender_size)
    evalset = build_eval_set(task.test, [attack_trigger_spec(cfg), *known_trigger_specs(cfg)],
                             len(task.labels), cfg.seed, task.kind.scoring(cfg))
    if not evalset.triggered["unknown"].indices:
        raise DataError(f"task: the test split has no inputs whose label is not the attack target "
                        f"{cfg.attack.target!r}, so ASR cannot be measured")
    defender = defender_data(defender_clean, task.labels, task.template, cfg.defense, task.kind)
    return Experiment(cfg, task, owner_train, defender, evalset, evalset.subset(cfg.eval.curve_examples),
                      _probe_set(cfg, evalset))


# ----------------------------------------------------------------------------------------------
# Input-side defenses: the evaluation set seen through a filter


def filter_eval_set(evalset: EvalSet, clean_inputs) -> EvalSet:
    """The same evaluation set with every input (clean and triggered) passed through an
    input-side defense's filter; labels, targets and indices are unchanged."""
    clean = clean_inputs([e.text for e in evalset.clean])
    triggered = {name: TriggeredSet(ts.indices, tuple(clean_inputs(list(ts.texts))), ts.targets)
                 for name, ts in evalset.triggered.items()}
    return EvalSet(tuple(replace(e, text=t) for t, e in zip(clean, evalset.clean)), triggered, evalset.scoring)


def defended_eval_set(plan: StagePlan, lm, data: DefenderData, evalset: EvalSet,
                      max_length: int | None) -> tuple[EvalSet, float | None]:
    """The evaluation set a stage of ``plan`` is scored on, and its filter's bar: for an input-side
    defense (ONION) every test input first passes through the filter, which sees the inputs it
    must answer, never which trigger they carry; otherwise ``evalset`` itself."""
    if plan.input_filter is None:
        return evalset, None
    clean_inputs = plan.input_filter(lm, data, max_length)
    return filter_eval_set(evalset, clean_inputs), getattr(clean_inputs, "bar", None)


# ----------------------------------------------------------------------------------------------
# One method on one victim


def run_method(name: str, lm, data: DefenderData, defense_cfg, settings: TrainSettings, *, seed: int,
               evalset: Optional[EvalSet] = None, evaluate: Optional[Callable] = None,
               on_stage: Optional[Callable] = None, **kw) -> list[dict]:
    """Run method ``name`` (``locphylax`` or any registered baseline) in place on ``lm``, stage
    after stage, each with the seed the pipeline gives it (``stage_seed(seed, key)``). Returns one
    record per stage: ``stage``, ``result`` (what the stage reported) and, with ``evalset`` and
    ``evaluate(lm, evalset) -> dict``, ``eval``: the stage's scores on the set it is judged on (an
    input-side defense: the filtered set). ``on_stage(record, lm)`` is called after each stage."""
    records = []
    for plan in method_plan(name, defense_cfg, data.labels):
        key = stage_key(name, plan.name)
        result = run_stage(plan, lm, data, seed=stage_seed(seed, key), settings=settings, **kw)
        record = {"stage": plan.name, "key": key, "result": result, "steps": plan.steps}
        if evalset is not None and evaluate is not None:
            judged, bar = defended_eval_set(plan, lm, data, evalset, settings.max_length)
            record["eval"] = evaluate(lm, judged)
            if bar is not None:
                record["result"] = {**result, "input_filter_bar": bar}
        records.append(record)
        if on_stage is not None:
            on_stage(record, lm)
    return records


__all__ = ["ATTACK", "Experiment", "build_experiment", "attack_trigger_spec", "known_trigger_specs",
           "filter_eval_set", "defended_eval_set", "run_method"]
