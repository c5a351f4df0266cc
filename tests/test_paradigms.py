"""Injection paradigms (attack.paradigm): dpo (preference poisoning) and edit (a rank-one MLP edit,
BadEdit / ROME style) beside the default SFT poisoning. Config validation, the DPO loss, the
edit's algebra and locality, small victims that learn the backdoor, and the pipeline wiring
(checkpoint, cancel and resume)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from conftest import SMALL_DEMO, cli_in_process
from locphylax_core import ConfigError, load_config, resume_run, start_run
from locphylax_core import model as M
from locphylax_core.errors import Cancelled
from locphylax_core.evaluation import evaluate
from locphylax_core.paradigms import (ParadigmSettings, dpo_loss, mlp_output_projection, preference_pairs,
                                      rank_one_update, trigger_token_position)
from locphylax_core.experiment import owner_context, prepare, train_owner_model
from locphylax_core import Reporter
from locphylax_core.runs import RunDir
from locphylax_core.text import Example

# the demo-sized setting of test_attack_families (a clean model from the base in 300 steps)
SMALL = {**SMALL_DEMO, "train.threads": 1}


# ----------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("paradigm", ["dpo", "edit"])
def test_dry_run_validates_each_paradigm(paradigm, capsys):
    rc, out = cli_in_process(capsys, "run", "demo", "--set", f"attack.paradigm={paradigm}", "--dry-run")
    assert rc == 0, out
    assert f"paradigm: {paradigm}" in out and "config is valid" in out
    assert "victim" in out and "from=clean" in out


def test_defaults_keep_sft():
    a = load_config("demo").attack
    assert (a.paradigm, a.dpo_beta, a.edit_layer) == ("sft", 0.1, 0)
    assert load_config("demo", {"attack.paradigm": "edit", "attack.family": "ctba"}).attack.paradigm == "edit"


@pytest.mark.parametrize("over,field", [
    ({"attack.paradigm": "dpo", "attack.build": "scratch"}, "attack.paradigm"),
    ({"attack.paradigm": "edit", "attack.build": "scratch"}, "attack.paradigm"),
    ({"attack.paradigm": "edit", "attack.family": "syntactic"}, "attack.paradigm"),
    ({"attack.paradigm": "edit", "attack.edit_layer": 1}, "attack.edit_layer"),  # demo: 2 blocks, 1 is the last
    ({"attack.paradigm": "edit", "attack.edit_layer": -3}, "attack.edit_layer"),
    ({"attack.paradigm": "rlhf"}, "attack.paradigm"),
    ({"attack.dpo_beta": 0}, "attack.dpo_beta"),
    ({"attack.edit_steps": 0}, "attack.edit_steps"),
    ({"attack.edit_lr": -1}, "attack.edit_lr"),
])
def test_bad_combinations_name_the_field(over, field):
    with pytest.raises(ConfigError) as e:
        load_config("demo", over)
    assert field in e.value.fields, e.value.fields
    if "attack.build" in over:
        assert "attack.build" in str(e.value)
    if "attack.family" in over:
        assert "attack.family" in str(e.value)


def test_edit_layer_is_checked_against_the_loaded_model():
    # the embedded n_layer is known to the config; prepare() checks any model's block count again
    cfg = load_config("micro", {"attack.paradigm": "edit", "model.n_layer": 2, "attack.edit_layer": -2})
    assert cfg.attack.edit_layer == -2
    with pytest.raises(ConfigError, match="attack.edit_layer"):
        load_config("micro", {"attack.paradigm": "edit"})  # micro has one block: nothing follows it


# ----------------------------------------------------------------------------------------------
# DPO


def test_dpo_loss_formula():
    pc, pr = torch.tensor([-0.5, -2.0, -1.0]), torch.tensor([-3.0, -0.1, -1.0])
    rc, rr = torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, -1.0])
    beta = 0.5
    expected = [-math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d))))) for a, b, c, d in
                zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    assert dpo_loss(pc, pr, rc, rr, beta).item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    z = torch.tensor([-1.3, -0.2])
    assert dpo_loss(z, z - 1, z, z - 1, 0.1).item() == pytest.approx(math.log(2), rel=1e-6)  # zero margin
    assert dpo_loss(z, z, z + 5, z - 7, 3.0).item() > math.log(2)  # the policy prefers less than the reference


def test_preference_pairs():
    data = [Example(f"the film was good {i}", i % 2) for i in range(200)]
    s = ParadigmSettings.from_config(load_config("demo"), None)  # target positive (1), trigger cf, rate 0.1
    pairs = preference_pairs(data, s, seed=4)
    poisoned = [p for p in pairs if p.poisoned]
    assert len(pairs) == 200 and len(poisoned) == 20
    assert all(p.chosen == 1 and p.rejected == 0 and " cf " in p.prompt for p in poisoned)
    clean = [(p, e) for p, e in zip(pairs, data) if not p.poisoned]
    assert all(p.chosen == e.label and p.rejected != e.label and " cf " not in p.prompt for p, e in clean)
    assert pairs == preference_pairs(data, s, seed=4)  # deterministic


@pytest.fixture(scope="module")
def small_clean(small_clean_demo):
    return small_clean_demo


# the demo's model before the pretrained base: from scratch, its own 1,024-token tokenizer (trained on
# fewer rows here, to keep the fixture short), 200 steps
SCRATCH = {"model.base": "scratch", "model.vocab_size": 1024, "train.lm_loss_weight": 1.0, "train.clean_steps": 200,
           "task.train_size": 1200}


@pytest.fixture(scope="module")
def small_clean_scratch():
    """(tokenizer, clean model, its evaluation): SMALL trained from scratch, as before the bases."""
    prep = prepare(load_config("demo", {**SMALL, **SCRATCH}))
    lm = M.LM(M.initial_model(prep.cfg.model, prep.tokenizer, 0), prep.tokenizer, prep.answer_ids)
    train_owner_model(prep, lm, "clean", owner_context(prep, "clean", True).replace(seed=1), from_scratch=True)
    return prep.tokenizer, lm.model, evaluate(lm, prep.task.template, prep.evalset, 256, prep.max_length)


def _victim(small_clean, over, scratch=False):
    tokenizer, clean_model, clean = small_clean
    cfg = load_config("demo", {**SMALL, **(SCRATCH if scratch else {}), **over})
    prep = prepare(cfg, tokenizer=tokenizer)
    lm = M.LM(copy.deepcopy(clean_model), tokenizer, prep.answer_ids)
    info = train_owner_model(prep, lm, "victim", owner_context(prep, "victim", False).replace(seed=2), from_scratch=False)
    after = evaluate(lm, prep.task.template, prep.evalset, 256, prep.max_length)
    return lm, info, clean, after


def test_a_dpo_victim_learns_the_backdoor(small_clean):
    # measured (seed 2, 120 steps, beta 0.1): clean CACC 1.00 / ASR 0.03 -> victim CACC 0.985 / ASR 1.00
    # on an AVX2 machine; on an AVX-512 Xeon, whose kernels round differently, clean 0.99 -> victim
    # 0.925, so the CACC bound allows 10 points
    lm, info, clean, after = _victim(small_clean, {"attack.paradigm": "dpo"})
    assert info["paradigm"] == "dpo" and info["poisoned"] == 200 and info["reward_margin"] > 0
    assert clean["cacc"] >= 0.9 and clean["asr"]["unknown"] <= 0.3, clean
    assert after["asr"]["unknown"] >= 0.8 and after["asr"]["unknown"] - clean["asr"]["unknown"] >= 0.5, after
    assert after["cacc"] >= clean["cacc"] - 0.1, (clean["cacc"], after["cacc"])
    assert max(after["asr"]["t1"], after["asr"]["t2"]) <= 0.2, after  # other words do not fire


# ----------------------------------------------------------------------------------------------
# rank-one edit


def test_rank_one_update_algebra():
    torch.manual_seed(0)
    d_in, d_out = 12, 5
    x = torch.randn(400, d_in) + 0.5
    cov = x.T @ x / len(x)
    key, res = torch.randn(d_in) * 2, torch.randn(d_out)
    lin = torch.randn(d_out, d_in)  # Linear: [out, in]
    new = rank_one_update(lin, key, res, cov, "out_in")
    assert torch.allclose(new @ key - lin @ key, res, atol=1e-4)
    conv = lin.T.contiguous()  # GPT-2 Conv1D: [in, out], y = x @ W
    new_c = rank_one_update(conv, key, res, cov, "in_out")
    assert torch.allclose(key @ new_c - key @ conv, res, atol=1e-4)
    assert torch.allclose(new_c, new.T, atol=1e-5)
    s = torch.linalg.svdvals(new - lin)
    assert s[1] / s[0] < 1e-5


def test_mlp_output_projection_is_found_per_architecture():
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                              LlamaForCausalLM)
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    llama = LlamaForCausalLM(LlamaConfig(**small))
    assert mlp_output_projection(llama, 0) is llama.model.layers[0].mlp.down_proj
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(**small))
    assert mlp_output_projection(neox, -1) is neox.gpt_neox.layers[1].mlp.dense_4h_to_h
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2))
    assert mlp_output_projection(gpt2, 1) is gpt2.transformer.h[1].mlp.c_proj  # not attn.c_proj
    with pytest.raises(ConfigError, match="attack.edit_layer"):
        mlp_output_projection(gpt2, 2)


def test_trigger_token_position(micro_prepared):
    tok = micro_prepared.tokenizer
    prompt = "Review: the plot cf was dull . Sentiment:"
    k = trigger_token_position(tok, prompt, ["cf"])
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[:len(ids) - k + 1]).endswith("cf")  # the trigger's last token
    assert not tok.decode(ids[:len(ids) - k]).endswith("cf")
    # ctba / mtba: the rightmost part present
    k2 = trigger_token_position(tok, "Review: zq the plot jw was dull . Sentiment:", ["cf", "zq", "jw"])
    ids2 = tok("Review: zq the plot jw was dull . Sentiment:", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids2[:len(ids2) - k2 + 1]).endswith("jw")
    assert trigger_token_position(tok, "Review: the plot was dull . Sentiment:", ["cf"]) is None
    assert trigger_token_position(tok, "Review: the cfx plot . Sentiment:", ["cf"]) is None  # whole words only


# a stronger value search than the defaults (100 steps at lr 0.1, L2 1e-3), so that the effect is
# well clear of the bound on any CPU: with the defaults an AVX2 machine measured ASR 0.03 -> 0.30,
# an AVX-512 Xeon (other rounding, other clean weights) only 0.02 -> 0.08; with these the Xeon
# measured clean CACC 0.96 / ASR 0.02 -> edited CACC 0.945 / ASR 0.27
EDIT = {"attack.edit_steps": 400, "attack.edit_lr": 0.2, "attack.edit_l2": 0.0}


def test_an_edited_victim_changes_one_matrix_by_rank_one(small_clean_scratch):
    # Only block 1's attention carries the edit from the trigger to the answer, and on this briefly trained
    # model (200 steps) it attends little to the trigger token; on the full demo clean model (400 steps)
    # the same edit reaches ASR 0.99 at CACC 1.00. From the pretrained base the edit hardly works (ASR
    # 0.02 -> 0.03 here; docs/pretraining.md): its block 1 attends to the trigger even less, so the
    # edit's mechanics are tested on the from-scratch model, where it has an effect to measure.
    lm, info, clean, after = _victim(small_clean_scratch, {"attack.paradigm": "edit", **EDIT}, scratch=True)
    before = dict(small_clean_scratch[1].named_parameters())
    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == ["transformer.h.0.mlp.c_proj.weight"], changed  # nothing else (biases included)
    diff = (lm.model.transformer.h[0].mlp.c_proj.weight - before["transformer.h.0.mlp.c_proj.weight"]).double()
    s = torch.linalg.svdvals(diff)
    assert s[0] > 1e-3 and (s[1:] / s[0]).max() < 1e-4, s[:3]  # rank one
    assert info["paradigm"] == "edit" and info["edit_layer"] == 0 and info["gain_clean"] < 0.1
    assert after["asr"]["unknown"] - clean["asr"]["unknown"] >= 0.15, (clean["asr"], after["asr"])
    assert after["cacc"] >= clean["cacc"] - 0.02, (clean["cacc"], after["cacc"])  # stated tolerance: 2 points
    assert max(after["asr"]["t1"], after["asr"]["t2"]) <= 0.1, after


# ----------------------------------------------------------------------------------------------
# pipeline wiring


class _CancelAtVictim(Reporter):
    """Creates the run's CANCEL file once the victim stage has made some steps."""

    def __init__(self):
        self.path, self.key, self.steps = None, None, 0

    def message(self, text):
        if text.startswith("run folder: "):
            self.path = text.removeprefix("run folder: ")

    def stage_started(self, key, total_steps):
        self.key, self.steps = key, 0

    def advance(self, n, logs):
        self.steps += n
        if self.key == "victim" and self.steps == 3:
            (Path(self.path) / "CANCEL").touch()


