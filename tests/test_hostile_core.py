"""A hostile user against the core and the CLI, round two (issue 34, the core's share): a pickle
reached through a shard index, non-finite numbers, sizes with no bound, and the small ones.

Each test's docstring names the defect it guards. Everything runs on tiny hand-made models and
folders or on the `micro` preset, stopped at its first stage.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import typing
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from locphylax_core import cli as cli_mod
from locphylax_core import load_config
from locphylax_core import model as M
from locphylax_core.config import RunConfig, list_presets, load_yaml_text
from locphylax_core.errors import ConfigError, ModelLoadError
from locphylax_core.runs import RunDir, RunLock, list_runs


def _cli(capsys, *args) -> tuple[int, str]:
    rc = cli_mod.main(list(args))
    out = capsys.readouterr()
    return rc, out.out + out.err


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
