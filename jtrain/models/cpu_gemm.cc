// Matrix products for XLA:CPU: bfloat16 x bfloat16 on the CPU's AMX tiles or AVX512-BF16 units,
// through oneDNN's matmul primitive (float32 or bfloat16 result) or MKL's cblas_gemm_bf16bf16f32
// (float32 result); float32 x float32 through oneDNN's matmul (float32 result).
// Also float32 attention (forward and backward) on its own AVX-512 products, which needs no
// library: see the "Fused attention" section and jtrain/models/cpu_attention.py.
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
#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
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

// One product C[m, n] = op(A) op(B) per batch item; lda / ldb / ldc are the stored row lengths
// (larger than a row where a matrix is a strided view, as attention's heads are).
struct Product {
  bool trans_a, trans_b;
  int64_t batch, m, n, k, lda, ldb, ldc;
};

// ---- Worker threads, shared by MKL's batch split and the attention kernel ----

// Threads kept for the process (each keeps its per-thread state, such as MKL's thread setting,
// warm); the caller is worker 0. One job at a time: `TryRun` returns false when the pool is busy,
// and the caller then runs its work alone.
class Pool {
 public:
  bool TryRun(int n, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(threads_.size()) < n - 1) {
        const int worker = static_cast<int>(threads_.size()) + 1;
        threads_.emplace_back([this, worker] { Loop(worker); });
      }
      job_ = &job;
      wanted_ = n - 1;
      pending_ = n - 1;
      ++generation_;
    }
    wake_.notify_all();
    job(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
    return true;
  }

 private:
  void Loop(int worker) {
    int64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen && worker <= wanted_; });
        seen = generation_;
        job = job_;
      }
      (*job)(worker);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  int64_t generation_ = 0;
  int wanted_ = 0, pending_ = 0;
};

Pool& Workers() {
  static Pool* pool = new Pool;  // never destroyed: its threads wait for work until the process ends
  return *pool;
}

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
  const int workers = static_cast<int>(std::min<int64_t>(batch, batch_threads));
  const std::function<void(int)> part = [&](int w) {
    const int previous = set_local_threads(1);
    body(batch * w / workers, batch * (w + 1) / workers);
    set_local_threads(previous);
  };
  if (workers <= 1 || set_local_threads == nullptr || !Workers().TryRun(workers, part)) body(0, batch);
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
constexpr int kQueryImplInfo = 8;      // dnnl_query_impl_info_str

