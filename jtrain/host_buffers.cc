// Keeps XLA:CPU's large host buffers mapped between executions.
//
// Why: XLA:CPU takes one scratch buffer per execution of a compiled step (412 MiB for the tiny
// benchmark model, about 2 GiB for the large one) from glibc's malloc. Anything above glibc's mmap
// ceiling (32 MiB) is mmap'ed on every allocation and munmap'ed on every free, so every step writes
// its intermediates into fresh pages: about 105,000 minor page faults and a fifth of a second of
// kernel time per tiny step, and the products that write those pages run at half their speed.
// glibc cannot be told to keep such blocks without putting everything in one never-trimmed heap
// (measured: 1.7-2.6x the peak memory), and XLA offers no allocator hook.
//
// What: `jtrain_host_buffers_install` points the allocation entries of one loaded library's
// relocation table (its GOT: posix_memalign, which XLA:CPU takes its buffers with, realloc and
// free) at the functions below.
// Requests of at least `threshold` bytes get whole pages of their own from mmap; when freed, they
// stay mapped in a small cache and serve the next request of about the same size (best fit within
// a quarter), which in a training loop is the next step's identical buffer. Everything else, and
// every pointer this file did not hand out, goes to glibc unchanged.
//
// Bounds: the cache holds at most as many bytes as were live in this file's blocks at their peak
// (so the process never keeps more than twice what it once used) and at most a quarter of the
// machine's physical memory, and blocks idle for longer than `idle_seconds` are unmapped at the
// next allocation or free.
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

struct Cached {
  void* ptr;
  size_t bytes;
  int64_t freed_ns;
};

struct Cache {
  std::mutex mu;
  std::unordered_map<void*, size_t> live;  // blocks handed out and not yet freed
  std::vector<Cached> idle;                // freed blocks, still mapped, oldest first
  size_t live_bytes = 0, idle_bytes = 0, peak_live_bytes = 0;
  // Counters for `jtrain_host_buffers_stats`.
  uint64_t reused = 0, mapped = 0, unmapped = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: frees may arrive during process exit
  return *c;
}

// Set by `jtrain_host_buffers_install` before the hooks are in place (atomics: a second install,
// as the tests do, may change them while other threads allocate).
size_t page_size = 4096;
std::atomic<size_t> max_idle_bytes{SIZE_MAX};  // a quarter of physical memory
std::atomic<size_t> threshold{size_t{32} << 20};
std::atomic<int64_t> idle_ns{int64_t{30} * 1000000000};

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Removes from the cache what is over its bounds (`all`: everything); returns the blocks to unmap
// outside the lock.
std::vector<Cached> Trim(Cache& c, int64_t now, bool all = false) {
  std::vector<Cached> out;
  size_t i = 0;
  const size_t cap = std::min(c.peak_live_bytes, max_idle_bytes.load(std::memory_order_relaxed));
  const int64_t idle_limit = idle_ns.load(std::memory_order_relaxed);
  while (i < c.idle.size() && (all || c.idle_bytes > cap || now - c.idle[i].freed_ns >= idle_limit)) {
    c.idle_bytes -= c.idle[i].bytes;
    out.push_back(c.idle[i]);
    ++i;
  }
  c.idle.erase(c.idle.begin(), c.idle.begin() + i);
  c.unmapped += out.size();
  return out;
}

void Unmap(const std::vector<Cached>& blocks) {
  for (const Cached& b : blocks) munmap(b.ptr, b.bytes);
}

void* Take(size_t n) {
  const size_t bytes = (n + page_size - 1) / page_size * page_size;
  Cache& c = cache();
  std::vector<Cached> drop;
  void* ptr = nullptr;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    size_t best = c.idle.size();
    for (size_t i = 0; i < c.idle.size(); ++i) {
      const size_t have = c.idle[i].bytes;
      if (have >= bytes && have - bytes <= bytes / 4 && (best == c.idle.size() || have < c.idle[best].bytes)) best = i;
    }
    if (best < c.idle.size()) {
      ptr = c.idle[best].ptr;
      c.idle_bytes -= c.idle[best].bytes;
      c.live[ptr] = c.idle[best].bytes;
      c.live_bytes += c.idle[best].bytes;
      c.peak_live_bytes = std::max(c.peak_live_bytes, c.live_bytes);
      c.idle.erase(c.idle.begin() + best);
      ++c.reused;
    }
    drop = Trim(c, NowNs());
  }
  Unmap(drop);
  if (ptr != nullptr) return ptr;
  ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ptr == MAP_FAILED) {  // give every cached block back and try once more
    {
      std::lock_guard<std::mutex> lock(c.mu);
      drop = Trim(c, 0, /*all=*/true);
    }
    Unmap(drop);
    ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ptr == MAP_FAILED) return nullptr;
  }
  std::lock_guard<std::mutex> lock(c.mu);
  c.live[ptr] = bytes;
  c.live_bytes += bytes;
  c.peak_live_bytes = std::max(c.peak_live_bytes, c.live_bytes);
  ++c.mapped;
  return ptr;
}

