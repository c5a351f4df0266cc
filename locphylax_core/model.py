"""Models: the embedded default (a small GPT-2 that starts from the project's pretrained base, or
from scratch with a byte-level BPE tokenizer trained on the task) and any Hugging Face causal LM
by hub id or local path.

Safety: checkpoints are what this project is about distrusting. Weights are read from
safetensors only (``use_safetensors=True``: a pickle-only checkpoint is refused, never
unpickled; every shard a sharded checkpoint's index names must be a ``.safetensors`` file inside
its folder), and ``trust_remote_code`` stays off unless the configuration names it. A model whose
config.json describes more than this machine's memory holds is refused before it is built.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import bases
from .architectures import EMBEDDED_ARCHS, base_model, decoder_blocks, gated_mlp, lora_targets
from .bases import SCRATCH
from .config import ModelConfig
from .errors import ConfigError, ModelLoadError
from .precision import Bf16Setting, use_bf16
from .runs import write_folder_atomically
from .sizes import (bytes_per_parameter, default_intermediate_size, hf_config_parameters, memory_problem,
                    parameters_text, weight_bytes)
from .tasks import Task
from .tasks.sources import embedded_corpus
from .text import render_prompt

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
EOS = "<|endoftext|>"
PAD = "<pad>"


@dataclass
class LM:
    """A causal LM with what the pipeline needs to score a task's answers."""

    model: torch.nn.Module
    tokenizer: object  # a PreTrainedTokenizerFast, left-padded
    answer_ids: tuple[int, ...]  # first token of each label's answer, indexed by label
    bf16: Bf16Setting = False  # eval.bf16: bfloat16 autocast of the scoring and probe forward passes
    # leading decoder blocks that no stage of the run adapts (model.lora.last_blocks): scoring may
    # reuse their output across models (engine.answer_logits, which checks their weights by content)
    frozen_blocks: int = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def inference_autocast(self):
        """The context every scoring forward pass of this model runs in (see ``bf16``; ``auto``:
        only where the device computes in bf16)."""
        if not use_bf16(self.bf16, self.device):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Byte-level BPE: any string, including a trigger never seen in training, is representable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None,
                                   pad_token=PAD, padding_side="left", model_max_length=100000)


def tokenizer_corpus(task: Task) -> list[str]:
    """What the model owner trains the tokenizer on: rendered clean prompts with their answers."""
    texts = [render_prompt(task.template, e.text) + (task.answer(e.label) if e.response is None else " " + e.response)
             for e in task.train]
    return texts + embedded_corpus()


def answer_token_ids(tokenizer, task: Task) -> tuple[int, ...]:
    ids = []
    for label in range(len(task.labels)):
        toks = tokenizer(task.answer(label), add_special_tokens=False)["input_ids"]
        if not toks:
            raise ModelLoadError(f"task.labels: answer {task.labels[label]!r} tokenizes to nothing")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ModelLoadError(f"task.labels {list(task.labels)}: two answers start with the same token "
                             "for this tokenizer, so they cannot be told apart; choose other label words")
    return tuple(ids)


def canary_token_id(tokenizer, canary: str, answer_ids: Sequence[int]) -> int:
    """First token of the defender's canary answer (`` <canary>``); it must differ from every label's."""
    toks = tokenizer(" " + canary, add_special_tokens=False)["input_ids"]
    if not toks:
        raise ConfigError(f"defense.canary: {canary!r} tokenizes to nothing")
    if toks[0] in answer_ids:
        raise ConfigError(f"defense.canary: {canary!r} starts with the same token as a label word for this "
                          "tokenizer; choose another canary word")
    return toks[0]


def run_answer_ids(tokenizer, task: Task, canary: str | None) -> tuple[int, ...]:
    """What a run's predictions range over: each label's first answer token, then the defender's
    canary answer's when ``defense.known_target`` is 'canary' (``canary``; None otherwise)."""
    ids = answer_token_ids(tokenizer, task)
    return ids + (canary_token_id(tokenizer, canary, ids),) if canary is not None else ids


# ----------------------------------------------------------------------------------------------
# Building and loading




def embedded_intermediate_size(cfg: ModelConfig) -> int:
    """MLP width: ``model.intermediate_size``, else 4 x n_embd (gpt2, gpt_neox) or, for the gated
    MLPs (three matrices instead of two), 8/3 x n_embd rounded up to a multiple of 8."""
    if cfg.intermediate_size is not None:
        return cfg.intermediate_size
    return default_intermediate_size(cfg.n_embd, gated_mlp(cfg.arch))


