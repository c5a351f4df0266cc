"""Attention-head ablation: which heads carry the backdoor (docs/method.md, section 2).

Ablating head ``(l, h)`` replaces that one head's attention pattern with a uniform distribution
over the visible prefix of every query position (its own and earlier non-pad tokens), leaving
every other head, and the rest of the forward pass, untouched. A head is "critical" when the
ablation changes the attack success rate (ASR) a lot.

Measurement, on a probe set of clean inputs and their triggered copies:

- ``delta_cacc[l, h]`` = CACC(ablated) - CACC(unablated), over all clean probe inputs.
- ``delta_asr[name][l, h]`` = ASR(ablated) - ASR(unablated) for each trigger (``unknown``: the
  attacker's, ``t1``, ``t2``, ...: the defender's known ones). ASR is the headline ASR of
  :mod:`locphylax_core.evaluation`, with one deliberate choice: the *eligible* set (triggered
  inputs whose correct label is not the target and whose clean copy the model answers
  correctly) is fixed ONCE, from the **unablated** model's clean predictions, and the same
  inputs are scored for every ablated head. Re-deriving eligibility from the ablated model's
  clean predictions would let a head that merely hurts clean accuracy change the denominator
  and mix its CACC effect into its ASR effect. For an EvalSet (whose triggered inputs never
  carry the target label) the unablated ASR over this set is the headline ASR of
  :func:`evaluation.evaluate` (tested on the micro run). Negative values mean that ablating the
  head weakens the attack. ``delta_asr_raw`` does the same for the raw ASR (all non-target
  inputs, clean correctness ignored), which stays defined when no input is eligible.

Implementation: a TransformerLens 4 ``TransformerBridge`` over a **deep copy** of the HF model
(the bridge replaces the modules of the model it wraps, so wrapping the caller's model would
mutate it), with a forward hook on ``blocks.{l}.attn.hook_pattern`` that overwrites the pattern
of the ablated head. The hooks live only for one forward pass (``bridge.hooks`` context).
No-copy path (``head_ablation(..., in_place=True)``, used by :func:`run_head_ablation`, which
owns the checkpoint it loads): :func:`borrowed_bridge` wraps the model itself and then puts its
modules, hooks and config back, so a 7B model's weights exist once (docs/scale.md); the arrays
are the same as with the copy (tested).

Left padding: our prompts are left-padded, with position ids computed from the attention mask
(:func:`engine.encode`). The bridge forwards ``attention_mask`` and ``position_ids`` as given to
the HF model, whose 4-D causal+padding mask the bridge's attention applies before the softmax, so
padded batches give the same answer logits as :func:`engine.forward_answer` (tested to 1e-4;
measured at most 1.4e-6 on the micro run's checkpoints). Batches therefore need not be grouped by length; they are sorted by token
length only to save padding compute. The uniform pattern is built from the same 2-D mask: query
``q`` of a row puts weight ``1/n`` on each key ``k <= q`` with ``mask[k] == 1`` (``n`` of them)
and zero on future and pad keys. A pad query (left padding: no visible key) gets an all-zero row;
pad positions are never attended to by real tokens, so this cannot reach any real output.

Batched sweep: the batch is stacked K times and copy ``k`` ablates the k-th head of the chunk
(one hook per layer indexes the (row, head) pairs to overwrite), so K heads cost one forward
pass. The naive sweep runs one forward per head. Both use the same hook code and give the same
arrays (tested).

Architectures: anything ``TransformerBridge.boot_transformers`` accepts (GPT-2 -- the embedded
model --, GPT-NeoX/Pythia, Llama, Qwen, ...). A model the bridge cannot take raises
:class:`ConfigError`; there is no plain-HF-hook fallback. The hook is also checked to have fired
for every ablated layer (an SDPA/flash model exposes no pattern), so an ablation can never
silently do nothing.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from .. import model as M
from ..engine import Batch
from ..config import load_run_config
from ..errors import ConfigError, RunError
from ..experiment import build_experiment
from ..evaluation import accuracy, encoded_batches
from ..runs import RunDir

DEFAULT_KEYS = ("victim", "stage1", "stage2")
MAX_ROWS_PER_PASS = 1024  # batch rows x stacked copies per forward pass in the batched sweep


# ----------------------------------------------------------------------------------------------
# The bridge


def _tokenizer_dir(tokenizer_dir_or_tokenizer, tmp: Path) -> Path:
    if isinstance(tokenizer_dir_or_tokenizer, (str, Path)):
        return Path(tokenizer_dir_or_tokenizer)
    # The bridge reloads an in-memory tokenizer by name (KeyError 'name_or_path' otherwise):
    # give it a saved copy.
    tokenizer_dir_or_tokenizer.save_pretrained(str(tmp))
    return tmp


def boot_bridge(model: torch.nn.Module, tokenizer_dir_or_tokenizer, *, in_place: bool = False):
    """``(bridge, tokenizer)``: a TransformerBridge over a deep copy of ``model`` (the caller's
    model is never modified) and a left-padded tokenizer for :func:`engine.encode`.

    ``in_place=True`` wraps ``model`` itself, with no copy of its weights: the bridge then
    replaces submodules of ``model`` until :func:`restore_model` puts them back. Use
    :func:`borrowed_bridge`, which does both, rather than this flag directly."""
    from transformer_lens.model_bridge import TransformerBridge

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    param = next(base.parameters())
    dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), param.dtype)
    with tempfile.TemporaryDirectory(prefix="locphylax-tok-") as tmp:
        tok_dir = _tokenizer_dir(tokenizer_dir_or_tokenizer, Path(tmp))
        tokenizer = M.load_tokenizer(str(tok_dir))  # ours, for encode()
        bridge_tok = M.load_tokenizer(str(tok_dir))  # the bridge may reconfigure its own copy
        hf = base.eval() if in_place else copy.deepcopy(base).eval()
        tl_logger = logging.getLogger("transformer_lens")
        level = tl_logger.level
        tl_logger.setLevel(logging.ERROR)
        try:
            bridge = TransformerBridge.boot_transformers(str(tok_dir), hf_model=hf, tokenizer=bridge_tok,
                                                         device=str(param.device), dtype=dtype)
        except Exception as e:
            raise ConfigError(f"head ablation: TransformerLens cannot wrap {type(base).__name__} "
                              f"({type(e).__name__}: {e})") from None
        finally:
            tl_logger.setLevel(level)
    bridge.eval()
    return bridge, tokenizer


def snapshot_model(model: torch.nn.Module) -> list:
    """What :func:`restore_model` needs to undo a bridge wrapped around ``model`` in place: each
    module's attributes, with its dicts (submodules, parameters, buffers, hooks) copied shallowly
    -- the parameter and buffer tensors themselves are shared, never copied -- and the configs'."""
    def shallow(obj) -> dict:
        return {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in vars(obj).items()}

    snap = [(mod, shallow(mod)) for mod in model.modules()]
    configs = {id(c): c for mod in model.modules() for c in [getattr(mod, "config", None)] if c is not None}
    for c in list(configs.values()):  # nested configs (e.g. text_config) too
        for v in vars(c).values():
            if hasattr(v, "to_dict") and hasattr(v, "model_type"):
                configs.setdefault(id(v), v)
    return snap + [(c, shallow(c)) for c in configs.values()]


