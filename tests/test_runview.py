"""The read-only run view the app displays: numbers equal the run's files, bad folders never raise."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from locphylax_core import ConfigError, load_config
from locphylax_core import runview as R
from locphylax_core import stage_model as SM


@pytest.fixture(scope="module")
def view(analysed_root):
    (path,) = [p for p in analysed_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return R.open_run(path)


def test_view_of_a_finished_analysed_run(view):
    assert view.health == "done" and view.problems == ()
    assert view.analysed and view.preset == "micro"
    assert view.label_words == ["negative", "positive", "unsure"]  # micro runs locphylax+ (canary)
    assert view.methods == ["locphylax", "clean_ft", "unlearn_single", "no_cluster"]
    assert view.attack_trigger == load_config("micro").attack.trigger_text


def test_results_table_equals_the_summary(view):
    t = R.results_table(view)
    s = view.summary
    assert list(t["key"]) == ["victim", "stage1", "stage2", "clean_ft", "unlearn_single", "no_cluster"]
    for key in ("victim", "stage1", "stage2"):
        row = t[t["key"] == key].iloc[0]
        assert row["CACC %"] == round(100 * s["stages"][key]["cacc"], 1)
        for trig, v in s["stages"][key]["asr"].items():  # None (no qualifying input) stays empty
            got = row[f"ASR {trig} %"]
            assert (v is None and (got is None or np.isnan(got))) or got == round(100 * v, 1)
    ft = t[t["key"] == "clean_ft"].iloc[0]
    assert ft["row"] == "clean fine-tuning" and ft["seconds"] == s["seconds"]["clean_ft"]
    both = R.compare_table([view, view])
    assert len(both) == 2 * len(t) and set(both["preset"]) == {"micro"}


def test_arrays_have_the_analysis_shapes(view):
    coords, preds = R.projection(view, "tsne")
    assert list(coords) == view.analysis["projections"]["tsne"]["stages"]
    assert all(c.shape == (len(view.probe), 2) for c in coords.values())
    assert set(preds) == set(coords) and all(p.max() < len(view.label_words) for p in preds.values())
    with pytest.raises(KeyError, match="umap"):
        R.projection(view, "umap")
    grids = R.head_grids(view, "victim")
    cfg = load_config("micro").model
    assert grids["delta_cacc"].shape == (cfg.n_layer, cfg.n_head)
    assert set(grids) >= {"delta_cacc", "delta_asr_unknown", "delta_asr_t1"}
    top = R.critical_heads(view, "victim")
    assert list(top.columns) == ["layer", "head", "ΔASR unknown (points)", "ΔCACC (points)"]
    assert len(top) == np.isfinite(grids["delta_asr_unknown"]).sum()  # NaN heads (no qualifying input) left out
    agg = R.aggregation_table(view)
    assert set(agg["stage"]) == set(view.analysis["aggregation"])


def test_stage_model_answers_without_changing(view):
    lm = SM.load_stage_model(view, "victim")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    trig = view.attack_trigger
    out = SM.answer(view, lm, ["a fine and moving film", f"a dull film {trig}"])
    assert len(out) == 2 and set(out) <= set(view.label_words)
    assert not lm.model.training
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    # the answers are the pipeline's own predictions for the probe texts
    probe_texts = [r["text"] for r in view.probe[:8]]
    from safetensors.numpy import load_file
    stored = load_file(str(view.path + "/hidden/victim.safetensors"))["pred"][:8]
    assert SM.answer(view, lm, probe_texts) == [view.label_words[int(i)] for i in stored]


def test_critical_heads_rank_by_absolute_asr_change():
    ha = {"delta_cacc": [[0.0, -0.1, 0.0], [0.02, 0.0, 0.0]],
          "delta_asr": {"unknown": [[-0.1, 0.5, None], [-0.9, 0.0, 0.2]]}}
    v = R.RunView("r", "/nowhere", "done", analysis={"head_ablation": {"victim": ha}})
    top = R.critical_heads(v, "victim", top=3)
    assert top[["layer", "head"]].values.tolist() == [[1, 0], [0, 1], [1, 2]]
    assert top["ΔASR unknown (points)"].tolist() == [-90.0, 50.0, 20.0]
    assert top["ΔCACC (points)"].tolist() == [2.0, -10.0, 0.0]
    assert len(R.critical_heads(v, "victim", top=10)) == 5  # the None head is left out
    with pytest.raises(KeyError):
        R.head_grids(v, "stage2")


def _copy(view, tmp_path):
    dst = tmp_path / view.run_id
    shutil.copytree(view.path, dst)
    return dst


@pytest.mark.parametrize("damage,health,problem", [
    (lambda p: (p / "summary.json").write_text('{"schema": 1, "stages": {'), "corrupt", "summary.json is corrupt"),
    (lambda p: (p / "state.json").write_text("[1, 2"), "corrupt", "state.json is corrupt"),
    (lambda p: (p / "config.yaml").unlink(), "incomplete", "config.yaml is missing"),
    (lambda p: (p / "summary.json").write_text('{"schema": 99}'), "corrupt", "unknown schema"),
    (lambda p: (p / "analysis.json").write_text("{"), "corrupt", "analysis.json is corrupt"),
])
def test_damaged_folders_become_problems_not_exceptions(view, tmp_path, damage, health, problem):
    dst = _copy(view, tmp_path)
    damage(dst)
    v = R.open_run(dst)
    assert v.health == health
    assert any(problem in p for p in v.problems), v.problems
    R.results_table(v)  # never raises
    R.aggregation_table(v)


def test_half_written_run_folder(tmp_path):
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "config.yaml").write_text("name: micro\n")
    row = {"key": "victim", "method": "locphylax", "stage": "victim", "step": 0, "split": "curve", "cacc": 0.5,
           "asr": {"unknown": 1.0}}
    (tmp_path / "r1" / "metrics.jsonl").write_text(json.dumps(row) + '\n{"key": "vic')
    v = R.open_run(tmp_path / "r1")
    assert v.health == "incomplete" and "state.json is missing" in v.problems
    assert len(v.metrics) == 1  # the line cut by a kill is skipped
    assert R.results_table(v).empty
    assert R.open_run(tmp_path / "nope").health == "corrupt"


def test_run_stamp_changes_when_the_run_grows(view, tmp_path):
    dst = _copy(view, tmp_path)
    before = R.run_stamp(dst)
    with open(dst / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"key": "x"}) + "\n")
    assert R.run_stamp(dst) != before


def test_config_error_names_each_bad_field():
    with pytest.raises(ConfigError) as e:
        load_config("micro", {"attack.poison_rate": 2, "defense.stage1_steps": 0})
    assert set(e.value.fields) == {"attack.poison_rate", "defense.stage1_steps"}
    assert "(0, 1]" in e.value.fields["attack.poison_rate"]


def test_stage_models_are_kept_within_a_memory_budget(micro_run):
    """Loaded models are shared, reloaded never while kept, and the least recently used dropped once
    together they exceed the budget (a count would keep 12 of the real LM's 538 MB models)."""
    from locphylax_core.stage_model import StageModels, load_stage_model, model_bytes
    view = R.open_run(micro_run.path)
    loads = []

    def load(stage):
        loads.append(stage)
        return load_stage_model(view, stage)
    one = model_bytes(load_stage_model(view, "victim"))
    models = StageModels(budget_bytes=2 * one)
    victim = models.get("victim", lambda: load("victim"))
    assert models.get("victim", lambda: load("victim")) is victim and loads == ["victim"]
    models.get("stage1", lambda: load("stage1"))
    models.get("victim", lambda: load("victim"))  # used again: stage1 is now the oldest
    models.get("stage2", lambda: load("stage2"))
    assert "stage1" not in models and "victim" in models and "stage2" in models
    assert models.held_bytes() == 2 * one and loads == ["victim", "stage1", "stage2"]
    small = StageModels(budget_bytes=1)  # one model larger than the budget is still kept, alone
    small.get("victim", lambda: load("victim"))
    small.get("stage2", lambda: load("stage2"))
    assert "victim" not in small and "stage2" in small


def test_a_run_id_names_its_preset_even_when_the_preset_name_holds_hyphens():
    from locphylax_core.runs import new_run_id, run_of_preset

    real, tiny = new_run_id("live-smollm2"), new_run_id("live")
    assert run_of_preset(real, "live-smollm2") and not run_of_preset(real, "live")
    assert run_of_preset(tiny, "live") and not run_of_preset(tiny, "live-smollm2")
    assert run_of_preset(new_run_id("my preset/2"), "my preset/2")  # as the id spells it: my-preset-2
    assert not run_of_preset("not-a-run-id", "live")
