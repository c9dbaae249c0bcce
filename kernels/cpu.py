"""What this CPU is, read once: the model name and the instruction-set features the kernels care
about (``/proc/cpuinfo``'s flags), and the path the fused kernel takes on it. Every benchmark header
and the training summary print ``describe()``, so two figures from different machines are never
mistaken for one machine's.

The fused kernel (kernels/csrc) is one source built once per instruction set (``FUSED_ISAS``): AVX2 +
FMA (8 fp32 lanes, 16 registers) everywhere, AVX-512F (16 lanes, 32 registers) where the CPU has it.
bf16 inputs run the native bf16 kernel (bf16 products with ``vdpbf16ps``, fp32 accumulation and softmax)
where the AVX-512 build runs and the CPU has ``avx512_bf16``; elsewhere the fp32 kernel on fp32
copies ("fp32 path on bf16 inputs"). AMX tiles are not used (no machine with them to build and test on).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

# The fused kernel's builds, best first, with the features each needs (kernels.fused compiles them).
FUSED_ISAS = {"avx512": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl"), "avx2": ("avx2", "fma")}
FEATURES = ("sse4_2", "avx", "fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]  # the FEATURES this CPU has
    logical_cores: int
    usable_cores: int

    @property
    def fused_isas(self) -> tuple[str, ...]:
        """The fused kernel's builds this CPU can run, best first (empty: none, the blocked kernel runs)."""
        return tuple(isa for isa, need in FUSED_ISAS.items() if set(need) <= self.flags)

    @property
    def fused_isa(self) -> str:
        """The build the fused kernel uses here by default: the best of ``fused_isas``, or ``none``."""
        return self.fused_isas[0] if self.fused_isas else "none"

    def missing(self, isa: str) -> str:
        """The features ``isa`` needs that this CPU lacks, space-separated ('' when it has them all)."""
        return " ".join(f for f in FUSED_ISAS[isa] if f not in self.flags)

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


ISA_ENV, BF16_ENV = "HALOFORMER_FUSED_ISA", "HALOFORMER_FUSED_BF16"


@dataclass(frozen=True)
class FusedChoice:
    isa: str   # the build the fused kernel runs: a FUSED_ISAS key, or "none" (the blocked kernel runs)
    bf16: str  # bf16 inputs: "native" (vdpbf16ps products, fp32 accumulation) or "fp32" (the fp32 kernel on copies)


def fused_choice(cpu: CpuInfo | None = None, env=None) -> FusedChoice:
    """The fused kernel's build and bf16 path here: the best this CPU has, unless the environment says
    ``HALOFORMER_FUSED_ISA=avx2|avx512`` or ``HALOFORMER_FUSED_BF16=native|fp32``. A value outside those,
    or one this CPU cannot run, is a ValueError naming the variable, what is allowed and what is missing."""
    cpu, env = cpu or info(), os.environ if env is None else env
    isa = env.get(ISA_ENV, "") or cpu.fused_isa
    if isa not in FUSED_ISAS and not (isa == "none" and not env.get(ISA_ENV)):
        raise ValueError(f"{ISA_ENV}: must be one of {', '.join(FUSED_ISAS)}; got {isa!r}")
    if isa != "none" and isa not in cpu.fused_isas:
        raise ValueError(f"{ISA_ENV}={isa}: this CPU lacks {cpu.missing(isa)}; "
                         f"it can run {', '.join(cpu.fused_isas) or 'none (the blocked kernel runs)'}")
    native_ok = isa == "avx512" and "avx512_bf16" in cpu.flags
    bf16 = env.get(BF16_ENV, "") or ("native" if native_ok else "fp32")
    if bf16 not in ("native", "fp32"):
        raise ValueError(f"{BF16_ENV}: must be one of native, fp32; got {bf16!r}")
    if bf16 == "native" and not native_ok:
        need = "avx512_bf16" if "avx512_bf16" not in cpu.flags else f"the avx512 build ({ISA_ENV}={isa})"
        raise ValueError(f"{BF16_ENV}=native: needs {need}; use {BF16_ENV}=fp32 (the fp32 kernel on bf16 values)")
    return FusedChoice(isa, bf16)


def describe(cpu: CpuInfo | None = None, env=None) -> str:
    """Two lines: the CPU and its cores; the features present and absent, and the fused kernel's path."""
    cpu = cpu or info()
    have = " ".join(f for f in FEATURES if f in cpu.flags) or "none"
    lack = " ".join(f for f in FEATURES if f not in cpu.flags) or "none"
    try:
        c = fused_choice(cpu, env)
        path = f"fused kernel: {c.isa}, bf16: {'avx512_bf16 vdpbf16ps' if c.bf16 == 'native' else 'fp32 kernel on copies'}"
    except ValueError as e:
        path = f"fused kernel: {e}"
    return (f"CPU: {cpu.model} ({cpu.logical_cores} logical cores, {cpu.usable_cores} usable)\n"
            f"features: {have}; absent: {lack}; {path}")