def restore_model(snapshot: list) -> None:
    """Put back every attribute recorded by :func:`snapshot_model` (dicts refilled in place, so
    objects that hold them keep working) and drop the attributes added since."""
    for obj, saved in snapshot:
        now = vars(obj)
        for k in [k for k in now if k not in saved]:
            del now[k]
        for k, v in saved.items():
            cur = now.get(k)
            if isinstance(v, dict) and isinstance(cur, dict) and cur is not v:
                cur.clear()
                cur.update(v)
            else:
                now[k] = v


@contextlib.contextmanager
def borrowed_bridge(model: torch.nn.Module, tokenizer_dir_or_tokenizer):
    """``with borrowed_bridge(model, tok) as (bridge, tokenizer)``: a TransformerBridge over the
    caller's model itself -- the weights are used where they are (one GPU, several under
    ``device_map='auto'``, or the CPU) and never copied -- whose module replacements, attention
    implementation switch and train/eval flag are undone on exit, even after an error. The
    model must not be used by anything else inside the block."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    snap = snapshot_model(base)
    bridge = None
    try:
        bridge, tokenizer = boot_bridge(base, tokenizer_dir_or_tokenizer, in_place=True)
        yield bridge, tokenizer
    finally:
        del bridge
        restore_model(snap)


@contextlib.contextmanager
def _copied_bridge(model: torch.nn.Module, tokenizer_dir_or_tokenizer):
    """:func:`boot_bridge` over a deep copy, as a context manager (the counterpart of
    :func:`borrowed_bridge`)."""
    bridge, tokenizer = boot_bridge(model, tokenizer_dir_or_tokenizer)
    try:
        yield bridge, tokenizer
    finally:
        del bridge


def uniform_pattern(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, S, S]``: row ``q`` is uniform over the keys ``k <= q`` with ``mask[k] == 1``, zero on
    future and pad keys; an all-zero row for a query with no visible key (a left pad)."""
    mask = attention_mask.bool()
    s = mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=mask.device).tril()
    visible = (causal.unsqueeze(0) & mask.unsqueeze(1)).float()
    return visible / visible.sum(-1, keepdim=True).clamp(min=1.0)