struct Api {
  int (*engine_create)(Handle*, int, size_t);
  int (*stream_create)(Handle*, Handle, unsigned);
  int (*memory_desc_create_with_strides)(Handle*, int, const Dims, int, const Dims);
  int (*matmul_primitive_desc_create)(Handle*, Handle, Handle, Handle, Handle, Handle, Handle);
  int (*primitive_attr_create)(Handle*);
  int (*primitive_attr_set_scratchpad_mode)(Handle, int);
  Handle (*primitive_desc_query_md)(Handle, int, int);
  int (*primitive_desc_query)(Handle, int, int, void*);
  int (*primitive_desc_next_impl)(Handle);
  int (*primitive_desc_destroy)(Handle);
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
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, bool, int, int>;
std::mutex cache_mutex;
std::map<Key, Entry> cache;

std::string Fail(const char* what, int status) {
  return std::string("jtrain_cpu_gemm: oneDNN ") + what + " failed with status " + std::to_string(status);
}

// Row-major [batch, rows, cols] of a matrix stored transposed or not, `ld` apart per stored row.
int Describe(Handle* md, int64_t batch, int64_t rows, int64_t cols, bool transposed, int dtype, int64_t ld) {
  Dims dims = {batch, rows, cols};
  Dims strides = {(transposed ? cols : rows) * ld, transposed ? 1 : ld, transposed ? ld : 1};
  return api.memory_desc_create_with_strides(md, 3, dims, dtype, strides);
}

// oneDNN's matmul offers its implementations best first, and on AVX-512 it ranks its brgemm
// kernel first for float32. Its older `gemm:jit` (an sgemm) ran the products with neither operand
// transposed and a wide result 1.1-1.7x faster alone on the benchmark's Xeon (2048 rows, 1024-32000
// columns); in the training step only the lm_head's forward kept that lead (benchmarks/TRIED.md).
// `sgemm_min_columns` is set from Python (`JTRAIN_CPU_F32_SGEMM`, default 8192); 0 keeps oneDNN's
// own order for every product.
int64_t sgemm_min_columns = 0;

bool PrefersSgemm(const Product& p, int src, int dtype) {
  return sgemm_min_columns > 0 && src == kF32 && dtype == kF32 && p.batch == 1 && !p.trans_a && !p.trans_b &&
         p.n >= sgemm_min_columns;
}

// Moves `pd` on to the first implementation whose name starts with `name`; false if none does.
bool SelectImpl(Handle pd, const char* name) {
  for (;;) {
    const char* impl = nullptr;
    if (api.primitive_desc_query(pd, kQueryImplInfo, 0, &impl) == 0 && impl != nullptr &&
        std::strncmp(impl, name, std::strlen(name)) == 0) {
      return true;
    }
    if (api.primitive_desc_next_impl(pd) != 0) return false;
  }
}

// The cached primitive for `p` of `src` operands with a `dtype` result, or an error message.
std::string Lookup(const Product& p, int src, int dtype, Entry* out) {
  const Key key{p.batch, p.m, p.n, p.k, p.lda, p.ldb, p.ldc, p.trans_a, p.trans_b, src, dtype};
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto found = cache.find(key);
  if (found != cache.end()) {
    *out = found->second;
    return "";
  }
  Entry e{};
  int status = Describe(&e.src, p.batch, p.m, p.k, p.trans_a, src, p.lda);
  if (status == 0) status = Describe(&e.weights, p.batch, p.k, p.n, p.trans_b, src, p.ldb);
  if (status == 0) status = Describe(&e.dst, p.batch, p.m, p.n, false, dtype, p.ldc);
  if (status != 0) return Fail("memory descriptor", status);
  Handle attr = nullptr, pd = nullptr;  // both kept: pd owns the scratchpad descriptor
  status = api.primitive_attr_create(&attr);
  if (status == 0) status = api.primitive_attr_set_scratchpad_mode(attr, kScratchpadUser);
  if (status != 0) return Fail("primitive attributes", status);
  status = api.matmul_primitive_desc_create(&pd, engine, e.src, e.weights, nullptr, e.dst, attr);
  if (status != 0) return Fail("matmul descriptor", status);
  if (PrefersSgemm(p, src, dtype) && !SelectImpl(pd, "gemm:jit")) {
    // No such kernel on this CPU or build: back to oneDNN's first choice (iterating consumed it).
    api.primitive_desc_destroy(pd);
    status = api.matmul_primitive_desc_create(&pd, engine, e.src, e.weights, nullptr, e.dst, attr);
    if (status != 0) return Fail("matmul descriptor", status);
  }
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

// ---- Fused attention (float32): scores, softmax and both products per head, in cache ----
//
// Why: as XLA ops, attention writes each head's [rows, keys] scores, probabilities and their
// gradients to memory between batched products that run at 80-120 GFLOP/s on these small shapes
// (a 64-long contraction). Here one worker takes one head (forward) or one key-value head
// (backward) at a time, a query block of rows at a time, so those matrices stay in the core's
// cache; the products (see "Small float32 products") read q, k, v and write o and the gradients
// as strided views of [batch, length, heads, head_dim], so no head-major copy is made either. The
// backward recomputes the probabilities from the saved log-sum-exp, as flash-attention kernels do.

namespace attn {

// Worker threads: one per core this process may run on.
int WorkerCount() {
  static const int count = [] {
    cpu_set_t cpus;
    return sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? std::max(1, CPU_COUNT(&cpus)) : 1;
  }();
  return count;
}

// exp(x) for the softmax's x <= 0, 16 lanes: 2^n p(r) with Cephes' expf polynomial (relative error
// about 2e-7); below -87 it returns ~0.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), _mm512_set1_ps(0.5f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f}) {
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  }
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// The lanes of a 16-float vector that `left` remaining elements fill (all 16 when 16 or more remain).
inline __mmask16 Lanes(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
}

// Which of 16 keys from `j` (of `n`) may be seen (the result) and exist (`lanes`): lane masks.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __mmask16 Keep16(const bool* keep, int64_t j, int64_t n,
                                                                              __mmask16* lanes) {
  *lanes = Lanes(n - j);
  const __m512i k = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(*lanes, keep + j));
  return _mm512_test_epi32_mask(k, k);
}

// The kernel's loops are AVX-512 only (jtrain.models.cpu_attention takes it on such CPUs only).
const bool kAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                     __builtin_cpu_supports("avx512vl");