// Our blocks are whole pages, so any other pointer is glibc's without a lookup.
bool MaybeOurs(void* ptr) { return ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % page_size == 0; }

// The size of `ptr` if it is one of our blocks in use, else 0.
size_t LiveBytes(void* ptr) {
  if (!MaybeOurs(ptr)) return 0;
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.live.find(ptr);
  return it == c.live.end() ? 0 : it->second;
}

// Returns the block to the cache if it is one of ours.
bool Give(void* ptr) {
  if (!MaybeOurs(ptr)) return false;
  Cache& c = cache();
  std::vector<Cached> drop;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.live.find(ptr);
    if (it == c.live.end()) return false;
    const int64_t now = NowNs();
    c.idle.push_back({ptr, it->second, now});
    c.idle_bytes += it->second;
    c.live_bytes -= it->second;
    c.live.erase(it);
    drop = Trim(c, now);
  }
  Unmap(drop);
  return true;
}

int HookedPosixMemalign(void** out, size_t alignment, size_t n) {
  if (n >= threshold.load(std::memory_order_relaxed) && alignment <= page_size) {
    void* ptr = Take(n);
    if (ptr == nullptr) return ENOMEM;
    *out = ptr;
    return 0;
  }
  return posix_memalign(out, alignment, n);
}

void HookedFree(void* ptr) {
  if (!Give(ptr)) free(ptr);
}

void* HookedRealloc(void* ptr, size_t n) {
  const size_t old_bytes = LiveBytes(ptr);
  if (old_bytes == 0) return realloc(ptr, n);
  void* fresh = n >= threshold.load(std::memory_order_relaxed) ? Take(n) : malloc(n);
  if (fresh == nullptr) return nullptr;  // the old block stays valid, as realloc promises
  std::memcpy(fresh, ptr, std::min(old_bytes, n));
  Give(ptr);
  return fresh;
}


#if defined(__x86_64__)
constexpr unsigned kJumpSlot = R_X86_64_JUMP_SLOT, kGlobDat = R_X86_64_GLOB_DAT, kAbsolute = R_X86_64_64;
#elif defined(__aarch64__)
constexpr unsigned kJumpSlot = R_AARCH64_JUMP_SLOT, kGlobDat = R_AARCH64_GLOB_DAT, kAbsolute = R_AARCH64_ABS64;
#else
#error "host_buffers.cc supports x86_64 and aarch64"
#endif

struct Target {
  const char* name_part;  // substring of the library's path
  int patched = 0;
  bool found = false;
  const char* error = nullptr;
};

template <typename T>
const T* Address(ElfW(Addr) base, ElfW(Addr) value) {
  // glibc relocates most of a loaded object's dynamic entries to absolute addresses; guard anyway.
  return reinterpret_cast<const T*>(value < base ? base + value : value);
}

// One loaded library's relocation tables, and the read-only-after-relocation (RELRO) range its
// GOT usually lies in.
struct Tables {
  ElfW(Addr) base = 0;
  const ElfW(Rela)* lists[2] = {nullptr, nullptr};  // the PLT's (DT_JMPREL) and the others (DT_RELA)
  size_t counts[2] = {0, 0};
  const ElfW(Sym)* symbols = nullptr;
  const char* names = nullptr;
  uintptr_t relro_first = 0, relro_last = 0;
};

// Points every relocation that names `function` at `replacement`; false if a page stayed read-only.
bool Patch(const Tables& t, const char* function, void* replacement, int* patched) {
  for (int list = 0; list < 2; ++list) {
    for (size_t i = 0; i < t.counts[list]; ++i) {
      const ElfW(Rela)& r = t.lists[list][i];
      const unsigned type = ELF64_R_TYPE(r.r_info);
      if (type != kJumpSlot && type != kGlobDat && type != kAbsolute) continue;
      const ElfW(Sym)& symbol = t.symbols[ELF64_R_SYM(r.r_info)];
      if (symbol.st_shndx != SHN_UNDEF || (type == kAbsolute && r.r_addend != 0)) continue;
      if (std::strcmp(t.names + symbol.st_name, function) != 0) continue;
      void** slot = reinterpret_cast<void**>(t.base + r.r_offset);
      const uintptr_t first = reinterpret_cast<uintptr_t>(slot) / page_size * page_size;
      const uintptr_t last = (reinterpret_cast<uintptr_t>(slot + 1) + page_size - 1) / page_size * page_size;
      void* page = reinterpret_cast<void*>(first);
      if (mprotect(page, last - first, PROT_READ | PROT_WRITE) != 0) return false;
      __atomic_store_n(slot, replacement, __ATOMIC_SEQ_CST);
      if (first >= t.relro_first && last <= t.relro_last) mprotect(page, last - first, PROT_READ);  // as it was
      ++*patched;
    }
  }
  return true;
}

