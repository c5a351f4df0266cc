"""The registries: a toy task, a toy attack paradigm and a toy defense, registered from this test
module alone (no core file edited), are accepted by the config, run by the pipeline, listed by the
CLI table, offered by the app's Setup page, and included in CASD and the exports; a toy defense
that never mentions cancellation is still stopped by a Stop (its context carries it). Also the three
defects the registry removed: stage results cut to a whitelist, ONION reported as training Stage 1
steps, and an unknown paradigm silently run as the rank-one edit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import Field

from locphylax_core import DEFENSES, PARADIGMS, TASKS, ConfigError, Reporter, RunDir, load_config, start_run
from locphylax_core.analysis.casd import default_trainings
from locphylax_core.analysis.figures import curve_table
from locphylax_core.analysis.run_analysis import analyze_run, export_figures
from locphylax_core.attack import poison
from locphylax_core.cli import main as cli_main
from locphylax_core.config import Options
from locphylax_core.defenses.base import StagePlan, clean_samples
from locphylax_core.engine import answer_loss
from locphylax_core.errors import Cancelled
from locphylax_core.experiment import ATTACK
from locphylax_core.paradigms import Paradigm
from locphylax_core.pipeline import stage_specs
from locphylax_core.registry import LOCPHYLAX, stage_key
from locphylax_core.tasks import CLASSIFICATION, TaskSpec
from locphylax_core.text import Example, render_prompt
from locphylax_core.trainer import StageContext, fit

SETUP = str(Path(__file__).resolve().parent.parent / "app" / "views" / "setup.py")
WORDS = ["red", "blue", "green", "gold", "grey", "pink", "teal", "navy"]


# ---- a toy task: is the colour list warm (label 1) or cold (label 0)?

def _toy_examples(n: int, seed: int) -> list[Example]:
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 6))]
        warm = sum(w in ("red", "gold", "pink") for w in words)
        out.append(Example(" ".join(words) + " .", int(warm * 2 >= len(words))))
    return out


def load_toy(cfg, seed: int = 0):
    return _toy_examples(cfg.train_size + cfg.defender_size, 11), _toy_examples(cfg.test_size, 12)


# ---- a toy paradigm: SFT poisoning at a scaled rate, with its own options class

class ToyParadigmOptions(Options):
    rate_scale: float = Field(1.0, gt=0, le=5)


def toy_poison(prep, lm, ctx: StageContext) -> dict:
    cfg = prep.cfg
    opts = cfg.attack.paradigm_settings()
    a = cfg.attack
    data, n = poison(prep.owner_train, a.trigger_text, a.position, min(1.0, a.poison_rate * opts.rate_scale),
                     cfg.task.labels.index(a.target), ctx.seed, a.family, a.trigger_parts)
    samples = [prep.task.kind.owner_sample(render_prompt(prep.task.template, e.text), lm.answer_ids[e.label], e)
               for e in data]
    logs = fit(lm, samples, a.steps, ctx, step_loss=answer_loss, kind=prep.task.kind)
    return {"paradigm": "toy_poison", "poisoned": n, "rate_scale": opts.rate_scale, "tokens": logs["tokens"]}


# ---- a toy defense: clean fine-tuning with its own options class and an extra key in its result

class ToyDefenseOptions(Options):
    steps: int = Field(2, ge=1)


def toy_stage(lm, data, cfg, ctx: StageContext) -> dict:
    logs = fit(lm, clean_samples(data, lm.answer_ids), cfg.steps, ctx, kind=data.kind)
    return {**logs, "toy_marker": 42.0}


def toy_plan(d, opts: ToyDefenseOptions, labels):
    cfg = type("ToyStageConfig", (), {"steps": opts.steps})()
    return [StagePlan("stage1", toy_stage, cfg), StagePlan("stage2", toy_stage, cfg)]


@pytest.fixture(scope="module")
def toys():
    TASKS.register("toy_colours", TaskSpec(CLASSIFICATION, load_toy), label="toy colour lists")
    PARADIGMS.register("toy_poison", Paradigm(toy_poison, lambda cfg: cfg.attack.steps), label="toy poisoning",
                       options=ToyParadigmOptions)
    DEFENSES.register("toy_ft", toy_plan, label="toy fine-tuning", options=ToyDefenseOptions, kind="model")
    yield
    TASKS.unregister("toy_colours")
    PARADIGMS.unregister("toy_poison")
    DEFENSES.unregister("toy_ft")


def _toy_config(**extra):
    return load_config("micro", {"task.name": "toy_colours", "attack.trigger": "zz", "attack.paradigm": "toy_poison",
                                 "attack.options": {"toy_poison": {"rate_scale": 2.0}},
                                 "defense.baselines": ["clean_ft", "toy_ft"],
                                 "defense.options": {"toy_ft": {"steps": 3}}, **extra})


def test_the_config_accepts_registered_entries_and_validates_their_options(toys):
    cfg = _toy_config()
    assert cfg.task.name == "toy_colours" and cfg.attack.paradigm == "toy_poison"
    assert cfg.attack.options == {"toy_poison": {"rate_scale": 2.0}}
    assert cfg.defense.options == {"toy_ft": {"steps": 3}} and cfg.defense.method_settings("toy_ft").steps == 3
    for over, field in [({"defense.options": {"toy_ft": {"steps": 0}}}, "defense.options.toy_ft.steps"),
                        ({"defense.options": {"toy_ft": {"stepz": 1}}}, "defense.options.toy_ft.stepz"),
                        ({"attack.options": {"toy_poison": {"rate_scale": 9}}}, "attack.options.toy_poison.rate_scale")]:
        with pytest.raises(ConfigError) as e:
            _toy_config(**over)
        assert field in e.value.fields, e.value.fields
    # the names are what is registered: unknown ones are refused and the message lists the registered ones
    for over, field, name in [({"task.name": "toy_nope"}, "task.name", "toy_colours"),
                              ({"attack.paradigm": "toy_nope"}, "attack.paradigm", "toy_poison"),
                              ({"defense.baselines": ["toy_nope"]}, "defense.baselines.0", "toy_ft")]:
        with pytest.raises(ConfigError) as e:
            load_config("micro", over)
        assert field in e.value.fields and name in e.value.fields[field], e.value.fields


def test_toys_run_in_the_pipeline_and_reach_casd_the_exports_the_cli_and_setup(toys, tmp_path, capsys, monkeypatch):
    import locphylax_core.paradigms as P

    def no_edit(*a, **kw):
        raise AssertionError("a registered paradigm fell through to the rank-one edit")
    monkeypatch.setattr(P, "rank_one_edit", no_edit)
    run, summary = start_run(_toy_config(), runs_root=tmp_path)
    state = run.read_state()
    assert state["status"] == "done" and set(summary["baselines"]) == {"clean_ft", "toy_ft"}
    victim = state["results"]["victim"]
    assert victim["paradigm"] == "toy_poison" and victim["rate_scale"] == 2.0 and victim["poisoned"] > 0
    assert state["total_steps"]["toy_ft/stage1"] == 3 and state["total_steps"]["toy_ft/stage2"] == 3
    assert state["results"]["toy_ft/stage2"]["toy_marker"] == 42.0  # stored whole, no whitelist
    # CASD and the exports include the new defense
    analysis = analyze_run(run, heads=False, casd=True)
    assert "toy_ft" in analysis["casd"]["labels"]
    written = export_figures(run)
    curves = next(p for p in written if p.name == "curves.csv")
    assert "toy_ft" in curves.read_text()
    # the CLI table lists each registry's new entry
    capsys.readouterr()
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "toy_colours" in out and "toy_poison" in out and "toy_ft" in out and "steps=2" in out
    # the app's Setup page offers them (its choices are the registries')
    from streamlit.testing.v1 import AppTest
    monkeypatch.syspath_prepend(str(Path(SETUP).parent.parent))  # the page imports `support`, as Home.py arranges
    at = AppTest.from_file(SETUP, default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    names = {w.label: w for w in [*at.selectbox, *at.multiselect]}
    assert any("toy_colours" in o for o in names["name"].options)
    assert any("toy_poison" in o for o in names["paradigm"].options)
    assert any("toy_ft" in o for o in names["baselines"].options)


# ---- a toy defense that knows nothing of cancellation: it hands its context to the trainer, as
# every stage does, and a Stop still ends it between two steps

class ToySlowOptions(Options):
    steps: int = Field(500, ge=1)


def toy_slow_stage(lm, data, cfg, ctx: StageContext) -> dict:
    steps_run = []

    def counted(model, batch, step):
        steps_run.append(step)
        return answer_loss(model, batch, step)
    logs = fit(lm, clean_samples(data, lm.answer_ids), cfg.steps, ctx, step_loss=counted, kind=data.kind)
    return {**logs, "steps_run": len(steps_run)}


def toy_slow_plan(d, opts: ToySlowOptions, labels):
    cfg = type("ToySlowConfig", (), {"steps": opts.steps})()
    return [StagePlan("stage1", toy_slow_stage, cfg), StagePlan("stage2", toy_slow_stage, cfg)]


class _StopAt(Reporter):
    """Asks the run to stop (its CANCEL file, as `locphylax cancel` and the app's Stop do) once
    ``key`` has trained ``after`` steps; counts the steps each stage reports."""

    def __init__(self, key: str, after: int):
        self.key, self.after, self.current, self.steps, self.folder = key, after, None, {}, None

    def message(self, text: str) -> None:
        if text.startswith("run folder: "):
            self.folder = Path(text.removeprefix("run folder: "))

    def stage_started(self, key: str, total_steps: int) -> None:
        self.current = key

    def advance(self, n: int, logs: dict) -> None:
        self.steps[self.current] = self.steps.get(self.current, 0) + n
        if self.current == self.key and self.steps[self.current] == self.after:
            RunDir(self.folder).cancel_file.touch()


def test_a_toy_defense_that_ignores_cancellation_is_still_cancelled(tmp_path):
    DEFENSES.register("toy_slow", toy_slow_plan, label="toy slow fine-tuning", options=ToySlowOptions, kind="model")
    try:
        cfg = load_config("micro", {"defense.baselines": ["toy_slow"]})
        stop = _StopAt("toy_slow/stage1", after=3)
        with pytest.raises(Cancelled):
            start_run(cfg, runs_root=tmp_path, reporter=stop)
    finally:
        DEFENSES.unregister("toy_slow")
    # the Stop came after its 3rd step; the trainer it handed its context to ended it before the 4th
    assert stop.steps["toy_slow/stage1"] == 3
    state = RunDir(stop.folder).read_state()
    assert state["status"] == "cancelled" and "toy_slow/stage1" not in state["finished"]
    assert state["finished"][-1] == "stage2"  # everything before it finished, and stays resumable
    assert not RunDir(stop.folder).cancel_file.exists()


def test_stage_results_are_stored_whole_and_onion_trains_no_steps(tmp_path):
    """Before the registry, Pipeline.run_all kept 7 keys of a stage's result (CROW's l_consistency
    was dropped) and reported defense.stage1_steps for ONION, which trains nothing."""
    cfg = load_config("micro", {"defense.baselines": ["crow", "onion"], "defense.options": {"onion": {"clean_quantile": 0.9, "fluency": "victim"}}})
    run, summary = start_run(cfg, runs_root=tmp_path)
    state = run.read_state()
    assert "l_consistency" in state["results"]["crow/stage1"] and "l_ce" in state["results"]["crow/stage2"]
    assert state["total_steps"]["onion/stage1"] == 0 and state["total_steps"]["onion/stage2"] == 0
    assert state["total_steps"]["crow/stage1"] == cfg.defense.stage1_steps
    assert "input_filter_bar" in state["results"]["onion/stage2"]
    curve = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in curve if r["key"].startswith("onion/") and r["split"] == "curve"]  # nothing trained


def test_every_registered_defense_has_a_label_and_a_kind():
    for e in DEFENSES:
        assert e.label and e.label != e.name and e.kind in ("model", "input"), e
    assert DEFENSES["onion"].kind == "input" and DEFENSES["crow"].options is not None


def test_stage_keys_follow_one_rule_in_the_pipeline_casd_and_the_curves():
    assert stage_key(LOCPHYLAX, "stage2") == "stage2" and stage_key("clean_ft", "stage1") == "clean_ft/stage1"
    cfg = load_config("micro")
    defended = [s for s in stage_specs(cfg) if s.method != ATTACK]
    assert [(s.key, s.parent) for s in defended] == [
        (stage_key(m, st), "victim" if st == "stage1" else stage_key(m, "stage1"))
        for m in [LOCPHYLAX, *cfg.defense.baselines] for st in ("stage1", "stage2")]
    assert default_trainings()["clean_ft"] == "clean_ft/stage2" and default_trainings()["stage2"] == "stage2"
    rows = [{"key": k, "step": 1, "split": "curve", "cacc": 1.0, "asr": {"unknown": 0.5}}
            for k in ("victim", "clean_ft/stage1", "clean_ft/stage2", "stage2")]
    assert list(curve_table(rows, "clean_ft")["stage"]) == ["victim", "stage1", "stage2"]
    assert list(curve_table(rows)["stage"]) == ["victim", "stage2"]


def test_core_modules_import_the_core_at_module_level_only():
    """Function-level imports are for optional heavy dependencies (transformer_lens, bitsandbytes,
    ...); a function-level import of another core module would hide a dependency (and a cycle)
    from the layer contracts that `make test` checks with import-linter."""
    import ast
    root = Path(__file__).resolve().parent.parent / "locphylax_core"
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [f"{path.relative_to(root)}:{n.lineno}" for n in ast.walk(fn)
                          if isinstance(n, ast.ImportFrom) and (n.level > 0 or (n.module or "").startswith("locphylax_core"))]
    assert not found, found
