"""Per-architecture knowledge, in one table: where a model's decoder blocks, final norm and MLP
projections are, and which modules LoRA adapts. Every feature that reaches into a model's modules
(the clustering hooks, fine-pruning, the rank-one edit, LoRA, head ablation, CASD) reads it here,
so they all support the same models.

A ``model_type`` (config.json) missing from the table still works where it can: its decoder blocks
are found as the ModuleList with ``num_hidden_layers`` entries, and its MLP by the first entry
whose projection names the block has; LoRA then falls back to peft's own default.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Arch:
    blocks: str  # path from the base model to its ModuleList of decoder blocks
    final_norm: str | None  # path from the base model to the norm before the output head
    mlp: str  # path from a block to its MLP ("" when the projections sit on the block itself, as in OPT)
    mlp_in: tuple[str, ...]  # the projections that produce the MLP's units (gated MLPs: gate and up)
    mlp_out: str  # the projection that reads them
    # LoRA targets when model.lora.target_modules is None. GPT-2 keeps peft's own default (c_attn,
    # the fused q/k/v projection): "c_proj" would also match the MLP's c_proj (peft matches suffixes).
    lora: tuple[str, ...] | None  # None: peft's own default for the model type
    rotary: bool = False  # full rotary position embeddings: a head's width must be even
    gqa: bool = False  # grouped-query attention (fewer key/value heads than heads)
    embedded: bool = False  # the project's own embedded model can be built as this (model.arch)
    # engine.answer_logits may run its blocks from block k on stored block-k inputs: its forward
    # (Llama's, restated in engine._output_from_block) adds nothing to the embeddings and masks only
    # causally (no sliding window)
    runs_from_block: bool = False


_LLAMA = Arch("model.layers", "model.norm", "mlp", ("gate_proj", "up_proj"), "down_proj",
              ("q_proj", "k_proj", "v_proj", "o_proj"), rotary=True, gqa=True, embedded=True)
ARCHITECTURES: dict[str, Arch] = {
    "gpt2": Arch("transformer.h", "transformer.ln_f", "mlp", ("c_fc",), "c_proj", ("c_attn",), embedded=True),
    "gpt_neox": Arch("gpt_neox.layers", "gpt_neox.final_layer_norm", "mlp", ("dense_h_to_4h",), "dense_4h_to_h",
                     ("query_key_value", "dense"), embedded=True),
    "llama": replace(_LLAMA, runs_from_block=True), "qwen2": _LLAMA, "mistral": _LLAMA,
    "gemma": replace(_LLAMA, lora=None, embedded=False), "qwen3": replace(_LLAMA, lora=None, embedded=False),
    "gptj": Arch("transformer.h", "transformer.ln_f", "mlp", ("fc_in",), "fc_out", None),
    "phi": Arch("model.layers", "model.final_layernorm", "mlp", ("fc1",), "fc2", None),
    "opt": Arch("model.decoder.layers", "model.decoder.final_layer_norm", "", ("fc1",), "fc2", None),
}


EMBEDDED_ARCHS = tuple(name for name, a in ARCHITECTURES.items() if a.embedded)  # model.arch's choices


def gated_mlp(arch: str) -> bool:
    """A gated MLP (down(act(gate(x)) * up(x))): three matrices instead of two."""
    return len(ARCHITECTURES[arch].mlp_in) > 1


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _get(mod, path: str):
    for name in filter(None, path.split(".")):
        mod = getattr(mod, name)
    return mod


def arch_of(model: torch.nn.Module) -> Arch | None:
    return ARCHITECTURES.get(getattr(getattr(base_model(model), "config", None), "model_type", None))


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of decoder blocks of any HF causal LM (and peft wraps)."""
    base = base_model(model)
    arch = arch_of(model)
    if arch is not None:
        try:
            return _get(base, arch.blocks)
        except AttributeError:
            pass
    n = getattr(base.config, "num_hidden_layers", None)
    for mod in base.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise ConfigError(f"cannot find the {n} decoder blocks of {type(base).__name__}")


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm before the output head, or None when the architecture has none (or is unknown)."""
    base = base_model(model)
    arch = arch_of(model)
    paths = [arch.final_norm] if arch is not None and arch.final_norm else \
        list(dict.fromkeys(a.final_norm for a in ARCHITECTURES.values() if a.final_norm))
    for path in paths:
        try:
            return _get(base, path)
        except AttributeError:
            continue
    return None


def _conv1d(mod) -> bool:
    """GPT-2's Conv1D stores its weight as [in, out]; nn.Linear as [out, in]."""
    return type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None and mod.weight.dim() == 2


