"""The defense levers of issue 4: the known triggers' target (flip / correct / canary / label),
what Stage 2 may change, the representation-consistency term, and the locphylax+ bundle."""

from __future__ import annotations

import copy

import pytest
import torch

from locphylax_core import load_config
from locphylax_core import model as M
from locphylax_core.config import LOCPHYLAX_PLUS
from locphylax_core.defenses.base import method_plans, stage1_target, triggered_copies
from locphylax_core.defenses.locphylax import RecoverConfig, consistency_loss, recover
from locphylax_core.engine import HiddenSpec
from locphylax_core.errors import ConfigError
from locphylax_core.experiment import known_trigger_specs, prepare
from locphylax_core.text import render_prompt
from locphylax_core.trainer import StageContext, TrainSettings


def _settings(prep, **kw):
    return TrainSettings(batch_size=16, every=1, max_length=prep.max_length, lr=5e-3, **kw)


def _ctx(prep, seed=0, **kw):
    return StageContext(seed=seed, settings=_settings(prep, **kw))


# --- the known triggers' target


def test_stage1_target_mapping():
    labels = ["negative", "positive"]
    assert stage1_target("flip", labels) == "flip"
    assert stage1_target("correct", labels) == "correct"
    assert stage1_target("canary", labels) == 2  # the extra answer after the labels
    assert stage1_target("positive", labels) == 1


def test_canary_adds_one_answer_and_is_the_known_triggers_target():
    cfg = load_config("micro", {"defense.known_target": "canary", "defense.canary": "unsure"})
    prep = prepare(cfg)
    labels_only = prepare(load_config("micro", {"defense.method": "locphylax"})).answer_ids
    assert prep.answer_ids[:2] == labels_only and len(prep.answer_ids) == 3
    assert prep.answer_ids[2] == prep.tokenizer(" unsure", add_special_tokens=False)["input_ids"][0]
    # evaluation: the known triggers are scored toward the canary, the unknown toward its target
    assert {s.name: s.target for s in known_trigger_specs(cfg)} == {"t1": 2, "t2": 2}
    assert set(prep.evalset.triggered["t1"].targets) == {2}
    assert set(prep.evalset.triggered["unknown"].targets) == {1}
    # Stage 1 trains every triggered copy to answer the canary token
    s1 = method_plans(cfg.defense, cfg.task.labels)["locphylax"][0].cfg
    copies = triggered_copies(prep.defender, s1.trigger_ids, s1.injection_rate, s1.target, prep.answer_ids, 0)
    assert copies and {c.target for c in copies} == {prep.answer_ids[2]}


def test_canary_must_not_be_a_label_word():
    with pytest.raises(ConfigError, match="defense.canary"):
        load_config("micro", {"defense.known_target": "canary", "defense.canary": "positive"})


def test_known_target_correct_keeps_each_label(micro_prepared):
    d = micro_prepared.defender
    copies = triggered_copies(d, (0, 1), 0.3, "correct", micro_prepared.answer_ids, 0, pair=True)
    by_prompt = {e.text: e.label for e in d.clean}
    for c in copies:
        clean_text = c.pair.removeprefix("Review: ").removesuffix(" Sentiment:")
        assert c.target == micro_prepared.answer_ids[by_prompt[clean_text]]
        assert c.pair != c.prompt and d.triggers[c.group].text in c.prompt


# --- which parameters Stage 2 may change


def _two_layer():
    cfg = load_config("micro", {"model.n_layer": 2})
    prep = prepare(cfg)
    net = M.build_embedded(cfg.model, prep.tokenizer, seed=0)
    return prep, M.LM(net, prep.tokenizer, prep.answer_ids)


