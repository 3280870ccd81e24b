// AdamW as one pass over each parameter, for the CPU train step (`jtrain.optim.fused_adamw`).
//
// XLA:CPU compiles optax's clip -> AdamW -> apply chain into four loops per parameter (the clipped
// gradient, each moment, the parameter), which read 8 and write 4 floats per parameter. This reads
// the parameter, its gradient sum and both moments once and writes the parameter and the moments
// in place (the call aliases them): 28 bytes per parameter instead of 48, on a pass that is bound
// by memory bandwidth. Operands: a float32[4] of step scalars, then (param, grad sum, mu, nu) per
// leaf; results: (param, mu, nu) per leaf, each aliased to its operand.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Leaf {
  float* p;
  const float* g;
  float* m;
  float* v;
  int64_t size;
  float decay;  // weight decay of this leaf (0 where the decay mask leaves it out)
};

struct Step {
  float grad_scale;  // clip coefficient / token count: the gradient sum's factor
  float inv_bc1;     // 1 / (1 - b1^t)
  float inv_bc2;     // 1 / (1 - b2^t)
  float lr;          // learning rate times the Trainer's lr factor
  float b1, b2, c1, c2, eps;  // c1 = 1 - b1 and c2 = 1 - b2, rounded from double as optax's are
};

// One leaf's elements [begin, end). A plain loop that GCC vectorises (the target clones give an
// AVX-512 version where the CPU has it); the scalars are copied to locals first, or the stores
// through the float pointers would force them to be reloaded every element.
__attribute__((target_clones("avx512f", "default"))) void Update(const Leaf& leaf, const Step& s, int64_t begin,
                                                                  int64_t end) {
  float* __restrict p = leaf.p + begin;
  const float* __restrict g = leaf.g + begin;
  float* __restrict m = leaf.m + begin;
  float* __restrict v = leaf.v + begin;
  const int64_t n = end - begin;
  const float grad_scale = s.grad_scale, inv_bc1 = s.inv_bc1, inv_bc2 = s.inv_bc2, lr = s.lr, eps = s.eps;
  const float b1 = s.b1, b2 = s.b2, c1 = s.c1, c2 = s.c2, lr_decay = s.lr * leaf.decay;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * grad_scale;
    const float mi = c1 * gi + b1 * m[i];
    const float vi = c2 * (gi * gi) + b2 * v[i];
    m[i] = mi;
    v[i] = vi;
    const float direction = (mi * inv_bc1) / (std::sqrt(vi * inv_bc2) + eps);
    p[i] = p[i] - lr * direction - lr_decay * p[i];
  }
}

// Elements [begin, end) of the leaves laid end to end.
void UpdateRange(const std::vector<Leaf>& leaves, const Step& s, int64_t begin, int64_t end) {
  int64_t offset = 0;
  for (const Leaf& leaf : leaves) {
    const int64_t lo = std::max(begin, offset), hi = std::min(end, offset + leaf.size);
    if (lo < hi) Update(leaf, s, lo - offset, hi - offset);
    offset += leaf.size;
    if (offset >= end) break;
  }
}

ffi::Error CpuAdamW(ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args, ffi::RemainingRets rets, float b1,
                    float b2, float c1, float c2, float eps, ffi::Span<const float> decay, int64_t threads) {
  if (scalars.element_count() != 4) return ffi::Error::InvalidArgument("cpu_adamw: expected 4 step scalars");
  const size_t n = decay.size();
  if (args.size() != 4 * n || rets.size() != 3 * n) {
    return ffi::Error::InvalidArgument("cpu_adamw: expected (param, grad, mu, nu) per leaf and (param, mu, nu) back");
  }
  std::vector<Leaf> leaves;
  leaves.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    auto p = args.get<ffi::Buffer<ffi::F32>>(4 * i), g = args.get<ffi::Buffer<ffi::F32>>(4 * i + 1);
    auto m = args.get<ffi::Buffer<ffi::F32>>(4 * i + 2), v = args.get<ffi::Buffer<ffi::F32>>(4 * i + 3);
    auto po = rets.get<ffi::Buffer<ffi::F32>>(3 * i), mo = rets.get<ffi::Buffer<ffi::F32>>(3 * i + 1);
    auto vo = rets.get<ffi::Buffer<ffi::F32>>(3 * i + 2);
    if (p.has_error() || g.has_error() || m.has_error() || v.has_error() || po.has_error() || mo.has_error() ||
        vo.has_error()) {
      return ffi::Error::InvalidArgument("cpu_adamw: every operand and result must be float32");
    }
    const int64_t size = p->element_count();
    if (g->element_count() != size || m->element_count() != size || v->element_count() != size ||
        (*po)->element_count() != size || (*mo)->element_count() != size || (*vo)->element_count() != size) {
      return ffi::Error::InvalidArgument("cpu_adamw: a leaf's param, grad and moments differ in size");
    }
    // The results alias the operands (input_output_aliases); copy where XLA gave separate buffers.
    float* pd = (*po)->typed_data();
    float* md = (*mo)->typed_data();
    float* vd = (*vo)->typed_data();
    if (pd != p->typed_data()) std::copy_n(p->typed_data(), size, pd);
    if (md != m->typed_data()) std::copy_n(m->typed_data(), size, md);
    if (vd != v->typed_data()) std::copy_n(v->typed_data(), size, vd);
    leaves.push_back({pd, g->typed_data(), md, vd, size, decay[i]});
    total += size;
  }
  const float* sc = scalars.typed_data();
  const Step step{sc[0], sc[1], sc[2], sc[3], b1, b2, c1, c2, eps};
  const int64_t workers = std::clamp<int64_t>(threads, 1, std::max<int64_t>(1, total / (1 << 16)));
  const int64_t chunk = (total + workers - 1) / workers;
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < workers; ++w) {
    pool.emplace_back(UpdateRange, std::cref(leaves), std::cref(step), w * chunk, std::min(total, (w + 1) * chunk));
  }
  UpdateRange(leaves, step, 0, std::min(total, chunk));
  for (auto& t : pool) t.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtrainCpuAdamW, CpuAdamW,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("c1")
                                  .Attr<float>("c2")
                                  .Attr<float>("eps")
                                  .Attr<ffi::Span<const float>>("decay")
                                  .Attr<int64_t>("threads"));
