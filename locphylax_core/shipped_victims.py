"""Backdoored LoRA adapters that ship with the project, so that a run whose victim one of them was
built from does not train it again (the Live demo on the real LM is "Ready" once the model loads).

A shipped victim is a folder ``locphylax_core/victims/<name>/``:

    adapter.safetensors   the LoRA weights of the victim's fine-tune (peft's names), before merging
    victim.json           what built it: the victim's fingerprint (:func:`victim_fingerprint`), the
                          configuration sections it hashes, the adapter's sha256, its measured
                          CACC / ASR, the machine and the command that rebuilds it; and, under
                          ``stages``, the baseline stages shipped on top of it (below)
    README.md             its card
    <method>__<stage>.safetensors   a shipped baseline stage's adapter (``clean_ft__stage1`` ...)

A baseline stage that trains a LoRA adapter on the victim (the Live demo's contrast, plain clean
fine-tuning) may ship too: it is a computation of the defender's own code on a shipped victim, so
whether it fits a run is the victim's fingerprint plus the stage's key and the defense settings
(:func:`stage_fingerprint`). The defense itself (Locphylax's stages) never ships: it is what a run
shows happening.

A run's victim stage loads one (``attack.shipped: true``, the default) only when the run's own
fingerprint equals the recorded one: the seed and the model, task, attack and owner-training
settings, everything the victim's weights depend on. Anything else trains as usual. The file is
checked against its recorded sha256 and loaded strictly (a missing, unexpected or mis-shaped weight
is an error that names it), never unpickled. This is the model owner's side: the defense never
reads it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import MULTI_PART_FAMILIES, RunConfig
from .errors import ModelLoadError
from .model import merge_lora, with_lora
from .runs import file_sha256

VICTIMS_DIR = Path(__file__).resolve().parent / "victims"
ADAPTER, RECORD, CARD = "adapter.safetensors", "victim.json", "README.md"
# settings that change how fast a victim trains, or what it is scored on, never its weights (the
# test rows are drawn apart from the training rows: tasks.load_task, tasks.sources.synthetic_sentiment)
_NOT_IN_FINGERPRINT = {"train": {"threads", "device", "allow_large"}, "attack": {"shipped"}, "task": {"test_size"}}
# which other baselines run beside a shipped baseline stage does not change its weights
_NOT_IN_STAGE_FINGERPRINT = {"baselines"}


def fingerprint_sections(cfg: RunConfig) -> dict:
    """The configuration a victim's weights depend on: the run seed and the model, task, attack
    and train sections (less what only changes speed), as plain data, with the attack's effective
    trigger (and decoy) filled in. Other fields at their default are left out, so a field added
    later with a default that keeps today's behaviour changes no fingerprint."""
    data = cfg.model_dump(mode="json", exclude_defaults=True)
    out = {"seed": cfg.seed}
    for section in ("model", "task", "attack", "train"):
        out[section] = {k: v for k, v in data.get(section, {}).items() if k not in _NOT_IN_FINGERPRINT.get(section, ())}
    # the trigger the victim is trained with, whether named or the family's default: a preset that
    # leaves attack.trigger empty builds the same victim as one that names its default
    a = cfg.attack
    if a.family in MULTI_PART_FAMILIES:
        out["attack"]["parts"] = a.trigger_parts
    else:
        out["attack"]["trigger"] = a.trigger_text
    if a.decoy_text is not None:
        out["attack"]["decoy"] = a.decoy_text
    return out


def victim_fingerprint(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(fingerprint_sections(cfg), sort_keys=True).encode()).hexdigest()


def stage_fingerprint_sections(cfg: RunConfig, key: str) -> dict:
    """What a baseline stage's weights depend on: its victim's sections, the stage's key (its seed
    derives from it and the run seed) and the defense settings (less which baselines run)."""
    defense = cfg.model_dump(mode="json", exclude_defaults=True).get("defense", {})
    return {**fingerprint_sections(cfg), "stage": key,
            "defense": {k: v for k, v in defense.items() if k not in _NOT_IN_STAGE_FINGERPRINT}}


def stage_fingerprint(cfg: RunConfig, key: str) -> str:
    return hashlib.sha256(json.dumps(stage_fingerprint_sections(cfg, key), sort_keys=True).encode()).hexdigest()


def stage_file(key: str) -> str:
    """The adapter file of the shipped baseline stage ``key`` in its victim's folder."""
    return key.replace("/", "__") + ".safetensors"


@dataclass(frozen=True)
class ShippedVictim:
    name: str
    folder: Path
    record: dict

    @property
    def adapter(self) -> Path:
        return self.folder / ADAPTER


