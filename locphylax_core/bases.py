"""The pretrained base language models: the ones the project ships in ``locphylax_core/bases/``
and any folder written by ``locphylax pretrain``.

A base folder holds ``config.json`` and ``model.safetensors`` (the weights, fp16), the tokenizer
(``tokenizer.json`` and its config), ``base.json`` (what it is, how it was trained, and the
sha256 of every one of its files) and ``README.md`` (its model card). ``model.base`` names one:
an embedded model then starts from those weights with that tokenizer, and its shape is the base's.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from .errors import ModelLoadError
from .runs import file_sha256

BASES_DIR = Path(__file__).resolve().parent / "bases"
DEFAULT_BASE = "small"  # what model.source=embedded starts from unless model.base says otherwise
SCRATCH = "scratch"  # model.base=scratch: a randomly initialised model and a tokenizer trained on the task
CARD = "base.json"

# the embedded model's size fields, as each config.json family spells them
_SHAPE_NAMES = {
    "gpt2": {"n_layer": "n_layer", "n_embd": "n_embd", "n_head": "n_head", "n_positions": "n_positions",
             "vocab_size": "vocab_size", "intermediate_size": "n_inner"},
    "other": {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
              "n_positions": "max_position_embeddings", "vocab_size": "vocab_size",
              "intermediate_size": "intermediate_size", "n_kv_head": "num_key_value_heads"},
}


def shipped() -> list[str]:
    return sorted(p.parent.name for p in BASES_DIR.glob(f"*/{CARD}"))


def base_folder(name_or_path: str) -> Path:
    """A shipped base's folder, or a folder given by path (relative: to the working directory,
    else to the repository root). Raises ValueError naming ``model.base`` when there is none."""
    if (BASES_DIR / name_or_path / CARD).is_file():
        return BASES_DIR / name_or_path
    path = Path(name_or_path).expanduser()
    if not path.is_absolute() and not path.exists():
        path = BASES_DIR.parent.parent / path
    if (path / "config.json").is_file() and (path / CARD).is_file():
        return path
    raise ValueError(f"model.base: {name_or_path!r} is neither a shipped base ({', '.join(shipped()) or 'none'}) "
                     f"nor a folder written by `locphylax pretrain` (config.json and {CARD}); "
                     f"model.base={SCRATCH} trains from scratch")


@functools.lru_cache(maxsize=32)
def _shape(folder: str, mtime: float) -> dict:
    conf = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    arch = conf.get("model_type", "gpt2")
    names = _SHAPE_NAMES["gpt2" if arch == "gpt2" else "other"]
    shape = {"arch": arch, **{field: conf.get(key) for field, key in names.items()}}
    if shape.get("n_kv_head") == shape["n_head"]:
        shape["n_kv_head"] = None
    return shape


def base_shape(name_or_path: str) -> dict:
    """The ``model`` fields a base fixes: arch, n_layer, n_embd, n_head, n_positions, vocab_size
    (and intermediate_size / n_kv_head where its config.json sets them)."""
    folder = base_folder(name_or_path)
    return dict(_shape(str(folder), (folder / "config.json").stat().st_mtime))


def read_card(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / CARD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{folder}: cannot read {CARD} ({e})") from None


def verify(folder: Path) -> dict:
    """Check every file the base's card lists against its sha256; returns the card. A changed,
    missing or unlisted weight file is an error that names it."""
    folder = Path(folder)
    card = read_card(folder)
    listed = card.get("files") or {}
    if "model.safetensors" not in listed:
        raise ModelLoadError(f"{folder / CARD}: lists no checksum for model.safetensors")
    for name, want in listed.items():
        path = folder / name
        if not path.is_file():
            raise ModelLoadError(f"{folder}: {name} is missing (the base's card lists it)")
        got = file_sha256(path)
        if got != want:
            raise ModelLoadError(f"{path}: sha256 {got[:16]}... does not match the base's card ({want[:16]}...); "
                                 "the file was changed or damaged")
    extra = [p.name for p in folder.glob("*.safetensors") if p.name not in listed]
    if extra:
        raise ModelLoadError(f"{folder}: weight files not listed in {CARD}: {extra}")
    return card


__all__ = ["BASES_DIR", "DEFAULT_BASE", "SCRATCH", "shipped", "base_folder", "base_shape", "verify", "read_card"]
