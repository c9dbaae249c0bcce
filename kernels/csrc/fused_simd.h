// The vector layer of the fused kernel: the only file that knows the instruction set. The tile logic
// (fused_common.h, fused_fwd.cpp, fused_bwd.cpp) is written once against it and compiled once per
// instruction set (kernels/fused.py builds one extension per variant with its own -m flags):
//   AVX2 + FMA:  V = Y (8 fp32 lanes, 16 registers), micro-kernel 6 × 16;
//   AVX-512F:    V = Z (16 fp32 lanes, 32 registers), micro-kernel 6 × 64, AVX2 for 8-wide tails.
// Y and Z have the same static interface, so ukernel<Vec, MR, NV> and every lane-wise softmax step take
// either. Masks are the one place the two differ in kind (AVX2 blends on vector masks, AVX-512 on
// mask registers), so they are operations of the vector type, not exposed.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <limits>

namespace fused {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

struct Y {  // AVX2: 8 fp32 lanes
  using f = __m256;
  using i = __m256i;
  static constexpr int W = 8;
  static f load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, f x) { _mm256_storeu_ps(p, x); }
  static i loadi(const int32_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
  static f set1(float x) { return _mm256_set1_ps(x); }
  static f bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static f zero() { return _mm256_setzero_ps(); }
  static f fma(f a, f b, f c) { return _mm256_fmadd_ps(a, b, c); }
  static f add(f a, f b) { return _mm256_add_ps(a, b); }
  static f sub(f a, f b) { return _mm256_sub_ps(a, b); }
  static f mul(f a, f b) { return _mm256_mul_ps(a, b); }
  static f max(f a, f b) { return _mm256_max_ps(a, b); }
  static f min(f a, f b) { return _mm256_min_ps(a, b); }
  // x where lo <= k <= hi (lane-wise), −inf elsewhere.
  static f keep_in_range(f x, i lo, i hi, int32_t k) {
    i kk = _mm256_set1_epi32(k);
    i out = _mm256_or_si256(_mm256_cmpgt_epi32(lo, kk), _mm256_cmpgt_epi32(kk, hi));
    return _mm256_blendv_ps(x, set1(NEG_INF), _mm256_castsi256_ps(out));
  }
  // x where id == k or the lane is exempt (ex all-ones), −inf elsewhere.
  static f keep_same_doc(f x, i id, i ex, int32_t k) {
    i keep = _mm256_or_si256(_mm256_cmpeq_epi32(id, _mm256_set1_epi32(k)), ex);
    return _mm256_blendv_ps(set1(NEG_INF), x, _mm256_castsi256_ps(keep));
  }
  static f zero_where_ninf(f m) { return _mm256_blendv_ps(m, zero(), _mm256_cmp_ps(m, set1(NEG_INF), _CMP_EQ_OQ)); }
  static f where_positive(f x, f e) { return _mm256_and_ps(x, _mm256_cmp_ps(e, zero(), _CMP_GT_OQ)); }
  static f fnma(f a, f b, f c) { return _mm256_fnmadd_ps(a, b, c); }
  static f floor(f x) { return _mm256_floor_ps(x); }
  static f pow2(f n) {  // 2^n for integral n in [-127, 128]
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static f zero_below(f e, f x, f lo) { return _mm256_and_ps(e, _mm256_cmp_ps(x, lo, _CMP_GE_OQ)); }
  static float hsum(f x) {
    alignas(32) float l[8];
    _mm256_store_ps(l, x);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  }
};

#if defined(__AVX512F__)
struct Z {  // AVX-512F: 16 fp32 lanes
  using f = __m512;
  using i = __m512i;
  static constexpr int W = 16;
  static f load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, f x) { _mm512_storeu_ps(p, x); }
  static i loadi(const int32_t* p) { return _mm512_loadu_si512((const void*)p); }
  static f set1(float x) { return _mm512_set1_ps(x); }
  static f bcast(const float* p) { return _mm512_set1_ps(*p); }
  static f zero() { return _mm512_setzero_ps(); }
  static f fma(f a, f b, f c) { return _mm512_fmadd_ps(a, b, c); }
  static f add(f a, f b) { return _mm512_add_ps(a, b); }
  static f sub(f a, f b) { return _mm512_sub_ps(a, b); }
  static f mul(f a, f b) { return _mm512_mul_ps(a, b); }
  static f max(f a, f b) { return _mm512_max_ps(a, b); }
  static f min(f a, f b) { return _mm512_min_ps(a, b); }
  static f keep_in_range(f x, i lo, i hi, int32_t k) {
    i kk = _mm512_set1_epi32(k);
    __mmask16 in = _mm512_cmple_epi32_mask(lo, kk) & _mm512_cmple_epi32_mask(kk, hi);
    return _mm512_mask_mov_ps(set1(NEG_INF), in, x);
  }
  static f keep_same_doc(f x, i id, i ex, int32_t k) {
    __mmask16 keep = _mm512_cmpeq_epi32_mask(id, _mm512_set1_epi32(k)) | _mm512_test_epi32_mask(ex, ex);
    return _mm512_mask_mov_ps(set1(NEG_INF), keep, x);
  }
  static f zero_where_ninf(f m) { return _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(m, set1(NEG_INF), _CMP_EQ_OQ), zero()); }
  static f where_positive(f x, f e) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, zero(), _CMP_GT_OQ), x); }
  static f fnma(f a, f b, f c) { return _mm512_fnmadd_ps(a, b, c); }
  static f floor(f x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static f pow2(f n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static f zero_below(f e, f x, f lo) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), e); }
};
using V = Z;  // the native width of this build
constexpr const char* ISA = "avx512";
#else
using V = Y;
constexpr const char* ISA = "avx2";
#endif

