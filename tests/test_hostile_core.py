"""A hostile user against the core and the CLI, round two (issue 34, the core's share): a pickle
reached through a shard index, non-finite numbers, sizes with no bound, and the small ones.

Each test's docstring names the defect it guards. Everything runs on tiny hand-made models and
folders or on the `micro` preset, stopped at its first stage.
"""

from __future__ import annotations

import json
import math
import os
import time
import typing
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from conftest import cli_in_process

from locphylax_core import load_config
from locphylax_core import model as M
from locphylax_core import sizes
from locphylax_core.config import RunConfig, embedded_parameters, list_presets, load_yaml_text, override_notes
from locphylax_core.errors import ConfigError, ModelLoadError
from locphylax_core.runs import INTERRUPTED, RunDir, RunLock, list_runs, shown_status



def _strict_json_lines(path: Path) -> list[dict]:
    """Every line of a JSONL file, refusing NaN / Infinity (which JSON does not have)."""
    def refuse(name):
        raise ValueError(f"bare {name} in {path.name}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# High: a pickle through a shard index


def _sharded_model(folder: Path) -> list[str]:
    """A tiny GPT-2 saved in two safetensors shards with an index; returns the shard names."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    conf = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(conf).save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / M.SAFETENSORS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2
    return shards


def _point_index(folder: Path, old: str, new: str) -> None:
    index_path = folder / M.SAFETENSORS_INDEX
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: (new if v == old else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


def test_a_shard_index_cannot_reach_a_pickle_or_another_folder(tmp_path, monkeypatch):
    """High: a folder holding any .safetensors file plus a model.safetensors.index.json naming a
    .bin shard made the loader torch.load it; an index could also name a shard outside the folder
    (`../other/...`) or a shard could be a link to one. Each is refused, naming the file, and no
    pickle is ever opened."""
    from safetensors.torch import load_file
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))

    good = tmp_path / "good"
    _sharded_model(good)
    assert M.count_parameters(M.load_causal_lm(str(good))) > 0  # a real sharded checkpoint loads

    pickled = tmp_path / "pickled"
    first, second = _sharded_model(pickled)
    # named to sort first: transformers then reads every shard the way it reads the first one
    torch.save(load_file(str(pickled / second)), pickled / "model-00000-of-00002.bin")
    (pickled / second).unlink()
    _point_index(pickled, second, "model-00000-of-00002.bin")
    with pytest.raises(ModelLoadError, match=r"model-00000-of-00002\.bin.*not a \.safetensors file"):
        M.load_causal_lm(str(pickled))
    # the same through a run checkpoint folder, as the app loads one
    with pytest.raises(ModelLoadError, match=r"model-00000-of-00002\.bin"):
        M.load_checkpoint(pickled)
    assert loads == []

    other = tmp_path / "other"
    _sharded_model(other)
    outside = tmp_path / "outside"
    first, second = _sharded_model(outside)
    (outside / second).unlink()
    _point_index(outside, second, f"../other/{second}")
    with pytest.raises(ModelLoadError, match=rf"\.\./other/{second}.*outside the model folder"):
        M.load_causal_lm(str(outside))

    linked = tmp_path / "linked"
    first, second = _sharded_model(linked)
    (linked / second).unlink()
    (linked / second).symlink_to(other / second)
    with pytest.raises(ModelLoadError, match=rf"{second}.*outside the model folder"):
        M.load_causal_lm(str(linked))
    assert loads == []


# ----------------------------------------------------------------------------------------------
# Non-finite numbers, and the other values validation let through (booleans as numbers, lone surrogates)


def _float_fields(model: type, prefix: str = "") -> list[str]:
    """The dotted names of every float setting of a configuration section, nested ones included."""
    out = []
    for name, field in model.model_fields.items():
        args = set(typing.get_args(field.annotation)) | {field.annotation}
        nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            out += _float_fields(nested[0], f"{prefix}{name}.")
        elif float in args or any(float in typing.get_args(a) for a in args):
            out.append(f"{prefix}{name}")
    return out


FLOAT_FIELDS = _float_fields(RunConfig)


def test_every_float_setting_is_found():
    assert {"train.lr", "defense.alpha", "attack.poison_rate", "model.lora.alpha"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_non_finite_settings_are_refused(field):
    """Non-finite numbers: `train.lr=inf` or `defense.alpha=inf` passed validation and every weight
    became NaN; every float setting refuses nan and infinities, naming the field."""
    for value in ("inf", "-inf", "nan", ".inf", "1e999"):
        with pytest.raises(ConfigError, match=rf"{field}: must be a finite number") as e:
            load_config("micro", [f"{field}={value}"])
        assert "Traceback" not in str(e.value)
    with pytest.raises(ConfigError, match=rf"{field}: must be a finite number"):
        load_config("micro", {field: float("nan")})


def test_non_finite_method_options_are_refused():
    """The same for a registered method's own settings (defense.options.<method>.<setting>)."""
    with pytest.raises(ConfigError, match=r"defense\.options\.crow\.weight: .*finite number"):
        load_config("micro", {"defense.baselines": ["crow"], "defense.options": {"crow": {"weight": float("inf")}}})


def test_a_diverging_loss_fails_the_stage(tmp_path, capsys):
    """Non-finite numbers: a run whose loss turned NaN ended "done" with NaN weights and plausible
    CACC/ASR, and metrics.jsonl got bare NaN. A finite but absurd learning rate makes the loss
    non-finite within steps: the stage stops with a clear error, the run is failed, nothing of the
    stage is saved and metrics.jsonl stays JSON."""
    root = tmp_path / "runs"
    rc, out = cli_in_process(capsys, "--runs", str(root), "run", "micro", "--set", "train.lr=1e30", "--no-analyze")
    assert rc == 2 and "Traceback" not in out, out
    assert "error: stage clean: the training loss is" in out and "not a finite number" in out, out
    run = RunDir(next(root.iterdir()))
    state = run.read_state()
    assert state["status"] == "failed" and state["finished"] == [] and "not a finite number" in state["error"]
    assert not run.checkpoint("clean").exists()
    rows = _strict_json_lines(run.path / "metrics.jsonl") if (run.path / "metrics.jsonl").exists() else []
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))


