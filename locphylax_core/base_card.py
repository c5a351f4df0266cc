"""A base folder's card, ``base.json``: what the base is, where it came from, and the sha256 of
every one of its files. Reading it and checking the files against it, for every kind of base
(shipped in ``locphylax_core/bases/``, written by ``locphylax pretrain``, or converted from a
packaged GGUF into the cache: ``packaged_bases``)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelLoadError
from .runs import file_sha256

CARD = "base.json"


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
    if not isinstance(listed, dict) or "model.safetensors" not in listed:
        raise ModelLoadError(f"{folder / CARD}: lists no checksum for model.safetensors")
    for name, want in listed.items():
        path = folder / name
        if not path.is_file():
            raise ModelLoadError(f"{folder}: {name} is missing (the base's card lists it)")
        got = file_sha256(path)
        if got != want:
            raise ModelLoadError(f"{path}: sha256 {got[:16]}... does not match the base's card ({str(want)[:16]}...); "
                                 "the file was changed or damaged")
    extra = [p.name for p in folder.glob("*.safetensors") if p.name not in listed]
    if extra:
        raise ModelLoadError(f"{folder}: weight files not listed in {CARD}: {extra}")
    return card


def file_checksums(folder: Path) -> dict[str, str]:
    """``{name: sha256}`` of every file directly in ``folder`` (what a card's ``files`` lists)."""
    return {p.name: file_sha256(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


__all__ = ["CARD", "read_card", "verify", "file_checksums"]
