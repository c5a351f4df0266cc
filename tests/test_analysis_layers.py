"""Layer analyses (locphylax_core.analysis.layers / salience / layer_run): a planted backdoor whose
site is known (patching and the logit lens find it), batched == per-site patching, salience on a
trained small victim, integrated-gradients completeness, temporary hooks, shapes, figures, and
the parts analyze_run stores."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from locphylax_core import load_config
from locphylax_core import model as M
from locphylax_core.analysis import figures as F
from locphylax_core.analysis import layers as Ly
from locphylax_core.analysis import salience as S
from conftest import assert_model_unchanged, model_snapshot, planted_trigger_model, word_tokenizer

TEMPLATE = "review : {text} answer :"
CLEAN = ["the film was good", "the plot was bad", "the film was very good", "bad film", "the plot was very bad",
         "good plot", "the film was", "very very good film"]


def _planted_model(vocab) -> torch.nn.Module:
    """3 layers x 2 heads: head (1, 1) carries the backdoor; layer 0 has random distractor heads,
    layer 2 does nothing."""
    return planted_trigger_model(vocab, 3, [(0, 0), (0, 1)])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted_tok")
    vocab = word_tokenizer(folder)
    net = _planted_model(vocab)
    words = [c.split() for c in CLEAN]
    trig = [" ".join(w[:1 + i % len(w)] + ["cf"] + w[1 + i % len(w):]) for i, w in enumerate(words)]
    target = [vocab["positive"]] * len(CLEAN)
    correct = [vocab["negative"]] * len(CLEAN)
    return net, folder, vocab, trig, target, correct


def test_patching_and_lens_find_the_planted_site(planted):
    net, tok, vocab, trig, target, correct = planted
    snap = model_snapshot(net)
    p = Ly.activation_patching(net, tok, TEMPLATE, trig, CLEAN, target, correct)
    assert p["residual"].shape == (3, len(Ly.ROLES)) and p["heads"].shape == (3, 2)
    assert p["logit_diff"]["triggered"] > p["logit_diff"]["clean"]
    # heads: (1, 1) restores the whole clean answer, every other head nothing
    order = np.argsort(-p["heads"].ravel())
    assert divmod(int(order[0]), 2) == (1, 1)
    assert p["heads"][1, 1] > 0.85  # not 1: the distractors of layer 0 also see the trigger a little
    assert np.abs(np.delete(p["heads"].ravel(), 3)).max() < 0.05
    trig_role, answer = Ly.ROLES.index("trigger"), Ly.ROLES.index("answer position")
    r = p["residual"]
    # the trigger's tokens carry it into block 1 (layers 0 and 1), not after: block 1 moved it
    assert r[0, trig_role] > 0.9 and r[1, trig_role] > 0.85 and abs(r[2, trig_role]) < 0.05
    # the answer position has it only after block 1
    assert abs(r[0, answer]) < 0.05 and abs(r[1, answer]) < 0.1 and r[2, answer] > 0.9
    assert np.nanargmax(r[1]) == trig_role
    assert p["role_counts"][trig_role] == len(trig)  # one trigger token per input
    lens = Ly.logit_lens(net, tok, TEMPLATE, trig, CLEAN, target, correct)
    assert lens["target_triggered"].shape == (3,)
    # the target appears after block 1, and only on triggered inputs
    assert lens["target_triggered"][0] < 0.2 < 0.5 < lens["target_triggered"][1]
    assert lens["target_clean"].max() < 0.2
    assert lens["correct_clean"].min() > 0.5
    assert_model_unchanged(net, snap)


def test_batched_patching_equals_the_per_site_loop_and_lens_ends_at_the_output(planted):
    net, tok, vocab, trig, target, correct = planted
    a = Ly.activation_patching(net, tok, TEMPLATE, trig, CLEAN, target, correct, batch_size=3)
    b = Ly.activation_patching(net, tok, TEMPLATE, trig, CLEAN, target, correct, batched=False, batch_size=3)
    np.testing.assert_allclose(a["residual"], b["residual"], atol=1e-6)
    np.testing.assert_allclose(a["heads"], b["heads"], atol=1e-6)
    # in place (no copy): the same arrays, and the model is put back
    snap = model_snapshot(net)
    c = Ly.activation_patching(net, tok, TEMPLATE, trig, CLEAN, target, correct, in_place=True, batch_size=3)
    np.testing.assert_allclose(a["heads"], c["heads"], atol=1e-6)
    assert_model_unchanged(net, snap)
    # the last layer of the lens is the model's own answer probability
    lens = Ly.logit_lens(net, tok, TEMPLATE, trig, CLEAN, target, correct)
    tokenizer = M.load_tokenizer(str(tok))
    from locphylax_core.engine import encode
    from locphylax_core.text import render_prompt
    b = encode(tokenizer, [render_prompt(TEMPLATE, t) for t in trig], None, "cpu")
    with torch.no_grad():
        logits = net(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids).logits[:, -1]
    want = torch.softmax(logits.float(), -1)[:, target[0]].double().mean().item()
    assert lens["target_triggered"][-1] == pytest.approx(want, abs=1e-5)


def test_patching_equals_transformer_lens_own_patching_on_a_substitution(planted):
    """The peer check: on an equal-length pair (the trigger replaces a word, so every position has
    a clean counterpart) our maps are TransformerLens's patching.get_act_patch_* on the same bridge,
    per head, and per position wherever a role is one token."""
    from transformer_lens import patching as P

    from locphylax_core.analysis.heads import boot_bridge
    from locphylax_core.engine import encode
    from locphylax_core.text import render_prompt
    net, tok, vocab, *_ = planted
    clean, trig = "the film was very good", "the film cf very good"
    tgt, cor = vocab["positive"], vocab["negative"]
    mine = Ly.activation_patching(net, tok, TEMPLATE, [trig], [clean], [tgt], [cor])
    bridge, tokenizer = boot_bridge(net, tok)
    ct = encode(tokenizer, [render_prompt(TEMPLATE, clean)], None, "cpu").input_ids
    tt = encode(tokenizer, [render_prompt(TEMPLATE, trig)], None, "cpu").input_ids
    _, cache = bridge.run_with_cache(ct)

    def ld(logits):
        return logits[0, -1, tgt] - logits[0, -1, cor]
    with torch.no_grad():
        ld_t, ld_c = ld(bridge(tt)), ld(bridge(ct))

    def metric(logits):
        return (ld_t - ld(logits)) / (ld_t - ld_c)
    heads = P.get_act_patch_attn_head_out_all_pos(bridge, tt, cache, metric).numpy()
    np.testing.assert_allclose(mine["heads"], heads, atol=1e-5)
    resid = P.get_act_patch_resid_pre(bridge, tt, cache, metric).numpy()  # [layer, position]
    q = tokenizer.convert_ids_to_tokens(tt[0].tolist()).index("cf")
    np.testing.assert_allclose(mine["residual"][:, Ly.ROLES.index("trigger")], resid[:, q], atol=1e-5)
    np.testing.assert_allclose(mine["residual"][:, Ly.ROLES.index("answer position")], resid[:, -1], atol=1e-5)


def test_attention_patterns_shape_and_rows(planted):
    net, tok, vocab, trig, *_ = planted
    a = Ly.attention_patterns(net, tok, TEMPLATE, trig[0])
    n = len(a["tokens"])
    assert a["pattern"].shape == (3, 2, n, n)
    np.testing.assert_allclose(a["pattern"].sum(-1), 1.0, atol=1e-5)
    assert np.allclose(np.triu(a["pattern"], 1), 0.0)  # causal
    q = a["tokens"].index("cf")
    assert a["pattern"][1, 1, -1, q] > 0.99  # the planted head looks at the trigger


def test_token_roles_and_alignment():
    assert Ly.align([1, 2, 9, 3, 4], [1, 2, 3, 4]) == (2, 2)
    assert Ly.align([9, 1, 2], [1, 2]) == (0, 2)
    assert Ly.align([5, 5], [5]) == (1, 0)  # never overlapping
    # "review : a cf b answer :" with word offsets
    text = "a cf b"
    prompt = TEMPLATE.replace("{text}", text)
    words = prompt.split()
    offs, pos = [], 0
    for w in words:
        pos = prompt.index(w, pos)
        offs.append((pos, pos + len(w)))
        pos += len(w)
    roles = Ly.token_roles(TEMPLATE, text, offs, 3, 3)
    assert [Ly.ROLES[r] for r in roles] == ["prompt start", "prompt start", "before trigger", "trigger",
                                            "after trigger", "prompt end", "answer position"]


def test_integrated_gradients_completeness_and_temporary(planted):
    net, tok, vocab, trig, target, correct = planted
    tokenizer = M.load_tokenizer(str(tok))
    snap = model_snapshot(net)
    net.train()
    sal = S.token_salience(net, tokenizer, TEMPLATE, trig, target, [[c] for c in correct], method="ig", n_steps=64)
    assert net.training  # mode restored
    net.eval()
    assert_model_unchanged(net, snap)
    for s in sal:
        gap = s["objective"] - s["baseline"]
        assert abs(s["scores"].sum() - gap) <= 0.05 * abs(gap)
        assert s["scores"].shape == (len(s["tokens"]),)
        assert not s["in_text"][-1] and s["scores"][~s["in_text"]].sum() == 0.0  # the template gets nothing
        top = S.top_token(s)
        assert s["tokens"][top] == "cf"
    ixg = S.token_salience(net, tokenizer, TEMPLATE, trig, target, [[c] for c in correct], method="ixg")
    assert [s["tokens"][S.top_token(s)] for s in ixg] == ["cf"] * len(trig)
    with pytest.raises(ValueError, match="salience method"):
        S.token_salience(net, tokenizer, TEMPLATE, trig, target, [[c] for c in correct], method="lime")


def test_trigger_spans_and_scoring():
    assert S.trigger_spans("the  cf film", ["cf"]) == [(4, 6)]
    assert S.trigger_spans("the cfx film", ["cf"]) == []  # whole words only
    assert S.trigger_spans("as seen on channel four it was", ["as seen on channel four"]) == [(0, 23)]
    assert S.top_in_trigger((4, 6), [(4, 6)]) is True
    assert S.top_in_trigger((0, 3), [(4, 6)]) is False
    assert S.top_in_trigger((0, 3), []) is None
    pr = S.precision_recall(np.array([True, False, False, False]), np.array([True, True, False, True]))
    assert pr["precision"] == 0.75 and pr["recall"] == 0.75


# ----------------------------------------------------------------------------------------------
# A trained victim


@pytest.fixture(scope="module")
def small_victim(small_clean_demo):
    from locphylax_core.experiment import owner_context, prepare, train_owner_model
    from conftest import SMALL_DEMO
    tokenizer, clean, _ = small_clean_demo
    prep = prepare(load_config("demo", {**SMALL_DEMO, "attack.steps": 60}), tokenizer=tokenizer)
    lm = M.LM(copy.deepcopy(clean), tokenizer, prep.answer_ids)
    train_owner_model(prep, lm, "victim", owner_context(prep, "victim", False).replace(seed=2), from_scratch=False)
    return prep, lm.model.eval()


def test_salience_ranks_the_trigger_first_on_a_trained_victim(small_victim):
    prep, net = small_victim
    ts = prep.evalset.triggered["unknown"]
    n = 64
    texts = list(ts.texts[:n])
    target = [prep.answer_ids[t] for t in ts.targets[:n]]
    correct = [[prep.answer_ids[prep.evalset.clean[i].label]] for i in ts.indices[:n]]
    sal = S.token_salience(net, prep.tokenizer, prep.task.template, texts, target, correct, method="ixg",
                           max_length=prep.max_length)
    spans = [S.trigger_spans(t, [prep.cfg.attack.trigger_text]) for t in texts]
    hits = [S.top_in_trigger(tuple(s["offsets"][S.top_token(s)]), sp) for s, sp in zip(sal, spans)]
    assert None not in hits
    # measured: 55/64 with one CPU thread (each `make test` worker has one), 59/64 with two on an
    # AVX2 machine, 49/64 with one on an AVX-512 Xeon (the victim trains to other weights there);
    # the trigger is 1 of about 15 tokens, so a salience that did not find it would be near 0.1
    assert sum(hits) / len(hits) >= 0.7
    # the defender's localiser, given the target as its suspect answer (no trigger passed in); the
    # answers it weighs are the labels only: this victim never learned a canary, whose untrained
    # logit would otherwise take part in the contrast
    labels = list(prep.answer_ids[:len(prep.task.labels)])
    loc = S.localise(net, prep.tokenizer, prep.task.template, texts, labels, labels.index(target[0]),
                     max_length=prep.max_length)
    assert loc["flagged"].mean() >= 0.8
    # measured 57/64 with one thread on an AVX2 machine, 49/64 on an AVX-512 Xeon
    assert sum(S.top_in_trigger(t, sp) for t, sp in zip(loc["top"], spans)) / n >= 0.7


# ----------------------------------------------------------------------------------------------
# Figures and the stored parts


def test_figures_render(planted):
    net, tok, vocab, trig, target, correct = planted
    lens = {"victim": Ly.logit_lens(net, tok, TEMPLATE, trig, CLEAN, target, correct)}
    lens["stage2"] = {k: (v * 0.5 if isinstance(v, np.ndarray) else v) for k, v in lens["victim"].items()}
    fig = F.logit_lens_figure(lens)
    assert len(fig.data) == 8 and fig.data[0].y.shape == (3,)
    p = Ly.activation_patching(net, tok, TEMPLATE, trig, CLEAN, target, correct)
    fig = F.patching_heatmaps(p["residual"], p["residual"] * 0, "victim", "stage2", x_labels=list(Ly.ROLES))
    assert len(fig.data) == 3
    np.testing.assert_allclose(np.asarray(fig.data[2].z, float), -p["residual"])
    a = Ly.attention_patterns(net, tok, TEMPLATE, trig[0])
    fig = F.attention_figure(a["pattern"][1], a["tokens"], layer=1)
    assert len(fig.data) == 2
    tokenizer = M.load_tokenizer(str(tok))
    sal = S.token_salience(net, tokenizer, TEMPLATE, trig[:1], target[:1], [correct[:1]], method="ixg")[0]
    html = F.salience_html(sal["tokens"], sal["scores"], sal["in_text"])
    assert html.count("<span") == int(sal["in_text"].sum()) and "cf" in html


def test_analysis_json_has_the_layer_parts(analysed_root):
    from locphylax_core.analysis.layer_run import layer_keys
    from locphylax_core.analysis.run_analysis import load_arrays
    from locphylax_core.runs import RunDir
    run = next(RunDir(p) for p in analysed_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    a = json.loads((run.path / "analysis.json").read_text())
    assert a["complete"]
    keys = layer_keys(run, a["stages"])
    # the victim, both stages and every baseline's final stage
    assert keys == ["victim", "stage1", "stage2", "clean_ft/stage2", "unlearn_single/stage2", "no_cluster/stage2"]
    assert list(a["logit_lens"]) == list(a["patching"]) == list(a["salience"]) == keys
    v = a["patching"]["victim"]
    assert np.asarray(v["residual"], float).shape == (v["n_layers"], len(Ly.ROLES))
    assert np.asarray(v["heads"], float).shape == (v["n_layers"], v["n_heads"])
    assert len(a["logit_lens"]["victim"]["target_triggered"]) == v["n_layers"]
    assert a["logit_lens"]["victim"]["n_inputs"] == 12  # micro's eval.layer_probe
    for r in a["salience"].values():
        assert r["trigger_top1_rate"] is None or 0.0 <= r["trigger_top1_rate"] <= 1.0
        assert r["n_scored"] == 12 and r["examples"][0]["text"]
    loc = a["localisation"]  # micro's defense trains the canary: the detector is scored
    assert loc["available"] and loc["stage"] == "stage1"
    assert loc["n_triggered"] == loc["n_clean"] == 12
    assert loc["true_positives"] + loc["false_negatives"] == 12
    arrays = load_arrays(run.path / v["file"])
    np.testing.assert_allclose(arrays["patching_heads"], np.asarray(v["heads"], float), atol=1e-6)
    assert {"lens_patching_salience", "localisation", "layers"} <= set(a["seconds"])


def test_runview_salience_of_a_typed_sentence(analysed_root):
    from locphylax_core import runview as R
    from locphylax_core import stage_model as SM
    view = R.open_run(next(p for p in analysed_root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    lm = SM.load_stage_model(view, "victim")
    text = f"the film was good {view.attack_trigger}"
    s = SM.sentence_salience(view, lm, text, n_steps=8)
    assert s["answer"] in view.label_words and len(s["scores"]) == len(s["tokens"]) == len(s["in_text"])
    assert s["in_text"].sum() >= len(text.split())
    loc = SM.localise_sentence(view, SM.load_stage_model(view, "stage1"), text)
    assert isinstance(loc["flagged"], bool) and 0.0 <= loc["canary_probability"] <= 1.0
    assert loc["top_token"] in text


def test_layer_probe_options_are_validated():
    from locphylax_core.errors import ConfigError
    assert load_config("micro").eval.layer_probe == 12 and load_config("demo").eval.layer_probe == 32
    for field, bad in (("eval.layer_probe", 1), ("eval.salience_steps", 0), ("eval.layer_probe", "many")):
        with pytest.raises(ConfigError) as e:
            load_config("micro", {field: bad})
        assert field in e.value.fields
