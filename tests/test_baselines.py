"""The baselines of issue 6: P2P-style benign injection, fine-pruning and CROW; each a config plus
a function of the defense's shape, reachable through `defense.baselines`."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import cli_in_process
from locphylax_core import ConfigError, load_config
from locphylax_core.defenses.base import DefenderData, clean_samples, method_plans
from locphylax_core.defenses.crow import CrowConfig, crow, layer_consistency
from locphylax_core.defenses.fine_pruning import FinePruneConfig, fine_prune, mlp_unit_activity
from locphylax_core.defenses.locphylax import RecoverConfig, recover
from locphylax_core.trainer import StageContext, TrainSettings
from locphylax_core.defenses import bdvax as BV, crow as CR, fine_pruning as FP, onion as ON
from locphylax_core.engine import encode
from locphylax_core.text import Example


def _settings(prep):
    return TrainSettings(lr=1e-2, batch_size=16, max_length=prep.max_length, every=0)


def _ctx(prep, seed):
    return StageContext(seed=seed, settings=_settings(prep))


def test_plans_for_the_new_baselines():
    d = load_config("demo", {"defense.baselines": ["p2p", "fine_pruning", "crow"]}).defense
    plans = method_plans(d, ("negative", "positive"))
    p2p = plans["p2p"]
    assert [p.fn for p in p2p] == [recover, recover]
    assert [p.cfg.steps for p in p2p] == [d.stage1_steps, d.stage2_steps]
    assert all(isinstance(p.cfg, RecoverConfig) and p.cfg.trigger_ids == (0, 1) and p.cfg.consistency_weight == 0
               for p in p2p)
    fp = plans["fine_pruning"]
    assert [(p.fn, p.cfg.prune_rate) for p in fp] == [(fine_prune, d.options["fine_pruning"]["prune_rate"]),
                                                      (fine_prune, 0.0)]
    cr = plans["crow"]
    assert [p.fn for p in cr] == [crow, crow] and cr[0].cfg == CrowConfig(d.stage1_steps, 5.5, 0.1, "peer")


def test_dry_run_validates_the_new_baselines_and_rejects_bad_values(capsys):
    rc, out = cli_in_process(capsys, "run", "demo", "--set", "defense.baselines=[p2p, fine_pruning, crow]", "--dry-run")
    assert rc == 0, out
    assert "fine_pruning/stage1" in out and "crow/stage2" in out and "p2p/stage1" in out
    for over, field in [({"defense.baselines": ["fine_pruning"], "defense.options": {"fine_pruning": {"prune_rate": 1.0}}},
                         "defense.options.fine_pruning.prune_rate"),
                        ({"defense.baselines": ["crow"], "defense.crow_weight": -1}, "defense.options.crow.weight"),
                        ({"defense.baselines": ["onion?"]}, "defense.baselines.0")]:
        with pytest.raises(ConfigError) as e:
            load_config("micro", over)
        assert field in e.value.fields


def test_fine_pruning_prunes_the_least_active_units_and_keeps_them_pruned(micro_prepared, tiny_lm):
    prep, lm = micro_prepared, tiny_lm
    mlp = lm.model.transformer.h[-1].mlp
    n_units = mlp.c_fc.weight.shape[1]
    activity = mlp_unit_activity(lm, prep.defender, -1, max_length=prep.max_length)
    assert activity.shape == (n_units,)
    expected = set(torch.argsort(activity)[: round(0.25 * n_units)].tolist())
    logs = fine_prune(lm, prep.defender, FinePruneConfig(steps=4, prune_rate=0.25), _ctx(prep, 0))
    zero = set(((mlp.c_fc.weight == 0).all(0) & (mlp.c_fc.bias == 0)).nonzero().flatten().tolist())
    assert logs["pruned"] == len(expected) and zero == expected  # pruned, and fine-tuning left them at 0
    assert all((mlp.c_proj.weight[u] == 0).all() for u in expected)
    before = copy.deepcopy(lm.model.state_dict())
    logs = fine_prune(lm, prep.defender, FinePruneConfig(steps=4, prune_rate=0.0), _ctx(prep, 1))
    zero_after = set(((mlp.c_fc.weight == 0).all(0) & (mlp.c_fc.bias == 0)).nonzero().flatten().tolist())
    assert zero_after == expected and logs["pruned"] == len(expected)  # Stage 2 keeps Stage 1's pruning
    changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("c_fc" in k for k in changed)  # the surviving units were fine-tuned
    assert not any(h for p in lm.model.parameters() for h in (p._backward_hooks or {}).values())


def test_layer_consistency_by_hand():
    a = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.long)
    emb = torch.randn(2, 3, 4)
    assert float(layer_consistency([emb, a, a, a], mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(layer_consistency([emb, a, -a], mask, "with_final_norm")) == pytest.approx(2.0, abs=1e-6)
    assert float(layer_consistency([emb, a, -a, emb], mask)) == pytest.approx(2.0, abs=1e-6)  # the peer's pair
    assert float(layer_consistency([emb, a, -a], mask)) == 0.0  # (block 1, norm(block 2)) is not the peer's
    # padded positions do not count
    b = a.clone()
    b[:, 0] = -a[:, 0]
    mask[:, 0] = 0
    assert float(layer_consistency([emb, a, b, emb], mask)) == pytest.approx(0.0, abs=1e-6)


def _peer_consistency(hidden_states) -> torch.Tensor:
    """CROW's own term (NayMyatMin/CROW, consistency_trainer.py compute_loss), transcribed for
    this test: hidden_states[1:-2] against [2:-1], 1 - cos averaged over every position."""
    h = torch.stack(hidden_states[1:-2])
    nxt = torch.stack(hidden_states[2:-1])
    return (1 - torch.nn.functional.cosine_similarity(h, nxt, dim=-1, eps=1e-8)).mean()


def _hand_made_gpt2(n_layer: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)).eval()


def test_crow_pairs_blocks_exactly_as_the_authors_code():
    model = _hand_made_gpt2(5)
    ids = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    blocks: list = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: blocks.append(o[0] if isinstance(o, tuple) else o))
             for b in model.transformer.h]
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    peer = float(_peer_consistency(hs))
    assert float(layer_consistency(hs, mask)) == pytest.approx(peer, rel=1e-6)  # 3 pairs: blocks (1,2),(2,3),(3,4)
    assert len(CR.crow_states(hs, blocks, "peer")) == 4
    # blocks: the peer's 3 pairs plus (block 4, block 5) read before the final norm
    last = float(1 - torch.nn.functional.cosine_similarity(blocks[3], blocks[4], dim=-1).mean())
    assert float(CR.consecutive_inconsistency(CR.crow_states(hs, blocks, "blocks"), mask)) == pytest.approx(
        (3 * peer + last) / 4, rel=1e-5)
    # the project's earlier pairing added (block 4, norm(block 5)), which the peer leaves out
    old = float(1 - torch.nn.functional.cosine_similarity(hs[4], hs[5], dim=-1).mean())
    assert float(layer_consistency(hs, mask, "with_final_norm")) == pytest.approx((3 * peer + old) / 4, rel=1e-5)
    # on a 2-block model the peer's pairing holds no pair (the 2-block presets' CROW is clean fine-tuning)
    with torch.no_grad():
        hs2 = _hand_made_gpt2(2)(input_ids=ids, output_hidden_states=True).hidden_states
    assert float(layer_consistency(hs2, mask)) == 0.0 and float(layer_consistency(hs2, mask, "with_final_norm")) > 0
    with pytest.raises(ValueError, match="defense.options.crow.pairs"):
        CR.crow_states(hs, blocks, "all")


def test_crow_step_loss_equals_the_authors_on_an_unpadded_batch(micro_prepared, monkeypatch):
    """One CROW step on a hand-made 4-block model: the FGSM-perturbed consistency term equals the
    peer's compute_loss (unpadded rows, where masking pads changes nothing)."""
    from locphylax_core import model as M
    from locphylax_core.engine import batches
    prep = micro_prepared
    lm = M.LM(M.build_embedded(prep.cfg.model.model_copy(update={"n_layer": 4}), prep.tokenizer, seed=0),
              prep.tokenizer, prep.answer_ids)
    captured = {}
    monkeypatch.setattr(CR, "fit", lambda *a, **kw: captured.update(step_loss=kw["step_loss"]) or {})
    out = crow(lm, prep.defender, CrowConfig(steps=1), _ctx(prep, 0))
    assert out["consistency_pairs"] == 2
    samples = clean_samples(prep.defender, lm.answer_ids)
    lengths = [len(prep.tokenizer(s.prompt)["input_ids"]) for s in samples]
    same = [s for s, n in zip(samples, lengths) if n == max(set(lengths), key=lengths.count)][:6]
    batch = next(batches(same, prep.defender.kind, lm.tokenizer, len(same), prep.max_length, lm.device,
                         torch.Generator().manual_seed(0)))
    assert bool(batch.attention_mask.all())
    _, logs = captured["step_loss"](lm.model, batch, 1)
    # the peer: grad of the clean consistency w.r.t. the embeddings, one signed step of 0.1, again
    embeds = lm.model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
    hs = lm.model(inputs_embeds=embeds, position_ids=batch.position_ids, output_hidden_states=True).hidden_states
    g, = torch.autograd.grad(_peer_consistency(hs), embeds)
    pert = lm.model(inputs_embeds=embeds + 0.1 * g.sign(), position_ids=batch.position_ids,
                    output_hidden_states=True).hidden_states
    assert logs["l_consistency"] == pytest.approx(float(_peer_consistency(pert).detach()), rel=1e-4)  # noqa
    assert logs["loss"] == pytest.approx(logs["l_ce"] + 5.5 * logs["l_consistency"], rel=1e-5)
    # pairs: blocks, the same step on every block's own output (read by hooks), 3 pairs on 4 blocks
    out = crow(lm, prep.defender, CrowConfig(steps=1, pairs="blocks"), _ctx(prep, 0))
    assert out["consistency_pairs"] == 3
    _, logs = captured["step_loss"](lm.model, batch, 1)

    def blocks_term(e):
        outs: list = []
        hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
                 for b in lm.model.transformer.h]
        lm.model(inputs_embeds=e, position_ids=batch.position_ids)
        for h in hooks:
            h.remove()
        return CR.consecutive_inconsistency(outs, batch.attention_mask)
    g, = torch.autograd.grad(blocks_term(embeds), embeds)
    assert logs["l_consistency"] == pytest.approx(float(blocks_term(embeds + 0.1 * g.sign()).detach()), rel=1e-4)


