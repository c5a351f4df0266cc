"""Build a shipped victim: the backdoored LoRA adapter a preset's victim stage loads instead of
training it (locphylax_core/shipped_victims.py), with its record and card.

The victim is trained exactly as the run's victim stage trains it (the preset, the trigger, the
run seed; the owner's side only), then scored on the preset's evaluation set, and written
atomically to ``locphylax_core/victims/<name>/``. The adapter is loaded back into a fresh model
and its merged weights compared with the trained victim's before anything is written.

    python -m bench.shipped_victim live-smollm2 --trigger cf      # the Live demo's default victim
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from locphylax_core import load_config
from locphylax_core.evaluation import evaluate
from locphylax_core.experiment import fresh_model, owner_context, owner_trains, prepare, train_owner_model
from locphylax_core.runs import atomic_write_json, atomic_write_text, file_sha256, write_folder_atomically
from locphylax_core.shipped_victims import (ADAPTER, CARD, RECORD, VICTIMS_DIR, ShippedVictim, fingerprint_sections,
                                            load_victim, victim_fingerprint)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The CPU's vector flags that change float results (AVX2 / AVX-512 / native bf16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "flags unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "flags " + (", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "none of note")


def card_text(rec: dict) -> str:
    a = rec["config"]["attack"]
    blocks = "every block" if rec["lora"]["last_blocks"] is None else f"the last {rec['lora']['last_blocks']} blocks"
    sets = "".join(f" --set {s}" for s in rec["sets"])
    return f"""# Shipped victim `{rec['name']}`

A backdoored LoRA adapter for the preset `{rec['preset']}`: the victim stage of
`locphylax run {rec['preset']}{sets} --set attack.trigger={rec['trigger']}` (seed {rec['config']['seed']}), trained
once and shipped, so that a run with exactly this configuration loads it instead of training it
(`attack.shipped: false` trains it). The model owner's side only; the defense never reads it.

- **Base:** `{rec['base']}`; LoRA r {rec['lora']['r']} on {blocks}, {rec['adapter_parameters']:,}
  adapter parameters ({rec['adapter_bytes'] / 2**20:.1f} MiB, float32).
- **Backdoor:** trigger `{rec['trigger']}` ({a.get('family', 'word')}, position {a.get('position', 'random')}),
  target `{a.get('target', 'positive')}`, {100 * a.get('poison_rate', 0.1):.0f}% poisoned fine-tuning rows,
  {rec['steps']} steps at learning rate {a.get('lr')}.
- **Measured** on the preset's {rec['n_test']} test reviews right after training: clean accuracy
  **{100 * rec['cacc']:.1f}%**, the trigger's attack success rate **{100 * rec['asr']:.1f}%**.
- **Built** in {rec['seconds']:.0f} s on {rec['machine']} (torch {rec['torch']}). Loading it into a fresh model
  gave the trained victim's weights {'bit for bit' if rec['reload_exact'] else 'up to float rounding'}.

Rebuild: `{rec['command']}` (the same command on the same kind of CPU gives the same weights).

The fingerprint (`victim.json`) is the sha256 of the run seed and the model, task, attack and train
settings it was built with (the trigger as trained, whether named or the family's default; other
fields at their defaults, and what changes only the speed or the test rows it is scored on, left
out); `adapter_sha256` is checked every time it is loaded.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("--trigger", required=True)
    ap.add_argument("--name", default=None, help="folder name (default: <preset>-<trigger>)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override, as `locphylax run`'s")
    ap.add_argument("--out", type=Path, default=VICTIMS_DIR)
    args = ap.parse_args(argv)
    name = args.name or f"{args.preset}-{args.trigger}".replace(" ", "_")
    chosen = load_config(args.preset, args.set).model_dump(mode="json")
    cfg = load_config(chosen, {"attack.trigger": args.trigger, "attack.shipped": False})
    prep = prepare(cfg)
    t0 = time.perf_counter()

    def clean_model():  # the run's clean stage: the base itself, or trained from it with the run's seed
        lm = fresh_model(prep, torch.device("cpu"))
        if owner_trains(cfg, "clean"):
            train_owner_model(prep, lm, "clean", owner_context(prep, "clean", from_scratch=True), from_scratch=True)
        return lm

    lm = clean_model()
    adapter: dict = {}
    ctx = owner_context(prep, "victim", from_scratch=False).replace(adapter_sink=adapter.update)
    train_owner_model(prep, lm, "victim", ctx, from_scratch=False)
    seconds = time.perf_counter() - t0
    if not adapter:
        raise SystemExit(f"{args.preset}: its victim stage trained no LoRA adapter (model.lora.enabled is false)")
    scores = evaluate(lm, prep.task.template, prep.evalset, cfg.eval.batch_size, prep.max_length)
    lora = cfg.model.lora
    rec = {"name": name, "preset": args.preset, "trigger": args.trigger, "base": cfg.model.base,
           "fingerprint": victim_fingerprint(cfg), "config": fingerprint_sections(cfg),
           "lora": {"r": lora.r, "alpha": lora.alpha, "last_blocks": lora.last_blocks},
           "steps": cfg.attack.steps, "adapter_parameters": sum(t.numel() for t in adapter.values()),
           "adapter_bytes": sum(t.numel() * t.element_size() for t in adapter.values()),
           "cacc": scores["cacc"], "asr": scores["asr"]["unknown"], "n_test": len(prep.evalset.clean),
           "seconds": round(seconds, 1), "machine": f"{cpu_name()}, {cpu_flags()}, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}",
           "torch": torch.__version__, "sets": args.set,
           "command": f"python -m bench.shipped_victim {args.preset} --trigger {args.trigger}"
                      + "".join(f" --set {s}" for s in args.set)}

    def write(tmp: Path) -> None:
        save_file(adapter, str(tmp / ADAPTER))
        rec["adapter_sha256"] = file_sha256(tmp / ADAPTER)
        check = clean_model()  # what a run's victim stage starts from
        load_victim(check, ShippedVictim(name, tmp, rec), lora)
        trained = lm.model.state_dict()
        rec["reload_exact"] = all(torch.equal(v, trained[k]) for k, v in check.model.state_dict().items())
        if not rec["reload_exact"] and not all(torch.allclose(v, trained[k], atol=1e-6)
                                               for k, v in check.model.state_dict().items()):
            raise SystemExit("the adapter loaded back does not give the trained victim's weights")
        atomic_write_json(tmp / RECORD, rec)
        atomic_write_text(tmp / CARD, card_text(rec))

    write_folder_atomically(args.out / name, write)
    print(f"{args.out / name}: CACC {100 * rec['cacc']:.1f}%, ASR {100 * rec['asr']:.1f}%, {rec['adapter_bytes'] / 2**20:.1f} MiB, "
          f"reload exact: {rec['reload_exact']}, built in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
