// Column statistics and the input gradient of a batch norm over the rows of a contiguous [M, C] float tensor
// (nn/fast_norm.py's ChannelLastBatchNorm1d), each in one pass over memory: torch needed a product temporary and
// two reductions for each pair of sums, and two passes for the gradient. Sums are accumulated in double, per
// chunk of rows (one chunk per task of torch's thread pool), and the chunks added in row order.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <mutex>
#include <vector>

namespace {

constexpr int64_t kRows = 512;  // rows per task

template <typename F>
std::vector<torch::Tensor> two_column_sums(int64_t m, int64_t c, F accumulate) {
  const int64_t chunks = (m + kRows - 1) / kRows;
  std::vector<double> part(size_t(chunks) * 2 * c, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      double* s0 = part.data() + size_t(k) * 2 * c;
      accumulate(k * kRows, std::min(m, (k + 1) * kRows), s0, s0 + c);
    }
  });
  auto a = torch::zeros({c}, torch::kFloat64), q = torch::zeros({c}, torch::kFloat64);
  double* pa = a.data_ptr<double>();
  double* pq = q.data_ptr<double>();
  for (int64_t k = 0; k < chunks; ++k) {
    const double* s0 = part.data() + size_t(k) * 2 * c;
    for (int64_t j = 0; j < c; ++j) {
      pa[j] += s0[j];
      pq[j] += s0[c + j];
    }
  }
  return {a, q};
}

void check(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 2 && t.is_contiguous(),
              what, ": a contiguous 2-d CPU float32 tensor is needed");
}

// (sum x, sum x^2) per column, float64.
std::vector<torch::Tensor> bn_stats(torch::Tensor x) {
  check(x, "bn_stats");
  const int64_t m = x.size(0), c = x.size(1);
  const float* px = x.data_ptr<float>();
  return two_column_sums(m, c, [&](int64_t r0, int64_t r1, double* s, double* q) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = px + r * c;
      for (int64_t j = 0; j < c; ++j) {
        const double v = row[j];
        s[j] += v;
        q[j] += v * v;
      }
    }
  });
}

// (sum dy, sum dy * x) per column, float64.
std::vector<torch::Tensor> bn_grad_sums(torch::Tensor dy, torch::Tensor x) {
  check(dy, "bn_grad_sums");
  check(x, "bn_grad_sums");
  TORCH_CHECK(dy.sizes() == x.sizes(), "bn_grad_sums: shapes differ");
  const int64_t m = x.size(0), c = x.size(1);
  const float* pd = dy.data_ptr<float>();
  const float* px = x.data_ptr<float>();
  return two_column_sums(m, c, [&](int64_t r0, int64_t r1, double* s, double* q) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* drow = pd + r * c;
      const float* xrow = px + r * c;
      for (int64_t j = 0; j < c; ++j) {
        const double d = drow[j];
        s[j] += d;
        q[j] += d * double(xrow[j]);
      }
    }
  });
}

// dx = c0 + k * dy - c1 * x per column (float32, the same operations in the same order as torch's
// addcmul(c0, dy, k).addcmul_(x, -c1)).
torch::Tensor bn_dx(torch::Tensor dy, torch::Tensor x, torch::Tensor k, torch::Tensor c0, torch::Tensor c1) {
  check(dy, "bn_dx");
  check(x, "bn_dx");
  const int64_t m = x.size(0), c = x.size(1);
  auto kc = k.contiguous(), c0c = c0.contiguous(), c1n = (-c1).contiguous();
  TORCH_CHECK(kc.numel() == c && c0c.numel() == c && c1n.numel() == c, "bn_dx: one coefficient per column");
  auto dx = torch::empty_like(x);
  const float* pd = dy.data_ptr<float>();
  const float* px = x.data_ptr<float>();
  const float* pk = kc.data_ptr<float>();
  const float* p0 = c0c.data_ptr<float>();
  const float* p1 = c1n.data_ptr<float>();
  float* po = dx.data_ptr<float>();
  at::parallel_for(0, m, kRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* drow = pd + r * c;
      const float* xrow = px + r * c;
      float* orow = po + r * c;
      for (int64_t j = 0; j < c; ++j) {
        const float t = p0[j] + drow[j] * pk[j];
        orow[j] = t + xrow[j] * p1[j];
      }
    }
  });
  return dx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bn_stats", &bn_stats, "(sum x, sum x^2) per column of a contiguous [M, C] float32, as float64");
  m.def("bn_grad_sums", &bn_grad_sums, "(sum dy, sum dy*x) per column, as float64");
  m.def("bn_dx", &bn_dx, "c0 + k*dy - c1*x per column");
}
