// The learnable reversible coupling z = f + a·z2 + b·z1 (nn/coupling_kernel.py) in one pass each way, float32.
// Forward rounds exactly as torch evaluates the expression, ((f + a·z2) + b·z1) with every product and sum rounded
// to float32 (built with -ffp-contract=off: no fused multiply-adds), so z is bit for bit the plain one.
// Backward, from the output gradient g: dz2 = a·g, dz1 = b·g (bit for bit autograd's) and the scalar gradients
// da = Σ g·z2, db = Σ g·z1 summed in float64 (autograd sums the float32 products: equal to float rounding).
#include <torch/extension.h>
#include <vector>

namespace {
void check(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() &&
                  t.sizes() == like.sizes(),
              "coupling: ", name, " must be a contiguous CPU float32 tensor of the output's shape");
}
}  // namespace

torch::Tensor coupling_forward(const torch::Tensor& f, const torch::Tensor& z2, const torch::Tensor& z1, double a,
                               double b) {
  check(f, f, "f");
  check(z2, f, "z2");
  check(z1, f, "z1");
  auto z = torch::empty_like(f);
  const float af = static_cast<float>(a), bf = static_cast<float>(b);
  const float* pf = f.data_ptr<float>();
  const float* p2 = z2.data_ptr<float>();
  const float* p1 = z1.data_ptr<float>();
  float* pz = z.data_ptr<float>();
  const int64_t n = f.numel();
  for (int64_t i = 0; i < n; ++i) {
    const float s = pf[i] + af * p2[i];
    pz[i] = s + bf * p1[i];
  }
  return z;
}

std::vector<torch::Tensor> coupling_backward(const torch::Tensor& g, const torch::Tensor& z2, const torch::Tensor& z1,
                                             double a, double b) {
  check(g, g, "g");
  check(z2, g, "z2");
  check(z1, g, "z1");
  auto d2 = torch::empty_like(g);
  auto d1 = torch::empty_like(g);
  const float af = static_cast<float>(a), bf = static_cast<float>(b);
  const float* pg = g.data_ptr<float>();
  const float* p2 = z2.data_ptr<float>();
  const float* p1 = z1.data_ptr<float>();
  float* q2 = d2.data_ptr<float>();
  float* q1 = d1.data_ptr<float>();
  const int64_t n = g.numel();
  constexpr int kLanes = 8;  // independent float64 partial sums: vectorisable without reassociating one chain
  double sa[kLanes] = {0}, sb[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float gv = pg[i + l];
      q2[i + l] = af * gv;
      q1[i + l] = bf * gv;
      sa[l] += static_cast<double>(gv) * static_cast<double>(p2[i + l]);
      sb[l] += static_cast<double>(gv) * static_cast<double>(p1[i + l]);
    }
  }
  for (; i < n; ++i) {
    const float gv = pg[i];
    q2[i] = af * gv;
    q1[i] = bf * gv;
    sa[0] += static_cast<double>(gv) * static_cast<double>(p2[i]);
    sb[0] += static_cast<double>(gv) * static_cast<double>(p1[i]);
  }
  double ta = 0, tb = 0;
  for (int l = 0; l < kLanes; ++l) {
    ta += sa[l];
    tb += sb[l];
  }
  auto opts = g.options();
  return {d2, d1, torch::full({}, ta, opts), torch::full({}, tb, opts)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("coupling_forward", &coupling_forward, "z = (f + a*z2) + b*z1, float32 rounding as torch's");
  m.def("coupling_backward", &coupling_backward, "(a*g, b*g, sum g*z2, sum g*z1)");
}