def test_metrics_never_get_bare_nan(tmp_path):
    """A non-finite number that reaches a run file is written as null, never as bare NaN."""
    run = RunDir(tmp_path)
    run.append_metric({"key": "clean", "loss": float("nan"), "cacc": float("inf"), "asr": 0.5})
    run.write_summary({"cacc": float("-inf"), "nested": [float("nan"), 1.0]})
    assert _strict_json_lines(tmp_path / "metrics.jsonl") == [{"key": "clean", "loss": None, "cacc": None, "asr": 0.5}]
    assert json.loads((tmp_path / "summary.json").read_text(), parse_constant=float) == \
        {"cacc": None, "nested": [None, 1.0]}


@pytest.mark.parametrize("field,value", [("seed", "true"), ("train.clean_steps", "false"), ("train.lr", "true"),
                                         ("model.lora.r", "yes")])
def test_a_boolean_is_not_a_number(field, value):
    """Small: `seed: true` became 1."""
    with pytest.raises(ConfigError, match=rf"{field}: must be a number, not a boolean"):
        load_config("micro", [f"{field}={value}"])
    assert load_config("micro", ["seed=3"]).seed == 3


def test_a_lone_surrogate_is_refused_at_validation(tmp_path, capsys):
    """Small: a lone-surrogate trigger ("\\uDCFF" in YAML) reached the tokenizer as a TypeError."""
    cfg = tmp_path / "surrogate.yaml"
    cfg.write_text('name: s\nattack: {trigger: "\\uDCFF"}\n')
    with pytest.raises(ConfigError, match=r"attack\.trigger: must be valid Unicode text; it contains the lone "
                                          r"surrogate U\+DCFF"):
        load_config(cfg)
    rc, out = cli_in_process(capsys, "--runs", str(tmp_path / "runs"), "run", str(cfg), "--dry-run")
    assert rc == 2 and "lone surrogate U+DCFF" in out and "Traceback" not in out
    with pytest.raises(ConfigError, match=r"defense\.known_triggers\.0\.text: must be valid Unicode"):
        load_config("micro", {"defense.known_triggers": [{"text": "a\udcffb"}]})


# ----------------------------------------------------------------------------------------------
# Sizes with no bound


def test_a_model_too_large_for_this_machine_is_refused_at_validation():
    """Sizes: a 48 x 8192 model (about 39B parameters) validated and died in the allocator. It is
    refused at validation with the estimate and the limit; train.allow_large lets it through."""
    big = {"model.base": "scratch", "model.n_layer": 48, "model.n_embd": 8192, "model.n_head": 64}
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_config("micro", big)
    assert time.perf_counter() - t0 < 2
    msg = str(e.value)
    limit = sizes.gib(sizes.machine_memory_bytes())
    assert "model: a 48 x 8192 model of about 38.7 billion parameters" in msg, msg
    assert "GiB of memory, more than this machine has" in msg and limit in msg and "train.allow_large=true" in msg
    assert load_config("micro", {**big, "train.allow_large": True}).model.n_embd == 8192


