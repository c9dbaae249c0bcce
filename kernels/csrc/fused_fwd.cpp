// Forward of the fused band attention: one task per (batch, head, 64-query tile), online softmax
// over the tile's key tiles (the global prefix, then the band), everything in L1/L2-sized buffers.
#include <ATen/Parallel.h>

#include "fused_common.h"

namespace fused {

struct RowState {  // per query lane: running max, Σ e, Σ e·s, Σ e over global keys
  float m[TQ], l[TQ], es[TQ], eg[TQ], alpha[TQ];
};

// In place on S^T [nc][TQ]: e = exp(s − m_new) with m_new the running max; updates the row state
// (rescaling old sums by alpha = exp(m_old − m_new)); e·s and global sums only when stats are on.
static void online_softmax(float* st, int nc, bool prefix, bool stats, RowState& rs) {
  const __m256 ninf = _mm256_set1_ps(NEG_INF), zero = _mm256_setzero_ps();
  for (int v = 0; v < TQ / 8; ++v) {
    __m256 mt = ninf;
    for (int kr = 0; kr < nc; ++kr) mt = _mm256_max_ps(mt, _mm256_loadu_ps(st + kr * TQ + 8 * v));
    __m256 m_old = _mm256_loadu_ps(rs.m + 8 * v);
    __m256 m_new = _mm256_max_ps(m_old, mt);
    // A lane that has seen no allowed key yet keeps m = −inf; subtract 0 there instead (−inf − −inf is NaN).
    __m256 base = _mm256_blendv_ps(m_new, zero, _mm256_cmp_ps(m_new, ninf, _CMP_EQ_OQ));
    __m256 alpha = exp8(_mm256_sub_ps(m_old, base));
    __m256 sum = zero, ps = zero;
    for (int kr = 0; kr < nc; ++kr) {
      float* p = st + kr * TQ + 8 * v;
      __m256 s = _mm256_loadu_ps(p);
      __m256 e = exp8(_mm256_sub_ps(s, base));
      _mm256_storeu_ps(p, e);
      sum = _mm256_add_ps(sum, e);
      if (stats) ps = _mm256_add_ps(ps, _mm256_and_ps(_mm256_mul_ps(e, s), _mm256_cmp_ps(e, zero, _CMP_GT_OQ)));
    }
    _mm256_storeu_ps(rs.m + 8 * v, m_new);
    _mm256_storeu_ps(rs.alpha + 8 * v, alpha);
    _mm256_storeu_ps(rs.l + 8 * v, _mm256_fmadd_ps(_mm256_loadu_ps(rs.l + 8 * v), alpha, sum));
    if (stats) {
      _mm256_storeu_ps(rs.es + 8 * v, _mm256_fmadd_ps(_mm256_loadu_ps(rs.es + 8 * v), alpha, ps));
      __m256 eg = _mm256_mul_ps(_mm256_loadu_ps(rs.eg + 8 * v), alpha);
      _mm256_storeu_ps(rs.eg + 8 * v, prefix ? _mm256_add_ps(eg, sum) : eg);
    }
  }
}

static void scale_rows(float* o, int nr, int64_t D, const float* alpha) {
  for (int r = 0; r < nr; ++r) {
    __m256 a = _mm256_set1_ps(alpha[r]);
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + r * D + d, _mm256_mul_ps(a, _mm256_loadu_ps(o + r * D + d)));
  }
}

struct FwdWork {  // per-thread buffers, kept across calls (no page faults on reuse)
  std::vector<float> qt, st, o;
  std::vector<Tile> tiles;
  RowState rs;
  QDocs qd;
  int32_t lo[TQ], hi[TQ];
};

static void fwd_tile(const Geo& g, const float* q, const float* k, const float* v, const FwdOut& res, int64_t task,
                     bool stats, FwdWork& w) {
  const int64_t D = g.D, nqt = (g.Q + TQ - 1) / TQ, G = g.H / g.Hkv;
  const int64_t bh = task / nqt, i0 = (task % nqt) * TQ, b = bh / g.H, h = bh % g.H;
  const int nr = (int)std::min<int64_t>(TQ, g.Q - i0);
  const float* qh = q + (bh * g.Q + i0) * D;
  const float* kh = k + (b * g.Hkv + h / G) * g.K * D;
  const float* vh = v + (b * g.Hkv + h / G) * g.K * D;
  const int64_t* qp = g.qpos + i0;
  query_tile_plan(g, b, i0, nr, w.tiles, w.qd);
  pack_t(qh, nr, D, g.scale, w.qt.data());
  float* o = w.o.data();
  std::fill(o, o + nr * D, 0.f);
  float m0, l0;  // the learned sink, if any, is the first "key" every row has seen
  sink_start(g, h, m0, l0);
  std::fill(w.rs.m, w.rs.m + TQ, m0);
  std::fill(w.rs.l, w.rs.l + TQ, l0);
  std::fill(w.rs.es, w.rs.es + TQ, l0 > 0.f ? m0 : 0.f);  // Σ e·s starts with the sink's 1·s_h
  std::fill(w.rs.eg, w.rs.eg + TQ, 0.f);
  float* st = w.st.data();
  for (const Tile& t : w.tiles) {
    gemm(t.nc, TQ, (int)D, kh + t.k0 * D, D, 1, w.qt.data(), TQ, st, TQ, false);  // S^T = K Qsᵀ
    if (!t.full) {
      tile_bounds(g, t, qp, nr, w.lo, w.hi);
      apply_mask(st, t.nc, w.lo, w.hi);
    }
    if (t.docmask) apply_doc_mask(st, t.nc, g.kdoc + b * g.K + t.k0, w.qd);
    online_softmax(st, t.nc, t.prefix, stats, w.rs);
    scale_rows(o, nr, D, w.rs.alpha);
    gemm(nr, (int)D, t.nc, st, 1, TQ, vh + t.k0 * D, D, o, D, true);  // O += P V (P read transposed)
  }
  const int64_t row0 = bh * g.Q + i0;
  for (int r = 0; r < nr; ++r) {
    // l == 0: an empty row without a sink (the pattern's: the caller raises; the documents': a shard's
    // partial over remote keys) gives out 0, lse −inf, m 0, mass 0, as the reference; with a sink out 0, lse s_h.
    const float l = w.rs.l[r], inv = l > 0.f ? 1.f / l : 0.f;
    float* dst = res.out + (row0 + r) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = o[r * D + d] * inv;
    res.lse[row0 + r] = w.rs.m[r] + std::log(l);
    if (stats) {
      res.st_m[row0 + r] = w.rs.es[r] * inv;
      res.st_max[row0 + r] = w.rs.m[r];
      res.st_gm[row0 + r] = w.rs.eg[r] * inv;
    }
  }
}

void forward(const Geo& g, const float* q, const float* k, const float* v, const FwdOut& res) {
  const int64_t ntasks = g.B * g.H * ((g.Q + TQ - 1) / TQ);
  const bool stats = res.st_m != nullptr;
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    thread_local FwdWork w;
    w.qt.resize(g.D * TQ), w.st.resize(TK * TQ), w.o.resize(TQ * g.D);
    for (int64_t t = t0; t < t1; ++t) fwd_tile(g, q, k, v, res, t, stats, w);
  });
}

}  // namespace fused