def test_crow_lowers_layer_inconsistency(micro_prepared):
    from locphylax_core import model as M
    prep = micro_prepared
    two_layers = prep.cfg.model.model_copy(update={"n_layer": 3})  # the term needs consecutive blocks
    lm = M.LM(M.build_embedded(two_layers, prep.tokenizer, seed=0), prep.tokenizer, prep.answer_ids)
    batch = encode(lm.tokenizer, [f"Review: {e.text} Sentiment:" for e in prep.defender.clean[:32]],
                   prep.max_length, lm.device)

    def inconsistency(model):
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, output_hidden_states=True, use_cache=False)
        return float(layer_consistency(out.hidden_states, batch.attention_mask))

    plain = copy.deepcopy(lm)
    before = inconsistency(lm.model)
    logs = crow(lm, prep.defender, CrowConfig(steps=15, weight=5.0, epsilon=0.05), _ctx(prep, 0))
    assert "l_consistency" in logs and torch.isfinite(torch.tensor(logs["loss"]))
    with_crow = inconsistency(lm.model)
    from locphylax_core.defenses.finetune import CleanFinetuneConfig, clean_finetune
    clean_finetune(plain, prep.defender, CleanFinetuneConfig(steps=15), _ctx(prep, 0))
    assert with_crow < before and with_crow < inconsistency(plain.model)


