"""Whether bfloat16 autocast pays on a device: ``train.bf16`` / ``eval.bf16`` may be ``auto``.

bfloat16 autocast is several times faster where the hardware computes in bf16 (a GPU that
supports it; a CPU with avx512_bf16 or AMX), and many times slower where it does not: on an
AVX2-only CPU torch emulates bf16 matrix products, measured here at 0.8 GFLOP/s against 62 in
float32 (bench/results/smollm2_speed.md). ``auto`` takes bf16 only where it is native.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal, Union

import torch

Bf16Setting = Union[bool, Literal["auto"]]
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute in bf16


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(f in cpu_flags() for f in NATIVE_BF16_CPU_FLAGS)
    return False


def use_bf16(setting: Bf16Setting, device: torch.device | str) -> bool:
    """The bf16 setting resolved for ``device``: True and False as given, ``auto`` where native."""
    return native_bf16(device) if setting == "auto" else bool(setting)


__all__ = ["Bf16Setting", "NATIVE_BF16_CPU_FLAGS", "cpu_flags", "native_bf16", "use_bf16"]