const char* ReadTables(struct dl_phdr_info* info, Tables* t) {
  t->base = info->dlpi_addr;
  const ElfW(Dyn)* dyn = nullptr;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_DYNAMIC) dyn = reinterpret_cast<const ElfW(Dyn)*>(t->base + ph.p_vaddr);
    if (ph.p_type == PT_GNU_RELRO) {
      t->relro_first = (t->base + ph.p_vaddr) / page_size * page_size;
      t->relro_last = (t->base + ph.p_vaddr + ph.p_memsz) / page_size * page_size;  // the loader rounds down
    }
  }
  if (dyn == nullptr) return "the library has no dynamic section";
  bool rela_plt = true;
  size_t bytes[2] = {0, 0};
  for (; dyn->d_tag != DT_NULL; ++dyn) {
    switch (dyn->d_tag) {
      case DT_JMPREL: t->lists[0] = Address<ElfW(Rela)>(t->base, dyn->d_un.d_ptr); break;
      case DT_PLTRELSZ: bytes[0] = dyn->d_un.d_val; break;
      case DT_PLTREL: rela_plt = dyn->d_un.d_val == DT_RELA; break;
      case DT_RELA: t->lists[1] = Address<ElfW(Rela)>(t->base, dyn->d_un.d_ptr); break;
      case DT_RELASZ: bytes[1] = dyn->d_un.d_val; break;
      case DT_SYMTAB: t->symbols = Address<ElfW(Sym)>(t->base, dyn->d_un.d_ptr); break;
      case DT_STRTAB: t->names = Address<char>(t->base, dyn->d_un.d_ptr); break;
    }
  }
  if (t->symbols == nullptr || t->names == nullptr || !rela_plt)
    return "the library's relocations are not in the expected (RELA) form";
  for (int list = 0; list < 2; ++list) {
    t->counts[list] = t->lists[list] == nullptr ? 0 : bytes[list] / sizeof(ElfW(Rela));
  }
  return nullptr;
}

int PatchObject(struct dl_phdr_info* info, size_t, void* data) {
  Target* target = static_cast<Target*>(data);
  if (info->dlpi_name == nullptr || std::strstr(info->dlpi_name, target->name_part) == nullptr) return 0;
  target->found = true;
  Tables tables;
  target->error = ReadTables(info, &tables);
  if (target->error != nullptr) return 1;
  // free and realloc first: from the moment posix_memalign hands out a cached block, every way the
  // library releases one must already know it.
  const char* refused = "mprotect refused to make the library's relocation table writable";
  if (!Patch(tables, "free", reinterpret_cast<void*>(&HookedFree), &target->patched)) {
    target->error = refused;
  } else if (target->patched == 0) {
    target->error = "the library does not import free";
  } else if (!Patch(tables, "realloc", reinterpret_cast<void*>(&HookedRealloc), &target->patched) ||
             !Patch(tables, "posix_memalign", reinterpret_cast<void*>(&HookedPosixMemalign), &target->patched)) {
    target->error = refused;
  }
  return 1;
}

}  // namespace

extern "C" {

// Redirects the allocation functions of the loaded library whose path contains `name_part`;
// returns nullptr on success or a description of what stopped it. Call once, before the library
// allocates what should be cached (blocks it allocated earlier still go to glibc correctly).
const char* jtrain_host_buffers_install(const char* name_part, uint64_t min_bytes, double idle_seconds) {
  page_size = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  threshold = std::max<size_t>(min_bytes, page_size);
  const long pages = sysconf(_SC_PHYS_PAGES);
  if (pages > 0) max_idle_bytes = static_cast<size_t>(pages) * page_size / 4;
  idle_ns = static_cast<int64_t>(idle_seconds * 1e9);
  Target target{name_part};
  dl_iterate_phdr(&PatchObject, &target);
  if (!target.found) return "the library is not loaded";
  if (target.error != nullptr) return target.error;
  return nullptr;
}

// Counters: blocks reused from the cache, mapped, unmapped; bytes live and cached now, peak live.
void jtrain_host_buffers_stats(uint64_t out[6]) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  out[0] = c.reused;
  out[1] = c.mapped;
  out[2] = c.unmapped;
  out[3] = c.live_bytes;
  out[4] = c.idle_bytes;
  out[5] = c.peak_live_bytes;
}

}  // extern "C"
