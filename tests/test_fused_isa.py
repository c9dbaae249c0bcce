"""The fused kernel's builds and its native bf16 path.

Which build runs (``kernels.cpu.fused_choice``) is tested on described CPUs, so it runs everywhere. The
native bf16 kernel (vdpbf16ps: bf16 products, fp32 accumulation and softmax) runs where the CPU has
``avx512_bf16`` and skips elsewhere, naming what is missing; it is compared with the fp64 reference on
the same bf16 values, as FlashAttention tests its bf16 kernels: against the error that a bf16
computation of the same attention makes (the reference kernel run in bf16).
"""

from __future__ import annotations

import shutil

import pytest
import torch

import kernels.fused as fused
from kernels import cpu, sparse_attention
from tests.test_fused import PATTERNS  # the band patterns the fp32 kernel is tested on

AVX2 = cpu.CpuInfo("an AVX2 EPYC", frozenset({"avx2", "fma"}), 2, 2)
ZEN4 = cpu.CpuInfo("an AVX-512 EPYC", frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"}), 2, 2)
SKX = cpu.CpuInfo("an AVX-512 Xeon without bf16", frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}), 2, 2)


def test_the_best_build_is_chosen_and_the_environment_can_narrow_it():
    assert cpu.fused_choice(ZEN4, {}) == cpu.FusedChoice("avx512", "native")
    assert cpu.fused_choice(SKX, {}) == cpu.FusedChoice("avx512", "fp32")  # no avx512_bf16: bf16 on fp32 copies
    assert cpu.fused_choice(AVX2, {}) == cpu.FusedChoice("avx2", "fp32")
    assert cpu.fused_choice(ZEN4, {cpu.ISA_ENV: "avx2"}) == cpu.FusedChoice("avx2", "fp32")
    assert cpu.fused_choice(ZEN4, {cpu.BF16_ENV: "fp32"}) == cpu.FusedChoice("avx512", "fp32")
    none = cpu.CpuInfo("an old CPU", frozenset({"sse4_2"}), 2, 2)
    assert cpu.fused_choice(none, {}) == cpu.FusedChoice("none", "fp32")  # the blocked kernel runs


@pytest.mark.parametrize("machine, env, message", [
    (ZEN4, {cpu.ISA_ENV: "avx9"}, "HALOFORMER_FUSED_ISA: must be one of avx512, avx2; got 'avx9'"),
    (AVX2, {cpu.ISA_ENV: "avx512"}, "HALOFORMER_FUSED_ISA=avx512: this CPU lacks avx512f avx512bw avx512vl; it can run avx2"),
    (ZEN4, {cpu.BF16_ENV: "amx"}, "HALOFORMER_FUSED_BF16: must be one of native, fp32; got 'amx'"),
    (SKX, {cpu.BF16_ENV: "native"}, "HALOFORMER_FUSED_BF16=native: needs avx512_bf16; use HALOFORMER_FUSED_BF16=fp32"),
    (ZEN4, {cpu.ISA_ENV: "avx2", cpu.BF16_ENV: "native"},
     "HALOFORMER_FUSED_BF16=native: needs the avx512 build (HALOFORMER_FUSED_ISA=avx2)"),
])
def test_a_build_the_cpu_cannot_run_is_one_line(machine, env, message):
    with pytest.raises(ValueError) as e:
        cpu.fused_choice(machine, env)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_trainer_checks_the_kernel_environment_with_the_config(monkeypatch):
    """A bad HALOFORMER_FUSED_ISA is a ConfigError from load_config (one line, exit 2, before any
    process group: the README's bad-input table runs the command)."""
    from hydra import compose, initialize_config_dir

    import trainer.train  # noqa: F401  (registers the launch_stamp resolver)
    from tests.train_utils import REPO
    from trainer.config.validate import ConfigError, load_config

    monkeypatch.setenv(cpu.ISA_ENV, "avx9")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=["trainer.ckpt_dir=unused"])
    with pytest.raises(ConfigError, match="HALOFORMER_FUSED_ISA: must be one of avx512, avx2; got 'avx9'"):
        load_config(dcfg, 1)


