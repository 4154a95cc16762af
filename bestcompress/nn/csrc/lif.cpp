// Fused multi-step LIF for the CPU: forward and backward over all T time steps in one pass each.
//
// The kernels are in lif_body.h (one copy per instruction set, picked at run time); this file dispatches and
// binds them. Layout: x, h, grad tensors are contiguous [T, N]; the membranes of a block of N lives in a small
// buffer. Memory traffic is the cost: forward reads x and writes S (and H when training), backward reads H and
// writes the gradient over it, and the gradient of a sum (one broadcast value) is never materialised.
#include <torch/extension.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <algorithm>
#include <string>
#include <vector>

namespace {

constexpr int64_t kBlock = 1024;

struct Params {
  double tau, v_th, v_reset, alpha;
  bool hard, decay_input, detach_reset, atan, integrate;  // integrate: IF, H = V + X
};

// One copy of the kernels per instruction set (lif_body.h), chosen at run time: portable builds still use AVX2 /
// AVX-512 where the CPU has them, and a cached build never runs instructions another machine lacks.
namespace base {
#include "lif_body.h"
}
#if defined(__x86_64__) && defined(__GNUC__)
#define BC_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "lif_body.h"
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,prefer-vector-width=512")
namespace avx512 {
#include "lif_body.h"
}
#pragma GCC pop_options
#endif

const char* const kIsaNames[] = {"baseline", "avx2", "avx512"};

int best_isa() {
#ifdef BC_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

int g_isa = best_isa();

std::vector<std::string> isas() {  // what this CPU can run, best last
  std::vector<std::string> out;
  for (int i = 0; i <= best_isa(); ++i) out.emplace_back(kIsaNames[i]);
  return out;
}

std::string set_isa(const std::string& name) {  // for tests and benchmarks; returns the previous one
  const std::string old = kIsaNames[g_isa];
  for (int i = 0; i <= best_isa(); ++i)
    if (name == kIsaNames[i]) {
      g_isa = i;
      return old;
    }
  TORCH_CHECK(false, "instruction set ", name, " is not available on this CPU");
}

// Buffers of S and H come from a small pool of freed blocks (exact byte size, most recently freed first, at most
// BESTCOMPRESS_LIF_POOL_MB, default 256 MiB, least recently freed dropped first). A fresh multi-megabyte block
// from malloc is fresh pages: their first touch faults and the kernel zeroes them, which took longer than the
// kernels themselves. Blocks under 1 MiB come from torch's allocator.
struct Pool final : c10::Allocator {
  static constexpr size_t kHeader = 64, kMin = size_t(1) << 20;
  std::mutex mutex;
  std::list<std::pair<size_t, char*>> free;  // (bytes, base), most recent first
  size_t held = 0;
  size_t limit = [] {
    const char* mb = std::getenv("BESTCOMPRESS_LIF_POOL_MB");
    return (mb && *mb ? size_t(std::strtoull(mb, nullptr, 10)) : size_t(256)) << 20;
  }();

  static void release(void* base) {
    Pool& pool = instance();
    const size_t bytes = *static_cast<size_t*>(base);
    std::vector<char*> drop;
    {
      std::lock_guard<std::mutex> lock(pool.mutex);
      pool.free.emplace_front(bytes, static_cast<char*>(base));
      pool.held += bytes;
      while (pool.held > pool.limit) {
        drop.push_back(pool.free.back().second);
        pool.held -= pool.free.back().first;
        pool.free.pop_back();
      }
    }
    for (char* b : drop) std::free(b);
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMin) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = kHeader + (n + 63) / 64 * 64;
    char* base = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex);
      for (auto it = free.begin(); it != free.end(); ++it)
        if (it->first == bytes) {
          base = it->second;
          held -= bytes;
          free.erase(it);
          break;
        }
    }
    if (!base) {
      base = static_cast<char*>(std::aligned_alloc(64, bytes));
      TORCH_CHECK(base, "lif: out of memory allocating ", bytes, " bytes");
      *reinterpret_cast<size_t*>(base) = bytes;
    }
    return {base + kHeader, base, &Pool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  static Pool& instance() {  // never destroyed: tensors may be freed after static destructors ran
    static Pool* pool = new Pool();
    return *pool;
  }
};

torch::Tensor pooled_like(const torch::Tensor& x) {
  return torch::Tensor(at::detail::empty_generic(x.sizes(), &Pool::instance(),
                                                 c10::DispatchKeySet(c10::DispatchKey::CPU), x.scalar_type(),
                                                 at::MemoryFormat::Contiguous));
}

std::vector<int64_t> pool_state() {  // (bytes held, limit)
  Pool& pool = Pool::instance();
  std::lock_guard<std::mutex> lock(pool.mutex);
  return {int64_t(pool.held), int64_t(pool.limit)};
}

int64_t set_pool_limit(int64_t bytes) {  // returns the previous limit; blocks over the new one are freed
  Pool& pool = Pool::instance();
  std::vector<char*> drop;
  size_t old;
  {
    std::lock_guard<std::mutex> lock(pool.mutex);
    old = pool.limit;
    pool.limit = size_t(bytes < 0 ? 0 : bytes);
    while (pool.held > pool.limit) {
      drop.push_back(pool.free.back().second);
      pool.held -= pool.free.back().first;
      pool.free.pop_back();
    }
  }
  for (char* b : drop) std::free(b);
  return int64_t(old);
}

template <typename T>
void forward_any(const T* x, T* s, T* h, int64_t steps, int64_t n, int64_t b, int64_t e, const Params& p) {
#ifdef BC_X86
  if (g_isa == 2) return avx512::forward<T>(x, s, h, steps, n, b, e, p);
  if (g_isa == 1) return avx2::forward<T>(x, s, h, steps, n, b, e, p);
#endif
  base::forward<T>(x, s, h, steps, n, b, e, p);
}

template <typename T>
void backward_any(const T* gs, T g0, const T* h, T* gx, int64_t steps, int64_t n, int64_t b, int64_t e,
                  const Params& p) {
#ifdef BC_X86
  if (g_isa == 2) return avx512::backward<T>(gs, g0, h, gx, steps, n, b, e, p);
  if (g_isa == 1) return avx2::backward<T>(gs, g0, h, gx, steps, n, b, e, p);
#endif
  base::backward<T>(gs, g0, h, gx, steps, n, b, e, p);
}

// (spikes, H): H, what backward needs, only when save_h (training); an undefined tensor (None) otherwise.
std::vector<torch::Tensor> lif_forward(torch::Tensor x, double tau, double v_th, double v_reset, bool hard,
                                       bool decay_input, bool detach_reset, double alpha, bool atan,
                                       bool integrate, bool save_h) {
  TORCH_CHECK(x.device().is_cpu(), "lif_forward: CPU tensors only");
  auto xc = x.contiguous();
  const int64_t steps = xc.size(0);
  const int64_t n = steps ? xc.numel() / steps : 0;
  auto s = pooled_like(xc);
  torch::Tensor h = save_h ? pooled_like(xc) : torch::Tensor();
  const Params p{tau, v_th, v_reset, alpha, hard, decay_input, detach_reset, atan, integrate};
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "lif_forward", [&] {
    const scalar_t* px = xc.data_ptr<scalar_t>();
    scalar_t* ps = s.data_ptr<scalar_t>();
    scalar_t* ph = save_h ? h.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, kBlock, [&](int64_t b, int64_t e) { forward_any<scalar_t>(px, ps, ph, steps, n, b, e, p); });
  });
  return {s, h};
}

