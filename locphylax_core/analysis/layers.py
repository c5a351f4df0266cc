"""Where the backdoor is computed: logit lens, activation patching and attention patterns.

All three run on a TransformerLens 4 ``TransformerBridge`` (:func:`heads.borrowed_bridge` over a
checkpoint the caller owns, or a deep copy: the caller's model is never left modified) with hooks
that live for one forward pass (``bridge.hooks``), and return plain numpy arrays.

**Logit lens** (:func:`logit_lens`). After each block ``l`` the residual stream at the answer
position (the last prompt token) is sent through the model's own final norm and unembedding
(``bridge.ln_final``, ``bridge.unembed``); the softmax over the whole vocabulary gives the
probability of the attacker's target answer and of the input's correct answer. The last layer's
lens is the model's own output (tested). Arrays ``[layer]``, means over the probe inputs.

**Activation patching** (:func:`activation_patching`). For a triggered input and its clean copy
(the same sentence without the trigger), ``LD = logit(target) - logit(correct)`` at the answer
position. One *site* at a time, the clean run's activation replaces the triggered run's, and

    restoration(site) = (LD_triggered - LD_patched) / (LD_triggered - LD_clean)

(ratio of the means over the probe inputs): 1 = patching that site alone undoes the trigger's
effect on the answer (the backdoor is carried there), 0 = it changes nothing. Sites:

- residual stream ``[layer, role]``: the input of block ``l`` (``blocks.{l}.hook_resid_pre``;
  layer 0 is the embeddings) at every token of one *role* of the triggered prompt -- :data:`ROLES`: the template before the
  input text, the input's tokens before the trigger, the trigger's tokens, the input's tokens
  after it, the template's tokens after the text except the last, and the answer position. Roles,
  not raw positions, because probe inputs differ in length and trigger position; the roles are
  found by aligning the two token sequences (their common prefix and suffix; what lies between
  is the trigger), so the analysis needs no trigger text. Tokens outside the trigger are patched
  with the clean run's activation at the aligned token; an inserted trigger's tokens have no
  clean counterpart and get the mean of the clean run's activations over its prompt tokens (mean
  patching, as TransformerLens users do for a position that does not exist in the clean run); a
  trigger that *replaces* as many clean tokens is patched position by position, which is exactly
  TransformerLens's own ``patching.get_act_patch_*`` on equal-length pairs (tested).
  Reading the map: the trigger's tokens light up in the layers before the one whose attention
  moves the trigger's information to the answer position, and the answer position after it.
- heads ``[layer, head]``: head ``h``'s output before the output projection
  (``blocks.{l}.attn.hook_z``) at every token, aligned the same way.

Batched over sites: the triggered batch is stacked K times and copy ``k`` patches site ``k`` (one
hook per hook point indexes its copies), so K sites cost one forward pass; ``batched=False`` is
the per-site loop (one forward per site), kept for ``bench/layers_bench.py``; both give the same
arrays (tested).

**Attention patterns** (:func:`attention_patterns`): ``[layer, head, query, key]`` for one input.
"""

from __future__ import annotations

import contextlib
import time
from typing import Sequence

import numpy as np
import torch

from .. import model as M
from ..engine import Batch, encode
from ..text import render_prompt
from .heads import _copied_bridge, borrowed_bridge

ROLES = ("prompt start", "before trigger", "trigger", "after trigger", "prompt end", "answer position")
MAX_ROWS_PER_PASS = 1024  # batch rows x stacked copies per forward pass


def _bridge(model, tokenizer_dir_or_tokenizer, in_place: bool, bridge=None):
    """A bridge over ``model`` (a copy, or the model itself for ``in_place``), or ``bridge`` -- a
    ``(bridge, tokenizer)`` pair the caller already holds (one boot for several analyses)."""
    if bridge is not None:
        return contextlib.nullcontext(bridge)
    return (borrowed_bridge if in_place else _copied_bridge)(model, tokenizer_dir_or_tokenizer)


def _device(bridge) -> torch.device:
    return next(bridge.original_model.parameters()).device


def _check_hooks(bridge, names) -> None:
    known = bridge.hook_dict
    missing = [n for n in names if n not in known]
    if missing:
        raise RuntimeError(f"the TransformerLens bridge has no hook {missing[0]!r}")


