// Backward of the fused band attention, one pass with 5 matmuls per (query tile, key tile):
//   S^T = K Qsᵀ, P^T = exp(S^T − lse), dV += P^T dO, dP^T = V dOᵀ, dS^T = P^T ∘ (dP^T − Δ'),
//   dK += dS^T Q, dQ += dS K           with Δ' = rowsum(dO ∘ O) − dlse computed per query tile (the
//   lse gradient: ∂lse/∂s = p, so dlse enters as dS += p·dlse). A learned sink is already inside the
//   saved lse (see fused_fwd.cpp), so P is the softmax over keys plus sink; its own gradient is per row.
// Tasks are (batch, kv head, segment of query tiles). A task owns the dQ rows of its queries (all G
// query heads sharing the kv head) and accumulates dK/dV of the keys they touch: straight into the
// output when the head has one segment (no atomics, no second pass over the queries as in
// FlashAttention-2's separate dQ pass), into a private buffer summed afterwards when heads are too
// few to keep every thread busy and are cut into segments.
#include <ATen/Parallel.h>

#include <type_traits>

#include "fused_bf16.h"

namespace fused {

struct BwdWork {
  std::vector<float> qt, dot, st, dpt;
  std::vector<uint32_t> qw, dow, qp2, dop2, kw, sw;  // bf16 inputs: the operands as bf16 pairs (BwdOps)
  std::vector<uint16_t> pr, sr;                       // bf16 inputs: P^T and dS^T rounded, row layout
  std::vector<Tile> tiles;
  QDocs qd;
  int32_t lo[TQ], hi[TQ];
  float lse[TQ], dl[TQ];
};

// Key rows [0, P) ∪ run indices [jlo, jhi) that query tiles [qt0, qt1) touch.
static void seg_keys(const Geo& g, int64_t qt0, int64_t qt1, int64_t& jlo, int64_t& jhi, std::vector<Tile>& tiles) {
  jlo = g.L, jhi = 0;
  for (int64_t qt = qt0; qt < qt1; ++qt) {
    int64_t i0 = qt * TQ, qmin, qmax;
    query_range(g.qpos + i0, (int)std::min<int64_t>(TQ, g.Q - i0), qmin, qmax);
    key_tiles(g, qmin, qmax, tiles);
    for (const Tile& t : tiles)
      if (!t.prefix) jlo = std::min(jlo, t.k0 - g.P), jhi = std::max(jhi, t.k0 - g.P + t.nc);
  }
  if (jlo > jhi) jlo = jhi = 0;
}

// P^T = exp(S^T − lse) in place (masked −inf → 0); dS^T = P^T ∘ (dP^T − Δ') in place of dP^T.
static void probs(float* st, int nc, const float* lse) {
  for (int v = 0; v < TQ / V::W; ++v) {
    V::f l = V::load(lse + V::W * v);
    for (int kr = 0; kr < nc; ++kr) {
      float* p = st + kr * TQ + V::W * v;
      V::store(p, vexp<V>(V::sub(V::load(p), l)));
    }
  }
}

static void dscores(const float* pt, float* dpt, int nc, const float* dl) {
  for (int v = 0; v < TQ / V::W; ++v) {
    V::f d = V::load(dl + V::W * v);
    for (int kr = 0; kr < nc; ++kr) {
      float* p = dpt + kr * TQ + V::W * v;
      V::store(p, V::mul(V::load(pt + kr * TQ + V::W * v), V::sub(V::load(p), d)));
    }
  }
}

// Δ = rowsum(dO ∘ O) of one query row (D % 8 == 0: AVX2 width).
static float delta(const float* dout, const float* out, int64_t D) {
  Y::f acc = Y::zero();
  for (int64_t d = 0; d < D; d += 8) acc = Y::fma(Y::load(dout + d), Y::load(out + d), acc);
  return Y::hsum(acc);
}

// The five products by input type. fp32: K, V, Q and dO read in place, the scale folded into the packed
// queries. bf16: vdpbf16ps on bf16 pairs; Q and dO packed once per query tile (as words along head_dim
// for S^T and dP^T, paired along the queries for dK and dV), K once per key tile for dQ, P^T and dS^T
// rounded to bf16 for the products they enter; the scores are scaled in fp32.
template <class T>
struct BwdOps;

template <>
struct BwdOps<float> {
  static void prep(BwdWork& w, const float* qh, const float* doh, int nr, int64_t D, float scale) {
    pack_t(qh, nr, D, scale, w.qt.data());
    pack_t(doh, nr, D, 1.f, w.dot.data());
  }
  static float delta(const float* dout, const float* out, int64_t D) { return fused::delta(dout, out, D); }
  static void scores(BwdWork& w, const float* kt, int nc, int64_t D, float, float* st) {  // S^T = K Qsᵀ
    gemm(nc, TQ, (int)D, kt, D, 1, w.qt.data(), TQ, st, TQ, false);
  }
  static void dv_dp(BwdWork& w, const float* pt, int nc, int nr, const float* doh, const float* vt, int64_t D, float* dv,
                    float* dpt) {
    gemm(nc, (int)D, nr, pt, TQ, 1, doh, D, dv, D, true);                    // dV += P^T dO
    gemm(nc, TQ, (int)D, vt, D, 1, w.dot.data(), TQ, dpt, TQ, false);        // dP^T = V dOᵀ
  }
  static void dk_dq(BwdWork&, const float* dst, int nc, int nr, const float* qh, const float* kt, int64_t D, float* dk,
                    float* dq) {
    gemm(nc, (int)D, nr, dst, TQ, 1, qh, D, dk, D, true);  // dK += dS^T Q (scaled later)
    gemm(nr, (int)D, nc, dst, 1, TQ, kt, D, dq, D, true);  // dQ += dS K (scaled at the end of the tile)
  }
};

#if defined(__AVX512F__)
template <>
struct BwdOps<bf16::u16> {
  using u16 = bf16::u16;
  static void prep(BwdWork& w, const u16* qh, const u16* doh, int nr, int64_t D, float) {
    bf16::pack_words_t(qh, nr, D, w.qw.data());
    bf16::pack_words_t(doh, nr, D, w.dow.data());
    bf16::pack_row_pairs(qh, nr, D, TQ / 2, w.qp2.data());
    bf16::pack_row_pairs(doh, nr, D, TQ / 2, w.dop2.data());
  }
  static float delta(const u16* dout, const u16* out, int64_t D) { return bf16::delta(dout, out, D); }
  static void scores(BwdWork& w, const u16* kt, int nc, int64_t D, float scale, float* st) {
    bf16::gemm(nc, TQ, (int)D / 2, (const uint32_t*)kt, D / 2, 1, w.qw.data(), TQ, st, TQ, false);
    bf16::scale(st, nc, scale);
  }
  static void dv_dp(BwdWork& w, const float* pt, int nc, int nr, const u16*, const u16* vt, int64_t D, float* dv,
                    float* dpt) {
    bf16::round_rows(pt, nc, w.pr.data());
    bf16::gemm(nc, (int)D, (nr + 1) / 2, (const uint32_t*)w.pr.data(), TQ / 2, 1, w.dop2.data(), D, dv, D, true);
    bf16::gemm(nc, TQ, (int)D / 2, (const uint32_t*)vt, D / 2, 1, w.dow.data(), TQ, dpt, TQ, false);
  }
  static void dk_dq(BwdWork& w, const float* dst, int nc, int nr, const u16*, const u16* kt, int64_t D, float* dk,
                    float* dq) {
    const int np = (nc + 1) / 2;
    bf16::round_rows(dst, nc, w.sr.data());
    bf16::gemm(nc, (int)D, (nr + 1) / 2, (const uint32_t*)w.sr.data(), TQ / 2, 1, w.qp2.data(), D, dk, D, true);
    bf16::round_key_pairs(dst, nc, w.sw.data());
    bf16::pack_row_pairs(kt, nc, D, np, w.kw.data());
    bf16::gemm(nr, (int)D, np, w.sw.data(), 1, TQ, w.kw.data(), D, dq, D, true);
  }
};
#endif

// One (query tile of head h) × (its key tiles); dk/dv rows of key row kr live at acc + (kr − off(kr))·D.
// Returns the tile's share of ∂loss/∂sinks[h] (0 without sinks).
template <class T>
static double bwd_qtile(const Geo& g, const BwdIn<T>& in, int64_t b, int64_t h, int64_t qt, float* dk, float* dv,
                        int64_t off, BwdWork& w) {
  const int64_t D = g.D, G = g.H / g.Hkv, i0 = qt * TQ, row0 = (b * g.H + h) * g.Q + i0;
  const int nr = (int)std::min<int64_t>(TQ, g.Q - i0);
  const int64_t kv = (b * g.Hkv + h / G) * g.K * D;
  const T *kh = in.k + kv, *vh = in.v + kv, *qh = in.q + row0 * D, *doh = in.dout + row0 * D;
  float* dqh = in.dq + row0 * D;
  const int64_t* qp = g.qpos + i0;
  query_tile_plan(g, b, i0, nr, w.tiles, w.qd);
  BwdOps<T>::prep(w, qh, doh, nr, D, g.scale);
  for (int r = 0; r < TQ; ++r) {  // padded lanes: finite values whose results are never read
    w.lse[r] = r < nr ? in.lse[row0 + r] : 0.f;
    if (w.lse[r] == NEG_INF) w.lse[r] = -NEG_INF;  // a row left empty by the documents: P = exp(−inf − inf) = 0
    w.dl[r] = r < nr ? BwdOps<T>::delta(doh + r * D, in.out + (row0 + r) * D, D) - (in.dlse ? in.dlse[row0 + r] : 0.f) : 0.f;
  }
  // The sink is a column with score s_h and no value: dP = 0 there, so its dS is p_sink·(0 − Δ') with
  // p_sink = exp(s_h − lse) (lse includes the sink); the keys' dS keep their form.
  double dsink = 0.0;
  if (g.sinks && g.sinks[h] != NEG_INF)
    for (int r = 0; r < nr; ++r) dsink -= (double)std::exp(g.sinks[h] - w.lse[r]) * w.dl[r];
  float *st = w.st.data(), *dpt = w.dpt.data();
  for (const Tile& t : w.tiles) {
    const int64_t acc_row = t.k0 - (t.prefix ? 0 : off);
    BwdOps<T>::scores(w, kh + t.k0 * D, t.nc, D, g.scale, st);  // S^T
    if (!t.full) {
      tile_bounds(g, t, qp, nr, w.lo, w.hi);
      apply_mask(st, t.nc, w.lo, w.hi);
    }
    if (t.docmask) apply_doc_mask(st, t.nc, g.kdoc + b * g.K + t.k0, w.qd);
    probs(st, t.nc, w.lse);
    BwdOps<T>::dv_dp(w, st, t.nc, nr, doh, vh + t.k0 * D, D, dv + acc_row * D, dpt);  // dV += P^T dO; dP^T = V dOᵀ
    dscores(st, dpt, t.nc, w.dl);
    BwdOps<T>::dk_dq(w, dpt, t.nc, nr, qh, kh + t.k0 * D, D, dk + acc_row * D, dqh);  // dK += dS^T Q; dQ += dS K
  }
  for (int64_t i = 0; i < nr * D; ++i) dqh[i] *= g.scale;
  return dsink;
}

template <class T>
void backward(const Geo& g, const BwdIn<T>& in, int nthreads) {
  const int64_t nqt = (g.Q + TQ - 1) / TQ, heads = g.B * g.Hkv, G = g.H / g.Hkv, D = g.D;
  // Segments per head: 1 when there are at least 2 heads per thread, else enough to give each thread ~2 tasks.
  const int64_t nseg = std::min<int64_t>(nqt, heads >= 2 * nthreads ? 1 : (2 * nthreads + heads - 1) / heads);
  std::vector<std::vector<float>> priv(nseg > 1 ? heads * nseg : 0);
  std::vector<int64_t> jlo(heads * nseg), jhi(heads * nseg);
  std::vector<double> dsink(heads * nseg * G, 0.0);  // per (task, query head of its group): summed below in order
  at::parallel_for(0, heads * nseg, 1, [&](int64_t t0, int64_t t1) {
    thread_local BwdWork w;
    w.qt.resize(D * TQ), w.dot.resize(D * TQ), w.st.resize(TK * TQ), w.dpt.resize(TK * TQ);
    if (!std::is_same<T, float>::value) {
      w.qw.resize(D / 2 * TQ), w.dow.resize(D / 2 * TQ), w.qp2.resize(TQ / 2 * D), w.dop2.resize(TQ / 2 * D);
      w.kw.resize(TK / 2 * D), w.sw.resize(TK / 2 * TQ), w.pr.resize(TK * TQ), w.sr.resize(TK * TQ);
    }
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t hd = task / nseg, s = task % nseg, b = hd / g.Hkv;
      const int64_t qt0 = s * nqt / nseg, qt1 = (s + 1) * nqt / nseg;
      float *dk = in.dk + hd * g.K * D, *dv = in.dv + hd * g.K * D;
      int64_t off = 0;
      if (nseg > 1) {
        seg_keys(g, qt0, qt1, jlo[task], jhi[task], w.tiles);
        off = jlo[task];
        priv[task].assign(2 * (g.P + jhi[task] - jlo[task]) * D, 0.f);
        dk = priv[task].data(), dv = dk + (g.P + jhi[task] - jlo[task]) * D;
      }
      for (int64_t qt = qt0; qt < qt1; ++qt)
        for (int64_t j = 0; j < G; ++j) dsink[task * G + j] += bwd_qtile<T>(g, in, b, (hd % g.Hkv) * G + j, qt, dk, dv, off, w);
    }
  });
  if (in.dsinks) {  // summed in task order, not in whatever order threads finish: deterministic
    std::vector<double> per_head(g.H, 0.0);
    for (int64_t task = 0; task < heads * nseg; ++task)
      for (int64_t j = 0; j < G; ++j) per_head[(task / nseg % g.Hkv) * G + j] += dsink[task * G + j];
    for (int64_t h = 0; h < g.H; ++h) in.dsinks[h] = (float)per_head[h];
  }
  if (nseg == 1) return;
  at::parallel_for(0, heads, 1, [&](int64_t h0, int64_t h1) {  // sum the segments' private dK/dV
    for (int64_t hd = h0; hd < h1; ++hd)
      for (int64_t s = 0; s < nseg; ++s) {
        const int64_t task = hd * nseg + s, n = g.P + jhi[task] - jlo[task];
        const float* src = priv[task].data();
        for (int half = 0; half < 2; ++half, src += n * D) {
          float* dst = (half ? in.dv : in.dk) + hd * g.K * D;
          for (int64_t i = 0; i < g.P * D; ++i) dst[i] += src[i];
          float* run = dst + (g.P + jlo[task]) * D;
          for (int64_t i = 0; i < (jhi[task] - jlo[task]) * D; ++i) run[i] += src[g.P * D + i];
        }
      }
  });
}

template void backward<float>(const Geo&, const BwdIn<float>&, int);
#if defined(__AVX512F__)
template void backward<bf16::u16>(const Geo&, const BwdIn<bf16::u16>&, int);
#endif

}  // namespace fused
