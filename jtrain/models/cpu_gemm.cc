// bfloat16 x bfloat16 -> float32 matrix products for XLA:CPU, through MKL's
// cblas_gemm_bf16bf16f32 (AMX tiles or AVX512-BF16 where the CPU has them).
//
// Why: XLA:CPU computes bf16 dots at its float32 speed, while the same CPU's AMX units run
// them 8-9x faster (benchmarks/TRIED.md). jtrain.models.cpu_gemm compiles this file once,
// sets the GEMM function pointer from the MKL library it found (so no address is baked into
// a compiled HLO), and registers the handler as an XLA FFI target.
//
// Operands are row-major, 2-D or 3-D with a shared leading batch; `trans_a` / `trans_b` say that
// an operand is stored transposed (BLAS's flags), so the weight gradients need no transposed copy.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// MKL's LP64 signature; the enums of the C interface are ints.
using GemmBf16 = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                          const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                          int ldc);
using SetLocalThreads = int (*)(int);

GemmBf16 gemm_bf16 = nullptr;
SetLocalThreads set_local_threads = nullptr;  // MKL_Set_Num_Threads_Local: the calling thread's MKL pool
int batch_threads = 1;

constexpr int kRowMajor = 101;
constexpr int kNoTrans = 111;
constexpr int kTrans = 112;

bool FitsInt(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

// One product C[m, n] = op(A) op(B) of a batch item.
struct Product {
  bool trans_a, trans_b;
  int64_t m, n, k, lda, ldb;

  void Run(const uint16_t* a, const uint16_t* b, float* c) const {
    gemm_bf16(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), 1.0f, a, static_cast<int>(lda), b, static_cast<int>(ldb),
              0.0f, c, static_cast<int>(n));
  }
};

// Runs body(first, last) over the batch: in the calling thread, or (many items) split over
// worker threads that each use a single-threaded MKL; one MKL pool synchronising on every small
// product (attention's per-head blocks) is slower than independent products side by side.
template <typename Body>
void OverBatch(int64_t batch, const Body& body) {
  const int64_t workers = std::min<int64_t>(batch, batch_threads);
  if (workers <= 1 || set_local_threads == nullptr) {
    body(0, batch);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t w = 0; w < workers; ++w) {
    pool.emplace_back([&, w] {
      const int previous = set_local_threads(1);
      body(batch * w / workers, batch * (w + 1) / workers);
      set_local_threads(previous);
    });
  }
  for (auto& t : pool) t.join();
}

ffi::Error Bf16Gemm(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b, ffi::ResultBuffer<ffi::F32> c, bool trans_a,
                    bool trans_b) {
  if (gemm_bf16 == nullptr) {
    return ffi::Error::Internal("jtrain_bf16_gemm: no GEMM function was set (jtrain.models.cpu_gemm sets it)");
  }
  auto da = a.dimensions();
  auto db = b.dimensions();
  const size_t rank = da.size();
  if ((rank != 2 && rank != 3) || db.size() != rank || (rank == 3 && da[0] != db[0])) {
    return ffi::Error::InvalidArgument("jtrain_bf16_gemm: operands must be 2-D, or 3-D with the same batch");
  }
  const int64_t batch = rank == 3 ? da[0] : 1;
  const int64_t a0 = da[rank - 2], a1 = da[rank - 1], b0 = db[rank - 2], b1 = db[rank - 1];
  const Product p{trans_a, trans_b, trans_a ? a1 : a0, trans_b ? b0 : b1, trans_a ? a0 : a1, a1, b1};
  const int64_t k_b = trans_b ? b1 : b0;
  if (p.k != k_b) {
    return ffi::Error::InvalidArgument("jtrain_bf16_gemm: contracting dimensions differ (" + std::to_string(p.k) +
                                       " vs " + std::to_string(k_b) + ")");
  }
  if (!FitsInt(p.m) || !FitsInt(p.n) || !FitsInt(p.k) || !FitsInt(a1) || !FitsInt(b1)) {
    return ffi::Error::InvalidArgument("jtrain_bf16_gemm: a dimension exceeds the 32-bit BLAS interface");
  }
  if (p.m == 0 || p.n == 0 || batch == 0) return ffi::Error::Success();
  if (p.k == 0) {
    std::memset(c->typed_data(), 0, sizeof(float) * batch * p.m * p.n);
    return ffi::Error::Success();
  }
  const uint16_t* pa = a.typed_data();
  const uint16_t* pb = b.typed_data();
  const int64_t sa = a0 * a1, sb = b0 * b1, sc = p.m * p.n;
  float* out = c->typed_data();
  OverBatch(batch, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) p.Run(pa + i * sa, pb + i * sb, out + i * sc);
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void jtrain_set_bf16_gemm(void* gemm, void* set_local, int threads) {
  gemm_bf16 = reinterpret_cast<GemmBf16>(gemm);
  set_local_threads = reinterpret_cast<SetLocalThreads>(set_local);
  batch_threads = threads;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtrainBf16Gemm, Bf16Gemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
