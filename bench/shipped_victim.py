"""Build a shipped victim: the backdoored LoRA adapter a preset's victim stage loads instead of
training it (locphylax_core/shipped_victims.py), with its record and card.

The victim is trained exactly as the run's victim stage trains it (the preset, the trigger, the
run seed; the owner's side only), then scored on the preset's evaluation set, and written
atomically to ``locphylax_core/victims/<name>/``. The adapter is loaded back into a fresh model
and its merged weights compared with the trained victim's before anything is written.

    python -m bench.shipped_victim live-smollm2 --trigger cf      # the Live demo's default victim
    python -m bench.shipped_victim live-smollm2 --trigger cf --baseline clean_ft   # its contrast, on it

``--baseline METHOD`` builds that baseline's stages on the folder's shipped victim (which must fit the
preset) the way a run's stages build them (the defender's code, each stage's own seed), and adds
their adapters to the folder: the Live demo's contrast is then loaded, not trained, before the click.
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
from locphylax_core.defenses.base import method_plans, run_stage
from locphylax_core.experiment import (defense_context, fresh_model, owner_context, owner_trains, prepare,
                                       train_owner_model)
from locphylax_core.registry import stage_key
from locphylax_core.runs import atomic_write_json, atomic_write_text, file_sha256, write_folder_atomically
from locphylax_core.shipped_victims import (ADAPTER, CARD, RECORD, VICTIMS_DIR, ShippedVictim, fingerprint_sections,
                                            load_stage, load_victim, matching_victim, stage_file, stage_fingerprint,
                                            stage_fingerprint_sections, victim_fingerprint)


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
""" + stages_card_text(rec)


def stages_card_text(rec: dict) -> str:
    stages = rec.get("stages") or {}
    if not stages:
        return ""
    methods = list(dict.fromkeys(e["method"] for e in stages.values()))
    lines = [f"""
## Shipped baseline stages on this victim

{', '.join(f'`{m}`' for m in methods)} on this backdoored model, as a run's baseline stages compute
them (the defender's code, each stage's own seed, the preset's defense settings), so that the Live
demo's contrast and other baselines are loaded, not trained. A run loads a stage only when its
victim fits (above) and its stage key and defense settings are the ones recorded (`stages` in
`victim.json`, `stage_fingerprint`); the defense itself is always computed.
"""]
    for method in methods:
        mine = {k: e for k, e in stages.items() if e["method"] == method}
        last = list(mine.values())[-1]
        lines.append(f"**`{method}`**, built on {last['machine']} (torch {last['torch']}):\n")
        lines += [f"- `{k}`: `{e['file']}`, {e['steps']} steps, built in {e['seconds']:.0f} s" for k, e in mine.items()]
        lines.append(f"""
Measured on the preset's {last['n_test']} test reviews after its last stage: clean accuracy
**{100 * last['cacc']:.1f}%**, the victim's trigger's attack success rate **{100 * last['asr']:.1f}%**.
Rebuild: `{last['command']}`.
""")
    return "\n".join(lines)


def named_config(args, shipped: bool):
    """The folder name and the configuration the builder works on: the preset with ``--set`` and
    the trigger; ``shipped`` false trains the victim, true loads the shipped one."""
    name = args.name or f"{args.preset}-{args.trigger}".replace(" ", "_")
    chosen = load_config(args.preset, args.set).model_dump(mode="json")
    return name, load_config(chosen, {"attack.trigger": args.trigger, "attack.shipped": shipped})


def reloaded_exactly(loaded, trained, what: str) -> bool:
    """Whether ``loaded`` (a model with the written adapters applied) has ``trained``'s weights bit for
    bit; up to float rounding is accepted and said (False), anything else stops the build."""
    want = trained.model.state_dict()
    got = loaded.model.state_dict()
    if all(torch.equal(v, want[k]) for k, v in got.items()):
        return True
    if all(torch.allclose(v, want[k], atol=1e-6) for k, v in got.items()):
        return False
    raise SystemExit(f"{what} loaded back did not give the trained model's weights")


def run_clean_model(prep):
    """A run's clean stage: the base itself, or trained from it with the run's seed."""
    lm = fresh_model(prep, torch.device("cpu"))
    if owner_trains(prep.cfg, "clean"):
        train_owner_model(prep, lm, "clean", owner_context(prep, "clean", from_scratch=True), from_scratch=True)
    return lm


def machine() -> str:
    n = torch.get_num_threads()
    return f"{cpu_name()}, {cpu_flags()}, {n} thread{'s' * (n != 1)}"


