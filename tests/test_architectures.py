"""Architectures (issue 7): the embedded model as GPT-2 (default, unchanged), GPT-NeoX, Llama,
Qwen2 and Mistral through the whole pipeline and the analyses; hf loading of a local folder of
each; LoRA targets per architecture; QLoRA's GPU requirement; the no-copy head-ablation path."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import cli_in_process, load_tensors
from locphylax_core import ConfigError, load_config, start_run
from locphylax_core import model as M
from locphylax_core.architectures import ARCHITECTURES, lora_targets
from locphylax_core.errors import ModelLoadError

ARCHS = ["gpt2", "gpt_neox", "llama", "qwen2", "mistral"]
TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32"]


def _tiny(micro_prepared, arch: str, seed: int = 1, **extra):
    cfg = micro_prepared.cfg.model.model_copy(update={"arch": arch, "n_layer": 2, "n_head": 2, "n_embd": 32, **extra})
    return M.build_embedded(cfg, micro_prepared.tokenizer, seed=seed).eval()


def _save_folder(net, tokenizer, folder):
    net.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


# ----------------------------------------------------------------------------------------------
# Building


def test_default_gpt2_is_bit_identical_to_the_previous_builder(micro_prepared):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg, tok = micro_prepared.cfg.model, micro_prepared.tokenizer
    assert cfg.arch == "gpt2"
    torch.manual_seed(7)  # the builder as it was before model.arch existed
    conf = GPT2Config(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    conf._attn_implementation = "eager"
    old = GPT2LMHeadModel(conf)
    new = M.build_embedded(cfg, tok, seed=7)
    assert type(new) is GPT2LMHeadModel
    assert new.config.to_dict() == old.config.to_dict()
    a, b = old.state_dict(), new.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ARCHS)
def test_build_each_architecture(micro_prepared, arch):
    from locphylax_core.architectures import decoder_blocks, final_norm
    from locphylax_core.engine import HiddenSpec, encode, forward_answer
    net = _tiny(micro_prepared, arch)
    c = net.config
    assert c.model_type == arch
    assert c._attn_implementation == "eager"
    assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size) == (2, 2, 32)
    assert len(decoder_blocks(net)) == 2 and final_norm(net) is not None
    assert M.model_max_positions(net) == micro_prepared.cfg.model.n_positions
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "attention_dropout"):
        assert getattr(c, name, 0.0) == 0.0, name
    width = {"gpt2": 128, "gpt_neox": 128}.get(arch, 88)  # gated MLPs: 8/3 x 32 rounded up to 8
    assert ((c.n_inner or 4 * c.n_embd) if arch == "gpt2" else c.intermediate_size) == width
    b = encode(micro_prepared.tokenizer, ["Review: a fine film . Sentiment:", "Review: bad Sentiment:"], 64, "cpu")
    with torch.no_grad():
        logits, h = forward_answer(net, b, HiddenSpec(0, False, "mean"))
    assert logits.shape == (2, len(micro_prepared.tokenizer)) and h.shape == (2, 32)
    assert torch.isfinite(logits).all() and torch.isfinite(h).all()
    # same seed, same weights
    again = _tiny(micro_prepared, arch)
    assert all(torch.equal(x, y) for x, y in zip(net.state_dict().values(), again.state_dict().values()))


def test_grouped_query_heads_and_width_fields(micro_prepared):
    net = _tiny(micro_prepared, "llama", n_kv_head=1, intermediate_size=40)
    assert net.config.num_key_value_heads == 1 and net.config.intermediate_size == 40
    assert net.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)  # one kv head of width 16
    with pytest.raises(ConfigError) as e:
        load_config("micro", ["model.n_kv_head=1"])  # gpt2 has no grouped-query attention
    assert "model.n_kv_head" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config("micro", ["model.arch=llama", "model.n_head=4", "model.n_kv_head=3"])
    assert "model.n_kv_head" in str(e.value)


def test_cli_dry_run_validates_an_architecture_and_names_a_bad_one(capsys):
    rc, out = cli_in_process(capsys, "run", "micro", "--set", "model.arch=llama", "--dry-run")
    assert rc == 0, out
    assert "arch: llama" in out and "config is valid" in out
    rc, out = cli_in_process(capsys, "run", "micro", "--set", "model.arch=gpt5", "--dry-run")
    assert rc != 0
    assert "model.arch" in out and "gpt5" in out


# ----------------------------------------------------------------------------------------------
# The whole pipeline and the analyses, per architecture


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_and_analyses_per_architecture(arch, tmp_path):
    from locphylax_core.analysis import analyze_run
    from locphylax_core.analysis.representations import stage_states
    cfg = load_config("micro", [f"model.arch={arch}", *TINY, "train.clean_steps=4", "attack.steps=3",
                                "defense.stage1_steps=2", "defense.stage2_steps=2", "eval.every=2",
                                "eval.clean_every=4", "defense.baselines=[clean_ft, fine_pruning]"])
    run, summary = start_run(cfg, runs_root=tmp_path / "runs")
    assert summary["status"] == "done"
    assert set(summary["stages"]) == {"victim", "stage1", "stage2"}
    assert set(summary["baselines"]) == {"clean_ft", "fine_pruning"}
    for block in [*summary["stages"].values(), *summary["baselines"].values()]:
        assert 0.0 <= block["cacc"] <= 1.0
        assert set(block["asr"]) == {"unknown", "t1", "t2"} and set(block["asr_raw"]) == {"unknown", "t1", "t2"}
    assert load_config(str(run.path / "config.yaml")).model.arch == arch
    state = run.read_state()
    fp = state["results"]["fine_pruning/stage1"]  # pruned step by step: a count it measured on the way
    assert fp["pruned"] in [c for c, _ in fp["prune_curve"]] and fp["prune_curve"][0][0] == 0
    assert M.load_checkpoint(run.checkpoint("stage2")).config.model_type == arch

    a = analyze_run(run, methods=("pca",), n_probe_heads=12)
    n_probe = len((run.path / "probe.jsonl").read_text().splitlines())
    assert a["projections"]["pca"]["stages"] == a["stages"]
    assert set(a["aggregation"]) == set(a["stages"])
    for key in ("victim", "stage1", "stage2"):
        h = a["head_ablation"][key]
        assert (h["n_layers"], h["n_heads"]) == (2, 2)
        for arr in (h["delta_cacc"], *[np.asarray(x) for x in h["delta_asr"].values()]):
            assert np.asarray(arr, dtype=float).shape == (2, 2)
        assert np.isfinite(np.asarray(h["delta_cacc"], dtype=float)).all()
    assert a["casd"]["labels"] == ["stage1", "stage2", "clean_ft", "fine_pruning"]  # every trained baseline
    # the layer analyses run on every architecture's bridge
    assert list(a["patching"]) == ["victim", "stage1", "stage2", "clean_ft/stage2", "fine_pruning/stage2"]
    for key, p in a["patching"].items():
        assert np.asarray(p["heads"], dtype=float).shape == (2, 2) and len(p["residual"]) == 2
        assert len(a["logit_lens"][key]["target_triggered"]) == 2
    m = np.asarray(a["casd"]["matrix"], dtype=float)
    assert m.shape == (4, 4) and np.isfinite(m).all() and np.allclose(m, m.T)
    # hidden states: the stored default view and a recomputed layer/pooling
    stored = stage_states(run, "stage2")
    assert stored.shape == (n_probe, 32)
    for layer in (0, 1):
        s = stage_states(run, "stage2", layer=layer, position="mean")
        assert s.shape == (n_probe, 32) and np.isfinite(s).all()
    assert np.allclose(stage_states(run, "stage2", layer=-1), stored, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# hf loading of a local folder, dtype, QLoRA's GPU requirement


@pytest.mark.parametrize("arch", ARCHS)
def test_load_a_local_hf_folder_of_each_architecture(micro_prepared, arch, tmp_path):
    from locphylax_core.engine import encode
    net = _tiny(micro_prepared, arch, seed=3)
    folder = _save_folder(net, micro_prepared.tokenizer, tmp_path / arch)
    assert (folder / "model.safetensors").is_file()
    loaded = M.load_causal_lm(str(folder), attn_implementation="eager").eval()
    assert type(loaded) is type(net) and loaded.config.model_type == arch
    b = encode(M.load_tokenizer(str(folder)), ["Review: a fine film . Sentiment:", "Review: bad Sentiment:"],
               None, "cpu")
    with torch.no_grad():
        l1 = net(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
        l2 = loaded(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    assert torch.allclose(l1[:, -1], l2[:, -1], atol=1e-5)
    bf = M.load_causal_lm(str(folder), dtype="bfloat16")
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}


def test_hf_source_runs_on_a_local_llama_folder_in_bfloat16(micro_prepared, tmp_path):
    folder = _save_folder(_tiny(micro_prepared, "llama", seed=3), micro_prepared.tokenizer, tmp_path / "llama")
    cfg = load_config("micro", ["model.source=hf", f"model.name_or_path={folder}", "model.dtype=bfloat16",
                                "attack.steps=2", "defense.stage1_steps=2", "defense.stage2_steps=2",
                                "defense.baselines=[]", "eval.every=2"])
    run, summary = start_run(cfg, runs_root=tmp_path / "runs")
    assert summary["status"] == "done"
    ck = load_tensors(run.checkpoint("stage2") / "model.safetensors")
    assert {t.dtype for t in ck.values()} == {torch.bfloat16}


def test_model_dtype_and_quantization_validation():
    for over, field in [(["model.dtype=bfloat16"], "model.dtype"),  # embedded trains in float32
                        (["model.quantization=4bit"], "model.quantization"),  # embedded
                        (["model.quantization=8bit"], "model.quantization"),
                        (["model.source=hf", "model.name_or_path=/x", "model.quantization=4bit"],
                         "model.quantization"),  # 4-bit without LoRA
                        (["model.source=hf", "model.name_or_path=/x", "model.quantization=4bit",
                          "model.lora.enabled=true"], "model.quantization")]:  # train.device=cpu
        with pytest.raises(ConfigError) as e:
            load_config("micro", over)
        assert field in str(e.value), over
    cfg = load_config("micro", ["model.source=hf", "model.name_or_path=/x", "model.quantization=4bit",
                                "model.lora.enabled=true", "train.device=cuda"])
    assert cfg.model.quantization == "4bit" and cfg.model.dtype == "float32"
    assert load_config("micro").model.dtype == "float32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_4bit_on_cpu_fails_clearly_naming_the_field(micro_prepared, tmp_path):
    from locphylax_core.experiment import prepare
    folder = _save_folder(_tiny(micro_prepared, "llama"), micro_prepared.tokenizer, tmp_path / "llama")
    with pytest.raises(ModelLoadError) as e:
        M.load_causal_lm(str(folder), quantization="4bit")
    msg = str(e.value)
    assert "model.quantization" in msg and "GPU" in msg
    cfg = load_config("micro", ["model.source=hf", f"model.name_or_path={folder}", "model.quantization=4bit",
                                "model.lora.enabled=true", "train.device=auto"])
    with pytest.raises(ModelLoadError) as e:
        prepare(cfg)  # before any run folder exists
    assert "model.quantization" in str(e.value)


# ----------------------------------------------------------------------------------------------
# LoRA with per-architecture targets


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_stage_trains_only_adapters_and_merges_back(micro_prepared, arch):
    from locphylax_core.config import LoraConfig
    from locphylax_core.defenses.locphylax import RecoverConfig, recover
    from locphylax_core.trainer import StageContext, TrainSettings
    net = _tiny(micro_prepared, arch)
    targets = lora_targets(net)
    assert targets == list(ARCHITECTURES[arch].lora)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    wrapped = M.with_lora(copy.deepcopy(net), LoraConfig(enabled=True, r=4))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == set(targets)

    lm = M.LM(net, micro_prepared.tokenizer, micro_prepared.answer_ids)
    settings = TrainSettings(lr=0.05, batch_size=16, max_length=micro_prepared.max_length, every=0)
    recover(lm, micro_prepared.defender, RecoverConfig(steps=3, trainable="lora"), StageContext(seed=0, settings=settings))
    after = lm.model.state_dict()
    assert type(lm.model) is type(net) and list(after) == list(before)  # merged: plain names again
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the merged adapter changed nothing"
    for k in changed:  # only the targets' weights moved
        assert k.endswith(".weight") and k.rsplit(".", 2)[-2] in targets, k


def test_explicit_lora_targets_win_and_unknown_types_fall_back_to_peft():
    class Conf:
        model_type = "something_new"

    class Net(torch.nn.Module):
        config = Conf()

    assert lora_targets(Net()) is None
    assert lora_targets(Net(), ["q_proj"]) == ["q_proj"]


# ----------------------------------------------------------------------------------------------
# Fine-pruning on a gated MLP


def test_fine_pruning_on_a_gated_mlp(micro_prepared):
    from locphylax_core.defenses.fine_pruning import FinePruneConfig, fine_prune, mlp_unit_activity
    from locphylax_core.trainer import StageContext, TrainSettings
    net = _tiny(micro_prepared, "llama")
    lm = M.LM(net, micro_prepared.tokenizer, micro_prepared.answer_ids)
    mlp = net.model.layers[-1].mlp
    activity = mlp_unit_activity(lm, micro_prepared.defender, -1, max_length=micro_prepared.max_length)
    assert activity.shape == (88,)
    expected = set(torch.argsort(activity)[:22].tolist())
    settings = TrainSettings(lr=0.01, batch_size=16, max_length=micro_prepared.max_length, every=0)
    logs = fine_prune(lm, micro_prepared.defender, FinePruneConfig(steps=3, prune_rate=0.25),
                      StageContext(seed=0, settings=settings))
    assert logs["pruned"] == 22 and logs["units"] == 88
    zero = set(((mlp.gate_proj.weight == 0).all(1) & (mlp.up_proj.weight == 0).all(1)).nonzero().flatten().tolist())
    assert zero == expected  # pruned, and the fine-tuning left them at zero
    assert (mlp.down_proj.weight[:, sorted(expected)] == 0).all()


# ----------------------------------------------------------------------------------------------
# Head ablation without copying the model


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_no_copy_head_ablation_equals_the_copy_and_shares_the_weights(micro_prepared, arch, monkeypatch):
    from locphylax_core.analysis import heads as H
    net = _tiny(micro_prepared, arch)
    with torch.no_grad():  # sharpen the attention so that an ablation changes answers
        for n, p in net.named_parameters():
            if any(s in n for s in ("c_attn.weight", "query_key_value.weight", "q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    prep = micro_prepared
    probe = prep.evalset.subset(16)
    args = (prep.tokenizer, prep.task.template, *H.probe_inputs(probe), prep.answer_ids)
    state0 = {k: v.clone() for k, v in net.state_dict().items()}
    mods0 = [(n, type(m)) for n, m in net.named_modules()]
    ptrs0 = {p.data_ptr() for p in net.parameters()}
    attn0 = net.config._attn_implementation

    copied = H.head_ablation(net, *args, batched=False, max_length=prep.max_length)

    # the no-copy path must never deep-copy anything, and the bridge holds the caller's tensors
    deepcopy = copy.deepcopy

    def no_model_copy(obj, *a, **k):
        if isinstance(obj, torch.nn.Module) and any(p.data_ptr() in ptrs0 for p in obj.parameters()):
            raise AssertionError("the model was deep-copied on the no-copy path")
        return deepcopy(obj, *a, **k)
    monkeypatch.setattr(copy, "deepcopy", no_model_copy)
    storages0 = {p.untyped_storage().data_ptr() for p in net.parameters()}
    with H.borrowed_bridge(net, prep.tokenizer) as (bridge, _tok):
        assert bridge.original_model is net
        params = [*bridge.original_model.parameters(), *bridge.parameters()]
        extra = {p.untyped_storage().data_ptr(): p.numel() for p in params
                 if p.untyped_storage().data_ptr() not in storages0}
    # Every tensor the bridge computes with lives in the caller's storage (GPT-2's split q/k/v are
    # views of c_attn), except GPT-NeoX's per-head interleaved query_key_value, which TransformerLens
    # splits into new q/k/v tensors: 3 (d^2 + d) per layer, never the whole model (docs/scale.md).
    assert sum(extra.values()) == (2 * 3 * (32 * 32 + 32) if arch == "gpt_neox" else 0)
    in_place = H.head_ablation(net, *args, batched=False, max_length=prep.max_length, in_place=True)
    monkeypatch.undo()

    assert in_place["delta_cacc"].shape == (2, 2)
    np.testing.assert_array_equal(in_place["delta_cacc"], copied["delta_cacc"])
    for name in copied["delta_asr"]:
        np.testing.assert_array_equal(in_place["delta_asr"][name], copied["delta_asr"][name])
        np.testing.assert_array_equal(in_place["delta_asr_raw"][name], copied["delta_asr_raw"][name])
    assert in_place["base"] == copied["base"]
    # the model is exactly as it was: modules, weights, no hooks left, attention implementation
    assert [(n, type(m)) for n, m in net.named_modules()] == mods0
    assert {p.data_ptr() for p in net.parameters()} == ptrs0
    now = net.state_dict()
    assert list(now) == list(state0) and all(torch.equal(now[k], state0[k]) for k in state0)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    assert net.config._attn_implementation == attn0


def test_borrowed_bridge_restores_the_model_after_an_error(micro_prepared):
    from locphylax_core.analysis import heads as H
    from locphylax_core.engine import encode, forward_answer
    net = _tiny(micro_prepared, "qwen2")
    b = encode(micro_prepared.tokenizer, ["Review: a fine film . Sentiment:"], None, "cpu")
    with torch.no_grad():
        before, _ = forward_answer(net, b)
    mods0 = [(n, type(m)) for n, m in net.named_modules()]
    with pytest.raises(RuntimeError, match="boom"):
        with H.borrowed_bridge(net, micro_prepared.tokenizer):
            assert [(n, type(m)) for n, m in net.named_modules()] != mods0  # wrapped in place meanwhile
            raise RuntimeError("boom")
    assert [(n, type(m)) for n, m in net.named_modules()] == mods0
    with torch.no_grad():
        after, _ = forward_answer(net, b)
    assert torch.equal(before, after)


@pytest.mark.parametrize("over, field", [
    ({"model.arch": "llama", "model.n_embd": 96, "model.n_head": 32}, "model.n_head"),  # odd rotary head width
    ({"model.source": "hf", "model.name_or_path": "gpt2", "model.arch": "llama"}, "model.arch"),
    ({"model.source": "hf", "model.name_or_path": "gpt2", "model.n_kv_head": 2}, "model.n_kv_head"),
    ({"attack.paradigm": "edit", "model.n_layer": 1}, "attack.edit_layer"),
    ({"model.source": "hf", "model.name_or_path": "gpt2", "model.quantization": "4bit", "model.lora.enabled": True,
      "train.device": "cuda", "attack.paradigm": "edit"}, "model.quantization"),
    ({"model.source": "hf", "model.name_or_path": "gpt2", "model.quantization": "4bit", "model.lora.enabled": True,
      "train.device": "cuda", "defense.baselines": ["fine_pruning"]}, "model.quantization"),
])
def test_combinations_that_would_fail_inside_a_run_are_config_errors(over, field):
    with pytest.raises(ConfigError) as e:
        load_config("micro", over)
    assert field in e.value.fields, e.value.fields


def test_an_hf_config_saved_with_every_field_still_loads():
    """A run's config.yaml lists every field, the embedded-only ones at their defaults included."""
    import yaml
    cfg = load_config("micro", {"model.source": "hf", "model.name_or_path": "gpt2"})
    assert load_config(yaml.safe_load(cfg.to_yaml())) == cfg
