"""Device selection: GPU when present, CPU always works."""

from __future__ import annotations

import functools

import torch

from lmscan.errors import InputError


def pick_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a torch device, with a clear error when unavailable."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {spec}: no CUDA GPU is available (use --device cpu or auto)")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) present")
        return device
    raise InputError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


def bf16_autocast(device, enabled: bool):
    """bfloat16 autocast on ``device`` when ``enabled``: for passes that only rank candidates
    (whatever a verdict rests on is computed outside it, in fp32)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def native_bf16(device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware. Autocast elsewhere is emulated and
    slower than fp32, so callers fall back to fp32 there."""
    return _native_bf16(str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _native_bf16(device: str) -> bool:  # asked before every ranking pass: /proc/cpuinfo is read once
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:  # x86 CPUs with AVX512-BF16 or AMX (Linux reports them in /proc/cpuinfo)
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags



_STORED_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(config: dict, device) -> torch.dtype:
    """The dtype a scan computes a checkpoint in: its own bf16/fp16 where ``device`` computes
    that natively (a GPU, a CPU with AVX512-BF16/AMX), fp32 everywhere else. Emulated bf16
    on a CPU without it is slower than fp32 (measured 2026-12-07 on Gemma-3-270M)."""
    nested = [config.get(name) for name in ("text_config", "language_config", "llm_config")]
    for scope in (config, *(n for n in nested if isinstance(n, dict))):
        stored = _STORED_DTYPES.get(str(scope.get("dtype") or scope.get("torch_dtype") or ""))
        if stored is not None:
            break
    else:
        return torch.float32
    device = torch.device(device)
    if stored == torch.bfloat16 and native_bf16(device):
        return torch.bfloat16
    if stored == torch.float16 and device.type == "cuda":
        return torch.float16
    return torch.float32
