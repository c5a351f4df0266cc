"""The public entry points for building and defending without a run folder:

- :func:`build_experiment` turns a configuration into its data: the task, the owner's and the
  defender's splits, the trigger specs, the evaluation, curve and probe sets. It loads no model and
  no tokenizer (so an analysis that only needs the evaluation set never loads weights twice).
- :func:`prepare` adds what a model needs (tokenizer, answer ids, context limit, the loaded model),
  with every check that can fail on bad input.
- :func:`fresh_model` and :func:`train_owner_model` (with :func:`owner_context`) build the clean
  model and the victim: the attacker's side.
- :func:`run_method` runs one registered method (``locphylax`` or a baseline) on a victim, stage by
  stage (:func:`defense_context` gives a stage its seed and settings), with the defender's data only.

The pipeline (``pipeline.py``: stages in a run folder, checkpoints, resume), the analyses and the
benchmarks all build on these: one orchestration of stages, with or without a run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from . import model as M
from .architectures import decoder_blocks
from .config import RunConfig
from .defenses.base import DefenderData, StagePlan, defender_data, method_plan, run_stage, stage1_target
from .distributed import distributed
from .engine import answer_and_lm_loss, answer_loss, set_torch_threads
from .errors import ConfigError, DataError
from .evaluation import EvalSet, TriggeredSet, TriggerSpec, build_eval_set
from .paradigms import owner_samples
from .registry import PARADIGMS, stage_key
from .shipped_victims import load_victim, matching_victim
from .tasks import Task, load_task, split_train, task_spec
from .text import Example, render_prompt
from .trainer import StageContext, TrainSettings, fit, stage_seed

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
# Preparation: everything that can fail on bad input happens here, before a run folder exists


@dataclass
class Prepared(Experiment):
    """The experiment's data plus what a model needs: the tokenizer, the answer token ids, the
    context limit and (model.source=hf) the loaded model."""

    tokenizer: object = None
    answer_ids: tuple[int, ...] = ()
    max_length: int | None = None
    base_model: Optional[torch.nn.Module] = None  # the loaded HF model (source=hf)


def _check_lengths(cfg: RunConfig, tokenizer, task, limit: int | None) -> None:
    if limit is None:
        return
    longest = max(task.test, key=lambda e: len(e.text))
    base = len(tokenizer(render_prompt(task.template, longest.text), add_special_tokens=False)["input_ids"])
    checks = [("attack.trigger", cfg.attack.trigger_text)] + [
        (f"defense.known_triggers[{i}].text", t.text) for i, t in enumerate(cfg.defense.known_triggers)]
    for fieldname, text in checks:
        n = len(tokenizer(" " + text, add_special_tokens=False)["input_ids"])
        if n + 8 > limit:  # the template needs room too
            raise ConfigError(f"{fieldname}: {text[:40]!r}... is {n} tokens, longer than the model context "
                              f"({limit} tokens) allows with the prompt template")
    if base > limit:
        raise DataError(f"task: the longest test prompt is {base} tokens, more than the model context ({limit}); "
                        f"raise model.n_positions or use a model with a longer context")
    task.kind.check_lengths(cfg, base, limit)


def load_hf_model(cfg: RunConfig) -> torch.nn.Module:
    """The model.source=hf model as configured: model.dtype, and model.quantization=4bit (QLoRA:
    NF4 weights placed on the GPU while loading; fails with a ModelLoadError without one)."""
    m = cfg.model
    quantized = m.quantization != "none"
    return M.load_causal_lm(m.name_or_path, m.trust_remote_code, dtype=m.dtype, quantization=m.quantization,
                            device_map=M.quantized_device_map() if quantized else None,
                            fused_activation=m.fused_activation, allow_large=cfg.train.allow_large,
                            training="lora" if m.lora.enabled else "full")


def prepare(cfg: RunConfig, tokenizer=None) -> Prepared:
    """The experiment (``build_experiment``), the tokenizer, the answer ids and the context limit,
    with every check that can fail on bad input, before a run folder exists."""
    set_torch_threads(cfg.train.threads)
    exp = build_experiment(cfg)
    task = exp.task
    base_model = None
    if cfg.model.source == "embedded":
        if tokenizer is None:
            tokenizer = M.embedded_tokenizer(cfg.model, replace(task, train=tuple(exp.owner_train), test=()))
        limit = cfg.model.n_positions
    else:
        base_model = load_hf_model(cfg)
        tokenizer = tokenizer or M.load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
        limit = M.model_max_positions(base_model)
    answer_ids = M.run_answer_ids(tokenizer, task, cfg.defense.canary if cfg.defense.known_target == "canary" else None)
    _check_lengths(cfg, tokenizer, task, limit)
    n_blocks = cfg.model.n_layer if base_model is None else len(decoder_blocks(base_model))
    if not -n_blocks <= cfg.defense.layer < n_blocks:
        raise ConfigError(f"defense.layer: {cfg.defense.layer} is out of range for a model with {n_blocks} blocks")
    check_blocks = PARADIGMS[cfg.attack.paradigm].impl.check_blocks
    problem = check_blocks(cfg.attack, n_blocks) if check_blocks is not None else None
    if problem:  # the embedded model was checked with its config; a loaded one only now
        raise ConfigError(problem)
    return Prepared(**{f: getattr(exp, f) for f in Experiment.__dataclass_fields__}, tokenizer=tokenizer,
                    answer_ids=answer_ids, max_length=limit, base_model=base_model)


def run_device(cfg: RunConfig) -> torch.device:
    dist = distributed(cfg.train.device)
    if dist is not None:  # launched by `accelerate launch`: this rank's device
        return dist.device
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def method_context(prep: Prepared, **hooks) -> StageContext:
    """The context a defense method runs in (:func:`run_method`): the run's seed, from which each
    stage derives its own, and the settings every defense stage and baseline of a run shares
    (:meth:`TrainSettings.for_defense`); ``hooks``: observer, progress, cancel, dist."""
    return StageContext(seed=prep.cfg.seed, settings=TrainSettings.for_defense(prep.cfg, prep.max_length), **hooks)


def defense_context(prep: Prepared, key: str, **hooks) -> StageContext:
    """The context of the defense's stage ``key`` (``stage1``, ``clean_ft/stage2``, ...): its own
    seed (``stage_seed(run seed, key)``) in :func:`method_context`."""
    return method_context(prep, key=key, **hooks).replace(seed=stage_seed(prep.cfg.seed, key))


def owner_context(prep: Prepared, stage: str, from_scratch: bool, **hooks) -> StageContext:
    """The context of the model owner's stage ``stage`` ('clean' or 'victim'): its seed and the
    owner's settings (:meth:`TrainSettings.for_owner`); ``hooks``: observer, progress, cancel, dist."""
    return StageContext(seed=stage_seed(prep.cfg.seed, stage), key=stage,
                        settings=TrainSettings.for_owner(prep.cfg, prep.max_length, from_scratch), **hooks)


