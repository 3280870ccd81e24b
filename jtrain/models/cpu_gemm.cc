// Matrix products for XLA:CPU: bfloat16 x bfloat16 on the CPU's AMX tiles or AVX512-BF16 units,
// through oneDNN's matmul primitive (float32 or bfloat16 result) or MKL's cblas_gemm_bf16bf16f32
// (float32 result); float32 x float32 through oneDNN's matmul (float32 result).
//
// Why: XLA:CPU computes bf16 dots at its float32 speed, while the same CPU's AMX units run
// them 8-9x faster, and oneDNN's float32 kernels ran the benchmark's products 1.0-1.4x faster
// than XLA's dot, transposed operands included (benchmarks/TRIED.md). jtrain.models.cpu_gemm
// compiles this file once, hands it the library it found (a path for oneDNN, function pointers
// for MKL, so no address is baked into a compiled HLO), and registers the handler as an XLA FFI
// target.
//
// Operands are row-major, 2-D or 3-D with a shared leading batch; `trans_a` / `trans_b` say that
// an operand is stored transposed (BLAS's flags), so the weight gradients need no transposed copy.
// oneDNN is reached through its C API, resolved with dlsym from the few declarations below (its
// 3.x ABI), so building this file needs no oneDNN headers.

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One product C[m, n] = op(A) op(B) per batch item; lda / ldb are the stored row lengths.
struct Product {
  bool trans_a, trans_b;
  int64_t batch, m, n, k, lda, ldb;
};

// ---- MKL: float32 results only ----

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

ffi::Error MklRun(const Product& p, const uint16_t* a, const uint16_t* b, float* c) {
  const int64_t sa = p.m * p.k, sb = p.k * p.n, sc = p.m * p.n;
  OverBatch(p.batch, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      gemm_bf16(kRowMajor, p.trans_a ? kTrans : kNoTrans, p.trans_b ? kTrans : kNoTrans, static_cast<int>(p.m),
                static_cast<int>(p.n), static_cast<int>(p.k), 1.0f, a + i * sa, static_cast<int>(p.lda), b + i * sb,
                static_cast<int>(p.ldb), 0.0f, c + i * sc, static_cast<int>(p.n));
    }
  });
  return ffi::Error::Success();
}

// ---- oneDNN: bfloat16 operands with float32 or bfloat16 results; float32 operands and results ----

