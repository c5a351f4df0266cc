"""Does bfloat16 pay on this CPU? One thread, a 1024 x 1024 matrix product in float32 and in
bfloat16 (what autocast runs), beside what ``train.bf16: auto`` / ``eval.bf16: auto`` decide here.

    .venv/bin/python -m bench.bf16_probe

Appends one line per run to bench/results/bf16_probe.md (the CPU, its bf16 flags, both rates).
"""

from __future__ import annotations

import time

import torch

from bench.common import RESULTS
from locphylax_core.precision import NATIVE_BF16_CPU_FLAGS, cpu_flags, use_bf16
from locphylax_core.pretrain import cpu_name

OUT = RESULTS / "bf16_probe.md"
HEADER = ("# bfloat16 against float32 on the CPUs this project ran on\n\n"
          "One thread, a 1024 x 1024 matrix product, best of 3 (`bench/bf16_probe.py`). Where the CPU has\n"
          "no native bf16 (no avx512_bf16 / amx_bf16 flag) torch emulates it, and `bf16: auto` stays float32.\n\n"
          "| CPU | vector ISA | bf16 flags | float32 GFLOP/s | bfloat16 GFLOP/s | bf16 / fp32 | `auto` takes bf16 |\n"
          "| --- | --- | --- | ---: | ---: | ---: | --- |\n")


def gflops(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return reps * 2 * n ** 3 / best / 1e9


def main() -> int:
    torch.set_num_threads(1)
    fp32, bf16 = gflops(torch.float32), gflops(torch.bfloat16, reps=1)
    flags = ", ".join(f for f in NATIVE_BF16_CPU_FLAGS if f in cpu_flags()) or "none"
    isa = "AVX-512" if "avx512f" in cpu_flags() else "AVX2" if "avx2" in cpu_flags() else "other"
    line = (f"| {cpu_name()} | {isa} | {flags} | {fp32:.1f} | {bf16:.1f} | {bf16 / fp32:.2f} | "
            f"{'yes' if use_bf16('auto', 'cpu') else 'no'} |\n")
    text = OUT.read_text() if OUT.is_file() else HEADER
    OUT.write_text(text + line)
    print(line, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