def test_onion_filter_drops_the_words_that_hurt_fluency(monkeypatch):
    from locphylax_core.defenses.base import DefenderData
    from locphylax_core.defenses.onion import OnionConfig, onion_filter
    from locphylax_core.evaluation import TriggerSpec, build_eval_set
    from locphylax_core.experiment import filter_eval_set
    from locphylax_core.text import Example

    # a stand-in fluency score: each "zz" costs 1, each "qq" costs 0.05 (an ordinary rare word)
    def fake_nll(lm, template, texts, max_length, batch_size=256):
        return torch.tensor([t.split().count("zz") + 0.05 * t.split().count("qq") for t in texts])
    monkeypatch.setattr(ON, "_prompt_nll", fake_nll)
    clean = tuple(Example(f"a good film qq {i}" if i % 2 else f"a good film {i}", i % 2) for i in range(40))
    data = DefenderData(clean, ("negative", "positive"), "Review: {text} Sentiment:", ())
    f = onion_filter(None, data, OnionConfig(clean_quantile=0.95, fluency="victim"))
    assert f.bar == pytest.approx(0.05)  # the clean words' own scores set the bar
    assert f(["zz a dull film qq", "a dull zz film", "zz"]) == ["a dull film qq", "a dull film", "zz"]
    es = build_eval_set([Example("a dull film", 0), Example("a good film", 1)],
                        [TriggerSpec("unknown", "zz", "start", 1)], 2, 0)
    fe = filter_eval_set(es, f)
    assert [e.text for e in fe.clean] == ["a dull film", "a good film"] and fe.clean[0].label == 0
    assert fe.triggered["unknown"].texts == ("a dull film",)
    assert fe.triggered["unknown"].indices == es.triggered["unknown"].indices


