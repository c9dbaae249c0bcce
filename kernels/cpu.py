"""What this CPU is, read once: the model name and the instruction-set features the kernels care
about (``/proc/cpuinfo``'s flags), and the path the fused kernel takes on it. Every benchmark header
and the training summary print ``describe()``, so two figures from different machines are never
mistaken for one machine's.

The fused kernel (kernels/csrc) has one micro-kernel today, AVX2 + FMA (8 fp32 lanes); it runs on
AVX-512 machines too, using half of each register. bf16 inputs run it on fp32 copies (``fused``'s
"fp32 path on bf16 inputs"): exact to fp32 inside, rounded to bf16 once at the output.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

FEATURES = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]  # the FEATURES this CPU has
    logical_cores: int
    usable_cores: int

    @property
    def fused_isa(self) -> str:
        """The fused kernel's micro-kernel on this CPU: ``avx2`` (the one built) or ``none``."""
        return "avx2" if {"avx2", "fma"} <= self.flags else "none"

    def has(self, feature: str) -> bool:
        if feature not in FEATURES:
            raise ValueError(f"feature: must be one of {', '.join(FEATURES)}; got {feature!r}")
        return feature in self.flags


@functools.lru_cache(maxsize=1)
def info(path: str = "/proc/cpuinfo") -> CpuInfo:
    """This machine's CpuInfo (the first processor's entry; all cores of one machine report the same)."""
    text = Path(path).read_text() if Path(path).exists() else ""
    field: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            k, v = (x.strip() for x in line.split(":", 1))
            field.setdefault(k, v)
    flags = frozenset(f for f in field.get("flags", "").split() if f in FEATURES)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return CpuInfo(field.get("model name", "unknown"), flags, os.cpu_count() or 1, usable)


def describe(cpu: CpuInfo | None = None) -> str:
    """Two lines: the CPU and its cores; the features present and absent, and the fused kernel's path."""
    cpu = cpu or info()
    have = " ".join(f for f in FEATURES if f in cpu.flags) or "none"
    lack = " ".join(f for f in FEATURES if f not in cpu.flags) or "none"
    return (f"CPU: {cpu.model} ({cpu.logical_cores} logical cores, {cpu.usable_cores} usable)\n"
            f"features: {have}; absent: {lack}; fused kernel: {cpu.fused_isa}")
