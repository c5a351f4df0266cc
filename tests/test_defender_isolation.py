"""The defender's code path never receives the attacker's trigger or the attack configuration."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from pathlib import Path

import torch
from pydantic import BaseModel

import locphylax_core.defenses as defenses
import locphylax_core.pipeline as pipeline
from locphylax_core import experiment, load_config, start_run, trainer
from locphylax_core.config import AttackConfig, RunConfig
from locphylax_core.defenses import base, bdvax, crow, fine_pruning, finetune, locphylax, onion
from locphylax_core.registry import DEFENSES, stage_key
from locphylax_core.trainer import CancelFile, StageContext, TrainSettings

TRIGGER = "zqzqattack"


def _walk(obj, path, found, seen):
    """Collect (path, problem) for every place the trigger or an AttackConfig is reachable."""
    if isinstance(obj, (torch.nn.Module, torch.Tensor)):
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, AttackConfig):
        found.append((path, "AttackConfig"))
        return
    if isinstance(obj, RunConfig):
        found.append((path, "RunConfig (holds the attack config)"))
        return
    if isinstance(obj, str):
        if TRIGGER in obj:
            found.append((path, repr(obj)))
        return
    if isinstance(obj, (int, float, bool, type(None), Path)):
        if TRIGGER in str(obj):
            found.append((path, str(obj)))
        return
    if callable(obj) and not dataclasses.is_dataclass(obj):
        return
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            _walk(getattr(obj, f.name), f"{path}.{f.name}", found, seen)
        return
    if isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            _walk(getattr(obj, name), f"{path}.{name}", found, seen)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _walk(k, f"{path}[key {k!r}]", found, seen)
            _walk(v, f"{path}[{k!r}]", found, seen)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for i, v in enumerate(obj):
            _walk(v, f"{path}[{i}]", found, seen)
        return
    # anything else (the tokenizer, the progress reporter): its text form must not hold the trigger
    if TRIGGER in repr(obj):
        found.append((path, f"repr of {type(obj).__name__}"))


def test_walker_detects_the_trigger_and_attack_config():
    """The checker itself works (so a passing isolation test means something)."""
    found = []
    _walk({"a": [base.DefenderTrigger(text=f"x {TRIGGER}")]}, "x", found, set())
    assert found == [("x['a'][0].text", repr(f"x {TRIGGER}"))]
    found = []
    _walk((1, {"cfg": AttackConfig(trigger="cf")}), "y", found, set())
    assert found == [("y[1]['cfg']", "AttackConfig")]
    found = []
    _walk(TrainSettings(lora=None), "z", found, set())
    assert found == []
    found = []  # a stage's context is walked field by field (its settings, progress, cancellation, key)
    _walk(StageContext(seed=1, key=f"k {TRIGGER}", cancel=CancelFile(Path(TRIGGER))), "c", found, set())
    assert [p for p, _ in found] == ["c.cancel.path", "c.key"]


def test_defense_never_sees_the_attack(monkeypatch, tmp_path):
    calls = []
    real = pipeline.run_stage

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_stage", recording)
    # the default baselines plus bdvax, whose vaccines (the defender's own triggers) train copies
    cfg = load_config("micro", [f"attack.trigger={TRIGGER}", "attack.position=end",
                                "defense.baselines=[clean_ft, unlearn_single, no_cluster, bdvax]",
                                "defense.options.bdvax.vaccine_steps=2", "defense.options.bdvax.variants=2"])
    run, summary = start_run(cfg, runs_root=tmp_path / "runs")
    assert summary["status"] == "done"
    # 2 Locphylax stages + 2 per baseline
    assert len(calls) == 10
    assert {c[0][0].fn for c in calls} == {locphylax.inject, locphylax.recover, finetune.clean_finetune,
                                           bdvax.vaccinate, fine_pruning.fine_prune}
    import json
    vaccines = json.loads((run.path / "state.json").read_text())["results"]["bdvax/stage1"]["vaccines"]
    assert len(vaccines) == 2 and not any(TRIGGER in v["trigger"] for v in vaccines)

    # The attack really used the trigger: the run folder's config and evaluation know it ...
    assert TRIGGER in (run.path / "config.yaml").read_text()
    assert any(TRIGGER in line for line in (run.path / "probe.jsonl").read_text().splitlines())
    # ... but nothing handed to the defender contains it.
    for n, (args, kwargs) in enumerate(calls):
        found = []
        seen = set()
        for i, a in enumerate(args):
            _walk(a, f"call{n}.args[{i}]", found, seen)
        for k, v in kwargs.items():
            _walk(v, f"call{n}.{k}", found, seen)
        assert not found, found
    # What each stage receives is exactly (plan, model, DefenderData, StageContext): no keyword
    # arguments, and a context holding the defense's own settings, its stage's seed and key, the
    # run's cancellation (all walked above)
    settings = TrainSettings.for_defense(cfg, cfg.model.n_positions)
    keys = []
    for args, kwargs in calls:
        assert not kwargs and len(args) == 4
        plan, _lm, data, ctx = args
        assert isinstance(data, base.DefenderData) and isinstance(ctx, StageContext)
        assert ctx.settings == settings and ctx.seed == trainer.stage_seed(cfg.seed, ctx.key)
        assert isinstance(ctx.cancel, CancelFile) and ctx.cancel.path == run.cancel_file
        keys.append(ctx.key)
    assert keys == [stage_key(m, st) for m in ["locphylax", *cfg.defense.baselines] for st in ("stage1", "stage2")]
    # The defender data is the clean defender split and the defender's own triggers.
    data = calls[0][0][2]
    assert isinstance(data, base.DefenderData)
    assert [t.text for t in data.triggers] == ["vx", "as seen on channel four"]
    assert len(data.clean) == cfg.task.defender_size


def test_defense_functions_take_no_attack_parameter():
    for fn in (locphylax.inject, locphylax.recover, finetune.clean_finetune, base.run_stage, base.method_plans,
               base.defender_data, trainer.fit, experiment.run_method, fine_pruning.fine_prune, crow.crow,
               onion.onion_filter, bdvax.vaccinate, bdvax.vaccine_backdoors, bdvax.unit_change, *[e.impl for e in DEFENSES]):
        params = inspect.signature(fn).parameters
        assert not [p for p in params if "attack" in p.lower()], fn.__name__
    for cls in (base.DefenderData, locphylax.InjectConfig, locphylax.RecoverConfig, finetune.CleanFinetuneConfig,
                TrainSettings, StageContext, bdvax.VaccinateConfig, fine_pruning.FinePruneConfig, crow.CrowConfig,
                onion.OnionConfig):
        assert not [f.name for f in dataclasses.fields(cls) if "attack" in f.name.lower()], cls.__name__


def test_defense_module_does_not_import_the_attack_config():
    modules = [defenses, *[importlib.import_module(f"{defenses.__name__}.{m.name}")
                           for m in pkgutil.iter_modules(defenses.__path__)]]
    assert {base, locphylax, finetune, fine_pruning, crow, onion, bdvax} <= set(modules)
    for module in modules:  # Locphylax and every built-in baseline, and what they share
        src = inspect.getsource(module)
        assert "AttackConfig" not in src, module.__name__
        assert "cfg.attack" not in src, module.__name__
