"""Peak memory of the head-ablation sweep with and without a copy of the model (docs/scale.md).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.analysis_memory --mode copy
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.analysis_memory --mode in_place

Builds a randomly initialised model of --arch (default llama, 8 layers x 1024 wide: about 100 M
parameters, 0.4 GB in float32) with the micro preset's tokenizer, then runs one head-ablation
sweep on a few probe inputs. Prints one JSON line: parameter bytes, the process's resident memory
before the sweep and its peak during it (ru_maxrss), the sweep's seconds. Run each mode in its own
process: ru_maxrss is a per-process high-water mark. On a GPU (--device cuda) it reports
torch.cuda.max_memory_allocated instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("copy", "in_place"), required=True)
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--probe", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()

    import transformers
    transformers.utils.logging.set_verbosity_error()
    from locphylax_core import load_config
    from locphylax_core import model as M
    from locphylax_core.analysis import heads as H
    from locphylax_core.experiment import prepare

    prep = prepare(load_config("micro"))
    cfg = prep.cfg.model.model_copy(update={"arch": args.arch, "n_layer": args.layers, "n_embd": args.width,
                                            "n_head": args.heads})
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    net = M.build_embedded(cfg, prep.tokenizer, seed=0).to(args.device, dtype).eval()
    n_params = M.count_parameters(net)
    probe = prep.evalset.subset(args.probe)
    clean_texts, clean_labels, triggered = H.probe_inputs(probe)
    triggered = {"unknown": triggered["unknown"]}
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mb()
    t0 = time.perf_counter()
    r = H.head_ablation(net, prep.tokenizer, prep.task.template, clean_texts, clean_labels, triggered,
                        prep.answer_ids, batched=False, max_length=prep.max_length, in_place=args.mode == "in_place")
    seconds = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": args.mode, "arch": args.arch, "device": args.device, "dtype": args.dtype,
                      "parameters": n_params, "param_mb": round(n_params * net.dtype.itemsize / 2**20, 1),
                      "mem_before_mb": round(before, 1), "peak_mb": round(peak, 1),
                      "peak_minus_before_mb": round(peak - before, 1), "sweep_seconds": round(seconds, 2),
                      "heads": int(r["n_layers"] * r["n_heads"])}))


if __name__ == "__main__":
    main()