def build_baseline_stages(args) -> int:
    """``--baseline``: the baseline's stages trained on the shipped victim of ``args``' preset and
    trigger, their adapters checked by loading them back, then added to the victim's folder."""
    name, cfg = named_config(args, shipped=True)
    victim = matching_victim(cfg, args.out)
    if victim is None or victim.name != name:
        raise SystemExit(f"{args.out / name}: no shipped victim there fits {args.preset} with the trigger "
                         f"{args.trigger!r} (build it first, without --baseline)")
    if args.baseline not in cfg.defense.baselines:
        raise SystemExit(f"--baseline: {args.baseline!r} is not one of {args.preset}'s baselines "
                         f"({', '.join(cfg.defense.baselines) or 'none'})")
    prep = prepare(cfg)

    def victim_model():
        lm = run_clean_model(prep)
        load_victim(lm, victim, cfg.model.lora)
        return lm

    lm = victim_model()
    adapters, stages = {}, {}
    sets = "".join(f" --set {s}" for s in args.set)
    for plan in method_plans(cfg.defense, cfg.task.labels)[args.baseline]:
        key = stage_key(args.baseline, plan.name)
        t0 = time.perf_counter()
        sink: dict = {}
        run_stage(plan, lm, prep.defender, defense_context(prep, key).replace(adapter_sink=sink.update))
        if not sink:
            raise SystemExit(f"{key}: this stage trained no LoRA adapter; only LoRA stages can ship")
        adapters[key] = sink
        stages[key] = {"method": args.baseline, "file": stage_file(key), "fingerprint": stage_fingerprint(cfg, key),
                       "defense": stage_fingerprint_sections(cfg, key)["defense"], "steps": plan.steps,
                       "seconds": round(time.perf_counter() - t0, 1), "machine": machine(), "torch": torch.__version__,
                       "command": f"python -m bench.shipped_victim {args.preset} --trigger {args.trigger}{sets} "
                                  f"--baseline {args.baseline}"}
    scores = evaluate(lm, prep.task.template, prep.evalset, cfg.eval.batch_size, prep.max_length)
    for e in stages.values():
        e.update(cacc=scores["cacc"], asr=scores["asr"]["unknown"], n_test=len(prep.evalset.clean))
    rec = dict(victim.record)
    # the other baselines' stages stay; this baseline's are replaced
    kept = {k: e for k, e in (rec.get("stages") or {}).items() if e.get("method") != args.baseline}

    def write(tmp: Path) -> None:
        for f in [victim.adapter, *(victim.folder / stage_file(k) for k in kept)]:
            (tmp / f.name).write_bytes(f.read_bytes())
        for key, tensors in adapters.items():
            save_file(tensors, str(tmp / stage_file(key)))
            stages[key]["adapter_sha256"] = file_sha256(tmp / stage_file(key))
        rec["stages"] = {**kept, **stages}
        check = victim_model()
        shipped = ShippedVictim(name, tmp, rec)
        for key in stages:
            load_stage(check, (shipped, stages[key]), key, cfg.model.lora)
        exact = reloaded_exactly(check, lm, "the stages' adapters")
        for e in stages.values():
            e["reload_exact"] = exact
        atomic_write_json(tmp / RECORD, rec)
        atomic_write_text(tmp / CARD, card_text(rec))

    write_folder_atomically(args.out / name, write)
    print(f"{args.out / name}: {args.baseline} stages {', '.join(stages)} added; after them CACC "
          f"{100 * scores['cacc']:.1f}%, the trigger's ASR {100 * scores['asr']['unknown']:.1f}%")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset")
    ap.add_argument("--trigger", required=True)
    ap.add_argument("--name", default=None, help="folder name (default: <preset>-<trigger>)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override, as `locphylax run`'s")
    ap.add_argument("--out", type=Path, default=VICTIMS_DIR)
    ap.add_argument("--baseline", default=None, metavar="METHOD",
                    help="build this baseline's stages on the folder's shipped victim and add them to it")
    args = ap.parse_args(argv)
    if args.baseline is not None:
        return build_baseline_stages(args)
    name, cfg = named_config(args, shipped=False)
    prep = prepare(cfg)
    t0 = time.perf_counter()

    lm = run_clean_model(prep)
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
           "seconds": round(seconds, 1), "machine": machine(),
           "torch": torch.__version__, "sets": args.set,
           "command": f"python -m bench.shipped_victim {args.preset} --trigger {args.trigger}"
                      + "".join(f" --set {s}" for s in args.set)}

    def write(tmp: Path) -> None:
        save_file(adapter, str(tmp / ADAPTER))
        rec["adapter_sha256"] = file_sha256(tmp / ADAPTER)
        check = run_clean_model(prep)  # what a run's victim stage starts from
        load_victim(check, ShippedVictim(name, tmp, rec), lora)
        rec["reload_exact"] = reloaded_exactly(check, lm, "the adapter")
        atomic_write_json(tmp / RECORD, rec)
        atomic_write_text(tmp / CARD, card_text(rec))

    write_folder_atomically(args.out / name, write)
    print(f"{args.out / name}: CACC {100 * rec['cacc']:.1f}%, ASR {100 * rec['asr']:.1f}%, {rec['adapter_bytes'] / 2**20:.1f} MiB, "
          f"reload exact: {rec['reload_exact']}, built in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
