// Python binding of the fused band attention (kernels/fused.py checks every argument before this).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "fused_bf16.h"

#if defined(__AVX512F__)
constexpr bool BF16_BUILT = true;
#else
constexpr bool BF16_BUILT = false;
#endif

// The typed pointer of a float32 or bfloat16 tensor (bf16 as its raw bits).
template <class T>
static const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

static fused::Geo geo(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& sinks,
                      const at::Tensor& qpos, const at::Tensor& kpos, int64_t P, int64_t kbase, int64_t wl, int64_t wr,
                      int64_t ng, bool causal, const c10::optional<at::Tensor>& qdoc,
                      const c10::optional<at::Tensor>& kdoc, double scale) {
  TORCH_CHECK((q.dtype() == at::kFloat || q.dtype() == at::kBFloat16) && k.dtype() == q.dtype() && q.is_contiguous() &&
                  k.is_contiguous(), "fused attention: q, k, v must be contiguous float32 or bfloat16, one dtype");
  TORCH_CHECK(q.size(3) % 8 == 0, "fused attention: head_dim must be a multiple of 8");
  TORCH_CHECK(q.dtype() == at::kFloat || (BF16_BUILT && q.size(3) % 16 == 0),
              "fused attention: bfloat16 inputs need the avx512 build and head_dim % 16 == 0");
  fused::Geo g;
  g.B = q.size(0), g.H = q.size(1), g.Q = q.size(2), g.D = q.size(3), g.Hkv = k.size(1), g.K = k.size(2);
  g.P = P, g.L = g.K - P, g.kbase = kbase, g.wl = wl, g.wr = wr, g.ng = ng, g.causal = causal;
  g.scale = (float)scale;
  g.qpos = qpos.data_ptr<int64_t>(), g.kpos = kpos.data_ptr<int64_t>();
  TORCH_CHECK(!sinks || (sinks->dtype() == at::kFloat && sinks->is_contiguous() && sinks->numel() == g.H),
              "fused attention: sinks must be a contiguous float32 [H] tensor");
  g.sinks = sinks ? sinks->data_ptr<float>() : nullptr;
  TORCH_CHECK(qdoc.has_value() == kdoc.has_value(), "fused attention: q_doc and k_doc must be given together");
  if (qdoc) {
    TORCH_CHECK(qdoc->dtype() == at::kInt && kdoc->dtype() == at::kInt && qdoc->is_contiguous() &&
                    kdoc->is_contiguous() && qdoc->numel() == g.B * g.Q && kdoc->numel() == g.B * g.K,
                "fused attention: q_doc, k_doc must be contiguous int32 [B, Q] and [B, K]");
  }
  g.qdoc = qdoc ? qdoc->data_ptr<int32_t>() : nullptr;
  g.kdoc = kdoc ? kdoc->data_ptr<int32_t>() : nullptr;
  return g;
}

std::vector<at::Tensor> fused_forward(at::Tensor q, at::Tensor k, at::Tensor v, c10::optional<at::Tensor> sinks,
                                      at::Tensor qpos, at::Tensor kpos, int64_t P, int64_t kbase, int64_t wl,
                                      int64_t wr, int64_t ng, bool causal, c10::optional<at::Tensor> qdoc,
                                      c10::optional<at::Tensor> kdoc, double scale, bool stats) {
  fused::Geo g = geo(q, k, sinks, qpos, kpos, P, kbase, wl, wr, ng, causal, qdoc, kdoc, scale);
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));  // fp32 for either input dtype
  at::Tensor lse = at::empty({g.B, g.H, g.Q}, out.options());
  std::vector<at::Tensor> res{out, lse};
  fused::FwdOut o{out.data_ptr<float>(), lse.data_ptr<float>(), nullptr, nullptr, nullptr};
  if (stats) {
    for (int i = 0; i < 3; ++i) res.push_back(at::empty({g.B, g.H, g.Q}, out.options()));
    o.st_m = res[2].data_ptr<float>(), o.st_max = res[3].data_ptr<float>(), o.st_gm = res[4].data_ptr<float>();
  }
  TORCH_CHECK(v.dtype() == q.dtype() && v.is_contiguous(), "fused attention: v must be contiguous, in q's dtype");
  if (q.dtype() == at::kFloat) fused::forward<float>(g, ptr<float>(q), ptr<float>(k), ptr<float>(v), o);
#if defined(__AVX512F__)
  else fused::forward<uint16_t>(g, ptr<uint16_t>(q), ptr<uint16_t>(k), ptr<uint16_t>(v), o);
#endif
  return res;
}

std::vector<at::Tensor> fused_backward(at::Tensor q, at::Tensor k, at::Tensor v, c10::optional<at::Tensor> sinks,
                                       at::Tensor dout, at::Tensor out, at::Tensor lse, c10::optional<at::Tensor> dlse,
                                       at::Tensor qpos, at::Tensor kpos, int64_t P, int64_t kbase, int64_t wl,
                                       int64_t wr, int64_t ng, bool causal, c10::optional<at::Tensor> qdoc,
                                       c10::optional<at::Tensor> kdoc, double scale) {
  fused::Geo g = geo(q, k, sinks, qpos, kpos, P, kbase, wl, wr, ng, causal, qdoc, kdoc, scale);
  const auto f32 = q.options().dtype(at::kFloat);  // gradients in fp32 for either input dtype (autograd casts back)
  at::Tensor dq = at::zeros(q.sizes(), f32), dk = at::zeros(k.sizes(), f32), dv = at::zeros(v.sizes(), f32);
  at::Tensor dsinks = sinks ? at::zeros_like(*sinks) : at::Tensor();
  TORCH_CHECK(dout.is_contiguous() && out.is_contiguous() && (!dlse || dlse->is_contiguous()),
              "fused attention backward: dout, out and dlse must be contiguous");
  TORCH_CHECK(dout.dtype() == q.dtype() && out.dtype() == q.dtype() && v.dtype() == q.dtype(),
              "fused attention backward: v, dout and out must be in q's dtype");
  const float* dl = dlse ? dlse->data_ptr<float>() : nullptr;
  float* ds = sinks ? dsinks.data_ptr<float>() : nullptr;
  if (q.dtype() == at::kFloat) {
    fused::BwdIn<float> in{ptr<float>(q), ptr<float>(k), ptr<float>(v), ptr<float>(dout), ptr<float>(out),
                           lse.data_ptr<float>(), dl, dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(), ds};
    fused::backward(g, in, at::get_num_threads());
  }
#if defined(__AVX512F__)
  else {
    fused::BwdIn<uint16_t> in{ptr<uint16_t>(q), ptr<uint16_t>(k), ptr<uint16_t>(v), ptr<uint16_t>(dout),
                              ptr<uint16_t>(out), lse.data_ptr<float>(), dl, dq.data_ptr<float>(), dk.data_ptr<float>(),
                              dv.data_ptr<float>(), ds};
    fused::backward(g, in, at::get_num_threads());
  }
#endif
  dk.mul_(scale);  // the kernel accumulates dS^T Q with the unscaled queries
  if (sinks) return {dq, dk, dv, dsinks};
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("isa") = fused::ISA;  // the instruction set this build was compiled for (fused_simd.h)
  m.attr("bf16") = BF16_BUILT;  // whether it takes bfloat16 inputs (vdpbf16ps; run only where the CPU has avx512_bf16)
  m.def("forward", &fused_forward, "fused band attention forward (learned sinks and documents inside) -> [out, lse(, m, max_logit, global_mass)]");
  m.def("backward", &fused_backward, "fused band attention backward -> [dq, dk, dv(, dsinks)]");
}