// Row `s` of raw scores -> probabilities in place (0 where `keep` is 0); returns the row's
// log-sum-exp of the scaled scores, or 0 for a row that may see no key (its output is zero).
__attribute__((target("avx512f,avx512bw,avx512vl"))) float SoftmaxRow(float* s, const bool* keep, int64_t n,
                                                                         float scale) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::max());
  int seen = 0;
  __mmask16 lanes;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = Keep16(keep, j, n, &lanes);
    vmax = _mm512_mask_max_ps(vmax, k, vmax, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, s + j), vscale));
    seen |= k;
  }
  if (seen == 0) {
    std::fill(s, s + n, 0.0f);
    return 0.0f;
  }
  const float mx = _mm512_reduce_max_ps(vmax);
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = Keep16(keep, j, n, &lanes);
    const __m512 e = _mm512_maskz_mov_ps(k, Exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(lanes, s + j), vscale, vmx)));
    vsum = _mm512_add_ps(vsum, e);
    _mm512_mask_storeu_ps(s + j, lanes, e);
  }
  const float sum = _mm512_reduce_add_ps(vsum);
  const __m512 inv = _mm512_set1_ps(1.0f / sum);
  for (int64_t j = 0; j < n; j += 16) {
    lanes = Lanes(n - j);
    _mm512_mask_storeu_ps(s + j, lanes, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, s + j), inv));
  }
  return mx + std::log(sum);
}

// Backward of one row: `s` raw scores -> probabilities from the saved log-sum-exp, `dp` (dO V^T)
// -> the scores' gradient, scaled for q and k: p * (dp - sum(dO * O)) * scale.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void GradRow(float* s, float* dp, const bool* keep,
                                                                     int64_t n, float scale, float lse, float d_row) {
  const __m512 vscale = _mm512_set1_ps(scale), vlse = _mm512_set1_ps(lse), vd = _mm512_set1_ps(d_row);
  __mmask16 lanes;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = Keep16(keep, j, n, &lanes);
    const __m512 p = _mm512_maskz_mov_ps(k, Exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(lanes, s + j), vscale, vlse)));
    const __m512 g = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, dp + j), vd);
    _mm512_mask_storeu_ps(s + j, lanes, p);
    _mm512_mask_storeu_ps(dp + j, lanes, _mm512_mul_ps(_mm512_mul_ps(p, g), vscale));
  }
}

// sum(x[0:n] * y[0:n]) in 16 lanes.
__attribute__((target("avx512f,avx512bw,avx512vl"))) float Dot(const float* x, const float* y, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = Lanes(n - j);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, x + j), _mm512_maskz_loadu_ps(lanes, y + j), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

struct Shape {
  int64_t batch, length, heads, keys, kv_heads, dim, mask_batch, block;
  bool causal;
  int64_t blocks() const { return (length + block - 1) / block; }
  // Row length of the workers' [*, keys] buffers (transposed keys and values, scores): padded off
  // a power of two, whose rows would share cache sets (measured: q k^T 110 -> 145 GFLOP/s).
  int64_t padded() const { return (keys + 15) / 16 * 16 + 16; }
  // Keys a query block may see: all, or (causal self-attention) those up to the block's last row.
  int64_t KeyEnd(int64_t row_end) const { return causal && length == keys ? row_end : keys; }
  const bool* Mask(const bool* mask, int64_t b, int64_t row) const {
    return mask + ((mask_batch == 1 ? 0 : b) * length + row) * keys;
  }
};

// ---- Small float32 products, AVX-512, one thread ----
//
// Why not oneDNN here: attention's products are small (a block of 64 query rows against at most
// the keys, a 64-long head) and many (about 1,800 per layer and step on the benchmark's large
// preset); oneDNN's per-call cost (primitive lookup, memory objects, stream) held them at ~90
// GFLOP/s per core and made blocks under 128 rows slower. A register tile of 6 rows x 64 columns,
// B streamed a row at a time, runs them at 100-145 GFLOP/s per core with no per-call cost, so
// blocks of 64 rows (less causal waste) pay: attention 10-20% faster per layer (TRIED.md).