// Gradient of the input. A gradient that is one value broadcast everywhere (that of a sum) is read as that value,
// not materialised. in_place: the gradient is written over h (the caller knows the graph is not kept).
torch::Tensor lif_backward(torch::Tensor grad_s, torch::Tensor h, double tau, double v_th, double v_reset,
                           bool hard, bool decay_input, bool detach_reset, double alpha, bool atan,
                           bool integrate, bool in_place) {
  TORCH_CHECK(h.is_contiguous(), "lif_backward: the saved membrane must be contiguous");
  TORCH_CHECK(grad_s.sizes() == h.sizes(), "lif_backward: gradient and membrane shapes differ");
  const int64_t steps = h.size(0);
  const int64_t n = steps ? h.numel() / steps : 0;
  auto gs = grad_s.to(h.scalar_type());
  bool scalar = gs.numel() > 0;
  for (int64_t d = 0; d < gs.dim(); ++d) scalar = scalar && (gs.stride(d) == 0 || gs.size(d) == 1);
  if (!scalar) gs = gs.contiguous();
  auto gx = in_place ? h : pooled_like(h);
  const Params p{tau, v_th, v_reset, alpha, hard, decay_input, detach_reset, atan, integrate};
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lif_backward", [&] {
    const scalar_t g0 = scalar ? *gs.data_ptr<scalar_t>() : scalar_t(0);
    const scalar_t* pg = scalar ? nullptr : gs.data_ptr<scalar_t>();
    const scalar_t* ph = h.data_ptr<scalar_t>();
    scalar_t* px = gx.data_ptr<scalar_t>();
    at::parallel_for(0, n, kBlock,
                     [&](int64_t b, int64_t e) { backward_any<scalar_t>(pg, g0, ph, px, steps, n, b, e, p); });
  });
  return gx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lif_forward", &lif_forward, "fused multi-step LIF forward: (spikes, membrane before reset)");
  m.def("lif_backward", &lif_backward, "fused multi-step LIF backward: gradient of the input");
  m.def("pool_state", &pool_state, "(bytes of freed buffers kept for reuse, limit)");
  m.def("set_pool_limit", &set_pool_limit, "bytes of freed buffers kept at most (returns the previous limit)");
  m.def("isas", &isas, "instruction sets this CPU runs the kernels with");
  m.def("set_isa", &set_isa, "run the kernels with this instruction set (returns the previous one)");
  m.def("isa", [] { return std::string(kIsaNames[g_isa]); }, "instruction set the kernels run with");
}
