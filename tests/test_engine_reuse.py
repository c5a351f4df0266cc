"""Scoring reuses the inputs of the first adapted block (engine.answer_logits): the same logits
as the whole forward, recomputed whenever the lower weights change."""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from locphylax_core.architectures import decoder_blocks
from locphylax_core import engine
from locphylax_core.engine import Batch, HiddenSpec, answer_logits, forward_answer, forward_loss, reusable_lower_blocks
from locphylax_core.model import with_lora


def _llama(seed=0):
    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(conf).eval()


def _lora(model, last_blocks=2, seed=1):
    lm = with_lora(model, SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=None, last_blocks=last_blocks))
    torch.manual_seed(seed)
    with torch.no_grad():  # a trained-looking adapter (peft starts lora_B at zero)
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return lm.eval()


def _batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 3, 1, 5, 2]):  # left padding, as the engine encodes
        ids[row, :pad], mask[row, :pad] = 0, 0
    return Batch(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))


def _count_calls(module):
    """Counts the module's forward calls (by wrapping its forward: a hook would stop the reuse)."""
    calls, forward = [], module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)
    module.forward = counted
    return calls


@torch.no_grad()
def test_reused_lower_blocks_give_the_whole_forwards_logits_exactly():
    base = _llama()
    victim = _lora(copy.deepcopy(base), seed=1)
    defended = _lora(copy.deepcopy(base), seed=3)  # another adapter on the same lower weights
    assert reusable_lower_blocks(victim) == 2
    batch = _batch()
    first_block_calls = _count_calls(decoder_blocks(defended)[0])

    for model in (victim, defended, victim):
        expected = forward_answer(model, _batch())[0]
        first_block_calls.clear()
        assert torch.equal(answer_logits(model, batch), expected)
        if model is defended:  # its lower blocks never ran: their output came from the victim's pass
            assert first_block_calls == [] and batch.lower_states["key"][0] == 2
    assert not torch.equal(answer_logits(victim, batch), answer_logits(defended, batch))


@torch.no_grad()
def test_a_change_to_a_lower_weight_recomputes_the_stored_inputs():
    model = _lora(_llama())
    batch = _batch()
    before = answer_logits(model, batch)
    first_key = batch.lower_states["key"]
    decoder_blocks(model)[0].mlp.down_proj.weight.mul_(1.5)  # in place: the same tensor, a new version
    after = answer_logits(model, batch)
    assert batch.lower_states["key"] != first_key
    assert torch.equal(after, forward_answer(model, _batch())[0])
    assert not torch.equal(before, after)


@torch.no_grad()
def test_nothing_is_reused_where_every_block_may_have_changed_or_the_forward_cannot_restart():
    assert reusable_lower_blocks(_llama()) == 0  # no adapter: any weight may have been trained
    assert reusable_lower_blocks(_lora(_llama(), last_blocks=4)) == 0  # an adapter on every block
    torch.manual_seed(0)
    gpt2 = _lora(GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=4, n_head=4, n_positions=64)))
    assert reusable_lower_blocks(gpt2) == 0  # GPT-2 adds position embeddings: no restart
    batch = _batch()
    assert torch.equal(answer_logits(gpt2, batch), forward_answer(gpt2, _batch())[0])
    assert batch.lower_states == {}


def test_training_mode_and_gradients_take_the_whole_forward():
    model = _lora(_llama())
    batch = _batch()
    logits = answer_logits(model, batch)  # gradients on: no stored states
    assert logits.requires_grad and batch.lower_states == {}


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@torch.no_grad()
def test_reuse_under_autocast_keys_the_dtype(dtype):
    model = _lora(_llama())
    batch = _batch()
    answer_logits(model, batch)
    with torch.autocast("cpu", dtype=dtype):
        got = answer_logits(model, batch)
        expected = forward_answer(model, _batch())[0]
    assert batch.lower_states["key"][2] == str(dtype)
    assert torch.equal(got, expected)


