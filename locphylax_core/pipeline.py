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
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from . import model as M
from .architectures import decoder_blocks, final_norm
from .config import RunConfig, load_run_config
from .defenses.base import method_plans, run_stage
from .distributed import distributed
from .engine import HiddenSpec, answer_logits, capture_output
from .errors import Cancelled, ConfigError, RunError, TrainingError
from .evaluation import EvalSet, encoded_batches, evaluate, evaluate_with_subset
from .experiment import (ATTACK, Prepared, as_lm, defended_eval_set, fresh_model, owner_context, owner_trains, prepare,
                         run_device, train_owner_model, victim_steps, defense_context)
from .registry import LOCPHYLAX, stage_key
from .shipped_victims import load_stage, matching_stage, matching_victim
from .runs import SUMMARY_SCHEMA, RunDir, RunLock, atomic_write_text, check_runs_root, wrapped_os_error
from .tasks import task_spec
from .trainer import CancelFile, Reporter, StageContext


KEEP_IN_MEMORY_BYTES = 1 << 30  # models up to this size (fp32) stay in memory for the stages that start from them


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
# Running


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
        self._kept: dict[str, torch.nn.Module] = {}  # finished stages a later stage starts from
        # a stage's curve point at its last step, waiting for the final evaluation: the curve's
        # inputs are the test set's first ones, so both come from one scoring of the test set
        self._last_curve: dict[str, tuple[int, dict]] = {}

    # --- models
    def _lm(self, model) -> M.LM:
        return as_lm(self.p, model, self.device)

    def _load_parent(self, spec: StageSpec) -> M.LM:
        if spec.parent is None:
            return fresh_model(self.p, self.device)
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
            self.run.write_progress(status="running", key=spec.key, step=step, total=state["total_steps"],
                                    finished=state["finished"])
            if step == state["total_steps"][spec.key]:
                self._last_curve[spec.key] = (step, logs)  # scored with the final evaluation (_final_eval)
                return
            # lm.model at call time: a LoRA stage swaps in its wrapped model while it trains
            r = evaluate(lm, self.p.task.template, self.p.curve_set, self.cfg.eval.batch_size, self.p.max_length)
            self._append_curve(spec, step, logs, r)
        return observe

    def _append_curve(self, spec: StageSpec, step: int, logs: dict, result: dict) -> None:
        self.run.append_metric({"key": spec.key, "method": spec.method, "stage": spec.stage, "step": step,
                                "split": "curve", **result, **{k: v for k, v in logs.items() if k != "tokens"}})

    def _final_eval(self, spec: StageSpec, lm: M.LM, step: int, extra: dict, evalset: EvalSet | None = None) -> dict:
        args = (self.cfg.eval.batch_size, self.p.max_length)
        last = self._last_curve.pop(spec.key, None)
        if last is None and evalset is None and ("shipped_victim" in extra or "shipped_stage" in extra):
            # a stage loaded, not trained, changed the model all the same: its one curve point, at
            # step 0, so the curve starts where the backdoor was planted
            last = (0, {})
        if last is not None and evalset is None:
            r, curve = evaluate_with_subset(lm, self.p.task.template, self.p.evalset, self.cfg.eval.curve_examples, *args)
            self._append_curve(spec, *last, curve)
        else:
            if last is not None:  # an input filter scores the test set through it; the curve never is
                self._append_curve(spec, *last, evaluate(lm, self.p.task.template, self.p.curve_set, *args))
            r = evaluate(lm, self.p.task.template, evalset or self.p.evalset, *args)
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
            # both states in one pass; answer_logits reuses the frozen blocks' output of these (cached) batches
            with (capture_output(decoder_blocks(lm.model)[-1]) as last, capture_output(final_norm(lm.model)) as normed,
                  lm.inference_autocast()):
                logits = answer_logits(lm.model, b, lm.frozen_blocks)
            block[idx] = HiddenSpec(-1, False, "last").pool(last["out"], b.attention_mask).float().cpu()
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
    def _context(self, spec: StageSpec, observer) -> StageContext:
        """What the stage ``spec`` gets: its seed and settings, the evaluations, progress and
        cancellation of this run."""
        hooks = dict(observer=observer, progress=self.reporter, cancel=CancelFile(self.run.cancel_file), dist=self.dist)
        if spec.method == ATTACK:
            return owner_context(self.p, spec.key, spec.parent is None, **hooks)
        return defense_context(self.p, spec.key, **hooks)

    def _run_stage(self, spec: StageSpec, plans: dict, state: dict) -> tuple[M.LM, dict]:
        """Train stage ``spec`` from its parent's model, evaluate it, and save its checkpoint and
        hidden states; returns the model and the stage's result."""
        lm = self._load_parent(spec)
        self.run.write_progress(status="running", key=spec.key, step=0, total=state["total_steps"],
                                finished=state["finished"])
        evalset = None
        ctx = self._context(spec, self._observer(spec, state, lm))
        if spec.method == ATTACK:
            if owner_trains(self.cfg, spec.stage):
                self.reporter.stage_started(spec.key, state["total_steps"][spec.key])
            extra = train_owner_model(self.p, lm, spec.stage, ctx, from_scratch=spec.parent is None)
        else:
            plan = next(p for p in plans[spec.method] if p.name == spec.stage)
            shipped = self._shipped_stage(spec, plan)
            self.reporter.stage_started(spec.key, state["total_steps"][spec.key])
            if shipped is not None:  # this very computation, shipped (the Live demo's contrast)
                extra = load_stage(lm, shipped, spec.key, self.cfg.model.lora)
            else:
                # The defender's code gets the model, the defender's data and its stage's context;
                # what the stage reports is stored whole.
                extra = dict(run_stage(plan, lm, self.p.defender, ctx))
            if plan.input_filter is not None:
                evalset, extra["input_filter_bar"] = defended_eval_set(plan, lm, self.p.defender, self.p.evalset,
                                                                      self.p.max_length)
        result = self._final_eval(spec, lm, state["total_steps"][spec.key], extra, evalset)
        if self.main:
            M.save_checkpoint(lm.model, self.run.checkpoint(spec.key))
            self._store_hidden(spec, lm)
        return lm, result

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
                lm, result = self._run_stage(spec, plans, state)
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
                    self._warm_rows(specs, plans, state)
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

    def _warm_rows(self, specs: list[StageSpec], plans: dict, state: dict) -> None:
        """For a run prepared ahead of a click: store the frozen blocks' output for every row the
        defense's own stages will train on (``train.reuse_frozen_states``; the same seeded batches),
        so that after the click they run only the adapted blocks. Nothing is trained: the
        defender's rows through the blocks no stage adapts, which are the same for every model."""
        todo = [s for s in specs if s.method == LOCPHYLAX and s.key not in state["finished"]]
        if not (self.cfg.train.reuse_frozen_states and todo and self.dist is None and "victim" in state["finished"]):
            return
        lm = self._load_parent(StageSpec("victim-rows", ATTACK, "stage1", "victim"))
        for spec in todo:
            plan = next(p for p in plans[spec.method] if p.name == spec.stage)
            run_stage(plan, lm, self.p.defender, self._context(spec, None).replace(warm_rows_only=True))

    def _steps(self, spec: StageSpec, plans: dict) -> int:
        if spec.stage == "clean":
            return self.cfg.train.clean_steps if owner_trains(self.cfg, "clean") else 0  # 0: the base is clean
        if spec.stage == "victim":
            if spec.parent is None:
                return self.cfg.train.clean_steps
            return 0 if matching_victim(self.cfg) is not None else victim_steps(self.cfg)
        plan = next(p for p in plans[spec.method] if p.name == spec.stage)
        return 0 if self._shipped_stage(spec, plan) is not None else plan.steps  # 0: a stage that trains nothing

    def _shipped_stage(self, spec: StageSpec, plan):
        """The shipped adapter of the baseline stage ``spec`` (shipped_victims.matching_stage), if
        one fits this run; the defense's own stages and input-side defenses are always computed."""
        if spec.method == LOCPHYLAX or plan.input_filter is not None or plan.steps == 0:
            return None
        return matching_stage(self.cfg, spec.key)