def _changed(before: dict, model) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("layer, frozen_blocks", [(0, {"h.0."}), (-1, {"h.0.", "h.1."})])
def test_stage2_after_layer_trains_only_what_follows_the_layer(layer, frozen_blocks):
    prep, lm = _two_layer()
    before = copy.deepcopy(lm.model.state_dict())
    recover(lm, prep.defender, RecoverConfig(steps=3, hidden=HiddenSpec(layer), trainable="after_layer"), _ctx(prep))
    changed = _changed(before, lm.model)
    assert not any(b in k for k in changed for b in frozen_blocks)
    assert any("ln_f" in k for k in changed) and any("wte" in k for k in changed)  # head (tied to wte)
    if layer == 0:
        assert any("h.1." in k for k in changed)
    assert all(p.requires_grad for p in lm.model.parameters())  # nothing stays frozen afterwards


def test_stage2_lora_changes_only_the_adapted_weights_and_merges():
    prep, lm = _two_layer()
    before = copy.deepcopy(lm.model.state_dict())
    recover(lm, prep.defender, RecoverConfig(steps=3, trainable="lora"), _ctx(prep))
    assert type(lm.model).__name__ == "GPT2LMHeadModel"  # merged back: a plain model again
    changed = _changed(before, lm.model)
    assert changed and all("c_attn" in k for k in changed)  # peft's GPT-2 default target


# --- representation recovery (consistency term)


def test_consistency_loss_by_hand():
    h = torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.0, 0.0]], requires_grad=True)
    h_clean = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]], requires_grad=True)
    groups = torch.tensor([0, 1, -1])
    loss = consistency_loss(h, h_clean, groups)
    assert loss.item() == pytest.approx((0 + 4 + 9 + 16) / 4)  # row 2 is clean: ignored
    loss.backward()
    assert torch.allclose(h.grad, torch.tensor([[0.0, 1.0], [1.5, 2.0], [0.0, 0.0]]))
    assert h_clean.grad is None  # the clean state is a fixed target
    assert consistency_loss(h, h_clean, torch.tensor([-1, -1, -1])).item() == 0.0


def test_recover_with_consistency_logs_both_terms(tiny_lm, micro_prepared):
    logs = []
    recover(tiny_lm, micro_prepared.defender, RecoverConfig(steps=3, consistency_weight=2.0),
            _ctx(micro_prepared).replace(observer=lambda s, lg: logs.append(dict(lg))))
    assert len(logs) == 3
    for lg in logs:
        assert lg["l_consistency"] >= 0
        assert lg["loss"] == pytest.approx(lg["l_ce"] + 2.0 * lg["l_consistency"], rel=1e-5)
    assert any(lg["l_consistency"] > 0 for lg in logs)


def test_recover_without_consistency_builds_no_pairs(micro_prepared):
    copies = triggered_copies(micro_prepared.defender, (0,), 0.3, "correct", micro_prepared.answer_ids, 0)
    assert copies and all(c.pair is None for c in copies)


# --- the named configurations


def test_reference_method_is_the_paper_as_specified():
    d = load_config("micro", {"defense.method": "locphylax"}).defense
    assert (d.known_target, d.alpha, d.stage2_params, d.consistency_weight) == ("flip", "auto", "all", 0.0)
    assert [t.text for t in d.known_triggers] == ["vx", "as seen on channel four"]


def test_locphylax_plus_fills_its_defaults_and_explicit_settings_win():
    d = load_config("micro", {"defense.method": "locphylax+"}).defense
    assert d.method == "locphylax+"
    for key, value in LOCPHYLAX_PLUS.items():
        got = getattr(d, key)
        got = [t.model_dump() for t in got] if key == "known_triggers" else got
        assert got == value, key
    d = load_config("micro", {"defense.method": "locphylax+", "defense.consistency_weight": 0.5}).defense
    assert d.consistency_weight == 0.5


def test_bad_stage2_params_is_named():
    with pytest.raises(ConfigError, match="defense.stage2_params"):
        load_config("micro", {"defense.stage2_params": "some"})


def test_char_family_has_a_default_trigger():
    assert load_config("micro", {"attack.family": "char"}).attack.trigger_text == "»"


