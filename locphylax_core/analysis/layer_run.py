"""The layer analyses of a run (logit lens, activation patching, salience, trigger localisation),
for the victim, each stage and each baseline whose checkpoint exists.

Probe inputs: the first ``eval.layer_probe`` triggered inputs of the run's evaluation set for the
attacker's trigger (``unknown``) and their clean copies, rebuilt exactly as the run built them
(:func:`experiment.build_experiment`). This is evaluation: it knows the attacker's target and
trigger. The defender's localiser (:func:`salience.localise`) is called with the Stage 1 model,
the inputs and the canary only; the trigger is read afterwards, to score it.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .. import model as M
from ..config import load_run_config
from ..errors import RunError
from ..experiment import attack_trigger_spec, build_experiment
from ..registry import DEFENSES, stage_key
from ..runs import RunDir
from ..tasks import CLASSIFICATION
from ..tasks.base import task_spec
from .heads import borrowed_bridge
from .layers import activation_patching, logit_lens
from .salience import localise, precision_recall, token_salience, top_in_trigger, top_token, trigger_spans

N_EXAMPLES = 3  # salience of the first few probe inputs per stage, stored for the app


class LayerProbe:
    """What every layer analysis of a run reads: its config, tokenizer, answers and probe inputs."""

    def __init__(self, run: RunDir, n_probe: int | None = None):
        cfg_path, tok_dir = run.config_path, run.tokenizer_dir
        if not cfg_path.is_file():
            raise RunError(f"{cfg_path}: missing, so {run.path} is not a run folder")
        if not tok_dir.is_dir():
            raise RunError(f"{tok_dir}: missing")
        self.run, self.cfg = run, load_run_config(cfg_path)
        self.classification = task_spec(self.cfg.task.name).kind is CLASSIFICATION
        exp = build_experiment(self.cfg)
        self.template = exp.task.template
        self.tokenizer = M.load_tokenizer(str(tok_dir))
        self.tok_dir = tok_dir
        canary = self.cfg.defense.canary if self.cfg.defense.known_target == "canary" else None
        self.answer_ids = M.run_answer_ids(self.tokenizer, exp.task, canary)
        self.has_canary = canary is not None
        self.n_labels = len(self.cfg.task.labels)
        n = self.cfg.eval.layer_probe if n_probe is None else int(n_probe)
        ts = exp.evalset.triggered.get("unknown")
        self.spec = attack_trigger_spec(self.cfg)
        k = min(n, len(ts.texts)) if ts is not None else 0
        self.triggered = list(ts.texts[:k]) if k else []
        self.clean = [exp.evalset.clean[i].text for i in ts.indices[:k]] if k else []
        self.labels = [exp.evalset.clean[i].label for i in ts.indices[:k]] if k else []
        self.targets = list(ts.targets[:k]) if k else []
        # the detector's negatives: clean test inputs (any label), as many as the triggered ones
        self.detector_clean = [e.text for e in exp.evalset.clean[:max(k, 1)]]
        self.max_length = self.cfg.model.n_positions if self.cfg.model.source == "embedded" else None

    def target_ids(self) -> list[int]:
        return [self.answer_ids[t] for t in self.targets]

    def correct_ids(self) -> list[int]:
        return [self.answer_ids[y] for y in self.labels]

    def trigger_words(self) -> list[str]:
        return list(self.spec.parts) or [self.spec.text]

    def load(self, key: str):
        model = M.load_checkpoint(self.run.checkpoint(key), "cpu")
        return model, M.prompt_max_length(model, self.max_length)


def layer_keys(run: RunDir, stages: Sequence[str]) -> list[str]:
    """The victim, Locphylax's stages and each baseline's final stage (as CASD compares them),
    among the analysed stages with a checkpoint, in run order."""
    wanted = {"victim", "stage1", "stage2", *(stage_key(e.name, "stage2") for e in DEFENSES)}
    return [k for k in stages if k in wanted and run.checkpoint(k).is_dir()]


def analyse_checkpoint(probe: LayerProbe, key: str, batched: bool = True, salience_method: str = "ixg") -> dict:
    """Logit lens, activation patching (one bridge) and salience of one checkpoint, loaded once:
    ``{"logit_lens", "patching", "salience"}``."""
    model, max_length = probe.load(key)
    with borrowed_bridge(model, probe.tok_dir) as pair:
        lens = logit_lens(model, probe.tok_dir, probe.template, probe.triggered, probe.clean, probe.target_ids(),
                          probe.correct_ids(), max_length=max_length, bridge=pair)
        patch = activation_patching(model, probe.tok_dir, probe.template, probe.triggered, probe.clean,
                                    probe.target_ids(), probe.correct_ids(), batched=batched, max_length=max_length,
                                    bridge=pair)
    sal = salience_rate(probe, model, max_length, method=salience_method)
    del model
    return {"logit_lens": lens, "patching": patch, "salience": sal}


def _example(sal: dict, text: str) -> dict:
    return {"text": text, "tokens": sal["tokens"], "scores": np.asarray(sal["scores"]).tolist(),
            "in_text": np.asarray(sal["in_text"]).tolist()}


def salience_rate(probe: LayerProbe, model, max_length, method: str = "ixg", n_steps: int | None = None) -> dict:
    """The salience of ``logit(target) - logit(correct)`` on the triggered probe inputs and
    ``trigger_top1_rate``, the share of them whose top-ranked token belongs to the attacker's
    trigger (None when the trigger is not literally in the inputs, e.g. a syntactic one).
    Gradient x input by default: one backward pass per input, against ``eval.salience_steps``
    for integrated gradients (the app's per-sentence view computes those on demand)."""
    t0 = time.perf_counter()
    n_steps = probe.cfg.eval.salience_steps if n_steps is None else n_steps
    words = probe.trigger_words()
    spans = [trigger_spans(t, words) for t in probe.triggered]
    sal = token_salience(model, probe.tokenizer, probe.template, probe.triggered, probe.target_ids(),
                         [[c] for c in probe.correct_ids()], method=method, n_steps=n_steps, max_length=max_length)
    hits = [top_in_trigger(None if (t := top_token(s)) is None else tuple(s["offsets"][t]), sp)
            for s, sp in zip(sal, spans)]
    scored = [h for h in hits if h is not None]
    gaps = [abs(s["delta"]) / max(abs(s["objective"] - s["baseline"]), 1e-12) for s in sal if s["delta"] is not None]
    return {"trigger_top1_rate": (sum(scored) / len(scored)) if scored else None, "n_scored": len(scored),
            "method": method, "n_steps": n_steps if method == "ig" else None,
            "completeness_gap_median": float(np.median(gaps)) if gaps else None,
            "examples": [_example(s, t) for s, t in zip(sal[:N_EXAMPLES], probe.triggered)],
            "seconds": round(time.perf_counter() - t0, 3)}


def run_localisation(probe: LayerProbe, key: str = "stage1", method: str = "ixg") -> dict:
    """The defender's detector and localiser with the Stage 1 model, scored on the triggered probe
    inputs (positives) and as many clean test inputs (negatives). Needs the canary answer
    (``defense.known_target: canary``): without one no answer marks a triggered input."""
    if not probe.has_canary:
        return {"available": False, "reason": "defense.known_target is not 'canary': no answer of the Stage 1 "
                                              "model marks a triggered input"}
    if not probe.run.checkpoint(key).is_dir():
        return {"available": False, "reason": f"no {key} checkpoint"}
    t0 = time.perf_counter()
    model, max_length = probe.load(key)
    suspect = probe.n_labels  # the canary comes after the labels (model.run_answer_ids)
    trig = localise(model, probe.tokenizer, probe.template, probe.triggered, probe.answer_ids, suspect,
                    method=method, max_length=max_length)
    clean = localise(model, probe.tokenizer, probe.template, probe.detector_clean, probe.answer_ids, suspect,
                     method=method, max_length=max_length)
    del model
    # evaluation from here on: the attacker's trigger scores what the defender found
    words = probe.trigger_words()
    hits = [top_in_trigger(top, trigger_spans(t, words)) for top, t in zip(trig["top"], probe.triggered)]
    flagged = trig["flagged"]
    scored = [h for h in hits if h is not None]
    scored_flagged = [h for h, f in zip(hits, flagged) if h is not None and f]
    from sklearn.metrics import roc_auc_score  # heavy to import; as analysis/metrics.py does

    scores = np.concatenate([clean["suspect_prob"], trig["suspect_prob"]])
    truth = np.concatenate([np.zeros(len(clean["suspect_prob"])), np.ones(len(trig["suspect_prob"]))])
    return {"available": True, "stage": key, "method": method,
            **precision_recall(clean["flagged"], flagged),
            # threshold-free: how well the canary's probability alone ranks triggered above clean
            "auc": float(roc_auc_score(truth, scores)) if 0 < truth.sum() < len(truth) else None,
            "trigger_top1_rate": (sum(scored) / len(scored)) if scored else None,
            "trigger_top1_rate_flagged": (sum(scored_flagged) / len(scored_flagged)) if scored_flagged else None,
            "examples": [{"text": t, "flagged": bool(f), "top_token": tok}
                         for t, f, tok in list(zip(probe.triggered, flagged, trig["top_token"]))[:N_EXAMPLES]],
            "seconds": round(time.perf_counter() - t0, 3)}


__all__ = ["LayerProbe", "layer_keys", "analyse_checkpoint", "salience_rate", "run_localisation"]