def shipped_victims(root: Path | None = None) -> list[ShippedVictim]:
    """Every shipped victim with a readable record (a folder without one is not a victim)."""
    out = []
    for rec_path in sorted((root or VICTIMS_DIR).glob(f"*/{RECORD}")):
        try:
            record = json.loads(rec_path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("fingerprint"), str):
            out.append(ShippedVictim(rec_path.parent.name, rec_path.parent, record))
    return out


def matching_victim(cfg: RunConfig, root: Path | None = None) -> ShippedVictim | None:
    """The shipped victim built from exactly ``cfg``'s victim settings, if ``attack.shipped``."""
    if not cfg.attack.shipped or not cfg.model.lora.enabled:
        return None
    fp = victim_fingerprint(cfg)
    return next((v for v in shipped_victims(root or VICTIMS_DIR) if v.record["fingerprint"] == fp), None)


def _apply_adapter(lm, path: Path, want_sha256: str | None, lora_cfg) -> str:
    """Apply the LoRA adapter file ``path`` to ``lm.model`` and merge it, as a LoRA stage's training
    leaves the model; returns the file's sha256. Errors (ModelLoadError) name the file and what is
    wrong: a sha256 that is not the recorded one, a file that is not safetensors, missing,
    unexpected or mis-shaped weights (then the model is left as it was)."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: the shipped adapter file is missing")
    got = file_sha256(path)
    if got != want_sha256:
        raise ModelLoadError(f"{path}: sha256 {got} is not the recorded {want_sha256} (a damaged or replaced file)")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors' own parse error, in one line
        raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from None
    wrapped = with_lora(lm.model, lora_cfg)
    params = {n: p for n, p in wrapped.named_parameters() if "lora_" in n}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    misshaped = sorted(f"{n} {tuple(tensors[n].shape)} (expected {tuple(p.shape)})"
                       for n, p in params.items() if n in tensors and tensors[n].shape != p.shape)
    if missing or unexpected or misshaped:
        lm.model = merge_lora(wrapped).eval()  # nothing was loaded: the adapter's B is zero, so this is the model as it was
        parts = [f"{label}: {', '.join(names[:5])}{' …' if len(names) > 5 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names]
        raise ModelLoadError(f"{path}: does not fit this model ({'; '.join(parts)})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n].to(p.dtype))
    lm.model = merge_lora(wrapped).eval()
    return got


def load_victim(lm, victim: ShippedVictim, lora_cfg) -> dict:
    """``lm.model`` with the shipped adapter applied and merged, as the victim's training leaves
    it; returns the stage's record. Errors (ModelLoadError) name the file and what is wrong."""
    got = _apply_adapter(lm, victim.adapter, victim.record.get("adapter_sha256"), lora_cfg)
    return {"steps": 0, "shipped_victim": victim.name, "adapter_sha256": got,
            "note": f"the shipped victim {victim.name!r} (locphylax_core/victims/{victim.name}), built from this "
                    "configuration; attack.shipped=false trains it instead"}


def matching_stage(cfg: RunConfig, key: str, root: Path | None = None) -> tuple[ShippedVictim, dict] | None:
    """The shipped baseline stage ``key`` (``clean_ft/stage1`` ...) built on exactly ``cfg``'s
    victim with exactly its defense settings, as (its victim, its record), if ``attack.shipped``."""
    victim = matching_victim(cfg, root)
    if victim is None:
        return None
    entry = (victim.record.get("stages") or {}).get(key)
    if not isinstance(entry, dict) or entry.get("fingerprint") != stage_fingerprint(cfg, key):
        return None
    return victim, entry


def load_stage(lm, shipped: tuple[ShippedVictim, dict], key: str, lora_cfg) -> dict:
    """``lm.model`` (the stage's parent) with the shipped baseline stage ``key`` applied and merged;
    returns the stage's record (``steps`` 0: it trains nothing)."""
    victim, entry = shipped
    got = _apply_adapter(lm, victim.folder / stage_file(key), entry.get("adapter_sha256"), lora_cfg)
    return {"steps": 0, "shipped_stage": f"{victim.name}/{key}", "adapter_sha256": got,
            "note": f"shipped with the victim {victim.name!r} (locphylax_core/victims/{victim.name}), trained by "
                    "this defense's code on it with these settings; attack.shipped=false trains it instead"}


__all__ = ["VICTIMS_DIR", "ShippedVictim", "shipped_victims", "matching_victim", "victim_fingerprint",
           "fingerprint_sections", "load_victim", "stage_fingerprint", "stage_fingerprint_sections", "stage_file",
           "matching_stage", "load_stage"]
