"""Bad input: each case gives a specific error and leaves no run folder behind."""

from __future__ import annotations

import builtins
import json
import pickle

import pytest
import torch

from locphylax_core import load_config, start_run
from locphylax_core.errors import ConfigError, DataError, ModelLoadError


def _start_fails(cfg, tmp_path, exc_type) -> str:
    root = tmp_path / "runs"
    with pytest.raises(exc_type) as ei:
        start_run(cfg, runs_root=root)
    assert not root.exists() or not any(root.iterdir()), f"run folder left behind: {list(root.iterdir())}"
    return str(ei.value)


def _csv_cfg(train, test, *extra):
    return load_config("micro", ["task.name=csv", f"task.train_file={train}", f"task.test_file={test}",
                                 "task.text_column=review", "task.label_column=stars",
                                 "task.train_size=20", "task.defender_size=10", "task.test_size=10", *extra])


def _write(path, header, rows):
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def _good(path, n=30):
    return _write(path, "review,stars", [f"film number {i} was {'good' if i % 2 else 'bad'},{i % 2}" for i in range(n)])


def test_missing_data_file(tmp_path):
    missing = tmp_path / "nowhere" / "train.csv"
    msg = _start_fails(_csv_cfg(missing, _good(tmp_path / "test.csv", 12)), tmp_path, DataError)
    assert "not found" in msg and str(missing) in msg


def test_missing_data_folder(tmp_path):
    cfg = load_config("micro", ["task.name=csv", f"task.path={tmp_path / 'absent'}"])
    msg = _start_fails(cfg, tmp_path, DataError)
    assert "task.path" in msg and "does not exist" in msg and "absent" in msg


