// Shared pieces of the fused band attention kernel: geometry, the AVX2/FMA matmul micro-kernel and
// a fast exp. Header-only so that each translation unit inlines them.
//
// Layout conventions (see fused_fwd.cpp): scores are kept TRANSPOSED, S^T[key][query] with 64
// queries per row, so that per-query softmax state (max, sum, lse, Δ) is a vector of 8-query
// lanes and every softmax step is a vertical (lane-wise) operation, with no horizontal reductions.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fused {

constexpr int TQ = 64;  // queries per tile (the lane dimension of S^T: 8 AVX2 vectors)
constexpr int TK = 64;  // keys per tile
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Which keys a query may see, for Window patterns with dilation 1:
//   keys = [prefix | run]: prefix = P keys with positions kpos[0..P) all < ng (global tokens),
//   run = L keys with contiguous positions kbase, kbase+1, ... (kbase >= ng: no globals in it).
//   allowed(qi, kj) = (qi−wl <= kj <= qi+wr  or  kj < ng  or  (!causal and qi < ng))
//                     and (!causal or kj <= qi)          — model.pattern.Pattern.allowed.
struct Geo {
  int64_t B, H, Hkv, Q, K, D;
  int64_t P, L, kbase, wl, wr, ng;
  bool causal;
  float scale;
  const int64_t* qpos;  // [Q]
  const int64_t* kpos;  // [K] (only the prefix is read)
  const float* sinks;   // [H] learned sink logits (one extra softmax column per head, no value), or null
  const int32_t* qdoc;  // [B, Q] document ids (kernels.reference.document_rule), or null: no documents
  const int32_t* kdoc;  // [B, K]
};

// The sink of head h as the softmax state a query row starts from: running max m0 = s_h and running
// sum l0 = exp(s_h − m0) = 1, so that out and lse come out with the sink column included (no extra
// pass). No sink, or s_h = −inf, starts from the empty state (−inf, 0).
inline void sink_start(const Geo& g, int64_t h, float& m0, float& l0) {
  m0 = g.sinks ? g.sinks[h] : NEG_INF;
  l0 = m0 == NEG_INF ? 0.f : 1.f;
}

struct FwdOut {
  float* out;                    // [B, H, Q, D]
  float* lse;                    // [B, H, Q]
  float *st_m, *st_max, *st_gm;  // [B, H, Q] each, or null without stats
};

struct BwdIn {
  const float *q, *k, *v, *dout, *out, *lse;
  const float* dlse;                            // [B, H, Q] or null (no lse gradient)
  float *dq, *dk, *dv;                          // outputs, zero-initialised
  float* dsinks;                                // [H] output (zero-initialised) when g.sinks, else null
};

void forward(const Geo& g, const float* q, const float* k, const float* v, const FwdOut& res);
void backward(const Geo& g, const BwdIn& in, int nthreads);

struct Tile {
  int64_t k0;   // first key row (index into the head's K rows)
  int nc;       // keys in this tile (<= TK)
  bool prefix;  // global-prefix tile (every key is a global token)
  bool full;    // every (query, key) pair of the tile is allowed by the pattern: no position mask needed
  bool docmask; // some (query, key) pair of the tile is in different documents: mask by document ids
};

// The key tiles a query tile with positions in [qmin, qmax] has to visit: the prefix in tiles of
// TK, then the band [qmin − wl, qmax + wr] of the run cut into tiles of TK starting at its first key.
inline void key_tiles(const Geo& g, int64_t qmin, int64_t qmax, std::vector<Tile>& out) {
  out.clear();
  for (int64_t c = 0; c < g.P; c += TK) {
    int nc = (int)std::min<int64_t>(TK, g.P - c);
    if (g.causal && g.kpos[c] > qmax) break;  // positions ascend: later prefix keys are later still
    out.push_back({c, nc, true, !g.causal || g.kpos[c + nc - 1] <= qmin, false});
  }
  if (g.L == 0) return;
  const int64_t wr = g.causal ? 0 : g.wr;  // causal: nothing right of the query survives kj <= qi
  int64_t lo, hi;                          // run indices [lo, hi)
  if (!g.causal && qmin < g.ng) {
    lo = 0, hi = g.L;  // a bidirectional global query sees every key
  } else {
    lo = std::max<int64_t>(0, qmin - g.wl - g.kbase);
    hi = std::min<int64_t>(g.L, qmax + wr - g.kbase + 1);
  }
  for (int64_t c = lo; c < hi; c += TK) {
    int nc = (int)std::min<int64_t>(TK, hi - c);
    int64_t p0 = g.kbase + c, p1 = p0 + nc - 1;
    bool full = p0 >= qmax - g.wl && p1 <= qmin + wr;
    out.push_back({g.P + c, nc, false, full, false});
  }
}