@torch.no_grad()
def test_a_merged_model_reuses_by_its_runs_frozen_blocks_and_only_where_they_match():
    from locphylax_core.model import merge_lora
    base = _llama()
    victim = merge_lora(_lora(copy.deepcopy(base), seed=1))  # adapters folded in: blocks 2 and 3 changed
    defended = merge_lora(_lora(copy.deepcopy(base), seed=3))
    assert reusable_lower_blocks(victim) == 0 and reusable_lower_blocks(victim, frozen=2) == 2
    batch = _batch()
    assert torch.equal(answer_logits(victim, batch, frozen=2), forward_answer(victim, _batch())[0])
    calls = _count_calls(decoder_blocks(defended)[0])
    assert torch.equal(answer_logits(defended, batch, frozen=2), forward_answer(defended, _batch())[0])
    assert len(calls) == 1  # forward_answer's own pass only
    # a model whose block 0 was trained (a full fine-tune) does not match: recomputed, still exact
    trained = copy.deepcopy(defended)
    decoder_blocks(trained)[0].self_attn.q_proj.weight.add_(0.01)
    key = batch.lower_states["key"]
    assert torch.equal(answer_logits(trained, batch, frozen=2), forward_answer(trained, _batch())[0])
    assert batch.lower_states["key"] != key


@torch.no_grad()
def test_a_hook_on_a_lower_block_is_honoured_not_reused_past():
    model = _lora(_llama())
    batch = _batch()
    plain = answer_logits(model, batch)  # stores block 2's inputs
    block = decoder_blocks(model)[1]
    handle = block.mlp.register_forward_hook(lambda _m, _i, out: out * 0)  # an ablation of block 1's MLP
    try:
        ablated = answer_logits(model, batch)
        assert torch.equal(ablated, forward_answer(model, _batch())[0])
        assert not torch.equal(ablated, plain)
    finally:
        handle.remove()
    assert torch.equal(answer_logits(model, batch), plain)


# ---- training from stored per-row inputs (train.reuse_frozen_states)