def test_too_much_data_is_refused_at_validation():
    """Sizes: `task.train_size=200000000` hung 90 s with no word."""
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"task\.train_size: 200,000,140 examples .* GiB of memory, more than this "
                                          r"machine has .*train\.allow_large=true"):
        load_config("micro", {"task.train_size": 200_000_000})
    assert time.perf_counter() - t0 < 2
    assert load_config("micro", {"task.train_size": 200_000_000, "train.allow_large": True})


def test_the_limit_is_this_machines_memory(monkeypatch):
    """The check compares with the memory it measures: every preset fits this machine, and micro
    is refused by one a byte short of what its model needs."""
    for preset in list_presets():  # sst2-smollm2 (135M parameters) included
        load_config(preset)
    micro = load_config("micro")
    need = embedded_parameters(micro.model) * 16
    monkeypatch.setattr(sizes, "machine_memory_bytes", lambda: need - 1)
    with pytest.raises(ConfigError, match=r"model: a 1 x 32 model"):
        load_config("micro")


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "qwen2"])
def test_the_parameter_estimate_matches_the_built_model(arch):
    """The estimate the size check uses: exact for gpt2 / gpt_neox, a little above for the gated
    architectures (never below by more than a rounding)."""
    cfg = load_config("micro", {"model.arch": arch, "model.n_layer": 3, "model.n_embd": 64, "model.n_head": 4,
                                "model.vocab_size": 500})
    tok = M.train_tokenizer(["a small corpus of words for the tokenizer"] * 4, 500)
    real = M.count_parameters(M.build_embedded(cfg.model.model_copy(update={"vocab_size": len(tok)}), tok, 0))
    estimate = embedded_parameters(cfg.model.model_copy(update={"vocab_size": len(tok)}))
    assert real <= estimate <= real * 1.05, (real, estimate)
    if arch in ("gpt2", "gpt_neox"):
        assert estimate == real


def test_an_hf_config_too_large_is_refused_before_it_is_built(tmp_path):
    """Sizes: an hf config.json with `n_layer: 100000` ran 150 s (building the model) before any
    check. Its size is estimated from config.json and refused in seconds."""
    folder = tmp_path / "huge"
    _sharded_model(folder)
    conf = json.loads((folder / "config.json").read_text())
    conf.update(n_layer=100_000, n_embd=1024, n_head=16)
    (folder / "config.json").write_text(json.dumps(conf))
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"its config\.json describes about 1,2\d\d\.\d billion parameters; "
                                             r"loaded at 4 bytes per weight, they would need about .* more than this "
                                             r"machine has"):
        M.load_causal_lm(str(folder))
    assert time.perf_counter() - t0 < 10


# ----------------------------------------------------------------------------------------------
# The small ones: configuration


def test_the_attack_trigger_must_not_be_a_known_trigger(tmp_path, capsys):
    """Small: `attack.trigger` equal to one of the defender's own triggers was accepted by the CLI
    (the app refused it); the check is in config validation, shared by both."""
    with pytest.raises(ConfigError, match=r"attack\.trigger: 'VX' is one of the defender's own known triggers"):
        load_config("micro", {"attack.trigger": "VX"})
    rc, out = cli_in_process(capsys, "--runs", str(tmp_path), "run", "micro", "--set",
                   "attack.trigger=as seen on  channel four", "--set", "attack.family=phrase", "--dry-run")
    assert rc == 2 and "is one of the defender's own known triggers" in out
    with pytest.raises(ConfigError, match=r"attack\.parts: 'vx' is one of the defender's own known triggers"):
        load_config("micro", {"attack.family": "ctba", "attack.parts": ["cf", "vx"]})
    with pytest.raises(ConfigError, match=r"attack\.trigger: 'zq' is one of the defender's own"):
        load_config("micro", {"attack.trigger": "zq", "defense.known_triggers": [{"text": "zq"}]})
    assert load_config("micro", {"attack.trigger": "vxx"}).attack.trigger == "vxx"


