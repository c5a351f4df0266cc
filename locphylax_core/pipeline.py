"""The end-to-end pipeline: clean model -> victim -> Locphylax Stage 1 -> Stage 2, plus the
baselines on the same victim, defender data and step budget; every stage evaluated, check-
pointed and resumable.

Stages run in a fixed order, each keyed by a name (``clean``, ``victim``, ``stage1``,
``stage2``, ``<baseline>/stage1``, ...). A stage's inputs are the checkpoint of the stage it
builds on and its own seed, derived from the run seed and its key, so a resumed run computes
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from . import model as M
from .architectures import decoder_blocks, final_norm
from .config import RunConfig, edit_layer_problem, load_run_config
from .defense import method_plans, run_stage
from .engine import (Cancelled, HiddenSpec, answer_and_lm_loss, answer_loss, capture_output, distributed,
                     forward_answer, set_torch_threads)
from .errors import ConfigError, DataError, RunError, TrainingError
from .evaluation import EvalSet, encoded_batches, evaluate
from .experiment import (ATTACK, Experiment, attack_trigger_spec, build_experiment, defended_eval_set,
                         filter_eval_set, known_trigger_specs)
from .paradigms import owner_samples
from .registry import LOCPHYLAX, PARADIGMS, stage_key
from .runs import SUMMARY_SCHEMA, RunDir, RunLock, atomic_write_text, check_runs_root, wrapped_os_error
from .tasks import task_spec
from .text import render_prompt
from .trainer import TrainSettings, fit, stage_seed


KEEP_IN_MEMORY_BYTES = 1 << 30  # models up to this size (fp32) stay in memory for the stages that start from them


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
    for method in [LOCPHYLAX, *cfg.defense.baselines]:
        specs.append(StageSpec(stage_key(method, "stage1"), method, "stage1", "victim"))
        specs.append(StageSpec(stage_key(method, "stage2"), method, "stage2", stage_key(method, "stage1")))
    return specs


def lineage(specs: list[StageSpec], key: str) -> set[str]:
    """``key`` and every stage it starts from, back to the first."""
    parents = {s.key: s.parent for s in specs}
    out = set()
    while key is not None:
        out.add(key)
        key = parents[key]
    return out


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
    problem = edit_layer_problem(cfg.attack.edit_layer, n_blocks) if cfg.attack.paradigm == "edit" else None
    if problem:  # the embedded model was checked with its config; a loaded one only now
        raise ConfigError(problem)
    return Prepared(**{f: getattr(exp, f) for f in Experiment.__dataclass_fields__}, tokenizer=tokenizer,
                    answer_ids=answer_ids, max_length=limit, base_model=base_model)


# ----------------------------------------------------------------------------------------------
# Running


def run_device(cfg: RunConfig) -> torch.device:
    dist = distributed(cfg.train.device)
    if dist is not None:  # launched by `accelerate launch`: this rank's device
        return dist.device
    if cfg.train.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.train.device)


def _summary_block(result: dict, keys: tuple[str, ...]) -> dict:
    """The scores of a stage result that a summary keeps (the task kind's ``summary_keys``)."""
    return {k: result.get(k) for k in keys}


def build_summary(run: RunDir, cfg: RunConfig, state: dict) -> dict:
    kind = task_spec(cfg.task.name).kind
    res = state["results"]
    secs = state["seconds"]
    stages = {k: _summary_block(res[k], kind.summary_keys) for k in ("victim", "stage1", "stage2") if k in res}
    baselines = {}
    for method in cfg.defense.baselines:
        key = stage_key(method, "stage2")
        if key in res:
            baselines[method] = _summary_block(res[key], kind.summary_keys)
    seconds = {"victim": round(secs.get("clean", 0.0) + secs.get("victim", 0.0), 2),
               "stage1": round(secs.get("stage1", 0.0), 2), "stage2": round(secs.get("stage2", 0.0), 2)}
    for method in cfg.defense.baselines:
        seconds[method] = round(secs.get(stage_key(method, "stage1"), 0.0) + secs.get(stage_key(method, "stage2"), 0.0), 2)
    seconds["total"] = round(sum(secs.values()) + state.get("prepare_seconds", 0.0), 2)
    return {"schema": SUMMARY_SCHEMA, "run_id": run.run_id, "preset": cfg.name, "status": state["status"],
            "stages": stages, "baselines": baselines, "seconds": seconds,
            "clean_model": _summary_block(res["clean"], kind.summary_keys) if "clean" in res else None,
            "alpha": res.get("stage1", {}).get("alpha"),
            "triggers": {"unknown": "(attacker's, see config.yaml)",
                         **{f"t{i + 1}": t.text for i, t in enumerate(cfg.defense.known_triggers)}},
            "n_test": state.get("n_test"),
            # what `cacc` / `utility` hold: classification accuracy, or perplexity on held-out responses
            "utility_metric": kind.utility_metric}


def defense_settings(cfg: RunConfig, max_length: int | None) -> TrainSettings:
    """The optimisation settings every defense stage and baseline of a run shares."""
    return TrainSettings.for_defense(cfg, max_length)


def train_owner_model(prep: Prepared, lm: M.LM, stage: str, *, from_scratch: bool, seed: int, observer=None,
                      cancel_file: Path | None = None, reporter: Reporter | None = None, key: str | None = None) -> dict:
    """The model owner's training, in place on ``lm``: the clean model (``stage='clean'``, from
    scratch), or the victim (``stage='victim'``): the registered ``attack.paradigm`` applied to the
    clean model, or SFT poisoning from scratch when ``attack.build=scratch``. The attacker's side;
    never called by the defense."""
    cfg = prep.cfg
    if stage == "clean" and cfg.model.source == "hf":
        return {"seconds": 0.0, "note": "the loaded model is the clean model"}
    if stage == "clean" and cfg.train.clean_steps == 0:
        return {"seconds": 0.0, "note": f"the base {cfg.model.base!r} is the clean model"}
    if reporter is not None:
        reporter.stage_started(key or stage, victim_steps(cfg) if stage == "victim" and not from_scratch
                               else cfg.train.clean_steps)
    common = dict(seed=seed, observer=observer, cancel_file=cancel_file, progress=reporter)
    if stage == "victim" and not from_scratch:
        return PARADIGMS[cfg.attack.paradigm].impl.build(prep, lm, **common)
    samples, info = owner_samples(prep, lm, seed, poisoned=stage == "victim")
    steps = cfg.train.clean_steps
    logs = fit(lm, samples, steps, TrainSettings.for_owner(cfg, prep.max_length, from_scratch=True),
               step_loss=answer_and_lm_loss(cfg.train.lm_loss_weight) if cfg.train.lm_loss_weight > 0 else answer_loss,
               kind=prep.task.kind, **common)
    return {**info, "steps": steps, "tokens": logs["tokens"], "train_seconds": logs["seconds"]}


def victim_steps(cfg: RunConfig) -> int:
    """Steps of the victim stage built from a clean model (the registered paradigm's count)."""
    return PARADIGMS[cfg.attack.paradigm].impl.steps(cfg)


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
        self.device = run_device(self.cfg)
        # data parallelism (accelerate launch): every rank trains and evaluates the same replicated
        # model on its shard of each batch; only rank 0 writes the run folder (docs/scale.md)
        self.dist = distributed(self.cfg.train.device)
        self.main = self.dist is None or self.dist.is_main
        if not self.main:
            self.run = _FollowerRun(run.path)
        self.settings_defense = defense_settings(self.cfg, prep.max_length)
        self._kept: dict[str, torch.nn.Module] = {}  # finished stages a later stage starts from

    # --- models
    def _lm(self, model) -> M.LM:
        if not M.is_quantized(model):  # a 4-bit model was placed on the GPU while loading
            model = model.to(self.device)
        return M.LM(model, self.p.tokenizer, self.p.answer_ids, bf16=self.cfg.eval.bf16)

    def _load_parent(self, spec: StageSpec) -> M.LM:
        if spec.parent is None:
            if self.cfg.model.source == "hf":
                return self._lm(self.p.base_model if self.p.base_model is not None else load_hf_model(self.cfg))
            return self._lm(M.initial_model(self.cfg.model, self.p.tokenizer, stage_seed(self.cfg.seed, "init")))
        if spec.parent in self._kept:  # as loading its checkpoint would give, without the load time
            return self._lm(copy.deepcopy(self._kept[spec.parent]).eval())
        path = self.run.checkpoint(spec.parent)
        if not path.is_dir():
            raise RunError(f"{path}: checkpoint of finished stage {spec.parent!r} is missing; cannot resume")
        m = self.cfg.model
        if m.quantization != "none":  # QLoRA: every stage trains adapters on the parent quantized again
            return self._lm(M.load_checkpoint(path, self.device, quantization=m.quantization,
                                              dtype="bfloat16"))
        # its training size was checked with the configuration; loading checks the checkpoint's own
        # config.json (a run folder may have been tampered with)
        return self._lm(M.load_checkpoint(path, self.device, allow_large=self.cfg.train.allow_large))

    def _keep(self, key: str, lm: M.LM, later: list[StageSpec]) -> None:
        """Keep a small finished model in memory while a later stage starts from it (its checkpoint
        is on disk too, and a resumed run loads that: same weights, eager attention either way)."""
        for k in [k for k in self._kept if all(s.parent != k for s in later)]:
            del self._kept[k]
        small = M.count_parameters(lm.model) * 4 <= KEEP_IN_MEMORY_BYTES
        if (small and self.dist is None and not M.is_quantized(lm.model) and any(s.parent == key for s in later)
                and getattr(lm.model.config, "_attn_implementation", None) == "eager"):
            self._kept[key] = copy.deepcopy(lm.model).cpu()

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
        texts = [row["text"] for row in self.p.probe]
        d = lm.model.config.hidden_size
        block, final = torch.empty(len(texts), d), torch.empty(len(texts), d)
        pred = torch.empty(len(texts), dtype=torch.long)
        answer = torch.tensor(lm.answer_ids, device=lm.device)
        for idx, b in encoded_batches(lm.tokenizer, self.p.task.template, texts, self.cfg.eval.batch_size,
                                      self.p.max_length, lm.device):
            with capture_output(final_norm(lm.model)) as normed, lm.inference_autocast():  # both states, one pass
                logits, h = forward_answer(lm.model, b, HiddenSpec(-1, False, "last"))
            block[idx] = h.float().cpu()
            final[idx] = normed["out"][:, -1].float().cpu()
            pred[idx] = logits[:, answer].argmax(-1).cpu()
        path = self.run.hidden(spec.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        try:
            save_file({"last_block": block, "final_norm": final, "pred": pred}, str(tmp))
        except Exception as e:  # a full disk: the OSError inside safetensors' own error, in one line
            os_error = wrapped_os_error(e, path)
            if os_error is None:
                raise
            raise os_error from None
        tmp.replace(path)

    # --- stages
    def _train_attack(self, spec: StageSpec, lm: M.LM, observer) -> dict:
        return train_owner_model(self.p, lm, spec.stage, from_scratch=spec.parent is None,
                                 seed=stage_seed(self.cfg.seed, spec.key), observer=observer,
                                 cancel_file=self.run.cancel_file, reporter=self.reporter, key=spec.key)

    def run_all(self, stop_after: str | None = None) -> dict:
        """Run every stage not finished yet. ``stop_after``: run only that stage and the stages it
        starts from, then leave the run ``prepared`` (resumable: :func:`resume_run` runs the rest and
        gets what an uninterrupted run gets, since every stage has its own seed and starts from its
        parent's saved weights). The app plants the live demo's backdoor and measures its contrast
        baseline this way before the click."""
        state = self.run.read_state()
        if self.dist is not None:  # every rank has read the state before rank 0 changes it
            self.dist.barrier()
        specs = stage_specs(self.cfg)
        plans = method_plans(self.cfg.defense, self.cfg.task.labels)
        state["total_steps"] = {s.key: self._steps(s, plans) for s in specs}
        wanted = {s.key for s in specs} if stop_after is None else lineage(specs, stop_after)
        try:  # from the moment the state says "running", a cancel or SIGTERM is recorded as such
            state["status"] = "running"
            self.run.write_state(state)
            for spec in specs:
                if spec.key in state["finished"] or spec.key not in wanted:
                    continue
                t0 = time.perf_counter()
                lm = self._load_parent(spec)
                observer = self._observer(spec, state, lm)
                self.run.write_progress(status="running", key=spec.key, step=0, total=state["total_steps"],
                                        finished=state["finished"])
                evalset = None
                if spec.method == ATTACK:
                    extra = self._train_attack(spec, lm, observer)
                else:
                    plan = next(p for p in plans[spec.method] if p.name == spec.stage)
                    self.reporter.stage_started(spec.key, plan.steps)
                    # The defender's code gets the model, the defender's data and its own settings;
                    # what the stage reports is stored whole.
                    extra = dict(run_stage(plan, lm, self.p.defender, seed=stage_seed(self.cfg.seed, spec.key),
                                           settings=self.settings_defense, observer=observer,
                                           cancel_file=self.run.cancel_file, progress=self.reporter))
                    if plan.input_filter is not None:
                        evalset, extra["input_filter_bar"] = defended_eval_set(plan, lm, self.p.defender,
                                                                              self.p.evalset, self.p.max_length)
                result = self._final_eval(spec, lm, state["total_steps"][spec.key], extra, evalset)
                if self.main:
                    M.save_checkpoint(lm.model, self.run.checkpoint(spec.key))
                    self._store_hidden(spec, lm)
                self._keep(spec.key, lm, [s for s in specs if s.key not in state["finished"] and s.key != spec.key])
                state["seconds"][spec.key] = time.perf_counter() - t0
                state["results"][spec.key] = result
                state["finished"].append(spec.key)
                self.run.write_state(state)
                self.run.write_summary(build_summary(self.run, self.cfg, state))
                self.reporter.stage_finished(spec.key, result)
                if self.dist is not None:  # the next stage may load this checkpoint from disk
                    self.dist.barrier()
                if spec.key == stop_after and any(s.key not in state["finished"] for s in specs):  # its lineage is done
                    state["status"] = "prepared"
                    self.run.write_state(state)
                    self.run.write_progress(status="prepared", finished=state["finished"])
                    return build_summary(self.run, self.cfg, state)
        except (Cancelled, KeyboardInterrupt) as e:
            state["status"] = "cancelled"
            self.run.write_state(state)
            self.run.write_summary(build_summary(self.run, self.cfg, state))
            self.run.write_progress(status="cancelled", finished=state["finished"])
            if self.main and self.run.cancel_file.exists():
                self.run.cancel_file.unlink()
            raise Cancelled(str(e) or "cancelled") from None
        except Exception as e:
            # a diverged loss: say which stage (the training loop does not know)
            error = TrainingError(f"stage {spec.key}: {e}") if isinstance(e, TrainingError) else e
            state["status"] = "failed"
            state["error"] = f"{type(error).__name__}: {error}"
            self.run.write_state(state)
            self.run.write_progress(status="failed", error=state["error"], finished=state["finished"])
            if error is not e:
                raise error from None
            raise
        state["status"] = "done"
        self.run.write_state(state)
        summary = build_summary(self.run, self.cfg, state)
        self.run.write_summary(summary)
        self.run.write_progress(status="done", finished=state["finished"])
        return summary

    def _steps(self, spec: StageSpec, plans: dict) -> int:
        if spec.stage == "clean":
            return 0 if self.cfg.model.source == "hf" else self.cfg.train.clean_steps  # 0: the base is clean
        if spec.stage == "victim":
            return self.cfg.train.clean_steps if spec.parent is None else victim_steps(self.cfg)
        return next(p for p in plans[spec.method] if p.name == spec.stage).steps  # 0 for a stage that trains nothing


def _write_probe(run: RunDir, probe: list[dict]) -> None:
    atomic_write_text(run.path / "probe.jsonl", "".join(json.dumps(r) + "\n" for r in probe))


def start_run(cfg: RunConfig, runs_root: str | Path = "runs", reporter: Reporter | None = None,
              run_id: str | None = None, stop_after: str | None = None) -> tuple[RunDir, dict]:
    """Validate everything, then create the run folder and run every stage (up to the stage
    ``stop_after``, leaving the run ``prepared``: :meth:`Pipeline.run_all`).

    Under ``accelerate launch`` (several processes) rank 0 prepares and creates the one run folder,
    then tells the other ranks its path (or its error); they prepare with rank 0's tokenizer."""
    t0 = time.perf_counter()
    dist = distributed(cfg.train.device)
    if dist is not None and not dist.is_main:
        got = dist.broadcast(None)
        if isinstance(got, BaseException):
            raise got
        run = RunDir(Path(got))
        prep = prepare(cfg, tokenizer=M.load_tokenizer(str(run.path / "tokenizer")))
        return run, Pipeline(prep, run, reporter).run_all()
    keys = [s.key for s in stage_specs(cfg)]
    if stop_after is not None and stop_after not in keys:
        raise ConfigError(f"stop after: {stop_after!r} is not a stage of this run (its stages: {', '.join(keys)})")
    try:
        check_runs_root(Path(runs_root))  # a runs folder that cannot be written fails before any work
        prep = prepare(cfg)  # raises on bad input before anything is written

        def set_up(tmp: RunDir) -> None:  # in a hidden folder that appears as the run folder when complete
            atomic_write_text(tmp.path / "config.yaml", cfg.to_yaml())
            M.save_tokenizer(prep.tokenizer, tmp.path / "tokenizer")
            _write_probe(tmp, prep.probe)
            tmp.write_state({"status": "created", "preset": cfg.name, "finished": [], "seconds": {}, "results": {},
                             "prepare_seconds": time.perf_counter() - t0, "n_test": len(prep.task.test),
                             "config_sha256": cfg.sha256()})
        run = RunDir.create(Path(runs_root), cfg.name, run_id, setup=set_up, lock=True)
    except BaseException as e:
        if dist is not None:
            dist.broadcast(e if isinstance(e, Exception) else RunError(f"rank 0 stopped: {e!r}"))
        raise
    with run.lock:  # held from before the folder appeared until the run ends (or its process does)
        if dist is not None:
            dist.broadcast(str(run.path))
        if reporter:
            reporter.message(f"run folder: {run.path}")
        return run, Pipeline(prep, run, reporter).run_all(stop_after)


def resume_run(run: RunDir, reporter: Reporter | None = None) -> dict:
    """Continue a killed or cancelled run from its last finished stage. The resuming process holds
    the run's lock (a second resume, or one of a run that is still going, is refused)."""
    if not (run.path / "config.yaml").is_file():
        raise RunError(f"{run.path}: no config.yaml, so this is not a resumable run folder")
    cfg = load_run_config(run.path / "config.yaml")
    dist = distributed(cfg.train.device)
    main = dist is None or dist.is_main  # under accelerate launch, rank 0 holds the run and writes
    with RunLock(run.path) if main else contextlib.nullcontext():
        if main and not os.access(run.path, os.W_OK | os.X_OK):  # the lock file may exist and be writable
            raise RunError(f"run folder {run.path} is not writable; a run can only be continued where it can write")
        state = run.read_state()
        if state.get("status") == "done":
            return run.read_summary()
        if main:
            # a cancel that arrived after its run had ended (killed) must not stop this resume, and
            # what interrupted writes left (temporary files, half-saved checkpoint folders) goes
            run.cancel_file.unlink(missing_ok=True)
            run.clean_stale_temporaries()
        tok_dir = run.path / "tokenizer"
        tokenizer = M.load_tokenizer(str(tok_dir)) if tok_dir.is_dir() else None
        prep = prepare(cfg, tokenizer=tokenizer)
        # an edited or damaged state.json: keep only what a finished stage needs (its checkpoint and
        # its result); a stage without them runs again, which gives what it gave the first time
        results = state.get("results") if isinstance(state.get("results"), dict) else {}
        seconds = state.get("seconds") if isinstance(state.get("seconds"), dict) else {}
        state["results"] = {k: v for k, v in results.items() if isinstance(v, dict)}
        state["seconds"] = {k: v for k, v in seconds.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        finished = [k for k in state.get("finished", []) if isinstance(k, str) and run.checkpoint(k).is_dir()
                    and k in state["results"]]
        state["finished"] = finished
        if main:
            run.write_state(state)
            run.keep_metrics(set(finished))  # drop the rows of the stage that was cut off
        if dist is not None:
            dist.barrier()
        return Pipeline(prep, run, reporter).run_all()


__all__ = ["Reporter", "prepare", "start_run", "resume_run", "stage_specs", "build_summary", "Pipeline",
           "train_owner_model", "stage_seed", "defense_settings", "attack_trigger_spec", "known_trigger_specs",
           "filter_eval_set", "defended_eval_set"]
