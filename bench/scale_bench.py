"""Throughput and peak memory of the whole pipeline on a randomly initialised 1B-class model.

The model is a Llama built from its config (no hub weights exist here): 22 blocks of width 2048,
32 query and 4 key/value heads, MLP 5632 (TinyLlama-1.1B's shape), with the embedded tokenizer of
the demo task. Each mode runs ``locphylax run`` in-process on the demo task with short step
budgets (throughput, not accuracy, is measured) and records, per stage, the steps, the wall time,
the trained tokens per second and the peak GPU memory (``torch.cuda.max_memory_allocated``).
Every mode runs in the same invocation, so the full-precision baseline and the bf16 / LoRA modes
are compared on the same machine.

    .venv/bin/python -m bench.scale_bench                   # on a GPU: every mode, 1B-class model
    .venv/bin/python -m bench.scale_bench --tiny --device cpu   # a smoke run of the same code on CPU
                                                                # (written to a temporary folder)

Writes bench/results/scale.csv and bench/results/scale.md (quoted in docs/scale.md).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

from locphylax_core import load_config, start_run  # noqa: E402
from locphylax_core import Reporter  # noqa: E402

OUT = ROOT / "bench" / "results"

# random models of their own shape, trained as the demo preset did before the pretrained bases
SCRATCH = {"model.base": "scratch", "train.lm_loss_weight": 1.0}
ONE_B = {**SCRATCH, "model.arch": "llama", "model.n_layer": 22, "model.n_embd": 2048, "model.n_head": 32,
         "model.n_kv_head": 4, "model.n_positions": 128, "model.vocab_size": 8000}
TINY = {**SCRATCH, "model.arch": "llama", "model.n_layer": 2, "model.n_embd": 64, "model.n_head": 4, "model.n_kv_head": 2,
        "model.n_positions": 128}
STEPS = {"train.clean_steps": 60, "attack.steps": 30, "defense.stage1_steps": 30, "defense.stage2_steps": 30,
         "defense.baselines": [], "eval.every": 1000, "eval.clean_every": 1000, "eval.curve_examples": 10,
         "task.test_size": 200, "train.warmup_steps": 5}
MODES = {  # name -> overrides; "fp32" is the baseline every other mode is compared with
    "fp32": {},
    "bf16": {"train.bf16": True},
    "bf16+checkpointing": {"train.bf16": True, "train.grad_checkpointing": True},
    "bf16+lora": {"train.bf16": True, "model.lora.enabled": True, "defense.stage2_params": "lora"},
    # QLoRA: the fp32 mode's clean model, saved as a Hugging Face folder, loaded in 4 bit (needs a GPU
    # and bitsandbytes); every stage trains LoRA adapters on the quantized weights
    "qlora": {"train.bf16": True, "model.source": "hf", "model.quantization": "4bit", "model.lora.enabled": True,
              "defense.stage2_params": "lora"},
}
HF_ONLY = ("model.arch", "model.n_layer", "model.n_embd", "model.n_head", "model.n_kv_head", "model.n_positions",
           "model.vocab_size")


class Recorder(Reporter):
    """Per stage: steps, wall seconds, trained tokens and peak GPU memory."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.rows: list[dict] = []
        self._t0, self._steps, self._key = 0.0, 0, None

    def stage_started(self, key, total_steps):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._t0, self._steps, self._key = time.perf_counter(), total_steps, key

    def stage_finished(self, key, result):
        if self.cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - self._t0
        tokens = result.get("tokens")
        self.rows.append({"stage": key, "steps": self._steps, "seconds": round(secs, 2),
                          "tokens_per_s": round(tokens / secs) if tokens else None,
                          "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None})


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def hf_folder(run_path: Path, dest: Path) -> Path:
    """A finished run's clean model as a Hugging Face folder: weights (safetensors) + tokenizer."""
    import shutil
    shutil.copytree(run_path / "checkpoints" / "clean", dest)
    for f in (run_path / "tokenizer").iterdir():
        shutil.copy(f, dest / f.name)
    return dest


def run_mode(name: str, sizes: dict, device: str, runs_root: Path, hf_path: Path | None = None
             ) -> tuple[list[dict], dict, Path]:
    over = {**sizes, **STEPS, **MODES[name], "train.device": device, "name": f"scale-{name}"}
    if over.get("model.source") == "hf":
        over = {k: v for k, v in over.items() if k not in HF_ONLY and k != "train.clean_steps"}
        over["model.name_or_path"] = str(hf_path)
    cfg = load_config("demo", over)
    rec = Recorder(device)
    t0 = time.perf_counter()
    run, summary = start_run(cfg, runs_root, reporter=rec)
    total = time.perf_counter() - t0
    params = 0
    from safetensors import safe_open
    for f in run.checkpoint("victim").glob("*.safetensors"):  # counted from the stored tensors' shapes
        with safe_open(str(f), framework="pt") as st:
            params += sum(_numel(st.get_slice(k).get_shape()) for k in st.keys())
    info = {"mode": name, "total_seconds": round(total, 1), "parameters": params,
            "victim_cacc": summary["stages"]["victim"]["cacc"]}
    return [{"mode": name, **r} for r in rec.rows], info, run.path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-block model (smoke test of this script)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--out", default=None, help="results folder (default: bench/results; with --tiny a temporary "
                                                "folder, so a smoke run never overwrites the GPU figures)")
    args = ap.parse_args(argv)
    sizes = TINY if args.tiny else ONE_B
    where = (torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "CPU")
    rows, infos = [], []
    with tempfile.TemporaryDirectory() as tmp:
        hf_path = None
        for mode in args.modes:
            if MODES[mode].get("model.source") == "hf" and hf_path is None:
                print(f"{mode}: needs the fp32 mode's clean model first; skipped", flush=True)
                continue
            try:
                r, info, run_path = run_mode(mode, sizes, args.device, Path(tmp), hf_path)
            except Exception as e:  # one failing mode (e.g. no bitsandbytes) must not lose the others
                print(f"{mode}: failed: {type(e).__name__}: {e}", flush=True)
                infos.append({"mode": mode, "total_seconds": None, "parameters": None, "error": f"{type(e).__name__}: {e}"})
                continue
            if mode == "fp32":
                hf_path = hf_folder(run_path, Path(tmp) / "clean-hf")
            rows += r
            infos.append(info)
            print(info, flush=True)
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "locphylax-scale-smoke" if args.tiny else OUT)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "scale.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [f"Measured on {where} with torch {torch.__version__} ({'tiny smoke model' if args.tiny else '1B-class Llama'}"
             f", {next((i['parameters'] for i in infos if i['parameters']), '?')} parameters), `bench/scale_bench.py`.", "",
             "| mode | stage | steps | seconds | trained tokens/s | peak GPU memory (GB) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['mode']} | {r['stage']} | {r['steps']} | {r['seconds']} | {r['tokens_per_s'] or '–'} | "
              f"{r['peak_gb'] if r['peak_gb'] is not None else '–'} |" for r in rows]
    lines += ["", "| mode | whole run (s) | note |", "| --- | ---: | --- |"]
    lines += [f"| {i['mode']} | {i['total_seconds'] if i['total_seconds'] is not None else '–'} | "
              f"{' '.join(i.get('error', '').split())[:200]} |" for i in infos]
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