// Per query r of the tile, the allowed key columns [lo[r], hi[r]] of tile t (empty when lo > hi).
inline void tile_bounds(const Geo& g, const Tile& t, const int64_t* qp, int nr, int32_t* lo, int32_t* hi) {
  for (int r = 0; r < TQ; ++r) {
    lo[r] = 0, hi[r] = -1;
    if (r >= nr) continue;
    int64_t qi = qp[r];
    if (t.prefix) {
      int n = t.nc;
      if (g.causal)
        while (n > 0 && g.kpos[t.k0 + n - 1] > qi) --n;
      hi[r] = n - 1;
      continue;
    }
    int64_t p0 = g.kbase + (t.k0 - g.P);
    if (!g.causal && qi < g.ng) {
      hi[r] = t.nc - 1;
      continue;
    }
    int64_t a = qi - g.wl - p0, b = (g.causal ? qi : qi + g.wr) - p0;
    lo[r] = (int32_t)std::max<int64_t>(0, a);
    hi[r] = (int32_t)std::min<int64_t>(t.nc - 1, b);
    if (a > t.nc - 1 || b < 0) lo[r] = 0, hi[r] = -1;
  }
}

// S^T rows [0, nc) × TQ lanes: set −inf where key row kr is outside [lo[q], hi[q]].
inline void apply_mask(float* st, int nc, const int32_t* lo, const int32_t* hi) {
  const __m256 ninf = _mm256_set1_ps(NEG_INF);
  for (int v = 0; v < TQ / 8; ++v) {
    __m256i l = _mm256_loadu_si256((const __m256i*)(lo + 8 * v));
    __m256i h = _mm256_loadu_si256((const __m256i*)(hi + 8 * v));
    for (int kr = 0; kr < nc; ++kr) {
      __m256i k = _mm256_set1_epi32(kr);
      // outside = kr < lo or kr > hi
      __m256i out = _mm256_or_si256(_mm256_cmpgt_epi32(l, k), _mm256_cmpgt_epi32(k, h));
      float* p = st + kr * TQ + 8 * v;
      _mm256_storeu_ps(p, _mm256_blendv_ps(_mm256_loadu_ps(p), ninf, _mm256_castsi256_ps(out)));
    }
  }
}

// exp of 8 floats: Cephes' range reduction x = n·ln2 + r and degree-6 polynomial for e^r
// (relative error ~2e-7, i.e. fp32 rounding); x below −87.3, −inf included, gives exactly 0.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), lo);
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