def ablation_hooks(heads: Sequence[tuple[int, int]], attention_mask: torch.Tensor,
                   fired: set | None = None) -> list:
    """Forward hooks for a batch stacked ``len(heads)`` times: copy ``k`` (rows ``k*B .. (k+1)*B``
    of ``attention_mask``) has head ``heads[k]`` ablated. ``heads`` of length 1 is the plain
    single-head ablation. ``fired`` (a set) records the layers whose hook ran."""
    heads = [(int(l), int(h)) for l, h in heads]
    if not heads:
        return []
    rows_total = attention_mask.shape[0]
    if rows_total % len(heads):
        raise ValueError(f"{rows_total} rows cannot be {len(heads)} equal copies")
    b = rows_total // len(heads)
    uniform = uniform_pattern(attention_mask)
    per_layer: dict[int, tuple[list, list]] = {}
    for k, (l, h) in enumerate(heads):
        rows, hs = per_layer.setdefault(l, ([], []))
        rows.extend(range(k * b, (k + 1) * b))
        hs.extend([h] * b)

    def make(layer: int, rows: torch.Tensor, hs: torch.Tensor):
        def hook(pattern: torch.Tensor, hook=None):
            if pattern.shape[0] != rows_total or pattern.shape[-1] != uniform.shape[-1]:
                raise RuntimeError(f"hook_pattern of layer {layer}: shape {tuple(pattern.shape)} does not match "
                                   f"the batch ({rows_total} rows, {uniform.shape[-1]} positions)")
            out = pattern.clone()
            out[rows, hs] = uniform[rows].to(out.dtype)
            if fired is not None:
                fired.add(layer)
            return out
        return hook

    dev = attention_mask.device
    return [(f"blocks.{l}.attn.hook_pattern", make(l, torch.tensor(r, device=dev), torch.tensor(h, device=dev)))
            for l, (r, h) in sorted(per_layer.items())]


def _repeat(batch: Batch, k: int) -> Batch:
    if k == 1:
        return batch
    return Batch(batch.input_ids.repeat(k, 1), batch.attention_mask.repeat(k, 1), batch.position_ids.repeat(k, 1))