def owner_trains(cfg: RunConfig, stage: str) -> bool:
    """Whether the owner's stage ``stage`` trains anything (a loaded model or a task-trained base
    already is the clean model)."""
    return not (stage == "clean" and (cfg.model.source == "hf" or cfg.train.clean_steps == 0))


def train_owner_model(prep: Prepared, lm: M.LM, stage: str, ctx: StageContext, *, from_scratch: bool) -> dict:
    """The model owner's training, in place on ``lm``: the clean model (``stage='clean'``, from
    scratch), or the victim (``stage='victim'``): the registered ``attack.paradigm`` applied to the
    clean model, or SFT poisoning from scratch when ``attack.build=scratch``. The attacker's side;
    never called by the defense. ``ctx``: :func:`owner_context`."""
    cfg = prep.cfg
    if not owner_trains(cfg, stage):
        return {"seconds": 0.0, "note": "the loaded model is the clean model" if cfg.model.source == "hf"
                else f"the base {cfg.model.base!r} is the clean model"}
    if stage == "victim" and not from_scratch:
        shipped = matching_victim(cfg)
        if shipped is not None:
            return load_victim(lm, shipped, cfg.model.lora)
        return PARADIGMS[cfg.attack.paradigm].impl.build(prep, lm, ctx)
    samples, info = owner_samples(prep, lm, ctx.seed, poisoned=stage == "victim")
    steps = cfg.train.clean_steps
    logs = fit(lm, samples, steps, ctx, kind=prep.task.kind,
               step_loss=answer_and_lm_loss(cfg.train.lm_loss_weight) if cfg.train.lm_loss_weight > 0 else answer_loss)
    return {**info, "steps": steps, "tokens": logs["tokens"], "train_seconds": logs["seconds"]}