def test_generation_checks_the_kernel_environment_with_its_config(monkeypatch):
    """trainer.generate runs attention too: the same one line from its config check, before loading."""
    from hydra import compose, initialize_config_dir

    from tests.train_utils import REPO
    from trainer.config.validate import ConfigError
    from trainer.tools.generate import load_generate_config

    monkeypatch.setenv(cpu.BF16_ENV, "Native")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        dcfg = compose(config_name="generate", overrides=["trainer.resume=/x"])
    with pytest.raises(ConfigError, match="HALOFORMER_FUSED_BF16: must be one of native, fp32; got 'Native'"):
        load_generate_config(dcfg)


def test_a_failed_avx512_build_keeps_the_avx2_kernel(monkeypatch):
    """Where the CPU has AVX-512 but the compiler cannot target it, the AVX2 build runs (one warning),
    not the blocked kernel; a build pinned by HALOFORMER_FUSED_ISA has no such fallback."""
    import warnings

    import torch.utils.cpp_extension as cpp_extension

    for target in (cpu, fused):  # this machine is a Zen 4 EPYC, wherever the test runs
        monkeypatch.setattr(target, "info" if target is cpu else "cpu_info", lambda path="/proc/cpuinfo": ZEN4)
    monkeypatch.delenv(cpu.ISA_ENV, raising=False)
    monkeypatch.setattr(fused.shutil, "which", lambda name: "/usr/bin/c++")
    avx2 = object()
    monkeypatch.setattr(fused, "_exts", {"avx2": avx2})  # the AVX2 build, loaded

    def load(name, **kw):
        raise RuntimeError("c++: error: unrecognized command-line option '-mavx512f'")

    monkeypatch.setattr(cpp_extension, "load", load)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fused.extension() is avx2 and fused.extension() is avx2
    assert [str(w.message) for w in caught] == [
        "kernels.fused: avx512 build failed: c++: error: unrecognized command-line option '-mavx512f'; "
        "using the avx2 build instead"]
    monkeypatch.setenv(cpu.ISA_ENV, "avx512")
    assert fused.extension() is None  # pinned: the failed build is not replaced


# --- the native bf16 kernel ------------------------------------------------------------------------

def _native_or_skip():
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the fused kernel falls back to blocked")
    here = cpu.info()
    lacks = " ".join(f for f in (*cpu.FUSED_ISAS["avx512"], "avx512_bf16") if f not in here.flags)
    if lacks:
        pytest.skip(f"the native bf16 kernel needs {lacks}; this CPU lacks them")


@pytest.fixture
def native(monkeypatch):
    _native_or_skip()
    monkeypatch.setenv(cpu.ISA_ENV, "avx512")
    monkeypatch.setenv(cpu.BF16_ENV, "native")
    assert fused.extension() is not None and fused.extension().bf16


NAMES = ("out", "lse", "stat_m", "max_logit", "global_mass", "dq", "dk", "dv")


def _case(B, H, Hkv, n, D, seed):
    """bf16 values (held in fp64) for q, k, v and a loss weight: the reference sees exactly the kernel's inputs."""
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(B, h, n, D, generator=g, dtype=torch.float64).bfloat16().double() for h in (H, Hkv, Hkv)]
    return qkv, torch.randn(B, H, n, D, generator=g).bfloat16().double()


def _run(qkv, w, pattern, dtype, backend, q_pos=None, k_pos=None, sinks=None, docs=None, seen=None):
    q, k, v = (t.to(dtype).requires_grad_() for t in qkv)
    real = fused.FusedAttention.apply
    with pytest.MonkeyPatch.context() as mp:  # which dtype the C++ kernel was handed
        mp.setattr(fused.FusedAttention, "apply", lambda *a: (seen.append(a[0].dtype) if seen is not None else None) or real(*a))
        out, lse, st = sparse_attention(q, k, v, pattern, q_pos, k_pos, backend=backend, return_stats=True,
                                        sinks=None if sinks is None else sinks.to(dtype), q_doc=docs,
                                        k_doc=None if docs is None else docs[:, : qkv[1].shape[2]])
    loss = (out.double() * w).sum() + lse.double().sum()
    return (out, lse, st.m, st.max_logit, st.global_mass, *torch.autograd.grad(loss, (q, k, v)))