@torch.no_grad()
def bridge_answer_logits(bridge, batch: Batch, heads: Sequence[tuple[int, int]] = (), extra_hooks=()) -> torch.Tensor:
    """Answer-position logits ``[rows, V]`` of the bridge on an (already stacked) batch, with
    ``heads[k]`` ablated in copy ``k``; no head ablated when ``heads`` is empty."""
    fired: set = set()
    hooks = ablation_hooks(heads, batch.attention_mask, fired) + list(extra_hooks)
    known = bridge.hook_dict
    for name, _ in hooks:
        if name not in known:
            raise ConfigError(f"head ablation: the bridge has no hook {name!r}")
    with bridge.hooks(fwd_hooks=hooks):
        # only the answer position's logits: the unembedding of every position was most of the cost
        logits = bridge(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                        use_cache=False, logits_to_keep=1)
    missing = {l for l, _ in heads} - fired
    if missing:
        raise RuntimeError(f"head ablation: hook_pattern of layer(s) {sorted(missing)} never fired "
                           "(the model does not compute an eager attention pattern)")
    return logits[:, -1]


# ----------------------------------------------------------------------------------------------
# Sweeps


def _swept_layers(layers: Sequence[int] | None, n_layers: int) -> set[int]:
    if layers is None:
        return set(range(n_layers))
    bad = [l for l in layers if not -n_layers <= int(l) < n_layers]
    if bad or not layers:
        raise ValueError(f"layers: expected block indices in [-{n_layers}, {n_layers}), got {list(layers)}")
    return {int(l) % n_layers for l in layers}