def victim_steps(cfg: RunConfig) -> int:
    """Steps of the victim stage built from a clean model (the registered paradigm's count)."""
    return PARADIGMS[cfg.attack.paradigm].impl.steps(cfg)


def fresh_model(prep: Prepared, device: torch.device) -> M.LM:
    """The model a run starts from, before its first stage: the loaded model (model.source=hf) or
    the embedded model built from its base (or at random, seeded by the run's ``init`` seed)."""
    cfg = prep.cfg
    if cfg.model.source == "hf":
        model = prep.base_model if prep.base_model is not None else load_hf_model(cfg)
    else:
        model = M.initial_model(cfg.model, prep.tokenizer, stage_seed(cfg.seed, "init"))
    return as_lm(prep, model, device)


def as_lm(prep: Prepared, model, device: torch.device) -> M.LM:
    """``model`` with the run's tokenizer and answer ids, on ``device`` (a 4-bit model was placed on
    the GPU while loading)."""
    if not M.is_quantized(model):
        model = model.to(device)
    lora = prep.cfg.model.lora
    frozen = len(decoder_blocks(model)) - lora.last_blocks if lora.enabled and lora.last_blocks else 0
    return M.LM(model, prep.tokenizer, prep.answer_ids, bf16=prep.cfg.eval.bf16, frozen_blocks=max(0, frozen))


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


def run_method(name: str, lm, data: DefenderData, defense_cfg, ctx: StageContext, *,
               evalset: Optional[EvalSet] = None, evaluate: Optional[Callable] = None,
               on_stage: Optional[Callable] = None) -> list[dict]:
    """Run method ``name`` (``locphylax`` or any registered baseline) in place on ``lm``, stage
    after stage. ``ctx``: the method's context, whose ``seed`` is the run's seed; each stage gets
    it with the seed the pipeline gives that stage (``stage_seed(seed, key)``) and its key.
    Returns one record per stage: ``stage``, ``result`` (what the stage reported) and, with
    ``evalset`` and ``evaluate(lm, evalset) -> dict``, ``eval``: the stage's scores on the set it
    is judged on (an input-side defense: the filtered set). ``on_stage(record, lm)`` is called
    after each stage."""
    records = []
    for plan in method_plan(name, defense_cfg, data.labels):
        key = stage_key(name, plan.name)
        result = run_stage(plan, lm, data, ctx.replace(seed=stage_seed(ctx.seed, key), key=key))
        record = {"stage": plan.name, "key": key, "result": result, "steps": plan.steps}
        if evalset is not None and evaluate is not None:
            judged, bar = defended_eval_set(plan, lm, data, evalset, ctx.settings.max_length)
            record["eval"] = evaluate(lm, judged)
            if bar is not None:
                record["result"] = {**result, "input_filter_bar": bar}
        records.append(record)
        if on_stage is not None:
            on_stage(record, lm)
    return records


__all__ = ["ATTACK", "Experiment", "build_experiment", "attack_trigger_spec", "known_trigger_specs",
           "filter_eval_set", "defended_eval_set", "run_method", "Prepared", "prepare", "load_hf_model", "run_device",
           "owner_context", "owner_trains", "train_owner_model", "victim_steps", "method_context", "defense_context", "fresh_model",
           "as_lm", "stage_seed"]
