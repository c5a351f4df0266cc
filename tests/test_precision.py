"""bf16 'auto': bfloat16 autocast only where the device computes in bf16 (an AVX2-only CPU emulates
it many times slower than float32), for training and for scoring alike."""

from __future__ import annotations

import pytest
import torch

from locphylax_core import trainer
from locphylax_core import model as M
from locphylax_core import precision
from locphylax_core.config import load_config


@pytest.fixture
def flags(monkeypatch):
    def set_flags(*names):
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(names))
    return set_flags


def test_auto_takes_bf16_only_on_a_cpu_that_computes_in_it(flags):
    flags("avx2", "fma")
    assert precision.use_bf16("auto", "cpu") is False
    assert precision.use_bf16(True, "cpu") is True and precision.use_bf16(False, "cpu") is False
    flags("avx2", "avx512f", "avx512_bf16")
    assert precision.use_bf16("auto", "cpu") is True
    flags("amx_bf16")
    assert precision.use_bf16("auto", torch.device("cpu")) is True


def test_training_and_scoring_follow_the_resolved_setting(flags):
    flags("avx2")
    assert trainer._autocast_factory("auto", torch.device("cpu")) is not None
    with trainer._autocast_factory("auto", torch.device("cpu"))():
        assert not torch.is_autocast_enabled("cpu")
    lm = M.LM(torch.nn.Linear(2, 2), None, (0, 1), bf16="auto")
    with lm.inference_autocast():
        assert not torch.is_autocast_enabled("cpu")
    flags("avx512_bf16")
    with trainer._autocast_factory("auto", torch.device("cpu"))():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with lm.inference_autocast():
        assert torch.is_autocast_enabled("cpu")


def test_the_config_accepts_auto_and_refuses_other_words():
    cfg = load_config("sst2-smollm2")
    assert cfg.train.bf16 == "auto" and cfg.eval.bf16 == "auto"  # the real-LM presets run anywhere
    assert load_config("micro", {"train.bf16": True}).train.bf16 is True
    from locphylax_core.errors import ConfigError
    with pytest.raises(ConfigError, match="train.bf16"):
        load_config("micro", {"train.bf16": "fast"})


def test_the_flags_are_read_from_this_machine():
    assert isinstance(precision.cpu_flags(), frozenset)
