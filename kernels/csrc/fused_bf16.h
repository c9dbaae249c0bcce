// bf16 operands of the fused kernel (AVX-512 builds; run only where the CPU has avx512_bf16, which
// kernels/cpu.py checks): products of bf16 pairs with vdpbf16ps into fp32 accumulators, so every
// matmul of the tile logic keeps its fp32 accumulation and the softmax stays fp32. vdpbf16ps multiplies
// PAIRS along the reduction dimension: lane j of C gets a[2j]·b[2j] + a[2j+1]·b[2j+1]. Operands are
// therefore held as 32-bit words, each two bf16 values adjacent along the reduction:
//   A(i, kp) = the word at A[i·ai + kp·ak] (broadcast),  B row kp = N words (16 per zmm load).
// A K or V row is such an operand in place when the reduction runs over head_dim (its pairs are
// adjacent already); everything else is packed here, per tile, in L1-sized buffers.
#pragma once

#include <cstdint>

#include "fused_common.h"

#if defined(__AVX512F__)
#define FUSED_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace fused {
namespace bf16 {

using u16 = uint16_t;
using u32 = uint32_t;

// C[MR × 16·NV] (+)= Σ_kp A(i, kp) · B(kp, ·), fp32 accumulators in registers (6 × 4 = 24 of 32 zmm).
template <int MR, int NV>
FUSED_BF16 inline void ukernel(int k2, const u32* A, int64_t ai, int64_t ak, const u32* B, int64_t ldb, float* C,
                               int64_t ldc, bool acc) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[i][v] = acc ? _mm512_loadu_ps(C + i * ldc + 16 * v) : _mm512_setzero_ps();
  for (int k = 0; k < k2; ++k) {
    __m512bh b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = (__m512bh)_mm512_loadu_si512((const void*)(B + k * ldb + 16 * v));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      __m512bh a = (__m512bh)_mm512_set1_epi32((int)A[i * ai + k * ak]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_dpbf16_ps(c[i][v], a, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + i * ldc + 16 * v, c[i][v]);
}

template <int NV>
FUSED_BF16 inline void gemm_cols(int M, int k2, const u32* A, int64_t ai, int64_t ak, const u32* B, int64_t ldb,
                                 float* C, int64_t ldc, bool acc) {
  int i = 0;
  for (; i + 6 <= M; i += 6) ukernel<6, NV>(k2, A + i * ai, ai, ak, B, ldb, C + i * ldc, ldc, acc);
  const u32* a = A + i * ai;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: ukernel<5, NV>(k2, a, ai, ak, B, ldb, c, ldc, acc); break;
    case 4: ukernel<4, NV>(k2, a, ai, ak, B, ldb, c, ldc, acc); break;
    case 3: ukernel<3, NV>(k2, a, ai, ak, B, ldb, c, ldc, acc); break;
    case 2: ukernel<2, NV>(k2, a, ai, ak, B, ldb, c, ldc, acc); break;
    case 1: ukernel<1, NV>(k2, a, ai, ak, B, ldb, c, ldc, acc); break;
    default: break;
  }
}

// C[M × N] (+)= A(M × 2·k2) · B(2·k2 × N) over bf16 pairs; N a multiple of 16. Not inlined into the
// (untargeted) tile logic: one call per tile matmul.
FUSED_BF16 inline void gemm(int M, int N, int k2, const u32* A, int64_t ai, int64_t ak, const u32* B, int64_t ldb,
                            float* C, int64_t ldc, bool acc) {
  int j = 0;
  for (; j + 64 <= N; j += 64) gemm_cols<4>(M, k2, A, ai, ak, B + j, ldb, C + j, ldc, acc);
  if (j + 32 <= N) gemm_cols<2>(M, k2, A, ai, ak, B + j, ldb, C + j, ldc, acc), j += 32;
  if (j + 16 <= N) gemm_cols<1>(M, k2, A, ai, ak, B + j, ldb, C + j, ldc, acc);
}

FUSED_BF16 inline __m512i widen(const u16* p) {  // 16 bf16 → 16 words holding them in the low half
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
}

FUSED_BF16 inline __m512i round16(const float* p) {  // 16 fp32 → bf16 (round to nearest even), widened
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p)));
}