def _nan_rows(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.where(rows, np.nan, values)


def _all_heads(bridge) -> list[tuple[int, int]]:
    return [(l, h) for l in range(bridge.cfg.n_layers) for h in range(bridge.cfg.n_heads)]


def sweep_logits(bridge, batches, n_items: int, answer_ids: Sequence[int], heads: Sequence[tuple[int, int]],
                 batched: bool = True, heads_per_pass: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label logits with no ablation ``[n_items, n_labels]`` and with each head of ``heads``
    ablated ``[len(heads), n_items, n_labels]``. ``batched``: ``heads_per_pass`` heads per
    forward pass (default: as many as fit :data:`MAX_ROWS_PER_PASS` rows); else one per pass."""
    answer = torch.tensor(list(answer_ids))
    n_lab = len(answer_ids)
    base = np.zeros((n_items, n_lab), dtype=np.float64)
    abl = np.zeros((len(heads), n_items, n_lab), dtype=np.float64)
    for idx, b in batches:
        base[idx] = bridge_answer_logits(bridge, b)[:, answer.to(b.input_ids.device)].double().cpu().numpy()
        rows = b.input_ids.shape[0]
        if batched:
            k = heads_per_pass or max(1, MAX_ROWS_PER_PASS // max(1, rows))
        else:
            k = 1
        k = max(1, min(int(k), len(heads)))
        for start in range(0, len(heads), k):
            chunk = list(heads[start:start + k])
            logits = bridge_answer_logits(bridge, _repeat(b, len(chunk)), chunk)
            logits = logits[:, answer.to(logits.device)].double().cpu().view(len(chunk), rows, n_lab)
            for j in range(len(chunk)):
                abl[start + j, idx] = logits[j].numpy()
    return base, abl


# ----------------------------------------------------------------------------------------------
# The public entry points


def _rank(delta: np.ndarray, top_k: int) -> tuple[list, list]:
    n_layers, n_heads = delta.shape
    mag = np.nan_to_num(np.abs(delta), nan=0.0)
    cells = sorted(((l, h) for l in range(n_layers) for h in range(n_heads)), key=lambda c: (-mag[c], c))
    critical_heads = [[int(l), int(h), float(delta[l, h])] for l, h in cells[:top_k]]
    per_layer = mag.sum(axis=1)
    critical_layers = [[int(l), float(per_layer[l])] for l in sorted(range(n_layers), key=lambda l: (-per_layer[l], l))]
    return critical_heads, critical_layers


def _every_head_row(abl_swept: np.ndarray, heads: Sequence[tuple[int, int]], n_layers: int,
                    n_heads: int) -> np.ndarray:
    """The swept heads' logits ``[len(heads), items, answers]`` as one row per head of the model; a
    head not swept has NaN logits, so NaN deltas."""
    rows = np.full((n_layers * n_heads, *abl_swept.shape[1:]), np.nan)
    rows[[l * n_heads + h for l, h in heads]] = abl_swept
    return rows


def _probe_items(clean_texts: Sequence[str], triggered: Mapping[str, tuple]) -> tuple[list[str], dict]:
    """Every probe input in one list (the clean ones first) and each trigger's span in it."""
    texts = list(clean_texts)
    spans = {}
    for name, (t_texts, targets, cidx) in triggered.items():
        if not (len(t_texts) == len(targets) == len(cidx)):
            raise ValueError(f"triggered[{name!r}]: texts, targets and clean_index differ in length")
        spans[name] = (len(texts), len(texts) + len(t_texts))
        texts += list(t_texts)
    return texts, spans


def _trigger_deltas(base_pred: np.ndarray, abl_pred: np.ndarray, y: np.ndarray, span: tuple[int, int], targets,
                    cidx, not_swept: np.ndarray, shape: tuple[int, int]) -> tuple:
    """One trigger's scores from the predictions of the unablated model (``base_pred``, per item)
    and of each ablated head (``abl_pred``, per head row and item): (eligible inputs, raw ASR,
    delta raw ASR, headline ASR, delta headline ASR); the ASRs are None and the deltas NaN where no
    input counts."""
    a, z = span
    cidx = np.array([int(i) for i in cidx], dtype=np.int64)
    tg = np.array([int(t) for t in targets], dtype=np.int64)
    # eligible once, from the unablated model: clean copy answered correctly (and, as in
    # build_eval_set, the label is not the target)
    eligible = (base_pred[cidx] == y[cidx]) & (y[cidx] != tg) if len(cidx) else np.zeros(0, dtype=bool)
    non_target = y[cidx] != tg  # raw ASR: every non-target input, clean correctness ignored
    base_raw, delta_raw = None, np.full(shape, np.nan)
    if non_target.any():
        base_raw = float((base_pred[a:z] == tg)[non_target].mean())
        delta_raw = _nan_rows((abl_pred[:, a:z] == tg)[:, non_target].mean(axis=1) - base_raw, not_swept).reshape(shape)
    if not eligible.any():
        return int(eligible.sum()), base_raw, delta_raw, None, np.full(shape, np.nan)
    asr0 = float((base_pred[a:z] == tg)[eligible].mean())  # = the headline ASR of evaluation.py
    hits = (abl_pred[:, a:z] == tg)[:, eligible]
    return (int(eligible.sum()), base_raw, delta_raw, asr0,
            _nan_rows(hits.mean(axis=1) - asr0, not_swept).reshape(shape))


def head_ablation(model: torch.nn.Module, tokenizer_dir_or_tokenizer, template: str, clean_texts: Sequence[str],
                  clean_labels: Sequence[int], triggered: Mapping[str, tuple], answer_ids: Sequence[int],
                  batched: bool = True, heads_per_pass: int | None = None, *, top_k: int = 5,
                  batch_size: int = 64, max_length: int | None = None, primary: str = "unknown",
                  in_place: bool = False, layers: Sequence[int] | None = None) -> dict:
    """Ablate every head in turn (uniform attention over the visible prefix) and measure the
    change in CACC and in headline ASR per trigger.

    ``triggered``: ``{name: (texts, targets, clean_index)}`` where ``clean_index[i]`` is the
    position in ``clean_texts`` of the clean copy of ``texts[i]`` (``TriggeredSet.indices``).
    Returns plain numpy arrays ``[n_layers, n_heads]``::

        {"delta_asr": {name: array}, "delta_cacc": array,
         "delta_asr_raw": {name: array},   # raw ASR (all non-target inputs), for reference
         "base": {"cacc": float, "asr": {name: float | None}, "asr_raw": {name: float | None}},
         "critical_heads": [[layer, head, delta_asr], ...]   # top_k by |delta ASR| of `primary`
         "critical_layers": [[layer, sum |delta ASR|], ...]  # all layers, largest first
         "n_eligible": {name: int}, "n_clean": int, "n_items": int (clean + triggered inputs),
         "n_layers", "n_heads", "primary",
         "batched", "heads_per_pass", "seconds": {"boot", "sweep"}}

    A trigger with no eligible input has ``base.asr[name] = None`` and an all-NaN array (and then,
    if it is ``primary``, NaN values in ``critical_heads``; ``critical_layers`` treats NaN as 0).
    The model is evaluated on its own device; it is not modified: by default a deep copy is
    wrapped; ``in_place=True`` wraps the model itself with no copy of its weights and restores it
    afterwards (:func:`borrowed_bridge`; the same arrays, half the peak memory: docs/scale.md).
    ``max_length`` (default: the model's context) truncates prompts from the left, as the
    pipeline's evaluation does. ``layers`` (default: every block) sweeps only the heads of those
    blocks (negative indices count from the last); the rows of the other blocks are NaN. The cost
    is one forward pass of every probe input per head, so on a 30-block model the blocks a
    fine-tune changed can be swept alone.
    """
    if len(clean_texts) != len(clean_labels):
        raise ValueError("clean_texts and clean_labels differ in length")
    if not clean_texts:
        raise ValueError("head ablation needs at least one clean probe input")
    t0 = time.perf_counter()
    boot = borrowed_bridge if in_place else _copied_bridge
    with boot(model, tokenizer_dir_or_tokenizer) as (bridge, tokenizer):
        t_boot = time.perf_counter() - t0
        device = next(bridge.original_model.parameters()).device
        labels = [int(y) for y in clean_labels]
        names = list(triggered)
        texts, spans = _probe_items(clean_texts, triggered)
        n_items = len(texts)

        if max_length is None:  # as the pipeline does: keep the end (the answer position) of an over-long prompt
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            max_length = M.model_max_positions(base)
        t1 = time.perf_counter()
        batches = encoded_batches(tokenizer, template, texts, batch_size, max_length, device)
        n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
        swept = _swept_layers(layers, n_layers)
        heads = [(l, h) for l, h in _all_heads(bridge) if l in swept]
        base_logits, abl_swept = sweep_logits(bridge, batches, n_items, answer_ids, heads, batched, heads_per_pass)
        t_sweep = time.perf_counter() - t1
    base_pred = base_logits.argmax(-1)
    abl_pred = _every_head_row(abl_swept, heads, n_layers, n_heads).argmax(-1)  # [n_heads_total, n_items]
    not_swept = np.repeat([l not in swept for l in range(n_layers)], n_heads)  # one flag per head row
    n_clean = len(labels)
    y = np.array(labels)
    base_cacc = accuracy(base_pred[:n_clean].tolist(), labels)
    delta_cacc = _nan_rows((abl_pred[:, :n_clean] == y).mean(axis=1) - base_cacc, not_swept).reshape(n_layers, n_heads)

    delta_asr, base_asr, n_eligible, delta_raw, base_raw = {}, {}, {}, {}, {}
    for name in names:
        _, targets, cidx = triggered[name]
        (n_eligible[name], base_raw[name], delta_raw[name], base_asr[name],
         delta_asr[name]) = _trigger_deltas(base_pred, abl_pred, y, spans[name], targets, cidx, not_swept,
                                            (n_layers, n_heads))

    primary = primary if primary in delta_asr else (names[0] if names else None)
    critical_heads, critical_layers = _rank(delta_asr[primary] if primary is not None else delta_cacc, top_k)
    return {"delta_asr": delta_asr, "delta_cacc": delta_cacc, "delta_asr_raw": delta_raw,
            "base": {"cacc": float(base_cacc), "asr": base_asr, "asr_raw": base_raw},
            "critical_heads": critical_heads, "critical_layers": critical_layers, "n_eligible": n_eligible,
            "n_clean": n_clean, "n_items": int(n_items), "n_layers": int(n_layers), "n_heads": int(n_heads),
            "primary": primary, "batched": bool(batched), "heads_per_pass": heads_per_pass, "layers": sorted(swept),
            "seconds": {"boot": t_boot, "sweep": t_sweep}}


def probe_inputs(evalset) -> tuple[list[str], list[int], dict]:
    """``(clean_texts, clean_labels, triggered)`` for :func:`head_ablation` from an EvalSet."""
    clean_texts = [e.text for e in evalset.clean]
    clean_labels = [e.label for e in evalset.clean]
    triggered = {name: (list(ts.texts), list(ts.targets), list(ts.indices)) for name, ts in evalset.triggered.items()}
    return clean_texts, clean_labels, triggered


def run_head_ablation(run: RunDir | str | Path, keys: Sequence[str] = DEFAULT_KEYS, n_probe: int = 200, top_k: int = 5,
                      batched: bool = True, heads_per_pass: int | None = None, batch_size: int = 64,
                      device: str | torch.device = "cpu", *, device_map=None, dtype=None,
                      layers: Sequence[int] | None = None) -> dict:
    """:func:`head_ablation` for the stage checkpoints ``keys`` of a finished (or partly finished)
    run, on the first ``n_probe`` clean test inputs of the run's evaluation set and their
    triggered copies (``EvalSet.subset``), rebuilt exactly as the run built it (same config,
    same tokenizer, same trigger insertion seeds). Returns ``{key: result}``.

    Each checkpoint is loaded once and the bridge wraps it in place (no copy of the weights:
    :func:`borrowed_bridge`); ``device_map='auto'`` (and e.g. ``dtype='bfloat16'``) lets
    accelerate spread a model too big for one device (docs/scale.md)."""

    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    cfg_path, tok_dir = run.config_path, run.tokenizer_dir
    if not cfg_path.is_file():
        raise RunError(f"{cfg_path}: missing, so {run.path} is not a run folder")
    if not tok_dir.is_dir():
        raise RunError(f"{tok_dir}: missing")
    missing = [k for k in keys if not run.checkpoint(k).is_dir()]
    if missing:
        raise RunError(f"{run.path}: no checkpoint for stage(s) {missing} (finished stages only)")
    cfg = load_run_config(cfg_path)
    exp = build_experiment(cfg)  # the run's evaluation set, rebuilt; no model is loaded for it
    tokenizer = M.load_tokenizer(str(tok_dir))
    answer_ids = M.run_answer_ids(tokenizer, exp.task,
                                  cfg.defense.canary if cfg.defense.known_target == "canary" else None)
    probe = exp.evalset.subset(n_probe)
    clean_texts, clean_labels, triggered = probe_inputs(probe)
    results = {}
    for key in keys:
        model = M.load_checkpoint(run.checkpoint(key), device, device_map=device_map, dtype=dtype)
        r = head_ablation(model, tok_dir, exp.task.template, clean_texts, clean_labels, triggered, answer_ids,
                          batched=batched, heads_per_pass=heads_per_pass, top_k=top_k, batch_size=batch_size,
                          max_length=cfg.model.n_positions if cfg.model.source == "embedded" else
                          M.model_max_positions(model), in_place=True, layers=layers)
        r["key"] = key
        results[key] = r
        del model
    return results


__all__ = ["head_ablation", "run_head_ablation", "boot_bridge", "borrowed_bridge", "snapshot_model", "restore_model",
           "uniform_pattern", "ablation_hooks",
           "bridge_answer_logits", "sweep_logits", "probe_inputs"]
