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

#include "fused_common.h"

namespace fused {

struct BwdWork {
  std::vector<float> qt, dot, st, dpt;
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
  for (int v = 0; v < TQ / 8; ++v) {
    __m256 l = _mm256_loadu_ps(lse + 8 * v);
    for (int kr = 0; kr < nc; ++kr) {
      float* p = st + kr * TQ + 8 * v;
      _mm256_storeu_ps(p, exp8(_mm256_sub_ps(_mm256_loadu_ps(p), l)));
    }
  }
}

static void dscores(const float* pt, float* dpt, int nc, const float* dl) {
  for (int v = 0; v < TQ / 8; ++v) {
    __m256 d = _mm256_loadu_ps(dl + 8 * v);
    for (int kr = 0; kr < nc; ++kr) {
      float* p = dpt + kr * TQ + 8 * v;
      _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(pt + kr * TQ + 8 * v), _mm256_sub_ps(_mm256_loadu_ps(p), d)));
    }
  }
}

// Δ = rowsum(dO ∘ O) of one query row.
static float delta(const float* dout, const float* out, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(dout + d), _mm256_loadu_ps(out + d), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// One (query tile of head h) × (its key tiles); dk/dv rows of key row kr live at acc + (kr − off(kr))·D.
// Returns the tile's share of ∂loss/∂sinks[h] (0 without sinks).
static double bwd_qtile(const Geo& g, const BwdIn& in, int64_t b, int64_t h, int64_t qt, float* dk, float* dv,
                      int64_t off, BwdWork& w) {
  const int64_t D = g.D, G = g.H / g.Hkv, i0 = qt * TQ, row0 = (b * g.H + h) * g.Q + i0;
  const int nr = (int)std::min<int64_t>(TQ, g.Q - i0);
  const int64_t kv = (b * g.Hkv + h / G) * g.K * D;
  const float *kh = in.k + kv, *vh = in.v + kv, *qh = in.q + row0 * D, *doh = in.dout + row0 * D;
  float* dqh = in.dq + row0 * D;
  const int64_t* qp = g.qpos + i0;
  query_tile_plan(g, b, i0, nr, w.tiles, w.qd);
  pack_t(qh, nr, D, g.scale, w.qt.data());
  pack_t(doh, nr, D, 1.f, w.dot.data());
  for (int r = 0; r < TQ; ++r) {  // padded lanes: finite values whose results are never read
    w.lse[r] = r < nr ? in.lse[row0 + r] : 0.f;
    if (w.lse[r] == NEG_INF) w.lse[r] = -NEG_INF;  // a row left empty by the documents: P = exp(−inf − inf) = 0
    w.dl[r] = r < nr ? delta(doh + r * D, in.out + (row0 + r) * D, D) - (in.dlse ? in.dlse[row0 + r] : 0.f) : 0.f;
  }
  // The sink is a column with score s_h and no value: dP = 0 there, so its dS is p_sink·(0 − Δ') with
  // p_sink = exp(s_h − lse) (lse includes the sink); the keys' dS keep their form.
  double dsink = 0.0;
  if (g.sinks && g.sinks[h] != NEG_INF)
    for (int r = 0; r < nr; ++r) dsink -= (double)std::exp(g.sinks[h] - w.lse[r]) * w.dl[r];
  float *st = w.st.data(), *dpt = w.dpt.data();
  for (const Tile& t : w.tiles) {
    const int64_t acc_row = t.k0 - (t.prefix ? 0 : off);
    gemm(t.nc, TQ, (int)D, kh + t.k0 * D, D, 1, w.qt.data(), TQ, st, TQ, false);  // S^T
    if (!t.full) {
      tile_bounds(g, t, qp, nr, w.lo, w.hi);
      apply_mask(st, t.nc, w.lo, w.hi);
    }
    if (t.docmask) apply_doc_mask(st, t.nc, g.kdoc + b * g.K + t.k0, w.qd);
    probs(st, t.nc, w.lse);
    gemm(t.nc, (int)D, nr, st, TQ, 1, doh, D, dv + acc_row * D, D, true);          // dV += P^T dO
    gemm(t.nc, TQ, (int)D, vh + t.k0 * D, D, 1, w.dot.data(), TQ, dpt, TQ, false);  // dP^T = V dOᵀ
    dscores(st, dpt, t.nc, w.dl);
    gemm(t.nc, (int)D, nr, dpt, TQ, 1, qh, D, dk + acc_row * D, D, true);  // dK += dS^T Q (scaled later)
    gemm(nr, (int)D, t.nc, dpt, 1, TQ, kh + t.k0 * D, D, dqh, D, true);   // dQ += dS K (scaled below)
  }
  for (int64_t i = 0; i < nr * D; ++i) dqh[i] *= g.scale;
  return dsink;
}

void backward(const Geo& g, const BwdIn& in, int nthreads) {
  const int64_t nqt = (g.Q + TQ - 1) / TQ, heads = g.B * g.Hkv, G = g.H / g.Hkv, D = g.D;
  // Segments per head: 1 when there are at least 2 heads per thread, else enough to give each thread ~2 tasks.
  const int64_t nseg = std::min<int64_t>(nqt, heads >= 2 * nthreads ? 1 : (2 * nthreads + heads - 1) / heads);
  std::vector<std::vector<float>> priv(nseg > 1 ? heads * nseg : 0);
  std::vector<int64_t> jlo(heads * nseg), jhi(heads * nseg);
  std::vector<double> dsink(heads * nseg * G, 0.0);  // per (task, query head of its group): summed below in order
  at::parallel_for(0, heads * nseg, 1, [&](int64_t t0, int64_t t1) {
    thread_local BwdWork w;
    w.qt.resize(D * TQ), w.dot.resize(D * TQ), w.st.resize(TK * TQ), w.dpt.resize(TK * TQ);
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
        for (int64_t j = 0; j < G; ++j) dsink[task * G + j] += bwd_qtile(g, in, b, (hd % g.Hkv) * G + j, qt, dk, dv, off, w);
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

}  // namespace fused