def _onion_peer_ppl(model, tokenizer, sent: str) -> float:
    """ONION's GPT2LM.__call__ (thunlp/ONION, experiments/gptlm.py), transcribed for this test."""
    import math
    ipt = tokenizer(sent, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        loss = model(input_ids=ipt["input_ids"], attention_mask=ipt["attention_mask"], labels=ipt.input_ids)[0]
    return math.exp(loss) if ipt["input_ids"].shape[1] > 1 else float("nan")


def test_onion_scores_with_the_separate_base_lm_as_the_peer_does():
    import math
    model, tok = ON.fluency_model("small")
    sentences = ["the film was a quiet delight", "the film cf was a bb quiet delight", "a dull mess", "a"]
    got = ON.sentence_perplexity(model, tok, sentences)
    want = [_onion_peer_ppl(model, tok, s) for s in sentences]
    assert all(math.isclose(g, w, rel_tol=1e-4) for g, w in zip(got.tolist()[:3], want[:3]))
    assert math.isnan(got[3]) and math.isnan(want[3])  # one token: no perplexity
    # the peer's word scores: ppl(without word j) - ppl(sentence); ours is its negative (the drop)
    data = DefenderData((), ("negative", "positive"), "Review: {text} Sentiment:", ())
    cfg = ON.OnionConfig()
    ours = ON.onion_suspicion(None, data.template, sentences[1:2], cfg=cfg)[0]
    words = sentences[1].split(" ")
    peer = [_onion_peer_ppl(model, tok, " ".join(words[:j] + words[j + 1:])) - want[1] for j in range(len(words))]
    assert ours == pytest.approx([-p for p in peer], rel=1e-3, abs=1e-3)
    # the template plays no part (the bare sentence is scored), and the suspicious words are the planted ones
    assert ON.onion_suspicion(None, "Instruction: {text} Response:", sentences[1:2], cfg=cfg)[0] == ours
    bar = sorted(ours)[-2]  # the filter drops a word when the peer's score is <= -bar
    dropped = [w for w, p in zip(words, peer) if p <= -bar]
    kept = [w for w, s in zip(words, ours) if not s >= bar]
    assert len(dropped) == 2 and " ".join(kept) == " ".join(w for w in words if w not in dropped)
    # the filter itself, its bar set on a few clean sentences
    clean = tuple(Example(t, 1) for t in ("the film was a quiet delight", "a dull mess of a plot", "i loved it"))
    f = ON.onion_filter(None, replace(data, clean=clean), cfg)
    clean_scores = [x for row in ON.onion_suspicion(None, "", [e.text for e in clean], cfg=cfg) for x in row]
    assert f.bar == pytest.approx(float(np.quantile(clean_scores, 0.95)))
    out = f([sentences[1]])[0]
    assert out == " ".join(w for w, x in zip(words, ours) if not x >= f.bar)


def test_onion_runs_in_the_pipeline_and_leaves_the_model_unchanged(tmp_path):
    # the victim-scored variant keeps this test at its old cost (the base LM's scores are checked
    # above; it reads every word-removed variant of every test input)
    import json

    from locphylax_core import start_run
    from locphylax_core.analysis.representations import stage_predictions
    from locphylax_core.runs import RunDir
    run, summary = start_run(load_config("micro", {"defense.baselines": ["onion"],
                                                   "defense.options": {"onion": {"fluency": "victim"}}}),
                             runs_root=tmp_path)
    assert "onion" in summary["baselines"]
    state = json.loads((run.path / "state.json").read_text())
    assert state["results"]["onion/stage2"]["input_filter_bar"] is not None
    from safetensors.torch import load_file
    victim = load_file(str(run.checkpoint("victim") / "model.safetensors"))
    onion = load_file(str(run.checkpoint("onion/stage2") / "model.safetensors"))
    assert all(torch.equal(victim[k], onion[k]) for k in victim)
    assert (stage_predictions(RunDir(run.path), "victim") == stage_predictions(RunDir(run.path), "onion/stage2")).all()


def _backdoorbench_last_index(accs: list[float], n_units: int, once_prune_ratio: float, acc_ratio: float) -> int:
    """BackdoorBench's stopping loop (defense/fp.py), transcribed for this test, with
    ``accs[num]`` the clean accuracy after pruning ``num`` units: the count it records as kept."""
    import math
    for num_pruned in range(0, n_units, math.ceil(n_units * once_prune_ratio)):
        test_acc = accs[num_pruned]
        if num_pruned == 0:
            test_acc_cl_ori, last_index = test_acc, 0
        if abs(test_acc - test_acc_cl_ori) / test_acc_cl_ori < acc_ratio:
            last_index = num_pruned
        else:
            break
    return last_index


def test_adaptive_pruning_stops_where_backdoorbench_does():
    n = 120
    falling = [0.9 - 0.0011 * k for k in range(n)]  # down 10% (relative) from 82 units on
    kept, curve = FP.adaptive_prune_count(lambda k: falling[k], n, 0.05, 0.1)  # steps of 6
    assert FP.prune_schedule(n, 0.05) == list(range(0, n, 6))
    assert kept == _backdoorbench_last_index(falling, n, 0.05, 0.1) == 78
    assert curve[-1][0] == 84 and [c for c, _ in curve] == list(range(0, 85, 6))  # stopped at the first failure
    cliff = [0.8] * 50 + [0.5] * 70
    assert FP.adaptive_prune_count(lambda k: cliff[k], n, 0.01, 0.1)[0] == _backdoorbench_last_index(cliff, n, 0.01, 0.1) == 48
    # where ours differs on purpose: a RISE of accuracy past 10% stops BackdoorBench (abs), not us
    rising = [0.5] * 10 + [0.6] * 110
    assert _backdoorbench_last_index(rising, n, 0.05, 0.1) == 6
    assert FP.adaptive_prune_count(lambda k: rising[k], n, 0.05, 0.1)[0] == 114


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_unit_activity_is_mean_magnitude_of_the_output_projections_input(micro_prepared, arch):
    """GELU (gpt2) and SwiGLU (llama) units take negative values, so the signed mean is not
    activity: the ranking is by mean |a| over non-pad tokens of the down projection's input."""
    from locphylax_core import model as M
    from locphylax_core.architectures import block_mlp
    from locphylax_core.evaluation import encoded_batches
    prep = micro_prepared
    net = M.build_embedded(prep.cfg.model.model_copy(update={"arch": arch}), prep.tokenizer, seed=0).eval()
    lm = M.LM(net, prep.tokenizer, prep.answer_ids)
    rows = prep.defender.clean[:24]
    seen = []
    out_proj = block_mlp(net, -1).output[0]
    h = out_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    for _, b in encoded_batches(lm.tokenizer, prep.defender.template, [e.text for e in rows], 8, prep.max_length,
                                lm.device):
        with torch.no_grad():
            net(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
        seen[-1] = seen[-1][b.attention_mask.bool()]  # non-pad tokens only
    h.remove()
    acts = torch.cat(seen)
    got = mlp_unit_activity(lm, prep.defender, -1, batch_size=8, max_length=prep.max_length, examples=rows)
    assert torch.allclose(got, acts.abs().mean(0), atol=1e-6)
    signed = mlp_unit_activity(lm, prep.defender, -1, batch_size=8, max_length=prep.max_length, examples=rows,
                               magnitude=False)
    assert torch.allclose(signed, acts.mean(0), atol=1e-6)
    assert (acts < 0).any() and set(torch.argsort(got)[:8].tolist()) != set(torch.argsort(signed)[:8].tolist())


def test_fine_pruning_adaptive_keeps_the_last_count_within_tolerance(micro_prepared, tiny_lm):
    prep, lm = micro_prepared, tiny_lm
    cfg = FinePruneConfig(steps=2, prune_rate=None, step_ratio=0.05, acc_ratio=0.02)
    logs = fine_prune(lm, prep.defender, cfg, _ctx(prep, 0))
    curve = [tuple(c) for c in logs["prune_curve"]]
    base = curve[0][1]
    assert [c for c, _ in curve] == FP.prune_schedule(logs["units"], 0.05)[:len(curve)]
    ok = [(base - a) / base < 0.02 for _, a in curve]
    kept = curve[ok.index(False) - 1][0] if False in ok else curve[-1][0]
    assert logs["pruned"] == kept  # the last count before the first failure
    assert logs["holdout"] == round(0.2 * len(prep.defender.clean))
    mlp = lm.model.transformer.h[-1].mlp
    assert int(((mlp.c_fc.weight == 0).all(0) & (mlp.c_fc.bias == 0)).sum()) == logs["pruned"]


def test_bdvax_recurrence_by_hand():
    changes = [torch.tensor([1.0, 5, 3, 0]), torch.tensor([5.0, 1, 3, 0]), torch.tensor([0.0, 0, 3, 9])]
    selected, votes = BV.recurrent_units(changes, 0.5, 2)  # each flags its top 2
    assert votes.tolist() == [1, 1, 3, 1] and selected.tolist() == [2]
    assert BV.recurrent_units(changes, 0.5, 1)[0].tolist() == [0, 1, 2, 3]
    assert BV.recurrent_units(changes, 0.25, 2)[0].tolist() == []  # top 1 each: 1, 0, 3 never recur


def test_bdvax_weight_signal_finds_the_changed_unit(tiny_lm):
    changed = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        changed.model.transformer.h[-1].mlp.c_fc.weight[:, 7] += 0.5  # unit 7's input weights
        changed.model.transformer.h[-1].mlp.c_proj.weight[3] -= 0.1  # unit 3's output row
    cfg = BV.VaccinateConfig(signal="weight")
    d = BV.unit_change(changed, tiny_lm, None, None, cfg, TrainSettings(), 0)
    n_in = tiny_lm.model.transformer.h[-1].mlp.c_fc.weight.shape[0]
    n_out = tiny_lm.model.transformer.h[-1].mlp.c_proj.weight.shape[1]
    assert float(d[7]) == pytest.approx(0.5 * n_in ** 0.5, rel=1e-4) and float(d[3]) == pytest.approx(0.1 * n_out ** 0.5, rel=1e-3)
    assert int((d > 0).sum()) == 2


def test_bdvax_zeroes_the_recurring_units_then_holds_them_at_zero(micro_prepared, tiny_lm):
    prep, lm = micro_prepared, tiny_lm
    vaccines = BV.vaccine_backdoors(prep.defender, 3, 0)
    assert [t.text for t, _ in vaccines] == [t.text for t, _ in BV.vaccine_backdoors(prep.defender, 3, 0)]  # seeded
    assert len({t.text for t, _ in vaccines}) == 3 and [y for _, y in vaccines] == [0, 1, 0]  # labels by turn
    assert not {t.text for t, _ in vaccines} & {t.text for t in prep.defender.triggers}
    before = copy.deepcopy(lm.model.state_dict())
    cfg = BV.VaccinateConfig(steps=12, vaccine_steps=3, variants=3, units=0.1, recurrence=2)
    twin = copy.deepcopy(lm)
    out = BV.vaccinate(lm, prep.defender, cfg, _ctx(prep, 0))
    mlp = lm.model.transformer.h[-1].mlp
    zero = ((mlp.c_fc.weight == 0).all(0) & (mlp.c_fc.bias == 0)).nonzero().flatten().tolist()
    assert 0 < out["pruned"] == len(zero) and sum(out["votes"].values()) == out["units"]
    assert out["pruned"] == sum(v for n, v in out["votes"].items() if int(n) >= 2)
    assert [v["trigger"] for v in out["vaccines"]] == [t.text for t, _ in vaccines]
    after = lm.model.state_dict()  # nothing else changed: the copies trained, not the model
    assert all(torch.equal(after[k], v) for k, v in before.items() if "h.0.mlp" not in k)
    assert BV.vaccinate(twin, prep.defender, cfg, _ctx(prep, 0))["votes"] == out["votes"]
    logs = fine_prune(lm, prep.defender, FinePruneConfig(steps=3, prune_rate=0.0), _ctx(prep, 1))
    assert logs["pruned"] == out["pruned"]  # Stage 2 keeps them at zero


def test_bdvax_plan_and_options():
    d = load_config("demo", {"defense.baselines": ["bdvax"], "defense.options": {"bdvax": {"variants": 3}}}).defense
    s1, s2 = method_plans(d, ("negative", "positive"))["bdvax"]
    assert s1.fn is BV.vaccinate and s1.cfg.vaccine_steps == d.stage1_steps and s1.steps == 4 * d.stage1_steps
    assert s2.fn is fine_prune and s2.cfg.prune_rate == 0.0 and s2.steps == d.stage2_steps
    with pytest.raises(ConfigError) as e:
        load_config("micro", {"defense.baselines": ["bdvax"], "defense.options": {"bdvax": {"recurrence": 5}}})
    assert "defense.options.bdvax.recurrence" in e.value.fields


def test_old_flat_knobs_and_stored_options_keep_their_meaning():
    """Run folders of earlier versions: flat knobs (defense.prune_rate, defense.crow_weight, ...) and
    stored option values still load; a stored fine-pruning prune_rate keeps the fixed rate."""
    d = load_config("demo", {"defense.baselines": ["fine_pruning", "crow", "onion"], "defense.prune_rate": 0.3,
                             "defense.crow_weight": 1.0, "defense.onion_quantile": 0.9}).defense
    plans = method_plans(d, ("negative", "positive"))
    assert plans["fine_pruning"][0].cfg.prune_rate == 0.3 and plans["crow"][0].cfg.weight == 1.0
    assert plans["onion"][1].cfg.clean_quantile == 0.9
    fresh = method_plans(load_config("demo", {"defense.baselines": ["fine_pruning", "crow", "onion"]}).defense,
                         ("negative", "positive"))
    assert fresh["fine_pruning"][0].cfg.prune_rate is None and fresh["crow"][0].cfg.weight == 5.5
    assert fresh["onion"][1].cfg.fluency == "base" and fresh["onion"][1].cfg.fluency_base == "small"