# activations that transformers implements twice: the same function (to float rounding: at most
# 2.4e-7 apart), the second as one fused torch kernel, about 3x faster on CPU than the first, which
# is written out in elementwise ops (forward and backward)
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


def use_fused_activation(conf) -> None:
    """Swap ``conf``'s activation for its fused equivalent (:data:`FUSED_ACTIVATIONS`), in place."""
    for name in ("activation_function", "hidden_act"):  # GPT-2's name, the other architectures'
        act = getattr(conf, name, None)
        if isinstance(act, str) and act in FUSED_ACTIVATIONS:
            setattr(conf, name, FUSED_ACTIVATIONS[act])


def embedded_config(cfg: ModelConfig, tokenizer):
    """The transformers config of the embedded model of architecture ``cfg.arch``: the size
    fields mapped to that class's names, dropout 0, eager attention (the head-ablation hooks of
    the analysis need the attention pattern), the embedded tokenizer's special tokens."""
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if cfg.arch == "gpt2":
        from transformers import GPT2Config
        conf = GPT2Config(n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
        if cfg.intermediate_size is not None:  # None keeps GPT2Config's own default (4 x n_embd)
            conf.n_inner = cfg.intermediate_size
    elif cfg.arch == "gpt_neox":
        from transformers import GPTNeoXConfig
        conf = GPTNeoXConfig(hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                             intermediate_size=embedded_intermediate_size(cfg), max_position_embeddings=cfg.n_positions,
                             hidden_dropout=0.0, attention_dropout=0.0, **special)
    elif gated_mlp(cfg.arch):
        from transformers import LlamaConfig, MistralConfig, Qwen2Config
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[cfg.arch]
        conf = cls(hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                   num_key_value_heads=cfg.n_kv_head or cfg.n_head, intermediate_size=embedded_intermediate_size(cfg),
                   max_position_embeddings=cfg.n_positions, attention_dropout=0.0, **special)
    else:  # the config's Literal makes this unreachable from a validated configuration
        raise ConfigError(f"model.arch: unknown architecture {cfg.arch!r}; allowed: {list(EMBEDDED_ARCHS)}")
    conf._attn_implementation = "eager"
    if cfg.fused_activation:
        use_fused_activation(conf)
    return conf


def build_embedded(cfg: ModelConfig, tokenizer, seed: int) -> torch.nn.Module:
    """A randomly initialised model of architecture ``cfg.arch`` (default GPT-2) with the embedded
    tokenizer; the same seed gives the same weights."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    torch.manual_seed(seed)
    conf = embedded_config(cfg, tokenizer)
    if cfg.arch == "gpt2":
        return GPT2LMHeadModel(conf)
    return AutoModelForCausalLM.from_config(conf, attn_implementation="eager")


def embedded_tokenizer(cfg: ModelConfig, owner_task: Task):
    """The embedded model's tokenizer: its base's, or (``model.base=scratch``) one trained on the
    model owner's rendered training data."""
    if cfg.base != SCRATCH:
        return load_tokenizer(str(base_folder_checked(cfg.base)))
    return train_tokenizer(tokenizer_corpus(owner_task), cfg.vocab_size)


def base_folder_checked(name_or_path: str) -> Path:
    try:
        return bases.base_folder(name_or_path)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def initial_model(cfg: ModelConfig, tokenizer, seed: int) -> torch.nn.Module:
    """The embedded model before any task training: the base's weights (checked against the
    sha256 sums of its card, loaded in float32), or random weights from ``seed`` (base=scratch)."""
    if cfg.base == SCRATCH:
        return build_embedded(cfg, tokenizer, seed)
    folder = base_folder_checked(cfg.base)
    bases.verify(folder)
    if len(tokenizer) != cfg.vocab_size:
        raise ModelLoadError(f"model.base {cfg.base!r}: the tokenizer has {len(tokenizer)} tokens, the base "
                             f"{cfg.vocab_size}; use the base's own tokenizer")
    return load_checkpoint(folder, dtype=torch.float32, fused_activation=cfg.fused_activation)


def _is_local(name_or_path: str) -> bool:
    return os.path.isdir(name_or_path) or name_or_path.startswith((".", "/", "~"))


SAFETENSORS_INDEX = "model.safetensors.index.json"  # a sharded checkpoint's weight map (weight -> shard file)
MAX_INDEX_BYTES = 64 << 20  # a real index is a few hundred kilobytes


def _allowed_roots(folder: Path) -> list[Path]:
    """Where a model folder's files may really lie: in the folder, or, for a snapshot of the Hugging
    Face hub cache (``models--X/snapshots/REV``, whose files are links to ``models--X/blobs``), in
    that repository's blobs."""
    real = folder.resolve()
    roots = [real]
    if real.parent.name == "snapshots":
        roots.append(real.parent.parent / "blobs")
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    real = path.resolve()
    return any(real == r or r in real.parents for r in roots)


def check_shard_index(folder: Path, index: Path, *, files_present: bool = True) -> list[Path]:
    """The shards a sharded checkpoint's index (``model.safetensors.index.json``) names, each
    checked to be a ``.safetensors`` file inside ``folder`` (after following links): transformers
    loads whatever the index names, a pickle (``torch.load``) or a file of another folder alike.
    ``files_present``: the shards must exist (False for a hub model whose shards are not
    downloaded yet: the names are checked, then transformers fetches them inside its cache)."""
    roots = _allowed_roots(folder)
    if not _inside(index, roots) or not index.resolve().is_file():
        raise ModelLoadError(f"{index}: the shard index is not a file inside {folder}; refusing to load")
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise ModelLoadError(f"{index}: {index.stat().st_size:,} bytes is too large for a shard index")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError, RecursionError) as e:  # unreadable, not UTF-8 or JSON, no mapping
        raise ModelLoadError(f"{index}: not a readable shard index ({type(e).__name__}); refusing to load") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: no weight_map (weight name -> shard file); refusing to load")
    shards = []
    for name in sorted({str(v) for v in weight_map.values()}):
        if not name.endswith(".safetensors"):
            raise ModelLoadError(f"{index}: the shard {name!r} is not a .safetensors file; refusing to load weights "
                                 "that are not safetensors (a pickle can run code when it is loaded)")
        shard = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or (files_present and not _inside(shard, roots)):
            raise ModelLoadError(f"{index}: the shard {name!r} lies outside the model folder {folder}; refusing to "
                                 "load it")
        if files_present and not shard.is_file():
            raise ModelLoadError(f"{index}: the shard {name!r} is missing from {folder}")
        shards.append(shard)
    return shards


