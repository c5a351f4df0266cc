"""CASD: the formulas on hand-checked shifts, layer_means on a real checkpoint, run_casd on the micro run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from locphylax_core import model as M
from locphylax_core.analysis.casd import casd, casd_matrix, layer_means, run_casd, shift
from locphylax_core.analysis.representations import load_probe
from locphylax_core.architectures import decoder_blocks
from locphylax_core.engine import encode
from locphylax_core.errors import RunError
from locphylax_core.text import render_prompt


def test_cosine_by_hand():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 1.0], [2.0, 2.0]])
    # layer 0 orthogonal: 1 - 0 = 1; layer 1 parallel: 1 - 1 = 0; mean 0.5
    assert casd(a, b) == pytest.approx(0.5)
    assert casd([[1.0, 0.0]], [[-3.0, 0.0]]) == pytest.approx(2.0)
    assert casd([[1.0, 1.0]], [[1.0, 0.0]]) == pytest.approx(1 - 1 / np.sqrt(2))
    # zero shifts: both zero -> 0, one zero -> 1
    assert casd([[0.0, 0.0]], [[0.0, 0.0]]) == 0.0
    assert casd([[0.0, 0.0]], [[1.0, 0.0]]) == 1.0


def test_l1_by_hand():
    # |a - b|_1 / ((|a|_1 + |b|_1) / 2) per layer
    assert casd([[2.0, 0.0]], [[1.0, 0.0]], "l1") == pytest.approx(1 / 1.5)
    assert casd([[1.0, 0.0]], [[0.0, 1.0]], "l1") == pytest.approx(2.0)
    assert casd([[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]], "l1") == 0.0
    with pytest.raises(ValueError):
        casd([[1.0]], [[1.0]], "l2")
    with pytest.raises(ValueError):
        casd(np.zeros((2, 3)), np.zeros((3, 3)))


def test_matrix_properties():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 8))
    s = {"a": shift(base, base + rng.normal(size=(3, 8))), "b": shift(base, base + rng.normal(size=(3, 8)))}
    s["a_again"] = s["a"].copy()
    for metric in ("cosine", "l1"):
        labels, D = casd_matrix(s, metric)
        assert labels == ["a", "b", "a_again"]
        np.testing.assert_array_equal(D, D.T)
        np.testing.assert_array_equal(np.diag(D), 0.0)
        assert D[0, 2] == pytest.approx(0.0, abs=1e-12)  # the same training: zero
        assert D[0, 1] > 0.1 and casd(s["a"], s["b"], metric) == casd(s["b"], s["a"], metric)
        assert (D >= 0).all() and (D <= 2 + 1e-12).all()


def test_layer_means_leaves_the_model_unchanged(micro_run):
    run = micro_run.run
    model = M.load_checkpoint(run.checkpoint("victim"))
    tok = M.load_tokenizer(str(run.path / "tokenizer"))
    template = micro_run.cfg.task.template
    texts = [r["text"] for r in load_probe(run)]
    b = encode(tok, [render_prompt(template, t) for t in texts], 64, "cpu")
    with torch.no_grad():
        before = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    model.train()
    means = layer_means(model, tok, template, texts, batch_size=128, max_length=64)
    assert model.training  # mode restored
    blocks = decoder_blocks(model)
    assert means.shape == (len(blocks), micro_run.cfg.model.n_embd) and np.isfinite(means).all()
    assert all(len(blk._forward_hooks) == 0 for blk in blocks)
    model.eval()
    with torch.no_grad():
        after = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    # padding does not leak in: the means do not depend on how prompts are batched
    np.testing.assert_allclose(layer_means(model, tok, template, texts, batch_size=3, max_length=64), means, atol=1e-6)


def test_run_casd(micro_run):
    run = micro_run.run
    out = run_casd(run)
    # registry order (registry.DEFENSES: locphylax, then unlearn_single, no_cluster, ..., clean_ft, ...)
    assert out["labels"] == ["stage1", "stage2", "unlearn_single", "no_cluster", "clean_ft"]
    D = out["matrix"]
    assert D.shape == (5, 5) and out["metric"] == "cosine"
    np.testing.assert_array_equal(D, D.T)
    np.testing.assert_array_equal(np.diag(D), 0.0)
    assert np.isfinite(D).all() and (D[~np.eye(5, dtype=bool)] > 0).all()
    assert set(out["shifts_norm"]) == set(out["labels"]) and all(v > 0 for v in out["shifts_norm"].values())
    same = run_casd(run, {"a": "stage2", "b": "stage2"}, metric="l1")
    np.testing.assert_array_equal(same["matrix"], np.zeros((2, 2)))
    with pytest.raises(RunError):
        run_casd(run, {"x": "no_such_stage"})
