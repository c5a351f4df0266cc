"""Shipped victims (locphylax_core/shipped_victims.py): a backdoored LoRA adapter built by
bench/shipped_victim.py is loaded by a run whose victim settings are exactly the ones that built
it, gives the trained victim's weights, and is refused when damaged or not fitting; so are the
baseline stages shipped on it (the Live demo's contrast)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench import shipped_victim as builder
from locphylax_core import load_config
from locphylax_core import shipped_victims as SV
from locphylax_core.errors import ModelLoadError
from locphylax_core.experiment import fresh_model, owner_trains, prepare, train_owner_model, owner_context
from locphylax_core.pipeline import start_run
from locphylax_core.runs import file_sha256
from conftest import read_jsonl

SETS = {"model.lora.enabled": True, "attack.trigger": "cf"}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("victims")
    assert builder.main(["micro", "--trigger", "cf", "--set", "model.lora.enabled=true", "--out", str(root)]) == 0
    for baseline in ("no_cluster", "clean_ft", "clean_ft"):  # built again: replaced, the other one kept
        assert builder.main(["micro", "--trigger", "cf", "--set", "model.lora.enabled=true", "--out", str(root),
                             "--baseline", baseline]) == 0
    return root


@pytest.fixture
def victims_dir(shipped, monkeypatch):
    monkeypatch.setattr(SV, "VICTIMS_DIR", shipped)
    return shipped


def test_the_builder_writes_an_adapter_a_record_and_a_card(shipped):
    folder = shipped / "micro-cf"
    rec = json.loads((folder / SV.RECORD).read_text())
    assert rec["adapter_sha256"] == file_sha256(folder / SV.ADAPTER)
    assert rec["reload_exact"] is True and 0 <= rec["asr"] <= 1
    assert set(load_file(str(folder / SV.ADAPTER))) and all("lora_" in k for k in load_file(str(folder / SV.ADAPTER)))
    card = (folder / SV.CARD).read_text()
    assert "--set model.lora.enabled=true" in card and f"{100 * rec['cacc']:.1f}%" in card


def test_a_run_with_the_same_settings_loads_it_and_scores_what_training_scores(victims_dir, tmp_path):
    cfg = load_config("micro", SETS)
    assert SV.matching_victim(cfg).name == "micro-cf"
    run, summary = start_run(cfg, tmp_path / "a", stop_after="victim")
    result = run.read_state()["results"]["victim"]
    assert result["shipped_victim"] == "micro-cf" and result["steps"] == 0
    trained_run, trained = start_run(load_config("micro", {**SETS, "attack.shipped": False}), tmp_path / "b",
                                     stop_after="victim")
    assert "shipped_victim" not in trained_run.read_state()["results"]["victim"]
    assert summary["stages"]["victim"] == trained["stages"]["victim"]  # the same weights, the same scores
    rec = json.loads((victims_dir / "micro-cf" / SV.RECORD).read_text())
    assert summary["stages"]["victim"]["asr"]["unknown"] == rec["asr"]
    # its one curve point: the curve starts where the backdoor was planted
    curve = [r for r in read_jsonl(run.path / "metrics.jsonl") if r["split"] == "curve" and r["key"] == "victim"]
    assert [r["step"] for r in curve] == [0] and curve[0]["cacc"] is not None


def test_other_settings_do_not_match(victims_dir):
    assert SV.matching_victim(load_config("micro", {**SETS, "attack.trigger": "zq"})) is None
    assert SV.matching_victim(load_config("micro", {**SETS, "attack.steps": 11})) is None
    assert SV.matching_victim(load_config("micro", {**SETS, "seed": 1})) is None
    assert SV.matching_victim(load_config("micro", {**SETS, "attack.shipped": False})) is None
    assert SV.matching_victim(load_config("micro", {**SETS, "train.threads": 2})).name == "micro-cf"  # speed only
    assert SV.matching_victim(load_config("micro", {**SETS, "defense.lr": 0.01})).name == "micro-cf"  # the defense's
    # what it is scored on: the test rows are drawn apart from the training rows
    assert SV.matching_victim(load_config("micro", {**SETS, "task.test_size": 17})).name == "micro-cf"
    assert SV.matching_victim(load_config("micro", {**SETS, "task.train_size": 101})) is None


def test_the_shipped_real_lm_victim_matches_its_preset_at_any_test_size():
    cf = {"attack.trigger": "cf", "attack.family": "word"}
    assert SV.matching_victim(load_config("live-smollm2", cf)).name == "live-smollm2-cf"
    assert SV.matching_victim(load_config("live-smollm2", {**cf, "task.test_size": 40})).name == "live-smollm2-cf"
    assert SV.matching_victim(load_config("live-smollm2", {**cf, "attack.steps": 199})) is None
    # the preset alone (`locphylax run live-smollm2`) leaves the trigger to the family's default, `cf`:
    # the same victim
    assert SV.matching_victim(load_config("live-smollm2")).name == "live-smollm2-cf"
    assert SV.matching_victim(load_config("live-smollm2", {"attack.trigger": "zq"})) is None


def _clean_lm(cfg):
    prep = prepare(cfg)
    lm = fresh_model(prep, torch.device("cpu"))
    if owner_trains(cfg, "clean"):
        train_owner_model(prep, lm, "clean", owner_context(prep, "clean", from_scratch=True), from_scratch=True)
    return lm


def _copy(shipped, tmp_path):
    folder = tmp_path / "micro-cf"
    folder.mkdir()
    for name in (SV.ADAPTER, SV.RECORD):
        (folder / name).write_bytes((shipped / "micro-cf" / name).read_bytes())
    return folder


def test_a_damaged_adapter_is_refused_by_its_sha256(shipped, tmp_path):
    folder = _copy(shipped, tmp_path)
    data = bytearray((folder / SV.ADAPTER).read_bytes())
    data[-1] ^= 1
    (folder / SV.ADAPTER).write_bytes(bytes(data))
    victim = SV.shipped_victims(tmp_path)[0]
    cfg = load_config("micro", SETS)
    with pytest.raises(ModelLoadError, match="sha256 .* is not the recorded"):
        SV.load_victim(_clean_lm(cfg), victim, cfg.model.lora)


def test_an_adapter_that_does_not_fit_names_the_weights(shipped, tmp_path):
    folder = _copy(shipped, tmp_path)
    tensors = load_file(str(folder / SV.ADAPTER))
    first = sorted(tensors)[0]
    tensors[first] = torch.zeros(3, 3)
    tensors["base_model.model.extra.lora_A.weight"] = torch.zeros(2)
    save_file(tensors, str(folder / SV.ADAPTER))
    rec = json.loads((folder / SV.RECORD).read_text())
    rec["adapter_sha256"] = file_sha256(folder / SV.ADAPTER)
    (folder / SV.RECORD).write_text(json.dumps(rec))
    cfg = load_config("micro", SETS)
    with pytest.raises(ModelLoadError) as e:
        SV.load_victim(_clean_lm(cfg), SV.shipped_victims(tmp_path)[0], cfg.model.lora)
    assert "unexpected: base_model.model.extra.lora_A.weight" in str(e.value)
    assert f"mis-shaped: {first} (3, 3)" in str(e.value)


def test_the_builder_adds_a_baselines_stages_to_its_victims_folder(shipped):
    folder = shipped / "micro-cf"
    rec = json.loads((folder / SV.RECORD).read_text())
    assert list(rec["stages"]) == ["no_cluster/stage1", "no_cluster/stage2", "clean_ft/stage1", "clean_ft/stage2"]
    for key, entry in rec["stages"].items():
        assert entry["adapter_sha256"] == file_sha256(folder / SV.stage_file(key)) and entry["reload_exact"] is True
    assert sorted(f.name for f in folder.glob("*.safetensors")) == sorted(
        [SV.ADAPTER, *(SV.stage_file(k) for k in rec["stages"])])
    card = (folder / SV.CARD).read_text()
    assert "## Shipped baseline stages on this victim" in card and "**`no_cluster`**" in card and "**`clean_ft`**" in card
    with pytest.raises(SystemExit, match="not one of micro's baselines"):
        builder.main(["micro", "--trigger", "cf", "--set", "model.lora.enabled=true", "--out", str(shipped),
                      "--baseline", "crow"])
    with pytest.raises(SystemExit, match="no shipped victim there fits"):
        builder.main(["micro", "--trigger", "zq", "--set", "model.lora.enabled=true", "--out", str(shipped),
                      "--baseline", "clean_ft"])


def test_a_run_loads_the_shipped_contrast_and_scores_what_training_it_scores(victims_dir, tmp_path):
    cfg = load_config("micro", SETS)
    run, summary = start_run(cfg, tmp_path / "a", stop_after="clean_ft/stage2")
    state = run.read_state()
    for key in ("clean_ft/stage1", "clean_ft/stage2"):
        assert state["results"][key]["shipped_stage"] == f"micro-cf/{key}" and state["total_steps"][key] == 0
    assert state["total_steps"]["stage1"] > 0  # the defense itself is always computed
    trained_run, trained = start_run(load_config("micro", {**SETS, "attack.shipped": False}), tmp_path / "b",
                                     stop_after="clean_ft/stage2")
    assert "shipped_stage" not in trained_run.read_state()["results"]["clean_ft/stage2"]
    assert summary["baselines"]["clean_ft"] == trained["baselines"]["clean_ft"]  # the same weights, the same scores
    curve = {r["key"]: r["step"] for r in read_jsonl(run.path / "metrics.jsonl") if r["split"] == "curve"}
    assert curve["clean_ft/stage1"] == curve["clean_ft/stage2"] == 0


def test_a_shipped_stage_fits_only_its_victim_and_defense_settings(victims_dir):
    key = "clean_ft/stage2"
    assert SV.matching_stage(load_config("micro", SETS), key)[0].name == "micro-cf"
    # which other baselines run beside it does not change it; what it is scored on neither
    assert SV.matching_stage(load_config("micro", {**SETS, "defense.baselines": ["clean_ft"]}), key) is not None
    assert SV.matching_stage(load_config("micro", {**SETS, "task.test_size": 17}), key) is not None
    assert SV.matching_stage(load_config("micro", {**SETS, "defense.lr": 0.01}), key) is None
    assert SV.matching_stage(load_config("micro", {**SETS, "defense.stage2_steps": 5}), key) is None
    assert SV.matching_stage(load_config("micro", {**SETS, "attack.trigger": "zq"}), key) is None
    assert SV.matching_stage(load_config("micro", {**SETS, "attack.shipped": False}), key) is None
    assert SV.matching_stage(load_config("micro", SETS), "stage2") is None


def test_a_damaged_shipped_stage_is_refused_by_its_sha256(shipped, tmp_path):
    folder = _copy(shipped, tmp_path)
    key = "clean_ft/stage1"
    data = bytearray((shipped / "micro-cf" / SV.stage_file(key)).read_bytes())
    data[-1] ^= 1
    (folder / SV.stage_file(key)).write_bytes(bytes(data))
    cfg = load_config("micro", SETS)
    found = SV.matching_stage(cfg, key, tmp_path)
    with pytest.raises(ModelLoadError, match="sha256 .* is not the recorded"):
        SV.load_stage(_clean_lm(cfg), found, key, cfg.model.lora)
    (folder / SV.stage_file(key)).unlink()
    with pytest.raises(ModelLoadError, match="shipped adapter file is missing"):
        SV.load_stage(_clean_lm(cfg), found, key, cfg.model.lora)