def check_local_checkpoint(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"model.name_or_path: local folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json, so this is not a Hugging Face model folder")
    safes = list(path.glob("*.safetensors"))
    roots = _allowed_roots(path)
    for s in safes:  # a link to a file elsewhere would load that file's weights
        if not _inside(s, roots):
            raise ModelLoadError(f"{s}: a link to {s.resolve()}, outside the model folder {path}; refusing to load it")
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not safes:
        if pickles:
            raise ModelLoadError(f"{path}: only pickle weights ({', '.join(sorted(pickles))}); refusing to unpickle "
                                 "an untrusted checkpoint. Convert it to safetensors first.")
        raise ModelLoadError(f"{path}: no *.safetensors weights found")
    index = path / SAFETENSORS_INDEX
    if index.exists() or index.is_symlink():
        safes = sorted(set(safes) | set(check_shard_index(path, index)))
    for s in safes:  # a truncated or corrupt file fails here with its name, not deep inside torch
        try:
            from safetensors import safe_open
            with safe_open(str(s), framework="pt") as f:
                list(f.keys())
        except Exception as e:
            raise ModelLoadError(f"{s}: corrupt safetensors file ({e})") from None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def quantization_config(quantization: str = "none"):
    """``None`` for ``none``; for ``4bit`` a transformers ``BitsAndBytesConfig`` (NF4, double
    quantization, bfloat16 compute): QLoRA's base-model format. bitsandbytes is imported only
    here, and only once a CUDA GPU is known to be there."""
    if quantization in (None, "none"):
        return None
    if quantization != "4bit":
        raise ConfigError(f"model.quantization: unknown value {quantization!r}; allowed: none, 4bit")
    if not torch.cuda.is_available():
        raise ModelLoadError("model.quantization='4bit' (QLoRA, bitsandbytes NF4) needs a CUDA GPU, and none is "
                             "available here; set model.quantization=none (LoRA on the unquantized model) or run "
                             "on a machine with a GPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError("model.quantization='4bit' needs the bitsandbytes package "
                             "(pip install bitsandbytes) on the GPU machine") from None
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _check_hub_index(repo_id: str) -> None:
    """A hub model's shard index, checked as a local folder's is (names only: the shards are
    downloaded afterwards, by transformers, into its cache). A repository without one passes."""
    from transformers.utils import cached_file
    try:
        index = cached_file(repo_id, SAFETENSORS_INDEX, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except Exception:  # no such repository, no network: the config's own loading reports it
        return
    if index:
        check_shard_index(Path(index).parent, Path(index), files_present=False)


def model_size_problem(conf, name_or_path: str, weights: float, training: str | None) -> str | None:
    """Why the model a config.json describes cannot fit this machine's memory (loaded in
    ``weights`` bytes per weight; ``training`` "full" / "lora" / None), or None: checked before
    transformers builds it, which for a config of 100,000 blocks takes minutes before failing."""
    params = hf_config_parameters(conf)
    if params is None:
        return None
    how = {"full": "trained (weights, gradients and AdamW state)", "lora": "trained through LoRA"}
    return memory_problem(f"model.name_or_path {name_or_path!r}",
                          params * bytes_per_parameter(weights, training=training is not None, lora=training == "lora"),
                          f"its config.json describes about {parameters_text(params)} parameters; "
                          f"{how.get(training, 'loaded')} at {weights:g} bytes per weight, they")


def load_causal_lm(name_or_path: str, trust_remote_code: bool = False, dtype=None,
                   attn_implementation: str | None = None, *, quantization: str = "none",
                   device_map=None, fused_activation: bool = False, allow_large: bool = False,
                   training: str | None = None) -> torch.nn.Module:
    """Any HF causal LM from a hub id or a local folder, weights from safetensors only.
    ``dtype``: a torch dtype or ``"float32"`` / ``"bfloat16"`` (None or ``"auto"``: as stored); ``quantization``
    ``"4bit"``: NF4 via bitsandbytes (CUDA only, :func:`quantization_config`); ``device_map``
    (e.g. ``"auto"``): accelerate places the weights once, across the visible devices, while
    loading (no second copy is made anywhere); ``fused_activation``: :func:`use_fused_activation`.
    A model that cannot fit this machine's memory (loaded, or ``training`` "full" / "lora") is
    refused before it is built, unless ``allow_large`` (train.allow_large) or ``device_map``
    (accelerate places or offloads it)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in DTYPES:
            raise ConfigError(f"model.dtype: unknown dtype {dtype!r}; allowed: {list(DTYPES)}")
        dtype = DTYPES[dtype]
    quant = quantization_config(quantization)  # fails here, before any weight is read, without a GPU
    if _is_local(name_or_path):
        check_local_checkpoint(Path(name_or_path).expanduser())
    try:
        conf = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"model.name_or_path {name_or_path!r}: cannot read its config ({type(e).__name__}: {e})") from None
    if fused_activation:
        use_fused_activation(conf)
    if not _is_local(name_or_path):
        _check_hub_index(name_or_path)
    if not allow_large and device_map is None:
        stored = dtype if dtype not in (None, "auto") else \
            getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
        problem = model_size_problem(conf, name_or_path, weight_bytes(stored), training)
        if problem:
            raise ModelLoadError(problem)
    if conf.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelLoadError(f"model.name_or_path {name_or_path!r}: model_type {conf.model_type!r} is not a causal "
                             "language model (AutoModelForCausalLM has no class for it)")
    try:
        extra = {}
        if quant is not None:
            extra["quantization_config"] = quant
        if device_map is not None:
            extra["device_map"] = device_map
        # mismatched shapes are reported in the loading info (and refused below, by name) instead
        # of transformers' error, which points at a report the CLI's quiet logging hides
        model, info = AutoModelForCausalLM.from_pretrained(
            name_or_path, config=conf, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype,
            attn_implementation=attn_implementation, output_loading_info=True, ignore_mismatched_sizes=True, **extra)
    except Exception as e:
        raise ModelLoadError(f"model.name_or_path {name_or_path!r}: cannot load safetensors weights "
                             f"({type(e).__name__}: {e})") from None
    problem = loading_problem(info)
    if problem:
        raise ModelLoadError(f"model.name_or_path {name_or_path!r}: its safetensors weights do not fit its "
                             f"config.json: {problem}")
    return model


def _names(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def loading_problem(info: dict) -> str | None:
    """What transformers' loading info says is wrong with a checkpoint, or None. A weight the
    checkpoint lacks would silently keep its random initialisation, one it has that the model lacks
    would be dropped, and a mis-shaped one would be re-initialised: each is named here."""
    parts = []
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched = info.get("mismatched_keys") or ()
    if missing:
        parts.append(f"{len(missing)} weight(s) missing from the checkpoint ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) the model does not have ({_names(unexpected)})")
    if mismatched:
        shown = [f"{k} (checkpoint {tuple(found)}, model expects {tuple(expected)})"
                 for k, found, expected in sorted(mismatched, key=lambda m: m[0])]
        more = f" and {len(shown) - 8} more" if len(shown) > 8 else ""
        parts.append(f"{len(shown)} weight(s) of the wrong shape: {', '.join(shown[:8])}{more}")
    if info.get("error_msgs"):
        parts.append("; ".join(str(m) for m in info["error_msgs"])[:400])
    return "; ".join(parts) or None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"{name_or_path!r}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------------------------
# Checkpoints: one folder each (config.json + model.safetensors), written atomically


def save_checkpoint(model: torch.nn.Module, folder: Path) -> None:
    """Save a stage's weights. A 4-bit (QLoRA) model is dequantized first (in place: its stage is
    over): transformers cannot write merged 4-bit weights back (measured on an H100 with
    transformers 5.17, docs/scale.md), and the next stage quantizes the checkpoint again on load."""
    if is_quantized(model):
        # one dtype afterwards: dequantized matrices come back in bfloat16 while the norms and
        # embeddings were kept in float32 for k-bit training, and the stage's hidden states are
        # still read from this model after saving
        model = model.dequantize().to(torch.bfloat16)
    write_folder_atomically(folder, lambda tmp: model.save_pretrained(tmp, safe_serialization=True))


def save_tokenizer(tokenizer, folder: Path) -> None:
    write_folder_atomically(folder, tokenizer.save_pretrained)


def load_checkpoint(folder: Path, device: str | torch.device = "cpu", *, device_map=None,
                    dtype=None, quantization: str = "none", fused_activation: bool = False,
                    allow_large: bool = False, training: str | None = None) -> torch.nn.Module:
    """A stage checkpoint, eager attention (the analyses hook attention patterns). ``device_map``
    (e.g. ``"auto"``, for a model too big for one device) lets accelerate place the weights while
    loading, and ``device`` is then ignored; ``dtype`` and ``quantization`` as :func:`load_causal_lm`
    (a 4-bit model is placed on the first GPU while loading)."""
    if quantization != "none" and device_map is None:
        device_map = quantized_device_map()
    model = load_causal_lm(str(folder), attn_implementation="eager", dtype=dtype, device_map=device_map,
                           quantization=quantization, fused_activation=fused_activation, allow_large=allow_large,
                           training=training)
    if device_map is None:
        model = model.to(device)
    return model.eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_max_positions(model: torch.nn.Module) -> int | None:
    conf = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        v = getattr(conf, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def prompt_max_length(model: torch.nn.Module, max_length: int | None = None) -> int | None:
    """``max_length``, or else the most positions the model (under any peft wrapper) takes."""
    return max_length if max_length is not None else model_max_positions(base_model(model))


def quantized_device_map() -> dict:
    """Where a 4-bit model is placed while loading: this process's GPU (``LOCAL_RANK`` under
    ``accelerate launch`` / torchrun, so every rank gets its own; GPU 0 otherwise)."""
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "quantization_method", None))


def with_lora(model: torch.nn.Module, lora_cfg) -> torch.nn.Module:
    """Wrap for a LoRA stage; :func:`merge_lora` folds the adapter back before saving. Targets:
    :func:`architectures.lora_targets`. Only the adapter weights are trainable. A 4-bit model (QLoRA)
    goes through peft's ``prepare_model_for_kbit_training`` first (norms in float32, no
    gradient checkpointing)."""
    from peft import LoraConfig, get_peft_model
    layers = None
    if lora_cfg.last_blocks is not None:  # peft finds the block index in each module's name
        n = len(decoder_blocks(model))
        layers = list(range(max(0, n - lora_cfg.last_blocks), n))
    conf = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=lora_targets(model, lora_cfg.target_modules), task_type="CAUSAL_LM",
                      layers_to_transform=layers)
    if is_quantized(model):
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, conf)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A LoRA-wrapped model's adapter weights by their peft names, copied to the CPU (before merging)."""
    return {n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if "lora_" in n}


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import PeftModel
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def describe(model: torch.nn.Module) -> dict:
    conf = model.config
    return {"model_type": conf.model_type, "parameters": count_parameters(model),
            "layers": getattr(conf, "num_hidden_layers", None), "heads": getattr(conf, "num_attention_heads", None),
            "hidden": getattr(conf, "hidden_size", None)}


__all__ = ["LM", "train_tokenizer", "tokenizer_corpus", "answer_token_ids", "run_answer_ids", "build_embedded",
           "initial_model",
           "embedded_tokenizer", "write_folder_atomically", "load_causal_lm",
           "load_tokenizer", "save_checkpoint", "save_tokenizer", "load_checkpoint", "with_lora", "adapter_state", "merge_lora",
           "model_max_positions", "describe", "embedded_config",
           "quantization_config"]
