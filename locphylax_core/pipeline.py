"""The end-to-end pipeline: clean model -> victim -> Locphylax Stage 1 -> Stage 2, plus the
baselines on the same victim, defender data and step budget; every stage evaluated, check-
pointed and resumable.

Stages run in a fixed order, each keyed by a name (``clean``, ``victim``, ``stage1``,
``stage2``, ``<baseline>/stage1``, ...). A stage's inputs are the checkpoint of the stage it
builds on and its own seed, derived from the run seed and its key, so a resumed run computes
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from . import model as M
from .attack import poison
from .config import RunConfig, edit_layer_problem, load_run_config
from .defense import DefenderData, TrainSettings, defender_data, method_plans, run_stage, stage1_target
from .engine import (Cancelled, HiddenSpec, Sample, answer_and_lm_loss, answer_loss, batches, capture_output,
                     decoder_blocks, final_norm, forward_answer, set_torch_threads, train_loop)
from .errors import ConfigError, DataError, RunError
from .evaluation import EvalSet, TriggerSpec, build_eval_set, encoded_batches, evaluate
from .generative import attack_response_fn, is_generative
from .runs import SUMMARY_SCHEMA, RunDir, atomic_write_text
from .tasks import Example, Task, load_task, render_prompt, split_train

ATTACK = "attack"


class Reporter:
    """Progress sink; the CLI draws bars from it, the app reads progress.json instead."""

    def stage_started(self, key: str, total_steps: int) -> None: ...
    def advance(self, n: int, logs: dict) -> None: ...
    def stage_finished(self, key: str, result: dict) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass(frozen=True)
class StageSpec:
    key: str  # unique in the run, also the checkpoint name
    method: str  # "attack", "locphylax", or a baseline name
    stage: str  # "clean", "victim", "stage1", "stage2"
    parent: Optional[str]  # key of the checkpoint this stage starts from (None: a fresh model)


def stage_specs(cfg: RunConfig) -> list[StageSpec]:
    specs = []
    if cfg.model.source == "hf" or cfg.attack.build == "finetune":
        specs.append(StageSpec("clean", ATTACK, "clean", None))
        specs.append(StageSpec("victim", ATTACK, "victim", "clean"))
    else:
        specs.append(StageSpec("victim", ATTACK, "victim", None))
    for method in ["locphylax", *cfg.defense.baselines]:
        prefix = "" if method == "locphylax" else f"{method}/"
        specs.append(StageSpec(f"{prefix}stage1", method, "stage1", "victim"))
        specs.append(StageSpec(f"{prefix}stage2", method, "stage2", f"{prefix}stage1"))
    return specs


def stage_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**31 - 1)


# ----------------------------------------------------------------------------------------------
# Preparation: everything that can fail on bad input happens here, before a run folder exists


@dataclass
class Prepared:
    cfg: RunConfig
    task: Task
    owner_train: list[Example]  # the model owner's training data (poisoned for the victim)
    defender: DefenderData  # the only data the defense receives
    evalset: EvalSet
    curve_set: EvalSet
    probe: list[dict]  # fixed probe set: text, group, label
    tokenizer: object
    answer_ids: tuple[int, ...]
    max_length: int | None
    base_model: Optional[torch.nn.Module] = None  # the loaded HF model (source=hf)


def attack_trigger_spec(cfg: RunConfig) -> TriggerSpec:
    a = cfg.attack
    return TriggerSpec("unknown", a.trigger_text, a.position, cfg.task.labels.index(a.target), a.family,
                       tuple(a.trigger_parts))


def known_trigger_specs(cfg: RunConfig) -> list[TriggerSpec]:
    """The defender's triggers as evaluated: ASR toward what Stage 1 trains them to answer (the
    flip for 'flip' and for 'correct', where there is no other target to measure)."""
    d = cfg.defense
    target = stage1_target(d.known_target, cfg.task.labels)
    target = "flip" if target == "correct" else target
    if is_generative(cfg.task.name) and target == "flip":  # generative flip = a refusal of benign requests
        target = cfg.task.labels.index("refuse")
    return [TriggerSpec(f"t{i + 1}", t.text, t.position, target) for i, t in enumerate(d.known_triggers)]


def _check_lengths(cfg: RunConfig, tokenizer, task: Task, limit: int | None) -> None:
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
    if task.generative and base + cfg.eval.max_new_tokens > limit:
        raise DataError(f"model.n_positions: the longest test prompt ({base} tokens) plus eval.max_new_tokens "
                        f"({cfg.eval.max_new_tokens}) exceeds the model context ({limit}); raise model.n_positions "
                        f"or lower task.max_words / eval.max_new_tokens")


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


def load_hf_model(cfg: RunConfig) -> torch.nn.Module:
    """The model.source=hf model as configured: model.dtype, and model.quantization=4bit (QLoRA:
    NF4 weights placed on the GPU while loading; fails with a ModelLoadError without one)."""
    m = cfg.model
    quantized = m.quantization != "none"
    return M.load_causal_lm(m.name_or_path, m.trust_remote_code, dtype=m.dtype, quantization=m.quantization,
                            device_map=M.quantized_device_map() if quantized else None)


def prepare(cfg: RunConfig, tokenizer=None) -> Prepared:
    set_torch_threads(cfg.train.threads)
    task = load_task(cfg.task, cfg.seed)
    owner_train, defender_clean = split_train(task, cfg.task.defender_size)
    base_model = None
    if cfg.model.source == "embedded":
        if tokenizer is None:
            tokenizer = M.embedded_tokenizer(cfg.model, Task(task.name, task.template, task.labels,
                                                             tuple(owner_train), ()))
        limit = cfg.model.n_positions
    else:
        base_model = load_hf_model(cfg)
        tokenizer = tokenizer or M.load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
        limit = M.model_max_positions(base_model)
    answer_ids = M.answer_token_ids(tokenizer, task)
    if cfg.defense.known_target == "canary":  # one more answer: predictions range over labels + canary
        answer_ids = answer_ids + (M.canary_token_id(tokenizer, cfg.defense.canary, answer_ids),)
    _check_lengths(cfg, tokenizer, task, limit)
    n_blocks = cfg.model.n_layer if base_model is None else len(decoder_blocks(base_model))
    if not -n_blocks <= cfg.defense.layer < n_blocks:
        raise ConfigError(f"defense.layer: {cfg.defense.layer} is out of range for a model with {n_blocks} blocks")
    problem = edit_layer_problem(cfg.attack.edit_layer, n_blocks) if cfg.attack.paradigm == "edit" else None
    if problem:  # the embedded model was checked with its config; a loaded one only now
        raise ConfigError(problem)
    scoring = None
    if task.generative:
        from .generative import ResponseScoring
        scoring = ResponseScoring(task.name, cfg.eval.asr_rule, cfg.eval.max_new_tokens,
                                  cfg.defense.canary if cfg.defense.known_target == "canary" else None)
    evalset = build_eval_set(task.test, [attack_trigger_spec(cfg), *known_trigger_specs(cfg)],
                             len(task.labels), cfg.seed, scoring)
    if not evalset.triggered["unknown"].indices:
        raise DataError(f"task: the test split has no inputs whose label is not the attack target "
                        f"{cfg.attack.target!r}, so ASR cannot be measured")
    defender = defender_data(defender_clean, task.labels, task.template, cfg.defense, task.generative)
    return Prepared(cfg, task, owner_train, defender,
                    evalset, evalset.subset(cfg.eval.curve_examples), _probe_set(cfg, evalset), tokenizer,
                    answer_ids, limit, base_model)


# ----------------------------------------------------------------------------------------------
# Running


def _device(cfg: RunConfig) -> torch.device:
    from .engine import distributed
    dist = distributed(cfg.train.device)
    if dist is not None:  # launched by `accelerate launch`: this rank's device
        return dist.device
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def _summary_block(result: dict) -> dict:
    block = {"cacc": result["cacc"], "asr": result["asr"], "asr_raw": result["asr_raw"]}
    if "utility" in result:  # generative tasks: perplexity, the no-trigger rate, clean refusal rates
        block.update({k: result.get(k) for k in ("utility", "asr_no_trigger", "refusal_rate")})
    return block


def build_summary(run: RunDir, cfg: RunConfig, state: dict) -> dict:
    res = state["results"]
    secs = state["seconds"]
    stages = {k: _summary_block(res[k]) for k in ("victim", "stage1", "stage2") if k in res}
    baselines = {}
    for method in cfg.defense.baselines:
        key = f"{method}/stage2"
        if key in res:
            baselines[method] = _summary_block(res[key])
    seconds = {"victim": round(secs.get("clean", 0.0) + secs.get("victim", 0.0), 2),
               "stage1": round(secs.get("stage1", 0.0), 2), "stage2": round(secs.get("stage2", 0.0), 2)}
    for method in cfg.defense.baselines:
        seconds[method] = round(secs.get(f"{method}/stage1", 0.0) + secs.get(f"{method}/stage2", 0.0), 2)
    seconds["total"] = round(sum(secs.values()) + state.get("prepare_seconds", 0.0), 2)
    return {"schema": SUMMARY_SCHEMA, "run_id": run.run_id, "preset": cfg.name, "status": state["status"],
            "stages": stages, "baselines": baselines, "seconds": seconds,
            "clean_model": _summary_block(res["clean"]) if "clean" in res else None,
            "alpha": res.get("stage1", {}).get("alpha"),
            "triggers": {"unknown": "(attacker's, see config.yaml)",
                         **{f"t{i + 1}": t.text for i, t in enumerate(cfg.defense.known_triggers)}},
            "n_test": state.get("n_test"),
            # what `cacc` / `utility` hold: classification accuracy, or perplexity on held-out responses
            "utility_metric": "perplexity" if is_generative(cfg.task.name) else "cacc"}


def defense_settings(cfg: RunConfig, max_length: int | None) -> TrainSettings:
    """The optimisation settings every defense stage and baseline of a run shares."""
    return TrainSettings(lr=cfg.defense.lr, batch_size=cfg.defense.batch_size, weight_decay=0.0,
                         grad_clip=cfg.train.grad_clip, max_length=max_length, every=cfg.eval.every,
                         lora=cfg.model.lora if cfg.model.lora.enabled else None, schedule=cfg.defense.schedule,
                         **train_options(cfg))


def train_options(cfg: RunConfig) -> dict:
    """The ``train_loop`` options of ``train`` that every training stage shares (accumulation, bf16,
    checkpointing); their defaults give the plain loop."""
    t = cfg.train
    return {"grad_accum": t.grad_accum, "bf16": t.bf16, "grad_checkpointing": t.grad_checkpointing}


def train_owner_model(prep: Prepared, lm: M.LM, stage: str, *, from_scratch: bool, seed: int, observer=None,
                      cancel_file: Path | None = None, reporter: Reporter | None = None, key: str | None = None) -> dict:
    """The model owner's training, in place on ``lm``: the clean model (``stage='clean'``, from
    scratch) or the victim (``stage='victim'``: poisoned data, fine-tuned from the clean model, or
    from scratch when ``attack.build=scratch``). The attacker's side; never called by the defense."""
    cfg = prep.cfg
    if stage == "victim" and cfg.attack.paradigm != "sft":
        return _paradigm_victim(prep, lm, seed=seed, observer=observer, cancel_file=cancel_file, reporter=reporter,
                                key=key)
    data = prep.owner_train
    info = {}
    if stage == "victim":
        target = cfg.task.labels.index(cfg.attack.target)
        a = cfg.attack
        respond = attack_response_fn(cfg.task) if prep.task.generative else None
        data, n_poison = poison(data, a.trigger_text, a.position, a.poison_rate, target, seed, a.family,
                                a.trigger_parts, a.decoy_text, respond)
        info["poisoned"] = n_poison
    if stage == "clean" and cfg.model.source == "hf":
        return {"seconds": 0.0, "note": "the loaded model is the clean model"}
    steps = cfg.train.clean_steps if from_scratch else cfg.attack.steps
    samples = [Sample(render_prompt(prep.task.template, e.text), lm.answer_ids[e.label], response=e.response)
               for e in data]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    it = batches(samples, lm.tokenizer, cfg.train.batch_size, prep.max_length, lm.device, gen)
    lora = cfg.model.lora if (cfg.model.lora.enabled and not from_scratch) else None
    if lora is not None:
        lm.model = M.with_lora(lm.model, lora)
    try:
        if reporter is not None:
            reporter.stage_started(key or stage, steps)
        logs = train_loop(lm.model, it, steps, cfg.train.lr if from_scratch else cfg.attack.lr,
                          weight_decay=cfg.train.weight_decay, grad_clip=cfg.train.grad_clip,
                          warmup=cfg.train.warmup_steps if from_scratch else 0,
                          schedule="cosine", on_step=observer,  # decay: poisoning must not cost CACC
                          step_loss=answer_and_lm_loss(cfg.train.lm_loss_weight)
                          if from_scratch and cfg.train.lm_loss_weight > 0 else answer_loss,
                          every=cfg.eval.clean_every if from_scratch else cfg.eval.every, **train_options(cfg),
                          cancel_file=cancel_file, progress=reporter)
    finally:
        lm.model = M.merge_lora(lm.model)
    return {**info, "steps": steps, "tokens": logs["tokens"], "train_seconds": logs["seconds"]}