def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    """Small: YAML's duplicate keys won silently (the last one)."""
    cfg = tmp_path / "dup.yaml"
    cfg.write_text("name: dup\ntrain:\n  lr: 0.1\n  batch_size: 16\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"the key 'train\.lr' is given twice \(lines 3 and 5\)"):
        load_config(cfg)
    rc, out = cli_in_process(capsys, "--runs", str(tmp_path / "runs"), "run", str(cfg), "--dry-run")
    assert rc == 2 and "given twice" in out
    # a merge key followed by keys of the mapping's own overrides them: no duplicate
    assert load_yaml_text("a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n", "s")["c"] == {"x": 3, "y": 2}


def test_a_null_trigger_override_is_said_out_loud(tmp_path, capsys):
    """Small: `--set attack.trigger=null` silently meant the family default (perhaps the word
    `null` was meant). The CLI says which default it is and how to give the word."""
    over = ["attack.family=phrase", "attack.trigger=null"]
    assert override_notes(load_config("micro", over), over) == [
        "--set attack.trigger=null is YAML's null, so attack.trigger takes the default of attack.family 'phrase': "
        "'I watched this 3D movie' (for the word 'null' itself, quote it: --set 'attack.trigger=\"null\"')"]
    rc, out = cli_in_process(capsys, "--runs", str(tmp_path), "run", "micro", "--set", "attack.trigger=~", "--dry-run")
    assert rc == 0 and "note: --set attack.trigger=~ is YAML's null" in out and "'cf'" in out
    assert load_config("micro", ['attack.trigger="null"']).attack.trigger == "null"
    rc, out = cli_in_process(capsys, "--runs", str(tmp_path), "run", "micro", "--set", "attack.trigger=zz", "--dry-run")
    assert rc == 0 and "note:" not in out


# ----------------------------------------------------------------------------------------------
# The small ones: the run store and the CLI


def test_a_run_reference_with_a_wildcard_is_a_clear_error(tmp_path, capsys):
    """Small: `locphylax cancel 'r*'` (a reference ending in *) raised a ValueError from glob."""
    root = tmp_path / "runs"
    (root / "run-a").mkdir(parents=True)
    for command in ("cancel", "show", "resume"):
        rc, out = cli_in_process(capsys, "--runs", str(root), command, "r*")
        assert rc == 2 and "no run 'r*'" in out and "wildcards such as * are not expanded" in out, out
        assert "Traceback" not in out
    rc, out = cli_in_process(capsys, "--runs", str(root), "cancel", "run-")  # a plain prefix still finds the run
    assert rc == 2 and "is not a run folder" in out


def _no_space(*_args, **_kwargs):
    from safetensors import SafetensorError
    raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path '
                          '"/somewhere/.tmpX"')


@pytest.mark.parametrize("writer", ["transformers.modeling_utils.safe_save_file", "locphylax_core.pipeline.save_file"])
def test_a_full_disk_says_so_in_one_line(tmp_path, capsys, monkeypatch, writer):
    """Small: a full disk while a checkpoint (or a stage's hidden states) was written gave a
    SafetensorError traceback; the message says the disk is full, and the run is failed (its
    finished stages kept, resumable)."""
    monkeypatch.setattr(writer, _no_space)
    root = tmp_path / "runs"
    rc, out = cli_in_process(capsys, "--runs", str(root), "run", "micro", "--no-analyze")
    assert rc == 2 and "Traceback" not in out and "SafetensorError" not in out, out
    assert "No space left on device (the disk is full: free some space" in out, out
    assert RunDir(next(root.iterdir())).read_state()["status"] == "failed"


def test_a_killed_run_is_shown_as_interrupted(tmp_path, capsys, monkeypatch):
    """Small: after a SIGKILL, `locphylax runs` said "running" although no process held the lock."""
    monkeypatch.setenv("COLUMNS", "200")  # rich: no wrapped cells
    root = tmp_path / "runs"
    run = RunDir(root / "20250101-000000-micro-abcdef")
    run.path.mkdir(parents=True)
    (run.path / "config.yaml").write_text(load_config("micro").to_yaml())
    run.write_state({"status": "running", "finished": ["clean"], "preset": "micro"})
    assert shown_status(run.path, "running") == INTERRUPTED
    rc, out = cli_in_process(capsys, "--runs", str(root), "runs")
    assert rc == 0 and INTERRUPTED in out and "running" not in out.split("finished stages")[1], out
    with RunLock(run.path):  # a process holds it: running it is
        assert shown_status(run.path, "running") == "running"
        rc, out = cli_in_process(capsys, "--runs", str(root), "runs")
        assert rc == 0 and "running" in out and INTERRUPTED not in out
    assert [i["status"] for i in list_runs(root)] == ["running"]  # state.json itself is not rewritten


def test_a_config_that_is_a_named_pipe_is_refused_not_read(tmp_path):
    """A config.yaml replaced by a FIFO blocked the reader (the Run page's Resume) forever."""

    from locphylax_core.config import read_config_text
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_config_text(fifo)
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_config_text(link)