// C[r, 0:cols] (+)= sum_p op(A)[r, p] B[p, n0 + 0:cols] for MR rows r; op(A)[r, p] is a[r * lda + p]
// or, with TA, a[p * lda + r]; cols <= 64 (masked lanes beyond). FULL (cols == 64) loads B's rows
// as whole vectors in the inner loop: a masked load also takes a slot on an FMA port, ~10% of a
// 64-column tile's time (the epilogue's once-per-tile masked stores cost nothing comparable).
template <int MR, bool TA, bool FULL>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void Tile(int64_t cols, int64_t k, const float* a, int64_t lda,
                                                                const float* b, int64_t ldb, float* c, int64_t ldc,
                                                                bool accumulate) {
  __mmask16 lanes[4];
  for (int v = 0; v < 4; ++v) {
    lanes[v] = Lanes(cols - 16 * v);
  }
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < k; ++p) {
    const float* row = b + p * ldb;
    __m512 bv[4];
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      bv[v] = FULL ? _mm512_loadu_ps(row + 16 * v) : _mm512_maskz_loadu_ps(lanes[v], row + 16 * v);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(TA ? a[p * lda + r] : a[r * lda + p]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      float* out = c + r * ldc + 16 * v;
      const __m512 sum = accumulate ? _mm512_add_ps(acc[r][v], _mm512_maskz_loadu_ps(lanes[v], out)) : acc[r][v];
      _mm512_mask_storeu_ps(out, lanes[v], sum);
    }
  }
}

template <bool TA, bool FULL>
void Rows(int64_t rows, int64_t cols, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
          int64_t ldc, bool accumulate) {
  constexpr int kMr = 6;  // 6 x 4 accumulators + 4 B vectors + a broadcast: within the 32 registers
  for (int64_t i = 0; i < rows; i += kMr) {
    const float* ai = TA ? a + i : a + i * lda;
    float* ci = c + i * ldc;
    switch (std::min<int64_t>(kMr, rows - i)) {  // the last tile takes the rows left
      case 6: Tile<6, TA, FULL>(cols, k, ai, lda, b, ldb, ci, ldc, accumulate); break;
      case 5: Tile<5, TA, FULL>(cols, k, ai, lda, b, ldb, ci, ldc, accumulate); break;
      case 4: Tile<4, TA, FULL>(cols, k, ai, lda, b, ldb, ci, ldc, accumulate); break;
      case 3: Tile<3, TA, FULL>(cols, k, ai, lda, b, ldb, ci, ldc, accumulate); break;
      case 2: Tile<2, TA, FULL>(cols, k, ai, lda, b, ldb, ci, ldc, accumulate); break;
      default: Tile<1, TA, FULL>(cols, k, ai, lda, b, ldb, ci, ldc, accumulate); break;
    }
  }
}

// C[m, n] (+)= op(A)[m, k] B[k, n]: B row-major (rows ldb apart), C rows ldc apart; op(A) is A
// (rows lda apart) or, with `ta`, the transpose of a [k, m] A. Column panels of 64 outermost, so a
// panel of B is reused by every row block while it sits in cache.
void Gemm(bool ta, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
          int64_t ldc, bool accumulate = false) {
  for (int64_t n0 = 0; n0 < n; n0 += 64) {
    const int64_t cols = std::min<int64_t>(64, n - n0);
    const bool full = cols == 64;
    if (ta) {
      (full ? Rows<true, true> : Rows<true, false>)(m, cols, k, a, lda, b + n0, ldb, c + n0, ldc, accumulate);
    } else {
      (full ? Rows<false, true> : Rows<false, false>)(m, cols, k, a, lda, b + n0, ldb, c + n0, ldc, accumulate);
    }
  }
}

// out[j] = column j of the 16 x 16 block whose rows are in[0:16]: unpacks within 128-bit lanes,
// then 128-bit lane shuffles (64 shuffles for 256 floats; the gathers this replaced took ~4x longer).
__attribute__((target("avx512f"))) inline void Transpose16(const __m512 in[16], __m512 out[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(in[i], in[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(in[i], in[i + 1]);
  }
  // u[4g + c], 128-bit lane b: rows 4g..4g+3 of column 4b + c.
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {
    const __m512 ab01 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), ab23 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    const __m512 cd01 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);
    const __m512 cd23 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    out[c] = _mm512_shuffle_f32x4(ab01, cd01, 0x88);
    out[4 + c] = _mm512_shuffle_f32x4(ab01, cd01, 0xDD);
    out[8 + c] = _mm512_shuffle_f32x4(ab23, cd23, 0x88);
    out[12 + c] = _mm512_shuffle_f32x4(ab23, cd23, 0xDD);
  }
}