def test_folder_without_train_split(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    _good(d / "validation.csv")
    msg = _start_fails(load_config("micro", ["task.name=csv", f"task.path={d}"]), tmp_path, DataError)
    assert "no train." in msg and str(d) in msg


def test_wrong_column_names(tmp_path):
    train = _write(tmp_path / "train.csv", "text,sentiment,source", [f"film {i},{i % 2},web" for i in range(30)])
    msg = _start_fails(_csv_cfg(train, _good(tmp_path / "test.csv", 12)), tmp_path, DataError)
    assert "'review'" in msg and "task.text_column" in msg
    assert "['text', 'sentiment', 'source']" in msg  # the columns that were found


def test_wrong_label_column(tmp_path):
    train = _write(tmp_path / "train.csv", "review,label", [f"film {i},{i % 2}" for i in range(30)])
    msg = _start_fails(_csv_cfg(train, _good(tmp_path / "test.csv", 12)), tmp_path, DataError)
    assert "'stars'" in msg and "task.label_column" in msg and "['review', 'label']" in msg


@pytest.mark.parametrize("bad", ["2", "-1", "neutral"])
def test_labels_outside_the_verbalizer(tmp_path, bad):
    rows = [f"film {i},{i % 2}" for i in range(30)]
    rows[4] = f"film four,{bad}"
    train = _write(tmp_path / "train.csv", "review,stars", rows)
    msg = _start_fails(_csv_cfg(train, _good(tmp_path / "test.csv", 12)), tmp_path, DataError)
    assert f"label {bad!r} is outside the verbalizer" in msg
    assert "row 5" in msg and "train.csv" in msg
    assert "['negative', 'positive']" in msg


def test_empty_split_header_only(tmp_path):
    test = _write(tmp_path / "test.csv", "review,stars", [])
    msg = _start_fails(_csv_cfg(_good(tmp_path / "train.csv"), test), tmp_path, DataError)
    assert "split is empty" in msg and "test.csv" in msg


def test_split_with_only_blank_texts(tmp_path):
    test = _write(tmp_path / "test.csv", "review,stars", [",0", "  ,1"])
    msg = _start_fails(_csv_cfg(_good(tmp_path / "train.csv"), test), tmp_path, DataError)
    assert "split is empty" in msg and "'review'" in msg


def test_too_little_training_data(tmp_path):
    msg = _start_fails(_csv_cfg(_good(tmp_path / "train.csv", 15), _good(tmp_path / "test.csv", 12)),
                       tmp_path, DataError)
    assert "task.defender_size" in msg and "15" in msg


def test_invalid_jsonl_line(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"review": "ok", "stars": 1}\n{"review": broken\n')
    msg = _start_fails(_csv_cfg(train, _good(tmp_path / "test.csv", 12)), tmp_path, DataError)
    assert "line 2 is not valid JSON" in msg


def test_unsupported_file_type(tmp_path):
    train = tmp_path / "train.xlsx"
    train.write_bytes(b"PK\x03\x04")
    msg = _start_fails(_csv_cfg(train, _good(tmp_path / "test.csv", 12)), tmp_path, DataError)
    assert "unsupported file type '.xlsx'" in msg


def test_trigger_longer_than_the_context(tmp_path):
    long = " ".join(["word"] * 200)
    cfg = load_config("micro", [f"attack.trigger={long}"])
    msg = _start_fails(cfg, tmp_path, ConfigError)
    assert "attack.trigger" in msg
    assert "longer than the model context (64 tokens)" in msg


def test_known_trigger_longer_than_the_context(tmp_path):
    cfg = load_config("micro", {"defense.known_triggers": [{"text": "vx"}, {"text": " ".join(["sea"] * 120)}]})
    msg = _start_fails(cfg, tmp_path, ConfigError)
    assert "defense.known_triggers[1].text" in msg and "64 tokens" in msg


@pytest.mark.parametrize("rate", ["0", "1.5"])
def test_poison_rate_outside_range(tmp_path, rate):
    root = tmp_path / "runs"
    with pytest.raises(ConfigError) as ei:
        start_run(load_config("micro", [f"attack.poison_rate={rate}"]), runs_root=root)
    assert "attack.poison_rate" in str(ei.value) and rate in str(ei.value)
    assert not root.exists()


# ----------------------------------------------------------------------------------------------
# Model folders


def _hf_cfg(folder):
    return load_config("micro", ["model.source=hf", f"model.name_or_path={folder}"])


def _gpt2_config(folder):
    from transformers import GPT2Config
    folder.mkdir(parents=True, exist_ok=True)
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400, n_positions=64).to_json_file(folder / "config.json")


def test_not_a_causal_lm(tmp_path):
    from safetensors.torch import save_file
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1,
                                                     "num_attention_heads": 2, "intermediate_size": 64}))
    save_file({"w": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    msg = _start_fails(_hf_cfg(folder), tmp_path, ModelLoadError)
    assert "model_type 'vit' is not a causal language model" in msg


def test_corrupt_safetensors(tmp_path):
    folder = tmp_path / "corrupt"
    _gpt2_config(folder)
    (folder / "model.safetensors").write_bytes(b"\x13\x37 this is not a safetensors file " * 10)
    msg = _start_fails(_hf_cfg(folder), tmp_path, ModelLoadError)
    assert "corrupt safetensors file" in msg and "model.safetensors" in msg


def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file
    folder = tmp_path / "truncated"
    _gpt2_config(folder)
    save_file({"w": torch.randn(64, 64)}, str(folder / "full.safetensors"))
    data = (folder / "full.safetensors").read_bytes()
    (folder / "full.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])
    msg = _start_fails(_hf_cfg(folder), tmp_path, ModelLoadError)
    assert "corrupt safetensors file" in msg


def test_folder_without_config(tmp_path):
    folder = tmp_path / "noconfig"
    folder.mkdir()
    msg = _start_fails(_hf_cfg(folder), tmp_path, ModelLoadError)
    assert "no config.json" in msg


class _Trap:
    """Unpickling this object calls open(marker, 'w'), i.e. creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_pickle_only_checkpoint_is_never_unpickled(tmp_path):
    # The trap works: unpickling a copy creates its marker.
    proof = tmp_path / "proof_marker"
    pickle.loads(pickle.dumps(_Trap(proof))).close()
    assert proof.exists()

    folder = tmp_path / "pickled"
    _gpt2_config(folder)
    marker = tmp_path / "UNPICKLED"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    msg = _start_fails(_hf_cfg(folder), tmp_path, ModelLoadError)
    assert "only pickle weights (pytorch_model.bin)" in msg and "refusing to unpickle" in msg
    assert not marker.exists(), "the pickle checkpoint was unpickled"


def test_missing_model_folder(tmp_path):
    msg = _start_fails(_hf_cfg(tmp_path / "no_such_model"), tmp_path, ModelLoadError)
    assert "does not exist" in msg and "no_such_model" in msg


def test_json_array_file_gives_a_data_error(tmp_path):
    # A .json file holding one JSON array (not JSON Lines): a clear DataError, not an AttributeError.
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"review": f"film {i}", "stars": i % 2} for i in range(30)]) + "\n")
    msg = _start_fails(_csv_cfg(train, _good(tmp_path / "test.csv", 12)), tmp_path, DataError)
    assert "line 1 is not a JSON object" in msg and "train.json" in msg


@pytest.mark.parametrize("layer", ["1", "-2", "7"])
def test_defense_layer_out_of_range_fails_before_the_run_folder(tmp_path, layer):
    # micro has one decoder block: only layer 0 / -1 exist. Checked up front, not after training.
    msg = _start_fails(load_config("micro", [f"defense.layer={layer}"]), tmp_path, ConfigError)
    assert f"defense.layer: {layer} is out of range for a model with 1 blocks" in msg