def _paradigm_victim(prep: Prepared, lm: M.LM, *, seed: int, observer=None, cancel_file: Path | None = None,
                     reporter: Reporter | None = None, key: str | None = None) -> dict:
    """The victim of ``attack.paradigm`` dpo or edit, in place on ``lm`` (the clean model): see
    ``paradigms.py``. The attacker's side; never called by the defense."""
    from .paradigms import ParadigmSettings, dpo_poison, rank_one_edit
    cfg = prep.cfg
    settings = ParadigmSettings.from_config(cfg, prep.max_length)
    if reporter is not None:
        reporter.stage_started(key or "victim", victim_steps(cfg))
    common = dict(seed=seed, observer=observer, cancel_file=cancel_file, progress=reporter)
    if cfg.attack.paradigm == "dpo":
        return dpo_poison(lm, prep.owner_train, settings, lora=cfg.model.lora if cfg.model.lora.enabled else None,
                          **common)
    return rank_one_edit(lm, prep.owner_train, settings, **common)


def victim_steps(cfg: RunConfig) -> int:
    """Steps of the victim stage built from a clean model (edit: the steps on the value vector)."""
    return cfg.attack.edit_steps if cfg.attack.paradigm == "edit" else cfg.attack.steps


class _FollowerRun(RunDir):
    """The run folder as a rank other than 0 sees it under data parallelism: it reads, and its
    writes do nothing (rank 0 writes state, metrics, progress and summary)."""

    def write_state(self, state: dict) -> None: ...
    def write_summary(self, summary: dict) -> None: ...
    def write_progress(self, **fields) -> None: ...
    def append_metric(self, row: dict) -> None: ...
    def keep_metrics(self, finished: set[str]) -> None: ...