// t[d, s] (rows ldt apart) = x[s, d] (rows ld apart) for s < rows, d < dim: a head's keys or
// values, so q k^T and dO v^T become products with a row-major B. In 16 x 16 blocks, so each
// store fills a cache line of t.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void Transpose(const float* x, int64_t ld, int64_t rows,
                                                                     int64_t dim, int64_t ldt, float* t) {
  for (int64_t s0 = 0; s0 < rows; s0 += 16) {
    const int64_t ns = std::min<int64_t>(16, rows - s0);
    const __mmask16 s_lanes = Lanes(ns);
    for (int64_t d0 = 0; d0 < dim; d0 += 16) {
      const int64_t nd = std::min<int64_t>(16, dim - d0);
      const __mmask16 d_lanes = Lanes(nd);
      __m512 in[16], out[16];
      for (int64_t i = 0; i < 16; ++i) {
        in[i] = i < ns ? _mm512_maskz_loadu_ps(d_lanes, x + (s0 + i) * ld + d0) : _mm512_setzero_ps();
      }
      Transpose16(in, out);
      for (int64_t j = 0; j < nd; ++j) _mm512_mask_storeu_ps(t + (d0 + j) * ldt + s0, s_lanes, out[j]);
    }
  }
}

// Runs body(task, worker) for every task on up to one thread per core (the attention's bodies
// cannot fail: shapes are checked before).
template <typename Body>
void ParallelFor(int64_t tasks, const Body& body) {
  std::atomic<int64_t> next{0};
  const std::function<void(int)> work = [&](int worker) {
    for (int64_t t = next++; t < tasks; t = next++) body(t, worker);
  };
  const int n = static_cast<int>(std::min<int64_t>(tasks, WorkerCount()));
  if (n <= 1 || !Workers().TryRun(n, work)) work(0);
}

#define JTRAIN_TRY(expr)              \
  do {                                \
    ffi::Error e_ = (expr);           \
    if (e_.failure()) return e_;      \
  } while (0)

// Forward of one (batch row, head): every query block, o and the rows' log-sum-exp. `kt` takes
// the head's keys transposed, `scores` one block's scores.
void ForwardHead(const Shape& sh, const float* q, const float* k, const float* v, const bool* mask, float scale,
                 int64_t task, float* kt, float* scores, float* o, float* lse) {
  const int64_t h = task % sh.heads, b = task / sh.heads;
  const int64_t kh = h / (sh.heads / sh.kv_heads), q_ld = sh.heads * sh.dim, kv_ld = sh.kv_heads * sh.dim;
  const float* v_head = v + b * sh.keys * kv_ld + kh * sh.dim;
  const int64_t ld = sh.padded();
  Transpose(k + b * sh.keys * kv_ld + kh * sh.dim, kv_ld, sh.keys, sh.dim, ld, kt);
  for (int64_t blk = 0; blk < sh.blocks(); ++blk) {
    const int64_t r0 = blk * sh.block, rows = std::min(sh.block, sh.length - r0), keys = sh.KeyEnd(r0 + rows);
    const int64_t at = (b * sh.length + r0) * q_ld + h * sh.dim;
    Gemm(false, rows, keys, sh.dim, q + at, q_ld, kt, ld, scores, ld);
    for (int64_t i = 0; i < rows; ++i) {
      lse[(b * sh.heads + h) * sh.length + r0 + i] = SoftmaxRow(scores + i * ld, sh.Mask(mask, b, r0 + i), keys, scale);
    }
    Gemm(false, rows, sh.dim, keys, scores, ld, v_head, kv_ld, o + at, q_ld);
  }
}


// Backward of one (batch row, key-value head): every query head of its group, a query block at a
// time; dq is written per block, dk and dv accumulate in the worker's buffers and are written once.
struct Buffers {
  std::vector<float> p, ds, dk, dv, kt, vt;
};

