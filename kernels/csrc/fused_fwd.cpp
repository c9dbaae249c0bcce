// Forward of the fused band attention: one task per (batch, head, 64-query tile), online softmax
// over the tile's key tiles (the global prefix, then the band), everything in L1/L2-sized buffers.
#include <ATen/Parallel.h>

#include <type_traits>

#include "fused_bf16.h"

namespace fused {

struct RowState {  // per query lane: running max, Σ e, Σ e·s, Σ e over global keys
  float m[TQ], l[TQ], es[TQ], eg[TQ], alpha[TQ];
};

// In place on S^T [nc][TQ]: e = exp(s − m_new) with m_new the running max; updates the row state
// (rescaling old sums by alpha = exp(m_old − m_new)); e·s and global sums only when stats are on.
static void online_softmax(float* st, int nc, bool prefix, bool stats, RowState& rs) {
  const V::f ninf = V::set1(NEG_INF), zero = V::zero();
  for (int v = 0; v < TQ / V::W; ++v) {
    const int o = V::W * v;
    V::f mt = ninf;
    for (int kr = 0; kr < nc; ++kr) mt = V::max(mt, V::load(st + kr * TQ + o));
    V::f m_old = V::load(rs.m + o);
    V::f m_new = V::max(m_old, mt);
    // A lane that has seen no allowed key yet keeps m = −inf; subtract 0 there instead (−inf − −inf is NaN).
    V::f base = V::zero_where_ninf(m_new);
    V::f alpha = vexp<V>(V::sub(m_old, base));
    V::f sum = zero, ps = zero;
    for (int kr = 0; kr < nc; ++kr) {
      float* p = st + kr * TQ + o;
      V::f s = V::load(p);
      V::f e = vexp<V>(V::sub(s, base));
      V::store(p, e);
      sum = V::add(sum, e);
      if (stats) ps = V::add(ps, V::where_positive(V::mul(e, s), e));
    }
    V::store(rs.m + o, m_new);
    V::store(rs.alpha + o, alpha);
    V::store(rs.l + o, V::fma(V::load(rs.l + o), alpha, sum));
    if (stats) {
      V::store(rs.es + o, V::fma(V::load(rs.es + o), alpha, ps));
      V::f eg = V::mul(V::load(rs.eg + o), alpha);
      V::store(rs.eg + o, prefix ? V::add(eg, sum) : eg);
    }
  }
}

static void scale_rows(float* o, int nr, int64_t D, const float* alpha) {  // D % 8 == 0: AVX2 width
  for (int r = 0; r < nr; ++r) {
    Y::f a = Y::set1(alpha[r]);
    for (int64_t d = 0; d < D; d += 8) Y::store(o + r * D + d, Y::mul(a, Y::load(o + r * D + d)));
  }
}

struct FwdWork {  // per-thread buffers, kept across calls (no page faults on reuse)
  std::vector<float> qt, st, o;
  std::vector<uint32_t> qw, pw, vw;  // bf16 inputs: queries, P and V as bf16 pairs (fused_bf16.h)
  std::vector<Tile> tiles;
  RowState rs;
  QDocs qd;
  int32_t lo[TQ], hi[TQ];
};

// The operands of the tile's two products by input type. fp32: K and V read in place, the scale folded
// into the packed queries. bf16: vdpbf16ps on bf16 pairs (K rows in place, queries, P and V packed per
// tile), the scale applied to the fp32 scores; P is rounded to bf16 for P V, as FlashAttention does.
template <class T>
struct FwdOps;

template <>
struct FwdOps<float> {
  static void prep(FwdWork& w, const float* qh, int nr, int64_t D, float scale) { pack_t(qh, nr, D, scale, w.qt.data()); }
  static void scores(FwdWork& w, const float* kt, int nc, int64_t D, float, float* st) {  // S^T = K Qsᵀ
    gemm(nc, TQ, (int)D, kt, D, 1, w.qt.data(), TQ, st, TQ, false);
  }
  static void pv(FwdWork&, const float* st, int nr, int nc, const float* vt, int64_t D, float* o) {  // O += P V
    gemm(nr, (int)D, nc, st, 1, TQ, vt, D, o, D, true);  // P read transposed
  }
};

#if defined(__AVX512F__)
template <>
struct FwdOps<bf16::u16> {
  static void prep(FwdWork& w, const bf16::u16* qh, int nr, int64_t D, float) { bf16::pack_words_t(qh, nr, D, w.qw.data()); }
  static void scores(FwdWork& w, const bf16::u16* kt, int nc, int64_t D, float scale, float* st) {
    bf16::gemm(nc, TQ, (int)D / 2, (const uint32_t*)kt, D / 2, 1, w.qw.data(), TQ, st, TQ, false);
    bf16::scale(st, nc, scale);
  }
  static void pv(FwdWork& w, const float* st, int nr, int nc, const bf16::u16* vt, int64_t D, float* o) {
    const int np = (nc + 1) / 2;
    bf16::round_key_pairs(st, nc, w.pw.data());
    bf16::pack_row_pairs(vt, nc, D, np, w.vw.data());
    bf16::gemm(nr, (int)D, np, w.pw.data(), 1, TQ, w.vw.data(), D, o, D, true);
  }
};
#endif

template <class T>
static void fwd_tile(const Geo& g, const T* q, const T* k, const T* v, const FwdOut& res, int64_t task, bool stats,
                     FwdWork& w) {
  const int64_t D = g.D, nqt = (g.Q + TQ - 1) / TQ, G = g.H / g.Hkv;
  const int64_t bh = task / nqt, i0 = (task % nqt) * TQ, b = bh / g.H, h = bh % g.H;
  const int nr = (int)std::min<int64_t>(TQ, g.Q - i0);
  const T* qh = q + (bh * g.Q + i0) * D;
  const T* kh = k + (b * g.Hkv + h / G) * g.K * D;
  const T* vh = v + (b * g.Hkv + h / G) * g.K * D;
  const int64_t* qp = g.qpos + i0;
  query_tile_plan(g, b, i0, nr, w.tiles, w.qd);
  FwdOps<T>::prep(w, qh, nr, D, g.scale);
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
    FwdOps<T>::scores(w, kh + t.k0 * D, t.nc, D, g.scale, st);
    if (!t.full) {
      tile_bounds(g, t, qp, nr, w.lo, w.hi);
      apply_mask(st, t.nc, w.lo, w.hi);
    }
    if (t.docmask) apply_doc_mask(st, t.nc, g.kdoc + b * g.K + t.k0, w.qd);
    online_softmax(st, t.nc, t.prefix, stats, w.rs);
    scale_rows(o, nr, D, w.rs.alpha);
    FwdOps<T>::pv(w, st, nr, t.nc, vh + t.k0 * D, D, o);
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

template <class T>
void forward(const Geo& g, const T* q, const T* k, const T* v, const FwdOut& res) {
  const int64_t ntasks = g.B * g.H * ((g.Q + TQ - 1) / TQ);
  const bool stats = res.st_m != nullptr;
  at::parallel_for(0, ntasks, 1, [&](int64_t t0, int64_t t1) {
    thread_local FwdWork w;
    w.qt.resize(g.D * TQ), w.st.resize(TK * TQ), w.o.resize(TQ * g.D);
    if (!std::is_same<T, float>::value) w.qw.resize(g.D / 2 * TQ), w.pw.resize(TK / 2 * TQ), w.vw.resize(TK / 2 * g.D);
    for (int64_t t = t0; t < t1; ++t) fwd_tile<T>(g, q, k, v, res, t, stats, w);
  });
}

template void forward<float>(const Geo&, const float*, const float*, const float*, const FwdOut&);
#if defined(__AVX512F__)
template void forward<bf16::u16>(const Geo&, const bf16::u16*, const bf16::u16*, const bf16::u16*, const FwdOut&);
#endif

}  // namespace fused