# ----------------------------------------------------------------------------------------------
# Logit lens


def _lens_probs(bridge, batch: Batch, ids_a: torch.Tensor, ids_b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``[n_layers, B]`` probabilities of token ``ids_a[i]`` and ``ids_b[i]`` for row ``i``,
    from each block's output at the last position."""
    n_layers = bridge.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_post" for l in range(n_layers)]
    _check_hooks(bridge, names)
    store: dict[int, torch.Tensor] = {}

    def make(l):
        def hook(x, hook=None):
            store[l] = x[:, -1:].detach()
            return x
        return hook

    with torch.no_grad():
        with bridge.hooks(fwd_hooks=[(n, make(l)) for l, n in enumerate(names)]):
            bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                   use_cache=False, logits_to_keep=1)
        rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
        pa, pb = [], []
        for l in range(n_layers):
            probs = torch.softmax(bridge.unembed(bridge.ln_final(store[l]))[:, -1].float(), -1)
            pa.append(probs[rows, ids_a].double().cpu().numpy())
            pb.append(probs[rows, ids_b].double().cpu().numpy())
    return np.stack(pa), np.stack(pb)


def logit_lens(model: torch.nn.Module, tokenizer_dir_or_tokenizer, template: str, triggered_texts: Sequence[str],
               clean_texts: Sequence[str], target_ids: Sequence[int], correct_ids: Sequence[int], *,
               batch_size: int = 64, max_length: int | None = None, in_place: bool = False,
               bridge=None) -> dict:
    """The logit lens of ``model`` on aligned triggered / clean probe inputs (``triggered_texts[i]``
    is ``clean_texts[i]`` with the trigger; ``target_ids[i]`` the target answer's token,
    ``correct_ids[i]`` the correct answer's). Returns ``[n_layers]`` mean probabilities::

        {"target_triggered", "correct_triggered", "target_clean", "correct_clean": array [layer],
         "n_layers": int, "n_inputs": int}
    """
    if not (len(triggered_texts) == len(clean_texts) == len(target_ids) == len(correct_ids)):
        raise ValueError("logit_lens: triggered_texts, clean_texts, target_ids and correct_ids differ in length")
    if not triggered_texts:
        raise ValueError("logit_lens needs at least one probe input")
    max_length = M.prompt_max_length(model, max_length)
    sums = {}
    with _bridge(model, tokenizer_dir_or_tokenizer, in_place, bridge) as (bridge, tokenizer):
        dev = _device(bridge)
        for kind, texts in (("triggered", triggered_texts), ("clean", clean_texts)):
            acc_t, acc_c = 0.0, 0.0
            for i in range(0, len(texts), batch_size):
                b = encode(tokenizer, [render_prompt(template, t) for t in texts[i:i + batch_size]], max_length, dev)
                t_ids = torch.tensor([int(x) for x in target_ids[i:i + batch_size]], device=dev)
                c_ids = torch.tensor([int(x) for x in correct_ids[i:i + batch_size]], device=dev)
                pt, pc = _lens_probs(bridge, b, t_ids, c_ids)
                acc_t, acc_c = acc_t + pt.sum(1), acc_c + pc.sum(1)
            sums[f"target_{kind}"], sums[f"correct_{kind}"] = acc_t / len(texts), acc_c / len(texts)
        n_layers = int(bridge.cfg.n_layers)
    return {**{k: np.asarray(v, np.float64) for k, v in sums.items()}, "n_layers": n_layers,
            "n_inputs": len(triggered_texts)}


# ----------------------------------------------------------------------------------------------
# Activation patching


def _token_ids(tokenizer, prompt: str, max_length) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if max_length is not None and len(ids) > max_length:  # encode() keeps the end
        ids, offs = ids[-max_length:], offs[-max_length:]
    return ids, offs


def align(trig_ids: Sequence[int], clean_ids: Sequence[int]) -> tuple[int, int]:
    """``(p, s)``: the longest common prefix and suffix of two token sequences (``p + s`` at most
    the shorter length). The triggered tokens ``p .. n_t - s`` are the trigger."""
    n = min(len(trig_ids), len(clean_ids))
    p = 0
    while p < n and trig_ids[p] == clean_ids[p]:
        p += 1
    s = 0
    while s < n - p and trig_ids[-1 - s] == clean_ids[-1 - s]:
        s += 1
    return p, s