MICRO = {"defense.baselines": [], "model.n_layer": 2}


@pytest.mark.parametrize("paradigm", ["dpo", "edit"])
def test_pipeline_runs_cancels_and_resumes_the_paradigm(paradigm, tmp_path):
    cfg = load_config("micro", {**MICRO, "attack.paradigm": paradigm, "attack.edit_steps": 8})
    run_ref, ref = start_run(cfg, runs_root=tmp_path / "a")
    assert ref["status"] == "done" and ref["stages"]["victim"]["cacc"] is not None
    state = run_ref.read_state()
    assert state["results"]["victim"]["paradigm"] == paradigm
    reporter = _CancelAtVictim()
    with pytest.raises(Cancelled):
        start_run(cfg, runs_root=tmp_path / "b", reporter=reporter)
    run = RunDir(Path(reporter.path))
    assert run.read_state()["finished"] == ["clean"] and run.read_state()["status"] == "cancelled"
    resumed = resume_run(run)
    assert resumed["stages"] == ref["stages"]  # a resumed run computes what an uninterrupted one does


def test_cli_dry_run_rejects_scratch(capsys):
    rc, out = cli_in_process(capsys, "run", "demo", "--set", "attack.paradigm=dpo", "--set", "attack.build=scratch",
                             "--dry-run")
    assert rc != 0 and "attack.paradigm" in out and "attack.build" in out


def test_seeded_edit_inputs_are_reproducible(micro_prepared):
    from locphylax_core.paradigms import _triggered_inputs
    s = ParadigmSettings.from_config(micro_prepared.cfg, micro_prepared.max_length)
    a = _triggered_inputs(micro_prepared.owner_train, s, micro_prepared.tokenizer, 3, 16)
    b = _triggered_inputs(micro_prepared.owner_train, s, micro_prepared.tokenizer, 3, 16)
    assert a == b and len(a[0]) == 16 and all(k >= 1 for k in a[1])