void BackwardHead(const Shape& sh, const float* q, const float* k, const float* v, const bool* mask,
                  const float* o, const float* lse, const float* dout, float scale, int64_t task, Buffers& w,
                  float* dq, float* dk, float* dv) {
  const int64_t kh = task % sh.kv_heads, b = task / sh.kv_heads, group = sh.heads / sh.kv_heads;
  const int64_t q_ld = sh.heads * sh.dim, kv_ld = sh.kv_heads * sh.dim;
  const float* k_head = k + b * sh.keys * kv_ld + kh * sh.dim;
  const float* v_head = v + b * sh.keys * kv_ld + kh * sh.dim;
  std::fill(w.dk.begin(), w.dk.end(), 0.0f);
  std::fill(w.dv.begin(), w.dv.end(), 0.0f);
  const int64_t ld = sh.padded();
  Transpose(k_head, kv_ld, sh.keys, sh.dim, ld, w.kt.data());
  Transpose(v_head, kv_ld, sh.keys, sh.dim, ld, w.vt.data());
  for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
    for (int64_t blk = 0; blk < sh.blocks(); ++blk) {
      const int64_t r0 = blk * sh.block, rows = std::min(sh.block, sh.length - r0), keys = sh.KeyEnd(r0 + rows);
      const int64_t at = (b * sh.length + r0) * q_ld + h * sh.dim;
      Gemm(false, rows, keys, sh.dim, q + at, q_ld, w.kt.data(), ld, w.p.data(), ld);
      Gemm(false, rows, keys, sh.dim, dout + at, q_ld, w.vt.data(), ld, w.ds.data(), ld);
      for (int64_t i = 0; i < rows; ++i) {
        const float d_row = Dot(dout + at + i * q_ld, o + at + i * q_ld, sh.dim);
        GradRow(w.p.data() + i * ld, w.ds.data() + i * ld, sh.Mask(mask, b, r0 + i), keys, scale,
                lse[(b * sh.heads + h) * sh.length + r0 + i], d_row);
      }
      Gemm(false, rows, sh.dim, keys, w.ds.data(), ld, k_head, kv_ld, dq + at, q_ld);
      Gemm(true, keys, sh.dim, rows, w.p.data(), ld, dout + at, q_ld, w.dv.data(), sh.dim, true);
      Gemm(true, keys, sh.dim, rows, w.ds.data(), ld, q + at, q_ld, w.dk.data(), sh.dim, true);
    }
  }
  for (int64_t s = 0; s < sh.keys; ++s) {
    std::memcpy(dk + b * sh.keys * kv_ld + s * kv_ld + kh * sh.dim, &w.dk[s * sh.dim], sh.dim * sizeof(float));
    std::memcpy(dv + b * sh.keys * kv_ld + s * kv_ld + kh * sh.dim, &w.dv[s * sh.dim], sh.dim * sizeof(float));
  }
}

// The shapes of q [B, L, N, H], k and v [B, S, K, H] and the mask [B or 1, L, S], checked.
ffi::Error CheckShapes(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                       ffi::Buffer<ffi::PRED> mask, bool causal, int64_t block, Shape* sh) {
  auto dq = q.dimensions(), dk = k.dimensions(), dv = v.dimensions(), dm = mask.dimensions();
  if (dq.size() != 4 || dk.size() != 4 || dv.size() != 4 || dm.size() != 3) {
    return ffi::Error::InvalidArgument("jtrain_cpu_attention: q, k, v must be [batch, length, heads, dim], the mask "
                                       "[batch or 1, queries, keys]");
  }
  *sh = Shape{dq[0], dq[1], dq[2], dk[1], dk[2], dq[3], dm[0], block, causal};
  const bool ok = dk[0] == sh->batch && dv[0] == sh->batch && dv[1] == sh->keys && dv[2] == sh->kv_heads &&
                  dk[3] == sh->dim && dv[3] == sh->dim && sh->kv_heads > 0 && sh->heads % sh->kv_heads == 0 &&
                  (dm[0] == 1 || dm[0] == sh->batch) && dm[1] == sh->length && dm[2] == sh->keys && block > 0;
  if (!ok) return ffi::Error::InvalidArgument("jtrain_cpu_attention: q, k, v and mask shapes do not agree");
  if (!kAvx512) return ffi::Error::Internal("jtrain_cpu_attention: this CPU lacks AVX-512 (F, BW, VL)");
  return ffi::Error::Success();
}

}  // namespace attn