// exp, lane-wise, for either width: Cephes' range reduction x = n·ln2 + r and degree-6 polynomial for
// e^r (relative error ~2e-7, fp32 rounding); x below −87.3, −inf included, gives exactly 0.
template <class Vec>
inline typename Vec::f vexp(typename Vec::f x) {
  using f = typename Vec::f;
  const f lo = Vec::set1(-87.3f), x0 = x;
  x = Vec::max(Vec::min(x, Vec::set1(88.3f)), lo);
  f n = Vec::floor(Vec::fma(x, Vec::set1(1.44269504088896341f), Vec::set1(0.5f)));
  x = Vec::fnma(n, Vec::set1(0.693359375f), x);
  x = Vec::fnma(n, Vec::set1(-2.12194440e-4f), x);
  f p = Vec::set1(1.9875691500e-4f);
  p = Vec::fma(p, x, Vec::set1(1.3981999507e-3f));
  p = Vec::fma(p, x, Vec::set1(8.3334519073e-3f));
  p = Vec::fma(p, x, Vec::set1(4.1665795894e-2f));
  p = Vec::fma(p, x, Vec::set1(1.6666665459e-1f));
  p = Vec::fma(p, x, Vec::set1(5.0000001201e-1f));
  p = Vec::fma(p, Vec::mul(x, x), Vec::add(x, Vec::set1(1.0f)));
  return Vec::zero_below(Vec::mul(p, Vec::pow2(n)), x0, lo);
}

// C[MR × W·NV] (+)= Σ_k A(i, k) · B[k·ldb + j] with A(i, k) = A[i·ai + k·ak]: A is broadcast one
// element at a time (so any stride works: transposed operands need no copy), B is read in place.
// MR·NV accumulators live in registers (AVX2 6 × 2 = 12 of 16 ymm; AVX-512 6 × 4 = 24 of 32 zmm).
template <class Vec, int MR, int NV>
inline void ukernel(int kk, const float* A, int64_t ai, int64_t ak, const float* B, int64_t ldb, float* C,
                    int64_t ldc, bool acc) {
  // The unroll pragmas matter: without them GCC 12 keeps c[][] on the stack, a store per FMA (measured 2× slower).
  typename Vec::f c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[i][v] = acc ? Vec::load(C + i * ldc + Vec::W * v) : Vec::zero();
  for (int k = 0; k < kk; ++k) {
    typename Vec::f b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = Vec::load(B + k * ldb + Vec::W * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      typename Vec::f a = Vec::bcast(A + i * ai + k * ak);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = Vec::fma(a, b[v], c[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) Vec::store(C + i * ldc + Vec::W * v, c[i][v]);
}

template <class Vec, int NV>
inline void gemm_cols(int M, int K, const float* A, int64_t ai, int64_t ak, const float* B, int64_t ldb, float* C,
                      int64_t ldc, bool acc) {
  int i = 0;
  for (; i + 6 <= M; i += 6) ukernel<Vec, 6, NV>(K, A + i * ai, ai, ak, B, ldb, C + i * ldc, ldc, acc);
  const float* a = A + i * ai;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: ukernel<Vec, 5, NV>(K, a, ai, ak, B, ldb, c, ldc, acc); break;
    case 4: ukernel<Vec, 4, NV>(K, a, ai, ak, B, ldb, c, ldc, acc); break;
    case 3: ukernel<Vec, 3, NV>(K, a, ai, ak, B, ldb, c, ldc, acc); break;
    case 2: ukernel<Vec, 2, NV>(K, a, ai, ak, B, ldb, c, ldc, acc); break;
    case 1: ukernel<Vec, 1, NV>(K, a, ai, ak, B, ldb, c, ldc, acc); break;
    default: break;
  }
}

// C[M × N] (+)= A(M × K) · B(K × N); N a multiple of 8, B and C row-major. Column panels of the
// widest micro-kernel first, then narrower ones for the rest.
inline void gemm(int M, int N, int K, const float* A, int64_t ai, int64_t ak, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool acc) {
  int j = 0;
#if defined(__AVX512F__)
  for (; j + 64 <= N; j += 64) gemm_cols<Z, 4>(M, K, A, ai, ak, B + j, ldb, C + j, ldc, acc);
  if (j + 32 <= N) gemm_cols<Z, 2>(M, K, A, ai, ak, B + j, ldb, C + j, ldc, acc), j += 32;
  if (j + 16 <= N) gemm_cols<Z, 1>(M, K, A, ai, ak, B + j, ldb, C + j, ldc, acc), j += 16;
#else
  for (; j + 16 <= N; j += 16) gemm_cols<Y, 2>(M, K, A, ai, ak, B + j, ldb, C + j, ldc, acc);
#endif
  if (j < N) gemm_cols<Y, 1>(M, K, A, ai, ak, B + j, ldb, C + j, ldc, acc);
}

}  // namespace fused