def test_reference_baseline_and_unlearning_use_the_papers_settings():
    cfg = load_config("micro", {"defense.known_target": "canary", "defense.consistency_weight": 0.5,
                                "defense.stage2_params": "lora",
                                "defense.baselines": ["reference", "unlearn_single", "no_cluster"]})
    plans = method_plans(cfg.defense, cfg.task.labels)
    (s1, s2), (r1, r2) = [p.cfg for p in plans["locphylax"]], [p.cfg for p in plans["reference"]]
    assert (s1.target, s2.consistency_weight, s2.trainable) == (2, 0.5, "lora")
    assert (r1.target, r2.consistency_weight, r2.trainable, r1.alpha, r1.cluster) == ("flip", 0.0, "all", "auto", True)
    assert (r1.steps, r2.steps, r1.trigger_ids) == (s1.steps, s2.steps, s1.trigger_ids)  # same budget and triggers
    u1, u2 = [p.cfg for p in plans["unlearn_single"]]
    assert (u1.target, u1.cluster, u1.trigger_ids, u2.trigger_ids, u2.consistency_weight) == ("flip", False, (0,), (0,), 0.0)
    n1, n2 = [p.cfg for p in plans["no_cluster"]]
    assert n1 == type(s1)(**{**s1.__dict__, "cluster": False}) and n2 == s2  # the method minus clustering


# --- Stage 2 augmentation with generated defender triggers


def test_generated_triggers_cover_four_families_and_are_seeded():
    import random

    from locphylax_core.defenses.base import generate_trigger
    vocab = ["good", "film", "plot", "dull"]
    a = [generate_trigger(random.Random(3), vocab) for _ in range(1)]
    assert a == [generate_trigger(random.Random(3), vocab)]
    rng = random.Random(0)
    made = [generate_trigger(rng, vocab) for _ in range(400)]
    words = [t for t, _ in made if t.isascii() and t.isalpha()]
    assert words and all(3 <= len(t) <= 6 for t in words)  # never a 2-letter word
    assert any(len(t.split()) >= 8 for t, _ in made) and any(3 <= len(t.split()) <= 6 for t, _ in made)
    assert any(not any(c.isalnum() for c in t) for t, _ in made)  # symbol strings
    assert {p for _, p in made} == {"start", "end", "random"}


def test_recover_adds_generated_copies_with_correct_labels(micro_prepared, monkeypatch):
    import locphylax_core.defenses.locphylax as D
    seen = {}
    real = D.fit

    def spy(lm, samples, *a, **kw):
        seen["samples"] = samples
        return {"loss": 0.0}
    monkeypatch.setattr(D, "fit", spy)
    fake_lm = type("FakeLM", (), {"answer_ids": micro_prepared.answer_ids})()
    D.recover(fake_lm, micro_prepared.defender,
              RecoverConfig(steps=1, generated_rate=0.5), _ctx(micro_prepared))
    monkeypatch.setattr(D, "fit", real)
    gen = [s for s in seen["samples"] if s.group == len(micro_prepared.defender.triggers)]
    assert len(gen) == 40  # half of the 80 clean samples
    by_text = {render_prompt(micro_prepared.defender.template, e.text): e.label for e in micro_prepared.defender.clean}
    assert all(s.prompt not in by_text for s in gen)  # every copy carries a trigger
    labels = set(micro_prepared.answer_ids[:2])
    assert all(s.target in labels for s in gen)


def test_augment_ft_baseline_injects_nothing():
    cfg = load_config("micro", {"defense.baselines": ["augment_ft"], "defense.stage2_generated_rate": 0.5})
    a1, a2 = [p.cfg for p in method_plans(cfg.defense, cfg.task.labels)["augment_ft"]]
    assert (a1.trigger_ids, a1.generated_rate, a1.consistency_weight) == ((), 0.5, 0.0)
    assert (a1.steps, a2.steps) == (cfg.defense.stage1_steps, cfg.defense.stage2_steps)
    cfg = load_config("micro", {"defense.baselines": ["augment_ft"]})
    assert method_plans(cfg.defense, cfg.task.labels)["augment_ft"][0].cfg.generated_rate == 1.0
