// Shared pieces of the fused band attention kernel: geometry, tiles, masks. Header-only so that each
// translation unit inlines them; the vector width is fused_simd.h's (one build per instruction set).
//
// Layout conventions (see fused_fwd.cpp): scores are kept TRANSPOSED, S^T[key][query] with 64
// queries per row, so that per-query softmax state (max, sum, lse, Δ) is a vector of V::W-query
// lanes and every softmax step is a vertical (lane-wise) operation, with no horizontal reductions.
#pragma once

#include "fused_simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace fused {

constexpr int TQ = 64;  // queries per tile (the lane dimension of S^T: 8 AVX2 or 4 AVX-512 vectors)
constexpr int TK = 64;  // keys per tile

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

// T: float, or bf16 bits (uint16_t, AVX-512 builds: fused_bf16.h). Gradients and lse are fp32 always.
template <class T>
struct BwdIn {
  const T *q, *k, *v, *dout, *out;
  const float* lse;                             // [B, H, Q]
  const float* dlse;                            // [B, H, Q] or null (no lse gradient)
  float *dq, *dk, *dv;                          // outputs, zero-initialised
  float* dsinks;                                // [H] output (zero-initialised) when g.sinks, else null
};

template <class T>
void forward(const Geo& g, const T* q, const T* k, const T* v, const FwdOut& res);
template <class T>
void backward(const Geo& g, const BwdIn<T>& in, int nthreads);

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
  for (int v = 0; v < TQ / V::W; ++v) {
    V::i l = V::loadi(lo + V::W * v), h = V::loadi(hi + V::W * v);
    for (int kr = 0; kr < nc; ++kr) {
      float* p = st + kr * TQ + V::W * v;
      V::store(p, V::keep_in_range(V::load(p), l, h, kr));
    }
  }
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
  int32_t id[TQ], exempt[TQ];  // exempt: all-ones lane mask, else 0
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
  for (int v = 0; v < TQ / V::W; ++v) {
    V::i id = V::loadi(d.id + V::W * v), ex = V::loadi(d.exempt + V::W * v);
    for (int kr = 0; kr < nc; ++kr) {
      float* p = st + kr * TQ + V::W * v;
      V::store(p, V::keep_same_doc(V::load(p), id, ex, kd[kr]));
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