// C[MR × 8·NV] (+)= Σ_k A(i, k) · B[k·ldb + j] with A(i, k) = A[i·ai + k·ak]: A is broadcast one
// element at a time (so any stride works: transposed operands need no copy), B is read in place.
// MR·NV accumulators live in registers (6 × 2 = 12 of the 16 ymm registers).
template <int MR, int NV>
inline void ukernel(int kk, const float* A, int64_t ai, int64_t ak, const float* B, int64_t ldb, float* C,
                    int64_t ldc, bool acc) {
  // The unroll pragmas matter: without them GCC 12 keeps c[][] on the stack, a store per FMA (measured 2× slower).
  __m256 c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) c[i][v] = acc ? _mm256_loadu_ps(C + i * ldc + 8 * v) : _mm256_setzero_ps();
  for (int k = 0; k < kk; ++k) {
    __m256 b[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + k * ldb + 8 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      __m256 a = _mm256_broadcast_ss(A + i * ai + k * ak);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) c[i][v] = _mm256_fmadd_ps(a, b[v], c[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(C + i * ldc + 8 * v, c[i][v]);
}

template <int NV>
inline void gemm_cols(int M, int K, const float* A, int64_t ai, int64_t ak, const float* B, int64_t ldb, float* C,
                      int64_t ldc, bool acc) {
  int i = 0;
  for (; i + 6 <= M; i += 6) ukernel<6, NV>(K, A + i * ai, ai, ak, B, ldb, C + i * ldc, ldc, acc);
  const float* a = A + i * ai;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: ukernel<5, NV>(K, a, ai, ak, B, ldb, c, ldc, acc); break;
    case 4: ukernel<4, NV>(K, a, ai, ak, B, ldb, c, ldc, acc); break;
    case 3: ukernel<3, NV>(K, a, ai, ak, B, ldb, c, ldc, acc); break;
    case 2: ukernel<2, NV>(K, a, ai, ak, B, ldb, c, ldc, acc); break;
    case 1: ukernel<1, NV>(K, a, ai, ak, B, ldb, c, ldc, acc); break;
    default: break;
  }
}

// C[M × N] (+)= A(M × K) · B(K × N); N a multiple of 8, B and C row-major.
inline void gemm(int M, int N, int K, const float* A, int64_t ai, int64_t ak, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool acc) {
  int j = 0;
  for (; j + 16 <= N; j += 16) gemm_cols<2>(M, K, A, ai, ak, B + j, ldb, C + j, ldc, acc);
  if (j < N) gemm_cols<1>(M, K, A, ai, ak, B + j, ldb, C + j, ldc, acc);
}

// dst[d][r] = scale · src[r·D + d] for r < nr, 0 for nr <= r < TQ: a query-side tile transposed
// once (reused by every key tile), so that S^T = K · Qᵀ reads both operands contiguously.
inline void pack_t(const float* src, int nr, int64_t D, float scale, float* dst) {
  for (int64_t d = 0; d < D; ++d) {
    float* row = dst + d * TQ;
    for (int r = 0; r < nr; ++r) row[r] = scale * src[r * D + d];
    for (int r = nr; r < TQ; ++r) row[r] = 0.f;
  }
}

// Documents of one query tile: the ids per lane, which lanes are exempt from the document rule
// (bidirectional global queries see every key), and the id range of the non-exempt queries.
struct QDocs {
  int32_t id[TQ], exempt[TQ];  // exempt: all-ones lane mask (for the AVX2 blend), else 0
  int32_t lo, hi;              // id range of the non-exempt queries (lo > hi: every query is exempt)
  bool any_exempt;
};

inline void query_docs(const Geo& g, int64_t b, int64_t i0, int nr, QDocs& d) {
  const int32_t* qd = g.qdoc + b * g.Q + i0;
  d.lo = INT32_MAX, d.hi = INT32_MIN, d.any_exempt = false;
  for (int r = 0; r < TQ; ++r) {
    d.id[r] = r < nr ? qd[r] : 0;
    d.exempt[r] = r < nr && !g.causal && g.qpos[i0 + r] < g.ng ? -1 : 0;
    if (r >= nr) continue;
    if (d.exempt[r]) d.any_exempt = true;
    else d.lo = std::min(d.lo, qd[r]), d.hi = std::max(d.hi, qd[r]);
  }
}

// Applies the document rule to the tiles of one query tile: run tiles whose document ids meet none of
// the (non-exempt) queries' are dropped, unless an exempt query sees them; the rest are flagged for
// the elementwise mask unless query and key tile are all one document. Global-prefix tiles are kept
// as they are (global keys are visible to every query). Ids need not be sorted: ranges are computed.
inline void doc_filter(const Geo& g, int64_t b, const QDocs& d, std::vector<Tile>& tiles) {
  if (!g.qdoc) return;
  size_t n = 0;
  for (const Tile& t : tiles) {
    Tile u = t;
    if (!t.prefix) {
      const int32_t* kd = g.kdoc + b * g.K + t.k0;
      int32_t lo = kd[0], hi = kd[0];
      for (int c = 1; c < t.nc; ++c) lo = std::min(lo, kd[c]), hi = std::max(hi, kd[c]);
      if (!d.any_exempt && (hi < d.lo || lo > d.hi)) continue;  // no query of the tile shares a document
      u.docmask = !(lo == hi && d.lo == d.hi && lo == d.lo);
    }
    tiles[n++] = u;
  }
  tiles.resize(n);
}

// S^T rows [0, nc) × TQ lanes: set −inf where key kr's document differs from the query's (exempt lanes keep).
inline void apply_doc_mask(float* st, int nc, const int32_t* kd, const QDocs& d) {
  const __m256 ninf = _mm256_set1_ps(NEG_INF);
  for (int v = 0; v < TQ / 8; ++v) {
    __m256i id = _mm256_loadu_si256((const __m256i*)(d.id + 8 * v));
    __m256i ex = _mm256_loadu_si256((const __m256i*)(d.exempt + 8 * v));
    for (int kr = 0; kr < nc; ++kr) {
      __m256i keep = _mm256_or_si256(_mm256_cmpeq_epi32(id, _mm256_set1_epi32(kd[kr])), ex);
      float* p = st + kr * TQ + 8 * v;
      _mm256_storeu_ps(p, _mm256_blendv_ps(ninf, _mm256_loadu_ps(p), _mm256_castsi256_ps(keep)));
    }
  }
}

inline void query_range(const int64_t* qp, int nr, int64_t& qmin, int64_t& qmax) {
  qmin = qp[0], qmax = qp[0];
  for (int r = 1; r < nr; ++r) qmin = std::min(qmin, qp[r]), qmax = std::max(qmax, qp[r]);
}

// The key tiles one query tile (rows [i0, i0 + nr) of batch b) visits, forward and backward alike:
// the band and global tiles its positions reach, narrowed by the documents when there are any.
inline void query_tile_plan(const Geo& g, int64_t b, int64_t i0, int nr, std::vector<Tile>& tiles, QDocs& qd) {
  int64_t qmin, qmax;
  query_range(g.qpos + i0, nr, qmin, qmax);
  key_tiles(g, qmin, qmax, tiles);
  if (g.qdoc) {
    query_docs(g, b, i0, nr, qd);
    doc_filter(g, b, qd, tiles);
  }
}

}  // namespace fused