class Pipeline:
    """Runs (or resumes) the stages of one run folder."""

    def __init__(self, prep: Prepared, run: RunDir, reporter: Reporter | None = None):
        self.p, self.cfg, self.run = prep, prep.cfg, run
        self.reporter = reporter or Reporter()
        self.device = _device(self.cfg)
        # data parallelism (accelerate launch): every rank trains and evaluates the same replicated
        # model on its shard of each batch; only rank 0 writes the run folder (docs/scale.md)
        from .engine import distributed
        self.dist = distributed(self.cfg.train.device)
        self.main = self.dist is None or self.dist.is_main
        if not self.main:
            self.run = _FollowerRun(run.path)
        self.settings_defense = defense_settings(self.cfg, prep.max_length)

    # --- models
    def _lm(self, model) -> M.LM:
        if not M.is_quantized(model):  # a 4-bit model was placed on the GPU while loading
            model = model.to(self.device)
        return M.LM(model, self.p.tokenizer, self.p.answer_ids)

    def _load_parent(self, spec: StageSpec) -> M.LM:
        if spec.parent is None:
            if self.cfg.model.source == "hf":
                return self._lm(self.p.base_model if self.p.base_model is not None else load_hf_model(self.cfg))
            return self._lm(M.initial_model(self.cfg.model, self.p.tokenizer, stage_seed(self.cfg.seed, "init")))
        path = self.run.checkpoint(spec.parent)
        if not path.is_dir():
            raise RunError(f"{path}: checkpoint of finished stage {spec.parent!r} is missing; cannot resume")
        m = self.cfg.model
        if m.quantization != "none":  # QLoRA: every stage trains adapters on the parent quantized again
            return self._lm(M.load_checkpoint(path, self.device, quantization=m.quantization,
                                              dtype="bfloat16"))
        return self._lm(M.load_checkpoint(path, self.device))

    # --- evaluation
    def _observer(self, spec: StageSpec, state: dict, lm: M.LM):
        def observe(step: int, logs: dict):
            # lm.model at call time: a LoRA stage swaps in its wrapped model while it trains
            r = evaluate(lm, self.p.task.template, self.p.curve_set, self.cfg.eval.batch_size, self.p.max_length)
            self.run.append_metric({"key": spec.key, "method": spec.method, "stage": spec.stage, "step": step,
                                    "split": "curve", **r, **{k: v for k, v in logs.items() if k != "tokens"}})
            self.run.write_progress(status="running", key=spec.key, step=step, total=state["total_steps"],
                                    finished=state["finished"])
        return observe

    def _final_eval(self, spec: StageSpec, lm: M.LM, step: int, extra: dict, evalset: EvalSet | None = None) -> dict:
        r = evaluate(lm, self.p.task.template, evalset or self.p.evalset, self.cfg.eval.batch_size, self.p.max_length)
        self.run.append_metric({"key": spec.key, "method": spec.method, "stage": spec.stage, "step": step,
                                "split": "test", **r})
        return {**r, **extra}

    @torch.no_grad()
    def _store_hidden(self, spec: StageSpec, lm: M.LM) -> None:
        from safetensors.torch import save_file
        texts = [row["text"] for row in self.p.probe]
        d = lm.model.config.hidden_size
        block, final = torch.empty(len(texts), d), torch.empty(len(texts), d)
        pred = torch.empty(len(texts), dtype=torch.long)
        answer = torch.tensor(lm.answer_ids, device=lm.device)
        for idx, b in encoded_batches(lm.tokenizer, self.p.task.template, texts, self.cfg.eval.batch_size,
                                      self.p.max_length, lm.device):
            with capture_output(final_norm(lm.model)) as normed:  # both states from one forward pass
                logits, h = forward_answer(lm.model, b, HiddenSpec(-1, False, "last"))
            block[idx] = h.float().cpu()
            final[idx] = normed["out"][:, -1].float().cpu()
            pred[idx] = logits[:, answer].argmax(-1).cpu()
        path = self.run.hidden(spec.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        save_file({"last_block": block, "final_norm": final, "pred": pred}, str(tmp))
        tmp.replace(path)

    # --- stages
    def _train_attack(self, spec: StageSpec, lm: M.LM, observer) -> dict:
        return train_owner_model(self.p, lm, spec.stage, from_scratch=spec.parent is None,
                                 seed=stage_seed(self.cfg.seed, spec.key), observer=observer,
                                 cancel_file=self.run.cancel_file, reporter=self.reporter, key=spec.key)

    def run_all(self) -> dict:
        state = self.run.read_state()
        if self.dist is not None:  # every rank has read the state before rank 0 changes it
            self.dist.barrier()
        specs = stage_specs(self.cfg)
        state["total_steps"] = {s.key: self._steps(s) for s in specs}
        state["status"] = "running"
        self.run.write_state(state)
        plans = method_plans(self.cfg.defense, self.cfg.task.labels)
        try:
            for spec in specs:
                if spec.key in state["finished"]:
                    continue
                t0 = time.perf_counter()
                lm = self._load_parent(spec)
                observer = self._observer(spec, state, lm)
                self.run.write_progress(status="running", key=spec.key, step=0, total=state["total_steps"],
                                        finished=state["finished"])
                if spec.method == ATTACK:
                    extra = self._train_attack(spec, lm, observer)
                else:
                    plan = next(p for p in plans[spec.method] if p.name == spec.stage)
                    self.reporter.stage_started(spec.key, getattr(plan.cfg, "steps", 0))
                    # The defender's code gets the model, the defender's data and its own settings.
                    extra = run_stage(plan, lm, self.p.defender, seed=stage_seed(self.cfg.seed, spec.key),
                                      settings=self.settings_defense, observer=observer,
                                      cancel_file=self.run.cancel_file, progress=self.reporter)
                    extra = {k: v for k, v in extra.items()
                             if k in ("alpha", "samples", "tokens", "seconds", "l_cluster", "l_inj", "pruned")}
                evalset = None
                if spec.method != ATTACK and plan.input_filter is not None:
                    evalset, extra["input_filter_bar"] = defended_eval_set(plan, lm, self.p)
                result = self._final_eval(spec, lm, state["total_steps"][spec.key], extra, evalset)
                if self.main:
                    M.save_checkpoint(lm.model, self.run.checkpoint(spec.key))
                    self._store_hidden(spec, lm)
                state["seconds"][spec.key] = time.perf_counter() - t0
                state["results"][spec.key] = result
                state["finished"].append(spec.key)
                self.run.write_state(state)
                self.run.write_summary(build_summary(self.run, self.cfg, state))
                self.reporter.stage_finished(spec.key, result)
                if self.dist is not None:  # the next stage may load this checkpoint from disk
                    self.dist.barrier()
        except (Cancelled, KeyboardInterrupt) as e:
            state["status"] = "cancelled"
            self.run.write_state(state)
            self.run.write_summary(build_summary(self.run, self.cfg, state))
            self.run.write_progress(status="cancelled", finished=state["finished"])
            if self.main and self.run.cancel_file.exists():
                self.run.cancel_file.unlink()
            raise Cancelled(str(e) or "cancelled") from None
        except Exception as e:
            state["status"] = "failed"
            state["error"] = f"{type(e).__name__}: {e}"
            self.run.write_state(state)
            self.run.write_progress(status="failed", error=state["error"], finished=state["finished"])
            raise
        state["status"] = "done"
        self.run.write_state(state)
        summary = build_summary(self.run, self.cfg, state)
        self.run.write_summary(summary)
        self.run.write_progress(status="done", finished=state["finished"])
        return summary

    def _steps(self, spec: StageSpec) -> int:
        if spec.stage == "clean":
            return 0 if self.cfg.model.source == "hf" else self.cfg.train.clean_steps
        if spec.stage == "victim":
            return self.cfg.train.clean_steps if spec.parent is None else victim_steps(self.cfg)
        return self.cfg.defense.stage1_steps if spec.stage == "stage1" else self.cfg.defense.stage2_steps


def filter_eval_set(evalset: EvalSet, clean_inputs) -> EvalSet:
    """The same evaluation set with every input (clean and triggered) passed through an
    input-side defense's filter; labels, targets and indices are unchanged."""
    from .evaluation import TriggeredSet
    clean = clean_inputs([e.text for e in evalset.clean])
    triggered = {name: TriggeredSet(ts.indices, tuple(clean_inputs(list(ts.texts))), ts.targets)
                 for name, ts in evalset.triggered.items()}
    return EvalSet(tuple(replace(e, text=t) for t, e in zip(clean, evalset.clean)), triggered, evalset.scoring)


def defended_eval_set(plan, lm: M.LM, prep: Prepared) -> tuple[EvalSet, float | None]:
    """The evaluation set a stage of ``plan`` is scored on, and its filter's bar: for an input-side
    defense (ONION) every test input first passes through the filter, which sees the inputs it
    must answer, never which trigger they carry; otherwise the run's own set."""
    if plan.input_filter is None:
        return prep.evalset, None
    clean_inputs = plan.input_filter(lm, prep.defender, prep.max_length)
    return filter_eval_set(prep.evalset, clean_inputs), getattr(clean_inputs, "bar", None)


def _write_probe(run: RunDir, probe: list[dict]) -> None:
    import json
    atomic_write_text(run.path / "probe.jsonl", "".join(json.dumps(r) + "\n" for r in probe))


def start_run(cfg: RunConfig, runs_root: str | Path = "runs", reporter: Reporter | None = None,
              run_id: str | None = None) -> tuple[RunDir, dict]:
    """Validate everything, then create the run folder and run every stage.

    Under ``accelerate launch`` (several processes) rank 0 prepares and creates the one run folder,
    then tells the other ranks its path (or its error); they prepare with rank 0's tokenizer."""
    from .engine import distributed
    t0 = time.perf_counter()
    dist = distributed(cfg.train.device)
    if dist is not None and not dist.is_main:
        got = dist.broadcast(None)
        if isinstance(got, BaseException):
            raise got
        run = RunDir(Path(got))
        prep = prepare(cfg, tokenizer=M.load_tokenizer(str(run.path / "tokenizer")))
        return run, Pipeline(prep, run, reporter).run_all()
    try:
        prep = prepare(cfg)  # raises on bad input before anything is written
        run = RunDir.create(Path(runs_root), cfg.name, run_id)
        try:
            atomic_write_text(run.path / "config.yaml", cfg.to_yaml())
            M.save_tokenizer(prep.tokenizer, run.path / "tokenizer")
            _write_probe(run, prep.probe)
            run.write_state({"status": "created", "preset": cfg.name, "finished": [], "seconds": {}, "results": {},
                             "prepare_seconds": time.perf_counter() - t0, "n_test": len(prep.task.test),
                             "config_sha256": hashlib.sha256(cfg.to_yaml().encode()).hexdigest()})
        except BaseException:
            import shutil
            shutil.rmtree(run.path, ignore_errors=True)  # nothing half-written is left behind
            raise
    except BaseException as e:
        if dist is not None:
            dist.broadcast(e if isinstance(e, Exception) else RunError(f"rank 0 stopped: {e!r}"))
        raise
    if dist is not None:
        dist.broadcast(str(run.path))
    if reporter:
        reporter.message(f"run folder: {run.path}")
    return run, Pipeline(prep, run, reporter).run_all()


def resume_run(run: RunDir, reporter: Reporter | None = None) -> dict:
    """Continue a killed or cancelled run from its last finished stage."""
    if not (run.path / "config.yaml").is_file():
        raise RunError(f"{run.path}: no config.yaml, so this is not a resumable run folder")
    cfg = load_run_config(run.path / "config.yaml")
    state = run.read_state()
    if state.get("status") == "done":
        return run.read_summary()
    tok_dir = run.path / "tokenizer"
    tokenizer = M.load_tokenizer(str(tok_dir)) if tok_dir.is_dir() else None
    prep = prepare(cfg, tokenizer=tokenizer)
    finished = [k for k in state.get("finished", []) if run.checkpoint(k).is_dir()]
    state["finished"] = finished
    state.setdefault("seconds", {})
    state.setdefault("results", {})
    from .engine import distributed
    dist = distributed(cfg.train.device)
    if dist is None or dist.is_main:  # under accelerate launch, rank 0 writes
        run.write_state(state)
        run.keep_metrics(set(finished))  # drop the rows of the stage that was cut off
    if dist is not None:
        dist.barrier()
    return Pipeline(prep, run, reporter).run_all()


__all__ = ["Reporter", "prepare", "start_run", "resume_run", "stage_specs", "build_summary", "Pipeline",
           "train_owner_model", "stage_seed", "defense_settings", "defended_eval_set", "filter_eval_set"]
