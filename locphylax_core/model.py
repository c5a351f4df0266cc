"""Models: the embedded default (a small GPT-2 trained from scratch with its own byte-level BPE
tokenizer) and any Hugging Face causal LM by hub id or local path.

Safety: checkpoints are what this project is about distrusting. Weights are read from
safetensors only (``use_safetensors=True``: a pickle-only checkpoint is refused, never
unpickled), and ``trust_remote_code`` stays off unless the configuration names it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .config import ModelConfig
from .errors import ConfigError, ModelLoadError
from .tasks import Task, render_prompt

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
EOS = "<|endoftext|>"
PAD = "<pad>"


@dataclass
class LM:
    """A causal LM with what the pipeline needs to score a task's answers."""

    model: torch.nn.Module
    tokenizer: object  # a PreTrainedTokenizerFast, left-padded
    answer_ids: tuple[int, ...]  # first token of each label's answer, indexed by label

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


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
    from .tasks import embedded_corpus
    texts = [render_prompt(task.template, e.text) + task.answer(e.label) for e in task.train]
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


# ----------------------------------------------------------------------------------------------
# Building and loading


def build_embedded(cfg: ModelConfig, tokenizer, seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    conf = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=tokenizer.eos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    # eager attention: the head-ablation hooks of the analysis need the attention pattern.
    conf._attn_implementation = "eager"
    return GPT2LMHeadModel(conf)


def _is_local(name_or_path: str) -> bool:
    return os.path.isdir(name_or_path) or name_or_path.startswith((".", "/", "~"))


def check_local_checkpoint(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"model.name_or_path: local folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json, so this is not a Hugging Face model folder")
    safes = list(path.glob("*.safetensors"))
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if not safes:
        if pickles:
            raise ModelLoadError(f"{path}: only pickle weights ({', '.join(sorted(pickles))}); refusing to unpickle "
                                 "an untrusted checkpoint. Convert it to safetensors first.")
        raise ModelLoadError(f"{path}: no *.safetensors weights found")
    for s in safes:  # a truncated or corrupt file fails here with its name, not deep inside torch
        try:
            from safetensors import safe_open
            with safe_open(str(s), framework="pt") as f:
                list(f.keys())
        except Exception as e:
            raise ModelLoadError(f"{s}: corrupt safetensors file ({e})") from None


def load_causal_lm(name_or_path: str, trust_remote_code: bool = False, dtype=None,
                   attn_implementation: str | None = None) -> torch.nn.Module:
    """Any HF causal LM from a hub id or a local folder, weights from safetensors only."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if _is_local(name_or_path):
        check_local_checkpoint(Path(name_or_path).expanduser())
    try:
        conf = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"model.name_or_path {name_or_path!r}: cannot read its config ({type(e).__name__}: {e})") from None
    if conf.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelLoadError(f"model.name_or_path {name_or_path!r}: model_type {conf.model_type!r} is not a causal "
                             "language model (AutoModelForCausalLM has no class for it)")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=conf, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, dtype=dtype,
                                                     attn_implementation=attn_implementation)
    except Exception as e:
        raise ModelLoadError(f"model.name_or_path {name_or_path!r}: cannot load safetensors weights "
                             f"({type(e).__name__}: {e})") from None
    return model


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


def _write_folder_atomically(folder: Path, write) -> None:
    """``write(tmp)`` fills a temporary sibling folder, which then replaces ``folder`` in one
    rename: a reader or a crash never sees half a checkpoint."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(model: torch.nn.Module, folder: Path) -> None:
    _write_folder_atomically(folder, lambda tmp: model.save_pretrained(tmp, safe_serialization=True))


def save_tokenizer(tokenizer, folder: Path) -> None:
    _write_folder_atomically(folder, tokenizer.save_pretrained)


def load_checkpoint(folder: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    # eager attention, as when the embedded model was built: the analyses hook attention patterns
    model = load_causal_lm(str(folder), attn_implementation="eager")
    return model.to(device).eval()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_max_positions(model: torch.nn.Module) -> int | None:
    conf = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        v = getattr(conf, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def with_lora(model: torch.nn.Module, lora_cfg) -> torch.nn.Module:
    """Wrap for a LoRA stage; :func:`merge_lora` folds the adapter back before saving."""
    from peft import LoraConfig, get_peft_model
    conf = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=lora_cfg.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, conf)


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import PeftModel
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def describe(model: torch.nn.Module) -> dict:
    conf = model.config
    return {"model_type": conf.model_type, "parameters": count_parameters(model),
            "layers": getattr(conf, "num_hidden_layers", None), "heads": getattr(conf, "num_attention_heads", None),
            "hidden": getattr(conf, "hidden_size", None)}


__all__ = ["LM", "train_tokenizer", "tokenizer_corpus", "answer_token_ids", "build_embedded", "load_causal_lm",
           "load_tokenizer", "save_checkpoint", "save_tokenizer", "load_checkpoint", "with_lora", "merge_lora",
           "model_max_positions", "describe"]