def _linear_like(mod) -> bool:
    return isinstance(mod, torch.nn.Linear) or _conv1d(mod)


@dataclass
class MLPUnits:
    """The intermediate units of one block's MLP: ``inputs`` are the projections that produce the
    units (``(module, unit_axis)`` of their weight; a unit is one output of each), ``output`` the
    projection that reads them. Unit ``i`` is pruned by zeroing its output row/column (and bias) in
    every input projection and its column/row in the output projection; its activation is the
    output projection's input."""

    mlp: torch.nn.Module
    inputs: list  # [(module, unit_axis of module.weight)]
    output: tuple  # (module, unit_axis of module.weight)

    @property
    def n_units(self) -> int:
        mod, axis = self.inputs[0]
        return mod.weight.shape[axis]

    def tensors(self):
        """``(tensor, unit_axis)`` of every weight and bias that holds a unit's parameters."""
        out = []
        for mod, axis in self.inputs:
            out.append((mod.weight, axis))
            if getattr(mod, "bias", None) is not None:
                out.append((mod.bias, 0))
        mod, axis = self.output
        out.append((mod.weight, axis))
        return out


def _mlp_of(block, arch: Arch) -> MLPUnits | None:
    try:
        mlp = _get(block, arch.mlp)
        ins = [_get(mlp, n) for n in arch.mlp_in]
        out = _get(mlp, arch.mlp_out)
    except AttributeError:
        return None
    if not all(_linear_like(m) for m in (*ins, out)):
        return None
    return MLPUnits(mlp, [(m, 1 if _conv1d(m) else 0) for m in ins], (out, 0 if _conv1d(out) else 1))


def block_mlp(model: torch.nn.Module, layer: int, field: str = "defense.layer") -> MLPUnits:
    """The MLP units of decoder block ``layer`` (``field`` names the setting in errors)."""
    blocks = decoder_blocks(model)
    if not -len(blocks) <= layer < len(blocks):
        raise ConfigError(f"{field}: {layer} is out of range for a model with {len(blocks)} blocks")
    block = blocks[layer]
    arch = arch_of(model)
    for candidate in ([arch] if arch is not None else []) + list(dict.fromkeys(ARCHITECTURES.values())):
        found = _mlp_of(block, candidate)
        if found is not None:
            return found
    known = sorted(ARCHITECTURES)
    raise ConfigError(f"{field}: cannot find the MLP projections of a {type(block).__name__} block (model_type "
                      f"{getattr(base_model(model).config, 'model_type', None)!r}); the architecture table "
                      f"(locphylax_core/architectures.py) knows {known}")


def mlp_output_projection(model: torch.nn.Module, layer: int, field: str = "attack.edit_layer") -> torch.nn.Module:
    """The MLP output projection of decoder block ``layer``: a Linear ([out, in] weight) or a GPT-2
    Conv1D ([in, out] weight) whose input is the post-activation MLP hidden state."""
    return block_mlp(model, layer, field).output[0]


def orientation(mod) -> str | None:
    """'in_out' for a GPT-2 Conv1D, 'out_in' for a Linear, None for anything else."""
    if isinstance(mod, torch.nn.Linear):
        return "out_in"
    return "in_out" if _conv1d(mod) else None


def lora_targets(model: torch.nn.Module, target_modules=None) -> list[str] | None:
    """The LoRA targets of a stage: ``target_modules`` when given, else the architecture's, else
    None (peft's own default for that model type)."""
    if target_modules is not None:
        return list(target_modules)
    arch = arch_of(model)
    return list(arch.lora) if arch is not None and arch.lora is not None else None


__all__ = ["Arch", "ARCHITECTURES", "EMBEDDED_ARCHS", "gated_mlp", "arch_of", "base_model", "decoder_blocks", "final_norm", "MLPUnits", "block_mlp",
           "mlp_output_projection", "orientation", "lora_targets"]