ffi::Error CpuAttentionForward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> o,
                               ffi::ResultBuffer<ffi::F32> lse, float scale, bool causal, int64_t block) {
  attn::Shape sh;
  JTRAIN_TRY(attn::CheckShapes(q, k, v, mask, causal, block, &sh));
  if (sh.keys == 0 || sh.dim == 0) {  // no key to see (or nothing to weigh): zeros, as for keyless rows
    std::memset(o->untyped_data(), 0, o->size_bytes());
    std::memset(lse->untyped_data(), 0, lse->size_bytes());
    return ffi::Error::Success();
  }
  std::vector<std::vector<float>> scores(attn::WorkerCount(), std::vector<float>(sh.block * sh.padded()));
  std::vector<std::vector<float>> kt(attn::WorkerCount(), std::vector<float>(sh.dim * sh.padded()));
  attn::ParallelFor(sh.batch * sh.heads, [&](int64_t task, int worker) {
    attn::ForwardHead(sh, q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(), scale, task,
                      kt[worker].data(), scores[worker].data(), o->typed_data(), lse->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error CpuAttentionBackward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                                ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                                ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                                ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, float scale,
                                bool causal, int64_t block) {
  attn::Shape sh;
  JTRAIN_TRY(attn::CheckShapes(q, k, v, mask, causal, block, &sh));
  if (sh.keys == 0 || sh.dim == 0) {
    for (auto* r : {&dq, &dk, &dv}) std::memset((*r)->untyped_data(), 0, (*r)->size_bytes());
    return ffi::Error::Success();
  }
  std::vector<attn::Buffers> buffers(attn::WorkerCount());
  for (auto& w : buffers) {
    for (auto* m : {&w.p, &w.ds}) m->resize(sh.block * sh.padded());
    for (auto* m : {&w.kt, &w.vt}) m->resize(sh.dim * sh.padded());
    for (auto* m : {&w.dk, &w.dv}) m->resize(sh.keys * sh.dim);
  }
  attn::ParallelFor(sh.batch * sh.kv_heads, [&](int64_t task, int worker) {
    attn::BackwardHead(sh, q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(), o.typed_data(),
                       lse.typed_data(), dout.typed_data(), scale, task, buffers[worker], dq->typed_data(),
                       dk->typed_data(), dv->typed_data());
  });
  return ffi::Error::Success();
}

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
                  a1, b1, trans_b ? b0 : b1};
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

// ---- Cross-entropy over float32 logits, for `jtrain.models.cpu_cross_entropy` ----
//
// nll = logsumexp(row) - row[label] per row of [rows, vocab] logits, and its gradient
// g * (softmax(row) - onehot(label)). Each task takes a few rows; a row (128 KB at a 32000 vocab)
// stays in the core's L2 cache between the max and the sum of exponentials, so the forward reads
// the logits from memory once and stores nothing of their size (XLA stored exp(row - max) for the
// backward); the backward recomputes the exponentials and writes the gradient over the logits'
// buffer (the call aliases them), so no second [rows, vocab] buffer is taken either.
namespace xent {

constexpr int64_t kRows = 8;

// A row's maximum and sum of exp(x - max): the backward scales exp(x - max) by 1 / sum rather than
// taking exp(x - logsumexp), whose float32 rounding (1e-6 at a logsumexp of 15) would reach every
// probability.
struct RowStats {
  float max, sum;
};

__attribute__((target("avx512f,avx512bw,avx512vl"))) RowStats Stats(const float* x, int64_t n) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = attn::Lanes(n - j);
    vmax = _mm512_mask_max_ps(vmax, lanes, vmax, _mm512_maskz_loadu_ps(lanes, x + j));
  }
  const float mx = _mm512_reduce_max_ps(vmax);
  if (!std::isfinite(mx)) return {mx == -std::numeric_limits<float>::infinity() ? mx : NAN, 1.0f};
  // The sum in double: 32000 float32 terms summed in float32 lanes drift by 1e-6 relative, which
  // reaches every probability of the backward (XLA's pairwise reduction stays near 2e-7).
  const __m512 m = _mm512_set1_ps(mx);
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = attn::Lanes(n - j);
    const __m512 e = _mm512_maskz_mov_ps(lanes, attn::Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + j), m)));
    lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
    hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
  }
  return {mx, static_cast<float>(_mm512_reduce_add_pd(_mm512_add_pd(lo, hi)))};
}

// out = exp(x - max) * scale over a row (out may be x).
__attribute__((target("avx512f,avx512bw,avx512vl"))) void ScaledExp(const float* x, int64_t n, float max,
                                                                      float scale, float* out) {
  const __m512 l = _mm512_set1_ps(max), s = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = attn::Lanes(n - j);
    const __m512 e = attn::Exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, x + j), l));
    _mm512_mask_storeu_ps(out + j, lanes, _mm512_mul_ps(e, s));
  }
}

