// Fused multi-step LIF for the CPU: forward and backward over all T time steps in one pass each.
//
// Each step repeats the exact operation order of bestcompress.nn.lif.LIF (charge, fire, reset), so spikes are
// bit-identical to the pure-torch neuron (built with -ffp-contract=off: no fused multiply-adds).
// Layout: x, h, grad tensors are contiguous [T, N]; the membrane of the N neurons lives in a small buffer.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kBlock = 1024;

struct Params {
  double tau, v_th, v_reset, alpha;
  bool hard, decay_input, detach_reset, atan, integrate;  // integrate: IF, H = V + X
};

Params unpack(double tau, double v_th, double v_reset, bool hard, bool decay_input, bool detach_reset,
              double alpha, bool atan, bool integrate) {
  return Params{tau, v_th, v_reset, alpha, hard, decay_input, detach_reset, atan, integrate};
}

// The flags are template parameters so that each inner loop is branch-free and the compiler vectorises it.
template <typename T, bool HARD, bool DECAY, bool INTEGRATE>
void forward_kernel(const T* __restrict__ x, T* __restrict__ s, T* __restrict__ h, int64_t steps, int64_t n,
                    const Params& p) {
  const T tau = T(p.tau), v_th = T(p.v_th), v_reset = T(p.v_reset);
  const T base = HARD ? v_reset : T(0);
  // Blocks of neurons small enough that their membranes stay in L1 while all T steps run over them.
  at::parallel_for(0, n, kBlock, [&](int64_t begin, int64_t end) {
    T v[kBlock];
    for (int64_t lo = begin; lo < end; lo += kBlock) {
      const int64_t len = std::min<int64_t>(kBlock, end - lo);
      for (int64_t i = 0; i < len; ++i) v[i] = HARD ? v_reset : T(0);
      for (int64_t t = 0; t < steps; ++t) {
        const T* __restrict__ xt = x + t * n + lo;
        T* __restrict__ st = s + t * n + lo;
        T* __restrict__ ht = h + t * n + lo;
#pragma GCC ivdep
        for (int64_t i = 0; i < len; ++i) {
          const T vi = v[i];
          T hh;
          if (INTEGRATE) hh = vi + xt[i];
          else if (DECAY) hh = vi + (xt[i] - (vi - base)) / tau;
          else hh = (vi - (vi - base) / tau) + xt[i];
          const T spike = static_cast<T>((hh - v_th) >= T(0));
          ht[i] = hh;
          st[i] = spike;
          v[i] = HARD ? hh * (T(1) - spike) + v_reset * spike : hh - v_th * spike;
        }
      }
    }
  });
}

// exp for the surrogate gradient, written so that the compiler vectorises it: round-to-nearest by the 1.5·2^m
// trick, a Taylor polynomial on |r| <= ln2/2 (relative error ~1e-7 in float, ~1e-16 in double), 2^k from bits.
template <typename T> struct ExpBits;
template <> struct ExpBits<float> {
  using I = int32_t;
  static constexpr int mantissa = 23, bias = 127, degree = 7;
  static constexpr float magic = 12582912.0f;
};
template <> struct ExpBits<double> {
  using I = int64_t;
  static constexpr int mantissa = 52, bias = 1023, degree = 13;
  static constexpr double magic = 6755399441055744.0;
};

template <typename T>
inline T vexp(T x) {
  using B = ExpBits<T>;
  x = x < T(-80) ? T(-80) : x;
  x = x > T(80) ? T(80) : x;
  const T kf = (x * T(1.4426950408889634) + B::magic) - B::magic;
  const T r = (x - kf * T(0.693145751953125)) - kf * T(1.4286068203094172e-06);
  T p = T(1);
  for (int d = B::degree; d >= 1; --d) p = T(1) + p * r / T(d);
  const typename B::I bits = (static_cast<typename B::I>(kf) + B::bias) << B::mantissa;
  T scale;
  __builtin_memcpy(&scale, &bits, sizeof(T));
  return p * scale;
}

template <typename T, bool ATAN>
inline T surrogate(T u, T alpha) {  // dS/dH at H - V_th = u
  if (ATAN) {
    const T k = T(M_PI / 2.0) * alpha * u;
    return (alpha / T(2)) / (T(1) + k * k);
  }
  const T sig = T(1) / (T(1) + vexp(-(alpha * u)));
  return alpha * sig * (T(1) - sig);
}