// dst[dp·TQ + r] = (x[r][2dp], x[r][2dp+1]) for r < nr, 0 for nr <= r < TQ: a query-side tile [nr][D]
// transposed as words, the B operand of a product that reduces over head_dim (S^T = K Qᵀ, dP^T = V dOᵀ).
FUSED_BF16 inline void pack_words_t(const u16* x, int nr, int64_t D, u32* dst) {
  const u32* w = (const u32*)x;
  for (int64_t dp = 0; dp < D / 2; ++dp) {
    u32* row = dst + dp * TQ;
    for (int r = 0; r < nr; ++r) row[r] = w[r * (D / 2) + dp];
    for (int r = nr; r < TQ; ++r) row[r] = 0;
  }
}

// dst[kp·D + d] = (x[2kp][d], x[2kp+1][d]) for kp < npairs; rows at or beyond n are 0: a row-major tile
// [n][D] paired along its rows, the B operand of a product that reduces over those rows (P V, dS K,
// P^T dO, dS^T Q).
FUSED_BF16 inline void pack_row_pairs(const u16* x, int n, int64_t D, int npairs, u32* dst) {
  for (int kp = 0; kp < npairs; ++kp) {
    const int r0 = 2 * kp, r1 = r0 + 1;
    for (int64_t d = 0; d < D; d += 16) {
      __m512i a = r0 < n ? widen(x + r0 * D + d) : _mm512_setzero_si512();
      __m512i b = r1 < n ? widen(x + r1 * D + d) : _mm512_setzero_si512();
      _mm512_storeu_si512((void*)(dst + kp * D + d), _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
}

// S^T rows [0, nc) × TQ (fp32) rounded to bf16 and paired along the key rows: dst[kp·TQ + q] =
// (s[2kp][q], s[2kp+1][q]), a key row at or beyond nc is 0 — the A operand of P V and dS K.
FUSED_BF16 inline void round_key_pairs(const float* st, int nc, u32* dst) {
  for (int kp = 0; 2 * kp < nc; ++kp)
    for (int q = 0; q < TQ; q += 16) {
      __m512i a = round16(st + (2 * kp) * TQ + q);
      __m512i b = 2 * kp + 1 < nc ? round16(st + (2 * kp + 1) * TQ + q) : _mm512_setzero_si512();
      _mm512_storeu_si512((void*)(dst + kp * TQ + q), _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
}

// S^T rows [0, nc) × TQ (fp32) rounded to bf16 in place of layout: dst[kr·TQ + q], whose words pair
// adjacent queries — the A operand of P^T dO and dS^T Q.
FUSED_BF16 inline void round_rows(const float* st, int nc, u16* dst) {
  for (int kr = 0; kr < nc; ++kr)
    for (int q = 0; q < TQ; q += 16)
      _mm256_storeu_si256((__m256i*)(dst + kr * TQ + q), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(st + kr * TQ + q)));
}

FUSED_BF16 inline void scale(float* st, int nc, float s) {
  const __m512 f = _mm512_set1_ps(s);
  for (int i = 0; i < nc * TQ; i += 16) _mm512_storeu_ps(st + i, _mm512_mul_ps(f, _mm512_loadu_ps(st + i)));
}

// Δ = rowsum(dO ∘ O) of one query row, both bf16 (D % 16 == 0), in fp32.
FUSED_BF16 inline float delta(const u16* dout, const u16* out, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16)
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(widen(dout + d), 16)),
                          _mm512_castsi512_ps(_mm512_slli_epi32(widen(out + d), 16)), acc);
  return _mm512_reduce_add_ps(acc);
}

}  // namespace bf16
}  // namespace fused
#endif
