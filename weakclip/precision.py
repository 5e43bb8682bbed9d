"""Compute precision: the dtypes a run may compute in, and whether this machine computes them natively.

Reduced precision pays only where the hardware has it: bf16 matrix units on GPUs (Ampere and later) and on
CPUs with AMX or AVX512-BF16. Elsewhere bf16 is emulated and runs slower than fp32, which one warning says.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .errors import WeakclipError, warn

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HALF = (torch.float16, torch.bfloat16)
# CPU feature flags (as /proc/cpuinfo spells them) that give native kernels for each half type.
_CPU_FLAGS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}


def compute_dtype(name: str, key: str, allowed: tuple[str, ...] = tuple(DTYPES)) -> torch.dtype:
    """The dtype a precision setting names ("fp32", "fp16", "bf16"); ``key`` names the setting in the error."""
    if name not in allowed:
        raise WeakclipError(f"{key}: expected {' or '.join(allowed)}, got '{name}'")
    return DTYPES[name]


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux), plus what PyTorch's own dispatch level implies."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:  # not Linux: PyTorch's capability string is all there is
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    if "AMX" in capability or "BF16" in capability:
        flags.add("amx_bf16")
    return frozenset(flags)


def native(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``device`` computes ``dtype`` at full speed: always fp32; bf16 on CUDA GPUs that support it and
    on CPUs with AMX or AVX512-BF16; fp16 on CUDA GPUs and on CPUs with AMX-FP16 or AVX512-FP16."""
    if dtype not in HALF:
        return True
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return any(flag in _cpu_flags() for flag in _CPU_FLAGS[dtype])
    return True  # other accelerators: their own business


@functools.cache
def warn_if_slow(dtype: torch.dtype, device: torch.device, key: str) -> None:
    """One warning per setting and device when ``dtype`` is emulated there (slower than fp32)."""
    if not native(dtype, device):
        name = next(k for k, v in DTYPES.items() if v == dtype)
        warn(f"{key}={name}: this {device.type} has no native {name} units, so it runs slower than fp32; "
             f"--set {key}=fp32 keeps fp32")
