"""Pretraining a base LM (locphylax_core/pretrain.py) on a tiny corpus, and loading bases."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from locphylax_core import bases
from locphylax_core import model as M
from locphylax_core.config import ModelConfig, load_config
from locphylax_core.errors import Cancelled
from locphylax_core.errors import ConfigError, ModelLoadError, RunError
from locphylax_core.pretrain import (FolderLock, flops_per_token, heldout_loss, latest_checkpoint,
                                     load_pretrain_config, pretrain, read_curve, window_batch)
from locphylax_core.runs import file_sha256
from locphylax_core.tasks import embedded_corpus

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32, "seq_len": 32, "batch_size": 8,
        "vocab_size": 400, "steps": 40, "lr": 3e-3, "warmup_steps": 5, "eval_every": 20, "eval_windows": 16,
        "checkpoint_every": 10, "threads": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """Sentences of the embedded domain: 3,000 to train on, 150 others held out."""
    folder = tmp_path_factory.mktemp("corpus")
    texts = list(dict.fromkeys(embedded_corpus(4000, seed=5)))
    (folder / "train.txt").write_text("\n".join(texts[:3000]) + "\n")
    (folder / "heldout.txt").write_text("\n".join(texts[-150:]) + "\n")
    words = lambda ts: sum(len(t.split()) for t in ts)  # noqa: E731
    (folder / "manifest.json").write_text(json.dumps({
        "schema": 1, "sources": [{"name": "embedded", "package": "locphylax", "licence": "the project's",
                                  "texts": 3150, "words": words(texts[:3000] + texts[-150:])}],
        "files": {"train.txt": {"texts": 3000, "words": words(texts[:3000]), "sha256": "x"},
                  "heldout.txt": {"texts": 150, "words": words(texts[-150:]), "sha256": "y"}},
        "test_splits": {"contains_test_splits": False, "never_read": [], "checked_against": ["none"], "rule": "-"}}))
    return folder


def _cfg(corpus, out, **over):
    return load_pretrain_config({**TINY, "corpus": str(corpus), "out": str(out), **over})


class StopAt:
    """A reporter that ends the run at a step: by the CANCEL file, or as a kill would (an exception)."""

    def __init__(self, step, out=None, kill=False):
        self.step, self.out, self.kill, self.seen = step, out, kill, 0

    def stage_started(self, *a): ...
    def stage_finished(self, *a): ...
    def message(self, text): ...

    def advance(self, n, logs):
        self.seen += n
        if self.seen == self.step:
            if self.kill:
                raise KeyboardInterrupt
            (self.out / "CANCEL").touch()


def _weights(out):
    return load_file(str(latest_checkpoint(out) / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt") / "a"
    card = pretrain(_cfg(tiny_corpus, out))
    return out, card


def test_pretraining_lowers_heldout_perplexity(uninterrupted, tiny_corpus):
    out, card = uninterrupted
    tok = M.load_tokenizer(str(out / "tokenizer"))
    untrained = M.build_embedded(_cfg(tiny_corpus, out).as_model_config().model_copy(
        update={"vocab_size": len(tok)}), tok, 0)
    held = load_file(str(out / "tokens.safetensors"))["heldout"]
    before = math.exp(heldout_loss(untrained, held, 32, 16, "cpu"))
    curve = read_curve(out)
    assert [r["step"] for r in curve] == [20, 40]
    assert curve[-1]["heldout_ppl"] < curve[0]["heldout_ppl"] < before
    assert curve[-1]["heldout_ppl"] < before / 3
    assert card["heldout_ppl"] == pytest.approx(curve[-1]["heldout_ppl"])
    assert card["steps"] == 40 and card["tokens_seen"] == 40 * 8 * 32
    assert curve[-1]["tokens_per_s"] > 0 and curve[-1]["mfu"] is None  # no GPU: no MFU, said so


def test_cancel_and_kill_resume_to_identical_weights(uninterrupted, tiny_corpus, tmp_path):
    ref = _weights(uninterrupted[0])
    for kill in (False, True):
        out = tmp_path / f"b{int(kill)}"
        with pytest.raises(KeyboardInterrupt if kill else Cancelled):
            pretrain(_cfg(tiny_corpus, out), reporter=StopAt(25, out, kill))
        step = json.loads((latest_checkpoint(out) / "trainer.json").read_text())["step"]
        assert step == (20 if kill else 25)  # a kill loses the steps since the last checkpoint
        assert not (out / "LOCK").exists()
        (out / "CANCEL").unlink(missing_ok=True)
        pretrain(_cfg(tiny_corpus, out))
        got = _weights(out)
        assert all(torch.equal(ref[k], got[k]) for k in ref)
        assert read_curve(out) == [{**r, "seconds": g["seconds"], "tokens_per_s": g["tokens_per_s"],
                                    "tflops": g["tflops"]} for r, g in zip(read_curve(uninterrupted[0]),
                                                                          read_curve(out))]


def test_resume_refuses_other_settings_and_a_second_process(uninterrupted, tiny_corpus):
    out = uninterrupted[0]
    with pytest.raises(ConfigError, match=r"lr: .* was started with lr=0.003, not 0.001"):
        pretrain(_cfg(tiny_corpus, out, lr=1e-3))
    (out / "LOCK").write_text(str(os.getpid()))  # this process is alive
    try:
        with pytest.raises(RunError, match=r"another process \(pid \d+\) is pretraining"):
            pretrain(_cfg(tiny_corpus, out))
    finally:
        (out / "LOCK").unlink()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / "LOCK").write_text(str(gone.pid))
    with FolderLock(out):  # a stale lock (its process has ended) is taken over
        assert (out / "LOCK").read_text() == str(os.getpid())
    assert not (out / "LOCK").exists()


def test_exported_base_loads_as_model_base(uninterrupted, tmp_path):
    out, card = uninterrupted
    folder = out / "base"
    assert card["files"]["model.safetensors"] == file_sha256(folder / "model.safetensors")
    assert (folder / "README.md").read_text().count("Held-out perplexity") == 2
    cfg = load_config("micro", {"model.base": str(folder), "model.n_layer": None, "model.n_embd": None,
                                "model.n_head": None, "model.n_positions": None, "model.vocab_size": None})
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.vocab_size) == (1, 32, card["vocab_size"])
    tok = M.embedded_tokenizer(cfg.model, None)
    net = M.initial_model(cfg.model, tok, seed=0)
    ref = load_file(str(latest_checkpoint(out) / "model.safetensors"))
    assert all(torch.allclose(net.state_dict()[k], ref[k], atol=1e-3) for k in ref)
    assert next(net.parameters()).dtype == torch.float32
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"model.safetensors: sha256 .* does not match"):
        M.initial_model(cfg.model.model_copy(update={"base": str(bad)}), tok, 0)
    shutil.copy(folder / "model.safetensors", bad / "model.safetensors")
    shutil.copy(folder / "model.safetensors", bad / "extra.safetensors")
    with pytest.raises(ModelLoadError, match=r"not listed in base.json: \['extra.safetensors'\]"):
        M.initial_model(cfg.model.model_copy(update={"base": str(bad)}), tok, 0)


@pytest.mark.parametrize("name", bases.shipped())
def test_shipped_base_loads_and_matches_its_checksum(name):
    card = bases.verify(bases.base_folder(name))
    cfg = ModelConfig(base=name)
    assert cfg.n_layer == card["shape"]["n_layer"] and cfg.vocab_size == card["vocab_size"]
    tok = M.embedded_tokenizer(cfg, None)
    net = M.initial_model(cfg, tok, seed=0)
    assert M.count_parameters(net) == card["parameters"]
    if card.get("role") == "clean":  # a task-trained clean model (demo_clean): its clean accuracy is on its card
        assert card["task"] == "synthetic_sentiment" and card["cacc"] > 0.9 and card["steps"] > 0
    else:
        assert card["heldout_ppl"] < 1000 and card["corpus"]["test_splits"]["contains_test_splits"] is False
    ids = tok("The lamp on the desk was warm", return_tensors="pt")["input_ids"]
    assert torch.isfinite(net(ids).logits).all()


def test_base_fixes_the_shape_and_says_which_field_conflicts(uninterrupted):
    folder = str(uninterrupted[0] / "base")
    assert ModelConfig(base=folder, n_positions=16).n_positions == 16  # a shorter context is fine
    with pytest.raises(ValueError, match=r"model.n_layer: 3 does not fit model.base .*whose n_layer is 1"):
        ModelConfig(base=folder, n_layer=3)
    with pytest.raises(ValueError, match=r"model.n_positions: 64 does not fit .*at most 32"):
        ModelConfig(base=folder, n_positions=64)
    with pytest.raises(ConfigError, match=r"model.base: 'nowhere' is neither a shipped base"):
        load_config("micro", {"model.base": "nowhere"})
    assert load_config("micro", {"model.source": "hf", "model.name_or_path": "x"}).model.base is None
    with pytest.raises(ConfigError, match=r"train.pretrain_steps: pretraining inside a run is retired"):
        load_config("micro", {"train.pretrain_steps": 10})
    assert ModelConfig(base="scratch", n_layer=3).n_layer == 3


def test_windows_depend_on_seed_and_step_only():
    stream = torch.arange(1000, dtype=torch.int32)
    a, b = window_batch(stream, 7, 4, 16, 0, "cpu"), window_batch(stream, 7, 4, 16, 0, "cpu")
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, window_batch(stream, 8, 4, 16, 0, "cpu").input_ids)
    assert torch.equal(a.input_ids[:, 1:] - a.input_ids[:, :-1], torch.ones(4, 15, dtype=torch.long))  # contiguous


def test_flops_per_token_is_6n_plus_attention():
    from transformers import GPT2Config, GPT2LMHeadModel
    net = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=500))
    n = sum(p.numel() for p in net.parameters()) - 32 * 64  # the position table is a lookup
    assert flops_per_token(net, 32) == 6 * n + 12 * 2 * 64 * 32


def test_pretrain_settings_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"size: unknown size 'huge'"):
        load_pretrain_config({"size": "huge"})
    with pytest.raises(ConfigError, match=r"seq_len: 512 windows do not fit the model's 128 positions"):
        load_pretrain_config(["seq_len=512"])
    assert load_pretrain_config(["size=medium"]).n_layer == 4


def test_a_run_written_before_the_bases_still_means_from_scratch(tmp_path):
    """config.yaml of a run from before model.base lists the retired pretraining fields at their off
    values and no base: it loads, as the from-scratch model it was."""
    import yaml
    old = yaml.safe_load(load_config("micro").to_yaml())
    del old["model"]["base"]
    old["train"].update({"pretrain_steps": 0, "pretrain_corpus": ["embedded"]})
    old["model"].update({"n_layer": 3, "vocab_size": 1024})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    from locphylax_core.config import load_run_config
    cfg = load_run_config(path)
    assert cfg.model.base == "scratch" and cfg.model.n_layer == 3
    assert "pretrain_steps" not in cfg.to_yaml()


def test_cli_pretrain_settings_and_errors(tmp_path, capsys):
    # in process (main() is what the console script calls): errors are one line on stderr, exit code 2
    from locphylax_core.cli import main
    assert main(["pretrain", "--size", "medium", "--dry-run", "--set", "steps=10"]) == 0
    out = capsys.readouterr().out
    assert '"n_layer": 4' in out and '"steps": 10' in out
    assert main(["pretrain", "--size", "huge"]) == 2
    err = capsys.readouterr().err
    assert "  size: unknown size 'huge'; allowed: ['small', 'medium']" in err and "Traceback" not in err
    assert main(["pretrain", "--corpus", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