def _assert_bf16_exact(qkv, w, pattern, **kw):
    seen = []
    got = _run(qkv, w, pattern, torch.bfloat16, "fused", seen=seen, **kw)
    assert seen == [torch.bfloat16], f"the native bf16 kernel did not run: the kernel saw {seen}"
    ref = _run(qkv, w, pattern, torch.float64, "reference", **kw)
    bf16_ref = _run(qkv, w, pattern, torch.bfloat16, "reference", **kw)
    for name, a, b, c in zip(NAMES, got, ref, bf16_ref):
        if name in ("out", "dq", "dk", "dv"):
            assert a.dtype == torch.bfloat16, name
            err, err_bf16 = (a.double() - b).abs().max().item(), (c.double() - b).abs().max().item()
            scale = b.abs().max().item()
            # bf16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3): P and dS are rounded to bf16 before
            # their products and the output once more; measured worst 6.2e-3 of the values' scale over 54
            # cases. FlashAttention's criterion: at most a few times the error a bf16 computation of the same
            # attention makes (measured worst ratio 3.2). A mis-masked key or a lost term moves them by ~1e-1.
            assert err <= 1e-2 * scale, f"{name}: error {err:.3g} is more than 1e-2 of the scale {scale:.3g}"
            assert err <= 4 * err_bf16 + 1e-6 * scale, f"{name}: error {err:.3g} vs bf16 reference {err_bf16:.3g}"
        else:
            # lse and the statistics are fp32: the bf16 products are exact in fp32 and summed in fp32
            # (measured ~4e-7 of the scale).
            assert a.dtype == torch.float32, name
            torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("shape", [(1, 4, 2, 333, 64), (2, 2, 2, 200, 32), (1, 2, 1, 150, 128)],
                         ids=["gqa_d64", "mha_d32", "one_kv_head_d128"])
def test_native_bf16_matches_reference(native, name, shape):
    B, H, Hkv, n, D = shape
    qkv, w = _case(B, H, Hkv, n, D, seed=n + D)
    _assert_bf16_exact(qkv, w, PATTERNS[name])


@pytest.mark.parametrize("name", ["sink", "longformer"])
def test_native_bf16_with_sinks_and_documents(native, name):
    qkv, w = _case(2, 4, 2, 260, 64, seed=5)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(6)).bfloat16().double()
    docs = (torch.arange(260) // 90).expand(2, 260).contiguous()
    _assert_bf16_exact(qkv, w, PATTERNS[name], sinks=sinks)
    _assert_bf16_exact(qkv, w, PATTERNS[name], docs=docs)


def test_native_bf16_shard_shaped(native):
    """A shard's call: queries at 300..427, keys = [4 globals | a halo-and-local run 230..427]."""
    pattern = PATTERNS["sink"]
    q_pos, k_pos = torch.arange(300, 428), torch.cat([torch.arange(4), torch.arange(230, 428)])
    g = torch.Generator().manual_seed(9)
    qkv = [torch.randn(1, h, n, 64, generator=g, dtype=torch.float64).bfloat16().double()
           for h, n in ((4, 128), (2, len(k_pos)), (2, len(k_pos)))]
    w = torch.randn(1, 4, 128, 64, generator=g).bfloat16().double()
    _assert_bf16_exact(qkv, w, pattern, q_pos=q_pos, k_pos=k_pos)


def test_bf16_head_dim_not_a_multiple_of_16_runs_on_fp32_copies(native):
    """vdpbf16ps fills 16 lanes: head_dim 24 goes to the fp32 kernel on the bf16 values (still fused)."""
    qkv, w = _case(1, 2, 2, 100, 24, seed=3)
    seen = []
    _run(qkv, w, PATTERNS["sink"], torch.bfloat16, "fused", seen=seen)
    assert seen == [torch.float32]