def _write_probe(run: RunDir, probe: list[dict]) -> None:
    atomic_write_text(run.probe_path, "".join(json.dumps(r) + "\n" for r in probe))


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
        prep = prepare(cfg, tokenizer=M.load_tokenizer(str(run.tokenizer_dir)))
        return run, Pipeline(prep, run, reporter).run_all()
    keys = [s.key for s in stage_specs(cfg)]
    if stop_after is not None and stop_after not in keys:
        raise ConfigError(f"stop after: {stop_after!r} is not a stage of this run (its stages: {', '.join(keys)})")
    try:
        check_runs_root(Path(runs_root))  # a runs folder that cannot be written fails before any work
        prep = prepare(cfg)  # raises on bad input before anything is written

        def set_up(tmp: RunDir) -> None:  # in a hidden folder that appears as the run folder when complete
            atomic_write_text(tmp.config_path, cfg.to_yaml())
            M.save_tokenizer(prep.tokenizer, tmp.tokenizer_dir)
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
    if not run.config_path.is_file():
        raise RunError(f"{run.path}: no config.yaml, so this is not a resumable run folder")
    cfg = load_run_config(run.config_path)
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
        tok_dir = run.tokenizer_dir
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


__all__ = ["Reporter", "start_run", "resume_run", "stage_specs", "build_summary", "Pipeline"]