template <typename T, bool HARD, bool DETACH, bool ATAN>
void backward_kernel(const T* __restrict__ gs, const T* __restrict__ h, T* __restrict__ gx, int64_t steps,
                     int64_t n, const Params& p) {
  const T dv = p.integrate ? T(1) : T(1) - T(1) / T(p.tau);  // dH_t / dV_{t-1}
  const T dx = (p.integrate || !p.decay_input) ? T(1) : T(1) / T(p.tau);  // dH_t / dX_t
  const T v_th = T(p.v_th), v_reset = T(p.v_reset), alpha = T(p.alpha);
  at::parallel_for(0, n, kBlock, [&](int64_t begin, int64_t end) {
    T gv[kBlock];  // dL/dV_t, flowing back from step t+1
    for (int64_t lo = begin; lo < end; lo += kBlock) {
      const int64_t len = std::min<int64_t>(kBlock, end - lo);
      for (int64_t i = 0; i < len; ++i) gv[i] = T(0);
      for (int64_t t = steps - 1; t >= 0; --t) {
        const int64_t off = t * n + lo;
        const T* __restrict__ gst = gs + off;
        const T* __restrict__ ht = h + off;
        T* __restrict__ gxt = gx + off;
#pragma GCC ivdep
        for (int64_t i = 0; i < len; ++i) {
          const T hh = ht[i];
          const T u = hh - v_th;
          const T spike = static_cast<T>(u >= T(0));
          const T g_v = gv[i];
          T g_spike = gst[i];  // everything that reaches the spike S_t
          T g_h;
          if (HARD) {
            if (!DETACH) g_spike += g_v * (v_reset - hh);
            g_h = g_v * (T(1) - spike);
          } else {
            if (!DETACH) g_spike -= g_v * v_th;
            g_h = g_v;
          }
          g_h += g_spike * surrogate<T, ATAN>(u, alpha);
          gxt[i] = g_h * dx;
          gv[i] = g_h * dv;
        }
      }
    }
  });
}

template <typename T>
void forward_dispatch(const T* x, T* s, T* h, int64_t steps, int64_t n, const Params& p) {
  if (p.integrate) {
    if (p.hard) forward_kernel<T, true, false, true>(x, s, h, steps, n, p);
    else forward_kernel<T, false, false, true>(x, s, h, steps, n, p);
  } else if (p.decay_input) {
    if (p.hard) forward_kernel<T, true, true, false>(x, s, h, steps, n, p);
    else forward_kernel<T, false, true, false>(x, s, h, steps, n, p);
  } else {
    if (p.hard) forward_kernel<T, true, false, false>(x, s, h, steps, n, p);
    else forward_kernel<T, false, false, false>(x, s, h, steps, n, p);
  }
}

template <typename T, bool ATAN>
void backward_dispatch(const T* gs, const T* h, T* gx, int64_t steps, int64_t n, const Params& p) {
  if (p.hard) {
    if (p.detach_reset) backward_kernel<T, true, true, ATAN>(gs, h, gx, steps, n, p);
    else backward_kernel<T, true, false, ATAN>(gs, h, gx, steps, n, p);
  } else {
    if (p.detach_reset) backward_kernel<T, false, true, ATAN>(gs, h, gx, steps, n, p);
    else backward_kernel<T, false, false, ATAN>(gs, h, gx, steps, n, p);
  }
}

std::vector<torch::Tensor> lif_forward(torch::Tensor x, double tau, double v_th, double v_reset, bool hard,
                                       bool decay_input, bool detach_reset, double alpha, bool atan,
                                       bool integrate) {
  TORCH_CHECK(x.device().is_cpu(), "lif_forward: CPU tensors only");
  auto xc = x.contiguous();
  const int64_t steps = xc.size(0);
  const int64_t n = steps ? xc.numel() / steps : 0;
  auto s = torch::empty_like(xc);
  auto h = torch::empty_like(xc);
  const Params p = unpack(tau, v_th, v_reset, hard, decay_input, detach_reset, alpha, atan, integrate);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "lif_forward", [&] {
    forward_dispatch<scalar_t>(xc.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), steps, n,
                               p);
  });
  return {s, h};
}

torch::Tensor lif_backward(torch::Tensor grad_s, torch::Tensor h, double tau, double v_th, double v_reset,
                           bool hard, bool decay_input, bool detach_reset, double alpha, bool atan,
                           bool integrate) {
  auto gs = grad_s.contiguous();
  auto hc = h.contiguous();
  const int64_t steps = hc.size(0);
  const int64_t n = steps ? hc.numel() / steps : 0;
  auto gx = torch::empty_like(hc);
  const Params p = unpack(tau, v_th, v_reset, hard, decay_input, detach_reset, alpha, atan, integrate);
  AT_DISPATCH_FLOATING_TYPES(hc.scalar_type(), "lif_backward", [&] {
    if (p.atan) backward_dispatch<scalar_t, true>(gs.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(),
                                                  gx.data_ptr<scalar_t>(), steps, n, p);
    else backward_dispatch<scalar_t, false>(gs.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(),
                                            gx.data_ptr<scalar_t>(), steps, n, p);
  });
  return gx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lif_forward", &lif_forward, "fused multi-step LIF forward: (spikes, membrane before reset)");
  m.def("lif_backward", &lif_backward, "fused multi-step LIF backward: gradient of the input");
}
