"""What this machine is, as far as kernel choice is concerned: the CPU, its flags, the threads, torch.

Kernel choices (:mod:`secateur.runtime.dispatch`) are measured per machine and cached under a key
made of exactly these facts, so that a cache copied to another CPU, another thread count or
another torch is never read there. Reading ``/proc/cpuinfo`` is Linux-only; elsewhere the model
comes from :func:`platform.processor` and the flag list is empty (the micro-benchmarks still decide).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from typing import Any

# the flags that decide which kernels can run well (all others are left out of the key)
FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
         "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and not model:
                    model = value.strip()
                elif name == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown", tuple(f for f in FLAGS if f in flags)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), e.g. ``"AMD EPYC"`` or ``"Intel(R) Xeon(R) ..."``."""
    return _cpuinfo()[0]


def cpu_flags() -> tuple[str, ...]:
    """The kernel-relevant instruction-set flags this CPU reports (a subset of :data:`FLAGS`)."""
    return _cpuinfo()[1]


def vendor() -> str:
    model = cpu_model().lower()
    return "intel" if "intel" in model else "amd" if "amd" in model else "other"


def has_amx() -> bool:
    return "amx_int8" in cpu_flags()


def describe() -> dict[str, Any]:
    """The facts a benchmark or an evaluation result records about the machine it ran on."""
    import torch

    from .._version import __version__

    return {"cpu": cpu_model(), "vendor": vendor(), "flags": list(cpu_flags()), "amx": has_amx(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "secateur": __version__,
            # oneDNN's own ISA cap (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 makes an AMX Xeon run as one
            # without AMX): choices measured under one cap must not be read under another
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")}


def key() -> str:
    """A short digest of :func:`describe`: kernel choices measured under one key hold only there."""
    return hashlib.sha256(json.dumps(describe(), sort_keys=True).encode()).hexdigest()[:16]


__all__ = ["FLAGS", "cpu_model", "cpu_flags", "vendor", "has_amx", "describe", "key"]
