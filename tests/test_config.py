"""Configuration: presets, `--set` overrides, and ConfigError messages that name field and value."""

from __future__ import annotations

import pytest

from locphylax_core.config import DEFAULT_ATTACK_TRIGGERS, RunConfig, list_presets, load_config
from locphylax_core.errors import ConfigError


@pytest.mark.parametrize("preset, base, n_layer, n_embd, train_size", [
    ("demo", "small", 2, 128, 6000),
    ("sst2", "small", 2, 128, 20000),
    ("agnews", "scratch", 2, 128, 4000),
    ("micro", "scratch", 1, 32, 300),
    ("sst2-smollm2", "smollm2-135m", 30, 576, 20000),
    ("agnews-smollm2", "smollm2-135m", 30, 576, 4000),
    ("jailbreak-smollm2", "smollm2-135m", 30, 576, 1100),
    ("refusal-smollm2", "smollm2-135m", 30, 576, 1100),
])
def test_presets_load(preset, base, n_layer, n_embd, train_size):
    cfg = load_config(preset)
    assert isinstance(cfg, RunConfig)
    assert cfg.name == preset
    assert cfg.model.base == base  # the shape comes from the base
    assert cfg.model.n_layer == n_layer
    assert cfg.model.n_embd == n_embd
    assert cfg.task.train_size == train_size
    assert preset in list_presets()


def test_sst2_preset_fields():
    cfg = load_config("sst2")
    assert cfg.task.name == "sst2"
    assert cfg.task.path == "../shared/data/sst2"
    assert cfg.task.labels == ["negative", "positive"]
    assert cfg.model.vocab_size == 8192 and cfg.model.n_positions == 96  # the base's tokenizer, a shorter context


def test_preset_by_path_equals_preset_by_name():
    from locphylax_core.config import PRESET_DIR
    assert load_config(str(PRESET_DIR / "micro.yaml")) == load_config("micro")


def test_family_default_trigger():
    # No trigger given: the family's default is used.
    cfg = load_config({}, ["attack.family=phrase"])
    assert cfg.attack.family == "phrase"
    assert cfg.attack.trigger is None
    assert cfg.attack.trigger_text == "I watched this 3D movie" == DEFAULT_ATTACK_TRIGGERS["phrase"]
    assert load_config({}, ["attack.family=long"]).attack.trigger_text == DEFAULT_ATTACK_TRIGGERS["long"]
    assert load_config({}).attack.trigger_text == "cf"


def test_family_override_on_a_preset_with_trigger_cleared():
    # The presets pin `trigger: cf`; clearing it (null) falls back to the family default.
    cfg = load_config("micro", ["attack.family=phrase", "attack.trigger=null"])
    assert cfg.attack.trigger_text == "I watched this 3D movie"


def test_overrides_are_typed():
    cfg = load_config("micro", [
        "attack.position=start",
        "attack.poison_rate=0.35",
        "attack.steps=7",
        "attack.trigger=zz top",
        "defense.after_final_norm=true",
        "defense.alpha=0.5",
        "defense.baselines=[clean_ft]",
        "model.lora.enabled=true",
        "model.lora.r=4",
        "seed=11",
    ])
    assert cfg.attack.position == "start"
    assert cfg.attack.poison_rate == 0.35 and isinstance(cfg.attack.poison_rate, float)
    assert cfg.attack.steps == 7 and isinstance(cfg.attack.steps, int)
    assert cfg.attack.trigger_text == "zz top"
    assert cfg.defense.after_final_norm is True
    assert cfg.defense.alpha == 0.5
    assert cfg.defense.baselines == ["clean_ft"]
    assert cfg.model.lora.enabled is True and cfg.model.lora.r == 4
    assert cfg.seed == 11
    # Untouched fields keep the preset's values.
    assert cfg.model.n_embd == 32 and cfg.defense.stage1_steps == 6


def test_overrides_as_dict():
    cfg = load_config("micro", {"attack.position": "end", "train.threads": 2})
    assert cfg.attack.position == "end" and cfg.train.threads == 2


def test_to_yaml_round_trip(tmp_path):
    cfg = load_config("micro", ["attack.trigger=zqzq", "defense.alpha=2"])
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(str(p)) == cfg


def _config_error(preset, overrides) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(preset, overrides)
    return str(ei.value)


def test_unknown_field_is_named():
    msg = _config_error("micro", ["attack.colour=red"])
    assert "attack.colour" in msg and "unknown field" in msg and "'red'" in msg


def test_unknown_top_level_field_is_named():
    msg = _config_error("micro", ["optimiser=adam"])
    assert "optimiser" in msg and "unknown field" in msg


@pytest.mark.parametrize("value, shown", [("0", "0"), ("1.5", "1.5"), ("-0.1", "-0.1")])
def test_bad_poison_rate(value, shown):
    msg = _config_error("micro", [f"attack.poison_rate={value}"])
    assert "attack.poison_rate" in msg
    assert shown in msg
    assert "(0, 1]" in msg


def test_poison_rate_one_is_allowed():
    assert load_config("micro", ["attack.poison_rate=1"]).attack.poison_rate == 1.0


def test_bad_position():
    msg = _config_error("micro", ["attack.position=middle"])
    assert "attack.position" in msg and "'middle'" in msg
    assert "start" in msg and "end" in msg and "random" in msg


def test_target_not_a_label():
    msg = _config_error("micro", ["attack.target=neutral"])
    assert "attack.target" in msg and "'neutral'" in msg
    assert "negative" in msg and "positive" in msg


def test_n_embd_not_divisible_by_n_head():
    msg = _config_error("micro", ["model.n_embd=30", "model.n_head=4"])
    assert "model.n_embd" in msg and "30" in msg and "model.n_head" in msg and "4" in msg


def test_bad_type():
    msg = _config_error("micro", ["defense.stage1_steps=many"])
    assert "defense.stage1_steps" in msg and "'many'" in msg


def test_known_target_must_be_flip_or_label():
    msg = _config_error("micro", ["defense.known_target=maybe"])
    assert "defense.known_target" in msg and "'maybe'" in msg
    assert load_config("micro", ["defense.known_target=negative"]).defense.known_target == "negative"


def test_hf_source_needs_a_name():
    msg = _config_error("micro", ["model.source=hf"])
    assert "model.name_or_path" in msg


def test_set_without_equals_and_unknown_preset():
    assert "dotted.key=value" in _config_error("micro", ["attack.position"])
    msg = _config_error("no_such_preset", None)
    assert "no_such_preset" in msg and "micro" in msg


def test_several_errors_are_all_reported():
    msg = _config_error("micro", ["attack.poison_rate=3", "attack.position=middle"])
    assert "attack.poison_rate" in msg and "attack.position" in msg
