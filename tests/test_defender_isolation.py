"""The defender's code path never receives the attacker's trigger or the attack configuration."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import torch
from pydantic import BaseModel

import locphylax_core.pipeline as pipeline
from locphylax_core import baselines, defense, experiment, load_config, start_run
from locphylax_core.config import AttackConfig, RunConfig

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
    _walk({"a": [defense.DefenderTrigger(text=f"x {TRIGGER}")]}, "x", found, set())
    assert found == [("x['a'][0].text", repr(f"x {TRIGGER}"))]
    found = []
    _walk((1, {"cfg": AttackConfig(trigger="cf")}), "y", found, set())
    assert found == [("y[1]['cfg']", "AttackConfig")]
    found = []
    _walk(defense.TrainSettings(lora=None), "z", found, set())
    assert found == []


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
    assert {c[0][0].fn for c in calls} == {defense.inject, defense.recover, baselines.clean_finetune,
                                           baselines.vaccinate, baselines.fine_prune}
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
    # The defender data is the clean defender split and the defender's own triggers.
    data = calls[0][0][2]
    assert isinstance(data, defense.DefenderData)
    assert [t.text for t in data.triggers] == ["vx", "as seen on channel four"]
    assert len(data.clean) == cfg.task.defender_size


def test_defense_functions_take_no_attack_parameter():
    for fn in (defense.inject, defense.recover, baselines.clean_finetune, defense.run_stage, defense.method_plans,
               defense.defender_data, defense.train_stage, experiment.run_method, baselines.fine_prune, baselines.crow,
               baselines.onion_filter, baselines.vaccinate, baselines.vaccine_backdoors, baselines.unit_change, *[e.impl for e in defense.DEFENSES]):
        params = inspect.signature(fn).parameters
        assert not [p for p in params if "attack" in p.lower()], fn.__name__
    for cls in (defense.DefenderData, defense.InjectConfig, defense.RecoverConfig, baselines.CleanFinetuneConfig,
                defense.TrainSettings, baselines.VaccinateConfig, baselines.FinePruneConfig, baselines.CrowConfig,
                baselines.OnionConfig):
        assert not [f.name for f in dataclasses.fields(cls) if "attack" in f.name.lower()], cls.__name__


def test_defense_module_does_not_import_the_attack_config():
    for module in (defense, baselines):  # Locphylax and every built-in baseline
        src = inspect.getsource(module)
        assert "AttackConfig" not in src, module.__name__
        assert "cfg.attack" not in src, module.__name__