def _training_batches(seed=5, n=4):
    """Left-padded batches whose rows recur with different padding (as a shuffled data set's do)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, 97, (int(L),), generator=g) for L in (4, 9, 6, 7, 5, 8)]
    out = []
    for b in range(n):
        chosen = [rows[(b * 3 + j) % len(rows)] for j in range(4)]
        width = max(len(r) for r in chosen)
        ids = torch.zeros(len(chosen), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chosen):
            ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
        out.append(Batch(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), targets=torch.randint(1, 97, (len(chosen),), generator=g)))
    return out


def _marked(batch):
    batch.reuse_frozen = True
    return batch


def test_training_from_stored_row_inputs_matches_the_whole_forward_and_its_gradients():
    model = _lora(_llama()).train()
    spec = HiddenSpec(-1)
    plain = _training_batches()[0]
    loss, h = forward_loss(model, plain, spec)
    grads = torch.autograd.grad(loss + h.pow(2).mean(), [p for p in model.parameters() if p.requires_grad])
    engine._ROW_STATES.update(key=None, rows={}, bytes=0)
    first_block_calls = _count_calls(decoder_blocks(model)[0])
    loss_r, h_r = forward_loss(model, _marked(_training_batches()[0]), spec)
    grads_r = torch.autograd.grad(loss_r + h_r.pow(2).mean(), [p for p in model.parameters() if p.requires_grad])
    assert len(first_block_calls) == 4  # once per row, alone
    assert torch.allclose(loss_r, loss, atol=1e-5) and torch.allclose(h_r, h, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_r, grads))
    first_block_calls.clear()
    forward_loss(model, _marked(_training_batches()[0]), spec)  # the same rows again: nothing below block 2 runs
    assert first_block_calls == []


def test_a_stored_row_is_the_same_whatever_batch_it_came_in():
    model = _lora(_llama()).train()
    engine._ROW_STATES.update(key=None, rows={}, bytes=0)
    batches = _training_batches()
    for b in batches:
        forward_loss(model, _marked(b))
    stored = dict(engine._ROW_STATES["rows"])
    assert len(stored) == 6  # every distinct row once, though they recur in differently padded batches
    engine._ROW_STATES.update(key=None, rows={}, bytes=0)
    for b in reversed(_training_batches()):  # another order, other first batches: the same numbers
        forward_loss(model, _marked(b))
    assert all(torch.equal(engine._ROW_STATES["rows"][k], v) for k, v in stored.items())


def test_stored_row_inputs_are_not_used_below_a_read_layer_a_hook_or_a_trainable_lower_weight():
    model = _lora(_llama()).train()
    calls = _count_calls(decoder_blocks(model)[0])
    batch = _marked(_training_batches()[0])
    forward_loss(model, batch, HiddenSpec(1))  # the clustering state is read below block 2
    assert len(calls) == 1
    handle = decoder_blocks(model)[0].register_forward_hook(lambda _m, _i, out: out)
    try:
        calls.clear()
        forward_loss(model, batch)
        assert len(calls) == 1
    finally:
        handle.remove()
    decoder_blocks(model)[1].mlp.up_proj.weight.requires_grad_(True)  # a full fine-tune of a lower block
    calls.clear()
    forward_loss(model, batch)
    assert len(calls) == 1


def test_fit_with_reuse_repeats_itself_and_stays_near_the_plain_run():
    from locphylax_core import trainer as T
    from locphylax_core.config import LoraConfig

    def train(reuse):
        engine._ROW_STATES.update(key=None, rows={}, bytes=0)
        torch.manual_seed(0)
        lm = SimpleNamespace(model=_llama(), tokenizer=None, device=torch.device("cpu"))
        settings = T.TrainSettings(lr=1e-2, lora=LoraConfig(enabled=True, r=4, alpha=8, last_blocks=2),
                                   reuse_frozen_states=reuse, every=0)
        T.fit(lm, iter(_training_batches(n=6)), 6, T.StageContext(settings=settings, seed=0))
        assert len(engine._ROW_STATES["rows"]) == (6 if reuse else 0)  # the six distinct rows, each once
        return [p.detach().clone() for p in lm.model.parameters()]

    first, again, plain = train(True), train(True), train(False)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(first, plain))
    assert any(not torch.equal(a, b) for a, b in zip(first, _llama().parameters()))  # it trained


# ---- a run prepared ahead stores the rows its defense will train on (Pipeline._warm_rows)

def test_a_prepared_run_stores_the_defenses_rows_so_the_click_computes_none_and_gets_the_same_result(tmp_path):
    from locphylax_core import load_config
    from locphylax_core.pipeline import resume_run, start_run
    from locphylax_core.runs import RunDir

    sets = {"model.arch": "llama", "model.n_layer": 3, "model.n_head": 2, "model.lora.enabled": True,
            "model.lora.last_blocks": 1, "train.reuse_frozen_states": True, "defense.baselines": []}
    cfg = load_config("micro", sets)
    engine._ROW_STATES.update(key=None, rows={}, bytes=0)
    straight_run, straight = start_run(cfg, tmp_path / "straight")  # nothing prepared
    engine._ROW_STATES.update(key=None, rows={}, bytes=0)
    run, _ = start_run(cfg, tmp_path / "prepared", stop_after="victim")
    assert run.read_state()["status"] == "prepared"
    stored = len(engine._ROW_STATES["rows"])
    assert stored > 0
    summary = resume_run(RunDir(run.path))  # the click, in the same process
    assert len(engine._ROW_STATES["rows"]) == stored  # every row Stage 1 and Stage 2 trained on was stored
    assert summary["stages"] == straight["stages"]


@torch.no_grad()
def test_hooks_on_upper_modules_see_the_same_states_when_the_lower_blocks_are_reused():
    """What the pipeline stores per stage (the last block's and the final norm's states) comes out
    of answer_logits' reused path unchanged."""
    from locphylax_core.architectures import final_norm
    from locphylax_core.engine import capture_output
    base = _llama()
    victim, defended = _lora(copy.deepcopy(base), seed=1), _lora(copy.deepcopy(base), seed=3)
    batch = _batch()
    answer_logits(victim, batch)  # stores block 2's inputs
    with capture_output(decoder_blocks(defended)[-1]) as last, capture_output(final_norm(defended)) as normed:
        calls = _count_calls(decoder_blocks(defended)[0])
        answer_logits(defended, batch)
    assert calls == []
    _, h = forward_answer(defended, _batch(), HiddenSpec(-1))
    with capture_output(final_norm(defended)) as normed_whole:
        forward_answer(defended, _batch())
    assert torch.equal(last["out"][:, -1], h) and torch.equal(normed["out"], normed_whole["out"])


def test_evaluation_batches_are_kept_for_a_tokenizer_loaded_again_with_the_same_content(micro_prepared):
    """A resumed run (or the live demo's job after its waiting process) loads its tokenizer again:
    its evaluation batches, with the frozen blocks' output stored on them, are the ones kept."""
    from locphylax_core.evaluation import encoded_batches
    tok = micro_prepared.tokenizer
    texts = ["a fine film", "dull and long", "the cast was superb"]
    first = encoded_batches(tok, "{text}", texts, 2, None, "cpu")
    again = encoded_batches(copy.deepcopy(tok), "{text}", texts, 2, None, "cpu")
    assert all(a is b for (_, a), (_, b) in zip(again, first))
    other = copy.deepcopy(tok)
    other.add_tokens(["zzqq"])  # another vocabulary: its own encodings
    assert encoded_batches(other, "{text}", texts, 2, None, "cpu")[0][1] is not first[0][1]
