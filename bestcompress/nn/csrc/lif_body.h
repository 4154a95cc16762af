// Kernels of lif.cpp, compiled once per instruction set: lif.cpp includes this file inside a namespace under a
// `#pragma GCC target(...)`, so each copy is auto-vectorised for its ISA (SSE2 baseline, AVX2, AVX-512) and
// picked at run time by what the CPU reports. Nothing is included here; Params and kBlock come from lif.cpp.
//
// Each step repeats the exact operation order of bestcompress.nn.lif.LIF (charge, fire, reset), so spikes are
// bit-identical to the pure-torch neuron (lif.cpp is built with -ffp-contract=off: no fused multiply-adds).

// exp for the sigmoid surrogate, vectorisable: round-to-nearest by the 1.5·2^m trick, Cody–Waite reduction to
// |r| <= ln2/2, the Taylor polynomial in Horner form with constant coefficients 1/k! (no divisions; relative
// error ~1e-7 in float, ~1e-16 in double), 2^k from its bits.
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

template <typename T, int N>
struct InvFactorials {  // c[k] = 1 / k!, computed by the compiler
  T c[N + 1];
  constexpr InvFactorials() : c() {
    double f = 1.0;
    for (int k = 0; k <= N; ++k) {
      if (k > 0) f *= k;
      c[k] = T(1.0 / f);
    }
  }
};

template <typename T>
__attribute__((always_inline)) inline T vexp(T x) {
  using B = ExpBits<T>;
  x = x < T(-80) ? T(-80) : x;
  x = x > T(80) ? T(80) : x;
  const T kf = (x * T(1.4426950408889634) + B::magic) - B::magic;
  const T r = (x - kf * T(0.693145751953125)) - kf * T(1.4286068203094172e-06);
  constexpr InvFactorials<T, B::degree> c{};
  T p = c.c[B::degree];
#pragma GCC unroll 16
  for (int d = B::degree - 1; d >= 0; --d) p = p * r + c.c[d];
  const typename B::I bits = (static_cast<typename B::I>(kf) + B::bias) << B::mantissa;
  T scale;
  __builtin_memcpy(&scale, &bits, sizeof(T));
  return p * scale;
}

template <typename T, bool ATAN>
__attribute__((always_inline)) inline T surrogate(T u, T alpha) {  // dS/dH at H - V_th = u
  if (ATAN) {
    const T k = T(M_PI / 2.0) * alpha * u;
    return (alpha / T(2)) / (T(1) + k * k);
  }
  const T sig = T(1) / (T(1) + vexp(-(alpha * u)));
  return alpha * sig * (T(1) - sig);
}

// Neurons [begin, end) of x [steps, n], in blocks whose membranes stay in L1 while all steps run over them.
// SAVE_H: also write H (what backward needs); inference skips it.
template <typename T, bool HARD, bool DECAY, bool INTEGRATE, bool SAVE_H>
void forward_range(const T* __restrict__ x, T* __restrict__ s, T* __restrict__ h, int64_t steps, int64_t n,
                   int64_t begin, int64_t end, const Params& p) {
  const T tau = T(p.tau), v_th = T(p.v_th), v_reset = T(p.v_reset);
  const T base = HARD ? v_reset : T(0);
  T v[kBlock];
  for (int64_t lo = begin; lo < end; lo += kBlock) {
    const int64_t len = end - lo < kBlock ? end - lo : kBlock;
    for (int64_t i = 0; i < len; ++i) v[i] = HARD ? v_reset : T(0);
    for (int64_t t = 0; t < steps; ++t) {
      const T* __restrict__ xt = x + t * n + lo;
      T* __restrict__ st = s + t * n + lo;
      T* __restrict__ ht = SAVE_H ? h + t * n + lo : nullptr;
#pragma GCC ivdep
      for (int64_t i = 0; i < len; ++i) {
        const T vi = v[i];
        T hh;
        if (INTEGRATE) hh = vi + xt[i];
        else if (DECAY) hh = vi + (xt[i] - (vi - base)) / tau;
        else hh = (vi - (vi - base) / tau) + xt[i];
        const T spike = static_cast<T>((hh - v_th) >= T(0));
        if (SAVE_H) ht[i] = hh;
        st[i] = spike;
        v[i] = HARD ? hh * (T(1) - spike) + v_reset * spike : hh - v_th * spike;
      }
    }
  }
}