namespace dnnl {

using Handle = void*;  // dnnl_engine_t, dnnl_stream_t, dnnl_memory_desc_t, dnnl_primitive_t, ...
using Dims = int64_t[12];  // dnnl_dims_t (DNNL_MAX_NDIMS = 12)
struct ExecArg {
  int arg;
  Handle memory;
};

constexpr int kCpuEngine = 1;      // dnnl_cpu
constexpr unsigned kInOrder = 1;   // dnnl_stream_in_order
constexpr int kBf16 = 2;           // dnnl_bf16
constexpr int kF32 = 3;            // dnnl_f32
constexpr int kArgSrc = 1;         // DNNL_ARG_SRC
constexpr int kArgDst = 17;        // DNNL_ARG_DST
constexpr int kArgWeights = 33;    // DNNL_ARG_WEIGHTS
constexpr int kArgScratchpad = 80; // DNNL_ARG_SCRATCHPAD
constexpr int kScratchpadUser = 1; // dnnl_scratchpad_mode_user
constexpr int kQueryScratchpad = 136;  // dnnl_query_scratchpad_md

struct Api {
  int (*engine_create)(Handle*, int, size_t);
  int (*stream_create)(Handle*, Handle, unsigned);
  int (*memory_desc_create_with_strides)(Handle*, int, const Dims, int, const Dims);
  int (*matmul_primitive_desc_create)(Handle*, Handle, Handle, Handle, Handle, Handle, Handle);
  int (*primitive_attr_create)(Handle*);
  int (*primitive_attr_set_scratchpad_mode)(Handle, int);
  Handle (*primitive_desc_query_md)(Handle, int, int);
  size_t (*memory_desc_get_size)(Handle);
  int (*primitive_create)(Handle*, Handle);
  int (*primitive_execute)(Handle, Handle, int, const ExecArg*);
  int (*memory_create)(Handle*, Handle, Handle, void*);
  int (*memory_destroy)(Handle);
  int (*stream_wait)(Handle);
};

Api api{};
Handle engine = nullptr;

// A matmul primitive and its memory descriptors, created once per shape and kept for the process
// (a step has a few dozen shapes). XLA runs independent products concurrently on its threads, and
// oneDNN's own scratchpad is shared between primitives (measured: corrupted gradients), so each
// primitive takes a user scratchpad, and each calling thread owns one (`Scratch`).
struct Entry {
  Handle src, weights, dst, scratch, primitive;
  size_t scratch_bytes;
};
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, int, int>;
std::mutex cache_mutex;
std::map<Key, Entry> cache;

std::string Fail(const char* what, int status) {
  return std::string("jtrain_cpu_gemm: oneDNN ") + what + " failed with status " + std::to_string(status);
}

// Row-major [batch, rows, cols] of a matrix stored transposed or not.
int Describe(Handle* md, int64_t batch, int64_t rows, int64_t cols, bool transposed, int dtype) {
  Dims dims = {batch, rows, cols};
  Dims strides = {rows * cols, transposed ? 1 : cols, transposed ? rows : 1};
  return api.memory_desc_create_with_strides(md, 3, dims, dtype, strides);
}

// The cached primitive for `p` of `src` operands with a `dtype` result, or an error message.
std::string Lookup(const Product& p, int src, int dtype, Entry* out) {
  const Key key{p.batch, p.m, p.n, p.k, p.trans_a, p.trans_b, src, dtype};
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto found = cache.find(key);
  if (found != cache.end()) {
    *out = found->second;
    return "";
  }
  Entry e{};
  int status = Describe(&e.src, p.batch, p.m, p.k, p.trans_a, src);
  if (status == 0) status = Describe(&e.weights, p.batch, p.k, p.n, p.trans_b, src);
  if (status == 0) status = Describe(&e.dst, p.batch, p.m, p.n, false, dtype);
  if (status != 0) return Fail("memory descriptor", status);
  Handle attr = nullptr, pd = nullptr;  // both kept: pd owns the scratchpad descriptor
  status = api.primitive_attr_create(&attr);
  if (status == 0) status = api.primitive_attr_set_scratchpad_mode(attr, kScratchpadUser);
  if (status != 0) return Fail("primitive attributes", status);
  status = api.matmul_primitive_desc_create(&pd, engine, e.src, e.weights, nullptr, e.dst, attr);
  if (status != 0) return Fail("matmul descriptor", status);
  e.scratch = api.primitive_desc_query_md(pd, kQueryScratchpad, 0);
  e.scratch_bytes = e.scratch == nullptr ? 0 : api.memory_desc_get_size(e.scratch);
  status = api.primitive_create(&e.primitive, pd);
  if (status != 0) return Fail("primitive creation", status);
  cache.emplace(key, e);
  *out = e;
  return "";
}

// A calling thread's scratchpad, grown to the largest a primitive has asked of it.
class Scratch {
 public:
  ~Scratch() { std::free(data_); }
  void* Get(size_t bytes) {
    if (bytes > size_) {
      std::free(data_);
      size_ = (bytes + 63) / 64 * 64;
      data_ = std::aligned_alloc(64, size_);
      if (data_ == nullptr) size_ = 0;
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

ffi::Error Run(const Product& p, const void* a, const void* b, void* c, int src, int dtype) {
  Entry e;
  std::string error = Lookup(p, src, dtype, &e);
  if (!error.empty()) return ffi::Error::Internal(error);
  thread_local Handle stream = nullptr;  // streams are not shared between threads
  if (stream == nullptr) {
    const int status = api.stream_create(&stream, engine, kInOrder);
    if (status != 0) return ffi::Error::Internal(Fail("stream creation", status));
  }
  thread_local Scratch scratch;
  void* scratch_data = scratch.Get(e.scratch_bytes);
  if (e.scratch_bytes > 0 && scratch_data == nullptr) return ffi::Error::Internal("jtrain_cpu_gemm: out of memory");
  Handle mems[4] = {nullptr, nullptr, nullptr, nullptr};
  int status = api.memory_create(&mems[0], e.src, engine, const_cast<void*>(a));
  if (status == 0) status = api.memory_create(&mems[1], e.weights, engine, const_cast<void*>(b));
  if (status == 0) status = api.memory_create(&mems[2], e.dst, engine, c);
  if (status == 0 && e.scratch_bytes > 0) status = api.memory_create(&mems[3], e.scratch, engine, scratch_data);
  if (status == 0) {
    const ExecArg args[4] = {{kArgSrc, mems[0]}, {kArgWeights, mems[1]}, {kArgDst, mems[2]}, {kArgScratchpad, mems[3]}};
    status = api.primitive_execute(e.primitive, stream, e.scratch_bytes > 0 ? 4 : 3, args);
    if (status == 0) status = api.stream_wait(stream);
  }
  for (Handle m : mems) {
    if (m != nullptr) api.memory_destroy(m);
  }
  return status == 0 ? ffi::Error::Success() : ffi::Error::Internal(Fail("matmul", status));
}

}  // namespace dnnl

bool FitsInt(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

// `onednn` chooses the library (fixed when the step is traced, so one process can hold both);
// float32 operands need oneDNN.
ffi::Error CpuGemm(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> c, bool trans_a, bool trans_b,
                   bool onednn) {
  if (onednn ? dnnl::engine == nullptr : gemm_bf16 == nullptr) {
    return ffi::Error::Internal(std::string("jtrain_cpu_gemm: ") + (onednn ? "oneDNN" : "MKL") +
                                " was not loaded (jtrain.models.cpu_gemm loads it)");
  }
  const ffi::DataType out_type = c->element_type();
  const ffi::DataType in_type = a.element_type();
  const bool f32_in = in_type == ffi::DataType::F32;
  if (b.element_type() != in_type || !(in_type == ffi::DataType::BF16 || (onednn && f32_in))) {
    return ffi::Error::InvalidArgument("jtrain_cpu_gemm: operands must both be bfloat16 (or float32 with oneDNN)");
  }
  if (out_type != ffi::DataType::F32 && !(onednn && !f32_in && out_type == ffi::DataType::BF16)) {
    return ffi::Error::InvalidArgument("jtrain_cpu_gemm: the result must be float32 (or bfloat16 with oneDNN)");
  }
  auto da = a.dimensions();
  auto db = b.dimensions();
  const size_t rank = da.size();
  if ((rank != 2 && rank != 3) || db.size() != rank || (rank == 3 && da[0] != db[0])) {
    return ffi::Error::InvalidArgument("jtrain_cpu_gemm: operands must be 2-D, or 3-D with the same batch");
  }
  const int64_t a0 = da[rank - 2], a1 = da[rank - 1], b0 = db[rank - 2], b1 = db[rank - 1];
  const Product p{trans_a, trans_b, rank == 3 ? da[0] : 1, trans_a ? a1 : a0, trans_b ? b0 : b1, trans_a ? a0 : a1,
                  a1, b1};
  const int64_t k_b = trans_b ? b1 : b0;
  if (p.k != k_b) {
    return ffi::Error::InvalidArgument("jtrain_cpu_gemm: contracting dimensions differ (" + std::to_string(p.k) +
                                       " vs " + std::to_string(k_b) + ")");
  }
  if (p.m == 0 || p.n == 0 || p.batch == 0) return ffi::Error::Success();
  if (p.k == 0) {
    std::memset(c->untyped_data(), 0, c->size_bytes());
    return ffi::Error::Success();
  }
  if (onednn) {
    return dnnl::Run(p, a.untyped_data(), b.untyped_data(), c->untyped_data(), f32_in ? dnnl::kF32 : dnnl::kBf16,
                     out_type == ffi::DataType::BF16 ? dnnl::kBf16 : dnnl::kF32);
  }
  if (!FitsInt(p.m) || !FitsInt(p.n) || !FitsInt(p.k) || !FitsInt(a1) || !FitsInt(b1)) {
    return ffi::Error::InvalidArgument("jtrain_cpu_gemm: a dimension exceeds MKL's 32-bit BLAS interface");
  }
  return MklRun(p, static_cast<const uint16_t*>(a.untyped_data()), static_cast<const uint16_t*>(b.untyped_data()),
                static_cast<float*>(c->untyped_data()));
}

template <typename Fn>
bool Resolve(void* lib, const char* name, Fn* fn) {
  *fn = reinterpret_cast<Fn>(dlsym(lib, name));
  return *fn != nullptr;
}

}  // namespace

extern "C" void jtrain_set_bf16_gemm(void* gemm, void* set_local, int threads) {
  gemm_bf16 = reinterpret_cast<GemmBf16>(gemm);
  set_local_threads = reinterpret_cast<SetLocalThreads>(set_local);
  batch_threads = threads;
}

// Loads oneDNN from `path` and creates its CPU engine; returns an empty string or what failed.
extern "C" const char* jtrain_load_onednn(const char* path) {
  static std::string error;
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return (error = std::string("dlopen: ") + dlerror()).c_str();
  dnnl::Api& f = dnnl::api;
  const bool ok = Resolve(lib, "dnnl_engine_create", &f.engine_create) &&
                  Resolve(lib, "dnnl_stream_create", &f.stream_create) &&
                  Resolve(lib, "dnnl_memory_desc_create_with_strides", &f.memory_desc_create_with_strides) &&
                  Resolve(lib, "dnnl_matmul_primitive_desc_create", &f.matmul_primitive_desc_create) &&
                  Resolve(lib, "dnnl_primitive_attr_create", &f.primitive_attr_create) &&
                  Resolve(lib, "dnnl_primitive_attr_set_scratchpad_mode", &f.primitive_attr_set_scratchpad_mode) &&
                  Resolve(lib, "dnnl_primitive_desc_query_md", &f.primitive_desc_query_md) &&
                  Resolve(lib, "dnnl_memory_desc_get_size", &f.memory_desc_get_size) &&
                  Resolve(lib, "dnnl_primitive_create", &f.primitive_create) &&
                  Resolve(lib, "dnnl_primitive_execute", &f.primitive_execute) &&
                  Resolve(lib, "dnnl_memory_create", &f.memory_create) &&
                  Resolve(lib, "dnnl_memory_destroy", &f.memory_destroy) &&
                  Resolve(lib, "dnnl_stream_wait", &f.stream_wait);
  if (!ok) return (error = std::string("a oneDNN 3.x C function is missing from ") + path).c_str();
  const int status = f.engine_create(&dnnl::engine, dnnl::kCpuEngine, 0);
  if (status != 0) return (error = "dnnl_engine_create failed with status " + std::to_string(status)).c_str();
  return "";
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtrainCpuGemm, CpuGemm,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Attr<bool>("onednn"));