// body(r) for every row, kRows rows per task over the attention kernel's workers.
template <typename Body>
void ForEachRow(int64_t rows, const Body& body) {
  attn::ParallelFor((rows + kRows - 1) / kRows, [&](int64_t task, int) {
    for (int64_t r = task * kRows; r < std::min(rows, (task + 1) * kRows); ++r) body(r);
  });
}

}  // namespace xent

ffi::Error CpuCrossEntropyForward(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> labels,
                                  ffi::ResultBuffer<ffi::F32> nll, ffi::ResultBuffer<ffi::F32> row_max,
                                  ffi::ResultBuffer<ffi::F32> row_sum) {
  const int64_t rows = labels.element_count();
  if (rows == 0) return ffi::Error::Success();
  const int64_t vocab = logits.element_count() / rows;
  if (vocab == 0 || logits.element_count() != rows * vocab || nll->element_count() != rows) {
    return ffi::Error::InvalidArgument("jtrain_cpu_cross_entropy: logits must be [rows, vocab], labels [rows]");
  }
  const float* x = logits.typed_data();
  const int32_t* y = labels.typed_data();
  float *out = nll->typed_data(), *mx = row_max->typed_data(), *sum = row_sum->typed_data();
  xent::ForEachRow(rows, [&](int64_t r) {
    const float* row = x + r * vocab;
    const xent::RowStats st = xent::Stats(row, vocab);
    mx[r] = st.max;
    sum[r] = st.sum;
    const float lse = st.max + std::log(st.sum);
    // A negative label is ignored (the caller maps HF's -100 there); one past the vocabulary is
    // NaN, as XLA's gather fills it, so the step's non-finite guard sees it.
    out[r] = y[r] < 0 ? 0.0f : y[r] >= vocab ? std::numeric_limits<float>::quiet_NaN() : lse - row[y[r]];
  });
  return ffi::Error::Success();
}

ffi::Error CpuCrossEntropyBackward(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> labels,
                                   ffi::Buffer<ffi::F32> row_max, ffi::Buffer<ffi::F32> row_sum,
                                   ffi::Buffer<ffi::F32> d_nll,
                                   ffi::ResultBuffer<ffi::F32> d_logits) {
  const int64_t rows = labels.element_count();
  if (rows == 0) return ffi::Error::Success();
  const int64_t vocab = logits.element_count() / rows;
  if (vocab == 0 || d_logits->element_count() != rows * vocab || d_nll.element_count() != rows) {
    return ffi::Error::InvalidArgument("jtrain_cpu_cross_entropy_backward: logits must be [rows, vocab]");
  }
  const float *x = logits.typed_data(), *mx = row_max.typed_data(), *sum = row_sum.typed_data();
  const float* g = d_nll.typed_data();
  const int32_t* y = labels.typed_data();
  float* dx = d_logits->typed_data();
  xent::ForEachRow(rows, [&](int64_t r) {
    float* out = dx + r * vocab;
    if (y[r] < 0) {  // an ignored row has no gradient
      std::fill_n(out, vocab, 0.0f);
      return;
    }
    xent::ScaledExp(x + r * vocab, vocab, mx[r], g[r] / sum[r], out);
    if (y[r] < vocab) out[y[r]] -= g[r];
  });
  return ffi::Error::Success();
}

template <typename Fn>
bool Resolve(void* lib, const char* name, Fn* fn) {
  *fn = reinterpret_cast<Fn>(dlsym(lib, name));
  return *fn != nullptr;
}

}  // namespace

// Float32 products with at least this many result columns (and neither operand transposed) prefer
// oneDNN's sgemm kernel; 0: oneDNN's own first choice everywhere (see `PrefersSgemm`).
extern "C" void jtrain_set_onednn_sgemm_min_columns(int64_t columns) { dnnl::sgemm_min_columns = columns; }

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
                  Resolve(lib, "dnnl_primitive_desc_query", &f.primitive_desc_query) &&
                  Resolve(lib, "dnnl_primitive_desc_next_impl", &f.primitive_desc_next_impl) &&
                  Resolve(lib, "dnnl_primitive_desc_destroy", &f.primitive_desc_destroy) &&
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtrainCpuAttentionForward, CpuAttentionForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtrainCpuAttentionBackward, CpuAttentionBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtrainCpuCrossEntropyForward, CpuCrossEntropyForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JtrainCpuCrossEntropyBackward, CpuCrossEntropyBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
