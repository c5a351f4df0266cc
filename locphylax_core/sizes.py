"""Size estimates made before anything is allocated: a model's parameter count from its shape, the
memory a run needs, and this machine's memory. A configuration that cannot fit is refused when it
is validated (or, for a Hugging Face model, once its config.json is read and before any weight is),
instead of by the allocator minutes later; ``train.allow_large`` lets a user go on anyway.

Pure Python (no torch): the configuration imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

# Training in a dtype of w bytes with AdamW keeps, per trained parameter, the weight, its gradient
# and the optimizer's two moments: 4 x w (16 bytes in float32). Activations come on top and depend
# on the inputs' lengths, so they are left out: the estimate is a lower bound.
TRAINING_COPIES = 4
# One example in memory (its text, its label and their Python objects): the synthetic task measured
# about 320 bytes; the rest is room for the poisoned and shuffled copies a run makes.
BYTES_PER_EXAMPLE = 1024
ALLOW_LARGE_HINT = "set train.allow_large=true to try anyway on a machine with more memory"


def weight_bytes(dtype) -> float:
    """Bytes per weight of a dtype given as a name or a torch dtype (float32 for anything unknown)."""
    name = str(dtype).removeprefix("torch.")
    return 2.0 if name in ("bfloat16", "float16", "half") else 4.0


def bytes_per_parameter(weights: float = 4.0, *, training: bool = True, lora: bool = False) -> float:
    """Memory per parameter: the weight alone when only loading or when LoRA trains a small
    adapter beside frozen weights, the weight with its training state otherwise."""
    return weights * TRAINING_COPIES if training and not lora else weights


def default_intermediate_size(n_embd: int, gated: bool) -> int:
    """The embedded model's MLP width when model.intermediate_size is left out: 4 x n_embd, or for a
    gated MLP (three matrices instead of two) 8/3 x n_embd rounded up to a multiple of 8."""
    return -(-(8 * n_embd) // (3 * 8)) * 8 if gated else 4 * n_embd


def transformer_parameters(*, n_layer: int, n_embd: int, vocab_size: int, intermediate_size: int, n_head: int = 1,
                           n_kv_head: int | None = None, gated: bool = False, learned_positions: int = 0,
                           tied: bool = True, experts: int = 1) -> int:
    """A decoder-only transformer's parameter count from its shape (attention, MLP and norms per
    block, embeddings, an untied output head): exact for GPT-2, within a few percent otherwise."""
    d = n_embd
    kv_width = d * (n_kv_head or n_head) // max(1, n_head)
    attention = 2 * d * d + 2 * d * kv_width  # query and output; key and value (fewer under GQA)
    mlp = (3 if gated else 2) * d * intermediate_size * max(1, experts)
    per_block = attention + mlp + 9 * d + intermediate_size  # norms and biases, the largest case (GPT-2)
    embeddings = vocab_size * d * (1 if tied else 2) + learned_positions * d
    return n_layer * per_block + embeddings + 2 * d


def hf_config_parameters(conf) -> int | None:
    """The parameter count a Hugging Face config (``AutoConfig``) describes, or None when its size
    fields are not positive integers (transformers then fails on its own, before allocating)."""
    def get(*names):
        for name in names:
            v = getattr(conf, name, None)
            if v is not None:
                return v
        return None

    d, layers, vocab = get("hidden_size", "n_embd", "d_model"), get("num_hidden_layers", "n_layer"), get("vocab_size")
    heads = get("num_attention_heads", "n_head") or 1
    inter = get("intermediate_size", "n_inner", "ffn_dim") or (4 * d if isinstance(d, int) else None)
    values = (d, layers, vocab, heads, inter)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return None
    kv = get("num_key_value_heads")
    experts = get("num_local_experts", "num_experts")
    model_type = getattr(conf, "model_type", "")
    return transformer_parameters(
        n_layer=layers, n_embd=d, vocab_size=vocab, intermediate_size=inter, n_head=heads,
        n_kv_head=kv if isinstance(kv, int) and kv > 0 else None,
        gated=get("hidden_act") in ("silu", "swiglu") or model_type in ("llama", "qwen2", "qwen3", "mistral", "gemma"),
        learned_positions=(get("n_positions", "max_position_embeddings") or 0) if model_type == "gpt2" else 0,
        tied=bool(getattr(conf, "tie_word_embeddings", True)), experts=experts if isinstance(experts, int) else 1)


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (a container's), if it has one."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            return int(text)
    return None


def machine_memory_bytes() -> int | None:
    """This machine's memory (RAM), or its container's limit where lower; None when unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    limit = _cgroup_limit()
    known = [x for x in (total, limit) if x]
    return min(known) if known else None


def parameters_text(n: int) -> str:
    return f"{n / 1e9:,.1f} billion" if n >= 1e9 else f"{n / 1e6:,.1f} million"


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def memory_problem(what: str, need: float, detail: str, limit: int | None = None) -> str | None:
    """Why ``need`` bytes cannot fit this machine (``limit``: its memory, measured when None), as
    ``what: ... ; ...`` naming the estimate, the limit and the way out; None when it fits."""
    limit = machine_memory_bytes() if limit is None else limit
    if limit is None or need <= limit:
        return None
    return (f"{what}: {detail} would need about {gib(need)} of memory, more than this machine has "
            f"({gib(limit)}); choose a smaller size, or {ALLOW_LARGE_HINT}")


__all__ = ["BYTES_PER_EXAMPLE", "bytes_per_parameter", "default_intermediate_size", "hf_config_parameters",
           "machine_memory_bytes", "memory_problem", "parameters_text", "transformer_parameters", "weight_bytes"]
