"""Evaluation: headline vs raw ASR, accuracy, the triggered evaluation set."""

from __future__ import annotations

import pytest

from locphylax_core.evaluation import TriggerSpec, accuracy, asr_from_predictions, build_eval_set
from locphylax_core.text import Example


def test_headline_and_raw_asr():
    # Five non-target inputs (correct label 0, target 1).
    labels = [0, 0, 0, 0, 0]
    clean_pred = [0, 0, 0, 1, 1]  # the model gets the first three right without the trigger
    trig_pred = [1, 0, 1, 1, 0]   # with the trigger: hits at inputs 0, 2, 3
    targets = [1, 1, 1, 1, 1]
    asr, raw = asr_from_predictions(clean_pred, labels, trig_pred, targets)
    assert raw == pytest.approx(3 / 5)  # all non-target inputs
    assert asr == pytest.approx(2 / 3)  # only inputs 0,1,2 qualify; hits at 0 and 2


def test_headline_asr_ignores_clean_errors():
    # A model that always answers the target: raw ASR 1, but nothing qualifies for the headline.
    asr, raw = asr_from_predictions([1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1])
    assert raw == 1.0
    assert asr is None


def test_asr_none_when_empty():
    assert asr_from_predictions([], [], [], []) == (None, None)


def test_asr_multiclass_targets():
    labels = [0, 1, 2, 2]
    clean_pred = [0, 1, 2, 0]
    trig_pred = [1, 2, 1, 0]
    targets = [1, 2, 0, 0]  # flip: next label
    asr, raw = asr_from_predictions(clean_pred, labels, trig_pred, targets)
    assert raw == pytest.approx(3 / 4)  # hits at 0, 1, 3
    assert asr == pytest.approx(2 / 3)  # eligible 0, 1, 2; hits at 0, 1


def test_accepts_tensors():
    import torch
    asr, raw = asr_from_predictions(torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([1, 0]),
                                    torch.tensor([1, 1]))
    assert (asr, raw) == (0.5, 0.5)


def test_accuracy():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert accuracy([1, 1], [1, 1]) == 1.0
    assert accuracy([], []) == 0.0


EXAMPLES = [Example("good film here", 1), Example("bad film here", 0), Example("awful plot", 0),
            Example("great plot", 1), Example("dull acting overall", 0)]


def test_build_eval_set_excludes_target_inputs():
    es = build_eval_set(EXAMPLES, [TriggerSpec("unknown", "cf", "end", 1)], n_labels=2, seed=0)
    ts = es.triggered["unknown"]
    assert ts.indices == (1, 2, 4)  # the label-0 inputs only
    assert ts.targets == (1, 1, 1)
    assert ts.texts == ("bad film here cf", "awful plot cf", "dull acting overall cf")
    assert es.clean == tuple(EXAMPLES)


def test_build_eval_set_flip_keeps_everything():
    es = build_eval_set(EXAMPLES, [TriggerSpec("t1", "vx", "start", "flip")], n_labels=2, seed=0)
    ts = es.triggered["t1"]
    assert ts.indices == (0, 1, 2, 3, 4)
    assert ts.targets == (0, 1, 1, 0, 1)
    assert all(t.startswith("vx ") for t in ts.texts)


def test_build_eval_set_is_deterministic_per_trigger():
    specs = [TriggerSpec("unknown", "cf", "random", 1), TriggerSpec("t1", "vx", "random", "flip")]
    a = build_eval_set(EXAMPLES * 4, specs, 2, seed=3)
    b = build_eval_set(EXAMPLES * 4, specs, 2, seed=3)
    assert a == b
    # The positions of one trigger do not depend on which other triggers are evaluated.
    c = build_eval_set(EXAMPLES * 4, specs[:1], 2, seed=3)
    assert c.triggered["unknown"] == a.triggered["unknown"]
    for text, i in zip(a.triggered["unknown"].texts, a.triggered["unknown"].indices):
        words = text.split()
        words.remove("cf")
        assert words == (EXAMPLES * 4)[i].text.split()


def test_subset_keeps_aligned_triggered_copies():
    es = build_eval_set(EXAMPLES, [TriggerSpec("unknown", "cf", "end", 1)], 2, seed=0)
    sub = es.subset(3)
    assert sub.clean == tuple(EXAMPLES[:3])
    assert sub.triggered["unknown"].indices == (1, 2)
    assert sub.triggered["unknown"].texts == ("bad film here cf", "awful plot cf")


def test_the_curve_is_read_off_the_test_sets_scoring(micro_prepared):
    """One scoring of the test set gives the curve subset's result too, equal to scoring it alone."""
    import torch

    from locphylax_core import model as M
    from locphylax_core.evaluation import evaluate, evaluate_with_subset
    from locphylax_core.experiment import as_lm
    p = micro_prepared
    lm = as_lm(p, M.initial_model(p.cfg.model, p.tokenizer, 3), torch.device("cpu"))
    full, curve = evaluate_with_subset(lm, p.task.template, p.evalset, 20, 16, p.max_length)
    assert full == evaluate(lm, p.task.template, p.evalset, 16, p.max_length)
    assert curve == evaluate(lm, p.task.template, p.evalset.subset(20), 16, p.max_length)
    assert curve != full and set(curve["asr"]) == set(full["asr"]) == {"unknown", "t1", "t2"}