// Gradient of the input from the spikes' gradient gs (or one value `g0` for all when GS_SCALAR: the gradient of
// a sum) and H. gx may be h itself (written in place, element by element after it was read): no restrict there.
template <typename T, bool HARD, bool DETACH, bool ATAN, bool GS_SCALAR>
void backward_range(const T* __restrict__ gs, T g0, const T* h, T* gx, int64_t steps, int64_t n, int64_t begin,
                    int64_t end, const Params& p) {
  const T dv = p.integrate ? T(1) : T(1) - T(1) / T(p.tau);  // dH_t / dV_{t-1}
  const T dx = (p.integrate || !p.decay_input) ? T(1) : T(1) / T(p.tau);  // dH_t / dX_t
  const T v_th = T(p.v_th), v_reset = T(p.v_reset), alpha = T(p.alpha);
  T gv[kBlock];  // dL/dV_t, flowing back from step t+1
  for (int64_t lo = begin; lo < end; lo += kBlock) {
    const int64_t len = end - lo < kBlock ? end - lo : kBlock;
    for (int64_t i = 0; i < len; ++i) gv[i] = T(0);
    for (int64_t t = steps - 1; t >= 0; --t) {
      const int64_t off = t * n + lo;
      const T* __restrict__ gst = GS_SCALAR ? nullptr : gs + off;
      const T* ht = h + off;
      T* gxt = gx + off;
#pragma GCC ivdep
      for (int64_t i = 0; i < len; ++i) {
        const T hh = ht[i];
        const T u = hh - v_th;
        const T g_v = gv[i];
        T g_spike = GS_SCALAR ? g0 : gst[i];  // everything that reaches the spike S_t
        T g_h;
        if (HARD) {
          if (!DETACH) g_spike += g_v * (v_reset - hh);
          g_h = g_v * (T(1) - static_cast<T>(u >= T(0)));
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
}

template <typename T>
void forward(const T* x, T* s, T* h, int64_t steps, int64_t n, int64_t begin, int64_t end, const Params& p) {
#define BC_FWD(HARD, DECAY, INTEGRATE)                                                                   \
  (h ? forward_range<T, HARD, DECAY, INTEGRATE, true>(x, s, h, steps, n, begin, end, p)                  \
     : forward_range<T, HARD, DECAY, INTEGRATE, false>(x, s, h, steps, n, begin, end, p))
  if (p.integrate) p.hard ? BC_FWD(true, false, true) : BC_FWD(false, false, true);
  else if (p.decay_input) p.hard ? BC_FWD(true, true, false) : BC_FWD(false, true, false);
  else p.hard ? BC_FWD(true, false, false) : BC_FWD(false, false, false);
#undef BC_FWD
}

template <typename T>
void backward(const T* gs, T g0, const T* h, T* gx, int64_t steps, int64_t n, int64_t begin, int64_t end,
              const Params& p) {
#define BC_BWD(HARD, DETACH, ATAN)                                                                       \
  (gs ? backward_range<T, HARD, DETACH, ATAN, false>(gs, g0, h, gx, steps, n, begin, end, p)             \
      : backward_range<T, HARD, DETACH, ATAN, true>(gs, g0, h, gx, steps, n, begin, end, p))
  if (p.atan) {
    if (p.hard) p.detach_reset ? BC_BWD(true, true, true) : BC_BWD(true, false, true);
    else p.detach_reset ? BC_BWD(false, true, true) : BC_BWD(false, false, true);
  } else {
    if (p.hard) p.detach_reset ? BC_BWD(true, true, false) : BC_BWD(true, false, false);
    else p.detach_reset ? BC_BWD(false, true, false) : BC_BWD(false, false, false);
  }
#undef BC_BWD
}