def token_roles(template: str, text: str, offsets: Sequence[tuple[int, int]], p: int, s: int) -> np.ndarray:
    """The :data:`ROLES` index of each token of a triggered prompt (``offsets`` from its
    tokenizer, ``p`` / ``s`` from :func:`align`)."""
    prompt = render_prompt(template, text)
    head = template.split("{text}")[0]
    text_start = len(head)
    text_end = len(prompt) - (len(template) - len(head) - len("{text}"))
    n = len(offsets)
    roles = np.empty(n, dtype=np.int64)
    for i, (a, z) in enumerate(offsets):
        if i == n - 1:
            roles[i] = 5
        elif p <= i < n - s:
            roles[i] = 2
        elif z <= text_start and i < p:  # (a byte-level BPE token's offsets include its leading space)
            roles[i] = 0
        elif a >= text_end and i >= n - s:
            roles[i] = 4
        else:
            roles[i] = 1 if i < p else 3
    return roles


def _pad_left(rows: Sequence[Sequence[int]], fill: int, width: int) -> torch.Tensor:
    return torch.tensor([[fill] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)


class _Pairs:
    """A batch of aligned triggered / clean prompts, left-padded to the same width, with each
    triggered token's role and the clean token it is patched from (-1: the clean mean)."""

    def __init__(self, tokenizer, template, trig_texts, clean_texts, max_length, device):
        trig, clean, roles, src = [], [], [], []
        for tt, ct in zip(trig_texts, clean_texts):
            ti, to = _token_ids(tokenizer, render_prompt(template, tt), max_length)
            ci, _ = _token_ids(tokenizer, render_prompt(template, ct), max_length)
            p, s = align(ti, ci)
            r = token_roles(template, tt, to, p, s)
            nt, nc = len(ti), len(ci)
            # the trigger's tokens: position by position when they replace as many clean tokens
            # (a substitution), else no counterpart (-1: the clean mean)
            same = nt - s - p == nc - s - p
            sr = [i if i < p else (i - nt + nc if i >= nt - s else (i if same else -1)) for i in range(nt)]
            trig.append(ti), clean.append(ci), roles.append(r), src.append(sr)
        width = max(max(len(t) for t in trig), max(len(c) for c in clean))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.width = width

        def batch(rows):
            ids = _pad_left(rows, pad, width)
            mask = _pad_left([[1] * len(r) for r in rows], 0, width)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            return Batch(ids.to(device), mask.to(device), pos.to(device))

        self.trig, self.clean = batch(trig), batch(clean)
        b = len(trig)
        # role[b, s] (-1 on pads) and the clean column each triggered column reads (-1: mean)
        role = torch.full((b, width), -1, dtype=torch.long)
        source = torch.full((b, width), -1, dtype=torch.long)
        for i, (r, sr, c) in enumerate(zip(roles, src, clean)):
            off_t, off_c = width - len(r), width - len(c)
            role[i, off_t:] = torch.as_tensor(r)
            source[i, off_t:] = torch.as_tensor([j + off_c if j >= 0 else -1 for j in sr])
        self.role, self.source = role.to(device), source.to(device)

    def aligned(self, clean_act: torch.Tensor) -> torch.Tensor:
        """The clean run's activation ``[B, S, ...]`` moved to the triggered run's columns (the
        mean over the clean prompt's tokens where there is no counterpart; zero on pads)."""
        mask = self.clean.attention_mask.to(clean_act.dtype)
        shape = (mask.shape[0], mask.shape[1]) + (1,) * (clean_act.dim() - 2)
        m = mask.view(shape)
        mean = (clean_act * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
        idx = self.source.clamp(min=0).view(shape).expand(-1, -1, *clean_act.shape[2:])
        out = torch.gather(clean_act, 1, idx)
        miss = (self.source < 0).view(shape)
        return torch.where(miss, mean.expand_as(out), out)


def _answer_diff(logits: torch.Tensor, target: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    last = logits[:, -1].double()
    rows = torch.arange(last.shape[0], device=last.device)
    return last[rows, target] - last[rows, correct]


def _stack(b: Batch, k: int) -> Batch:
    return Batch(b.input_ids.repeat(k, 1), b.attention_mask.repeat(k, 1), b.position_ids.repeat(k, 1))


def _run(bridge, b: Batch, hooks=()):
    """The answer position's logits ``[rows, 1, V]`` (the unembedding of every position is most of a small
    model's cost)."""
    with torch.no_grad(), bridge.hooks(fwd_hooks=list(hooks)):
        return bridge(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False,
                      logits_to_keep=1)


def _patch_hooks(sites: Sequence[tuple], pairs: _Pairs, clean_acts: dict, n_rows: int, fired: set) -> list:
    """Forward hooks for the batch stacked ``len(sites)`` times: copy ``k`` patches ``sites[k]``,
    ``("resid", layer, role)`` or ``("head", layer, head)``."""
    per_hook: dict[str, list] = {}
    for k, site in enumerate(sites):
        kind, layer, which = site
        name = f"blocks.{layer}.hook_resid_pre" if kind == "resid" else f"blocks.{layer}.attn.hook_z"
        per_hook.setdefault(name, []).append((k, kind, which))
    b = pairs.trig.input_ids.shape[0]
    hooks = []
    for name, items in per_hook.items():
        src = clean_acts[name]

        def hook(x, hook=None, items=items, src=src, name=name):
            if x.shape[0] != n_rows or x.shape[1] != pairs.width:
                raise RuntimeError(f"{name}: shape {tuple(x.shape)} does not match the patched batch")
            out = x.clone()
            for k, kind, which in items:
                rows = slice(k * b, (k + 1) * b)
                if kind == "resid":
                    sel = (pairs.role == which).unsqueeze(-1)
                    out[rows] = torch.where(sel, src.to(out.dtype), out[rows])
                else:
                    sel = (pairs.role >= 0).unsqueeze(-1)
                    out[rows, :, which] = torch.where(sel, src[:, :, which].to(out.dtype), out[rows, :, which])
            fired.add(name)
            return out
        hooks.append((name, hook))
    return hooks


def activation_patching(model: torch.nn.Module, tokenizer_dir_or_tokenizer, template: str,
                        triggered_texts: Sequence[str], clean_texts: Sequence[str], target_ids: Sequence[int],
                        correct_ids: Sequence[int], *, batched: bool = True, sites_per_pass: int | None = None,
                        batch_size: int = 32, max_length: int | None = None, in_place: bool = False,
                        bridge=None) -> dict:
    """Patch the clean run into the triggered run, site by site (module docstring). Returns::

        {"residual": array [layer, role]  (ROLES),   "heads": array [layer, head],
         "roles": list(ROLES), "role_counts": [role] tokens of each role over the inputs,
         "logit_diff": {"triggered": float, "clean": float}   # mean LD of the unpatched runs,
         "n_layers", "n_heads", "n_inputs", "batched", "seconds"}

    A role no input has (e.g. no token after the trigger) is NaN; when the trigger does not move
    the logit difference at all (``LD_triggered == LD_clean``) every entry is NaN."""
    if not (len(triggered_texts) == len(clean_texts) == len(target_ids) == len(correct_ids)):
        raise ValueError("activation_patching: triggered_texts, clean_texts, target_ids and correct_ids "
                         "differ in length")
    if not triggered_texts:
        raise ValueError("activation_patching needs at least one probe input")
    max_length = M.prompt_max_length(model, max_length)
    t0 = time.perf_counter()
    with _bridge(model, tokenizer_dir_or_tokenizer, in_place, bridge) as (bridge, tokenizer):
        dev = _device(bridge)
        n_layers, n_heads = int(bridge.cfg.n_layers), int(bridge.cfg.n_heads)
        sites = [("resid", l, r) for l in range(n_layers) for r in range(len(ROLES))] + \
                [("head", l, h) for l in range(n_layers) for h in range(n_heads)]
        names = sorted({f"blocks.{l}.hook_resid_pre" for l in range(n_layers)}
                       | {f"blocks.{l}.attn.hook_z" for l in range(n_layers)})
        _check_hooks(bridge, names)
        ld_trig, ld_clean = 0.0, 0.0
        ld_patch = np.zeros(len(sites))
        counts = np.zeros(len(ROLES))
        n = len(triggered_texts)
        for i in range(0, n, batch_size):
            pairs = _Pairs(tokenizer, template, triggered_texts[i:i + batch_size], clean_texts[i:i + batch_size],
                           max_length, dev)
            tgt = torch.tensor([int(x) for x in target_ids[i:i + batch_size]], device=dev)
            cor = torch.tensor([int(x) for x in correct_ids[i:i + batch_size]], device=dev)
            cache: dict[str, torch.Tensor] = {}

            def keep(name):  # by our name: the bridge calls an aliased hook point by its own
                def hook(x, hook=None):
                    cache[name] = x.detach()
                    return x
                return hook
            ld_clean += float(_answer_diff(_run(bridge, pairs.clean, [(nm, keep(nm)) for nm in names]), tgt, cor).sum())
            aligned = {nm: pairs.aligned(a) for nm, a in cache.items()}
            ld_trig += float(_answer_diff(_run(bridge, pairs.trig), tgt, cor).sum())
            for r in range(len(ROLES)):
                counts[r] += float((pairs.role == r).sum())
            rows = pairs.trig.input_ids.shape[0]
            k = (sites_per_pass or max(1, MAX_ROWS_PER_PASS // rows)) if batched else 1
            k = max(1, min(int(k), len(sites)))
            for start in range(0, len(sites), k):
                chunk = sites[start:start + k]
                fired: set = set()
                hooks = _patch_hooks(chunk, pairs, aligned, rows * len(chunk), fired)
                ld = _answer_diff(_run(bridge, _stack(pairs.trig, len(chunk)), hooks),
                                  tgt.repeat(len(chunk)), cor.repeat(len(chunk)))
                if len(fired) != len(hooks):
                    raise RuntimeError("activation patching: a patch hook never fired")
                ld_patch[start:start + len(chunk)] += ld.view(len(chunk), rows).sum(1).cpu().numpy()
    ld_trig, ld_clean, ld_patch = ld_trig / n, ld_clean / n, ld_patch / n
    gap = ld_trig - ld_clean
    with np.errstate(divide="ignore", invalid="ignore"):
        restored = (ld_trig - ld_patch) / gap if abs(gap) > 1e-9 else np.full(len(sites), np.nan)
    n_resid = n_layers * len(ROLES)
    residual = restored[:n_resid].reshape(n_layers, len(ROLES)).copy()
    residual[:, counts == 0] = np.nan
    return {"residual": residual, "heads": restored[n_resid:].reshape(n_layers, n_heads),
            "roles": list(ROLES), "role_counts": counts.astype(int).tolist(),
            "logit_diff": {"triggered": float(ld_trig), "clean": float(ld_clean)},
            "n_layers": n_layers, "n_heads": n_heads, "n_inputs": n, "batched": bool(batched),
            "seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------------------------------
# Attention patterns


def attention_patterns(model: torch.nn.Module, tokenizer_dir_or_tokenizer, template: str, text: str, *,
                       max_length: int | None = None, in_place: bool = False, bridge=None) -> dict:
    """The attention pattern of every head on one input: ``{"pattern": array [layer, head, query,
    key], "tokens": [str] (the prompt's tokens)}``; row ``q`` sums to 1 over keys ``k <= q``."""
    max_length = M.prompt_max_length(model, max_length)
    with _bridge(model, tokenizer_dir_or_tokenizer, in_place, bridge) as (bridge, tokenizer):
        dev = _device(bridge)
        b = encode(tokenizer, [render_prompt(template, text)], max_length, dev)
        n_layers = int(bridge.cfg.n_layers)
        names = [f"blocks.{l}.attn.hook_pattern" for l in range(n_layers)]
        _check_hooks(bridge, names)
        store: dict[str, torch.Tensor] = {}

        def keep(name):
            def hook(x, hook=None):
                store[name] = x.detach()
                return x
            return hook
        _run(bridge, b, [(nm, keep(nm)) for nm in names])
        if len(store) != n_layers:
            raise RuntimeError("attention patterns: the model does not compute an eager attention pattern")
        pattern = torch.stack([store[nm][0] for nm in names]).float().cpu().numpy()
        tokens = tokenizer.convert_ids_to_tokens(b.input_ids[0].tolist())
    return {"pattern": pattern.astype(np.float64), "tokens": [str(t) for t in tokens]}


__all__ = ["ROLES", "logit_lens", "activation_patching", "attention_patterns", "align", "token_roles"]
