// Helpers of nn/int_forward.py. spikes_to_u8: a float32 tensor of spikes (every element +0.0 or 1.0, by bits) as
// uint8 in one pass; it returns the uint8 copy, or an empty tensor as soon as a block holds any other value (a
// real-valued stream, -0.0, NaN, an integer count above 1), so a refused input costs at most one block beyond
// the first bad one. nhwc_to_nchw: a channels-last float32 [N, C, H, W] copied to contiguous memory by 32x32
// tiles (torch's copy_ of that layout was as slow as the int8 convolution that produced it); a copy, so the
// values are the same bits.
#include <torch/extension.h>
#include <cstdint>
#include <cstring>

namespace {
constexpr int64_t kBlock = 1 << 14;
constexpr uint32_t kOne = 0x3F800000u;  // float32 1.0 as bits
}  // namespace

torch::Tensor spikes_to_u8(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "spikes_to_u8: a contiguous CPU float32 tensor is needed");
  auto out = torch::empty(x.sizes(), x.options().dtype(torch::kUInt8));
  const int64_t n = x.numel();
  const uint32_t* src = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    uint32_t bad = 0;
    for (int64_t i = b; i < e; ++i) {
      const uint32_t v = src[i];
      bad |= (v != 0u) & (v != kOne);
      dst[i] = static_cast<uint8_t>(v != 0u);
    }
    if (bad) return torch::empty({0}, x.options().dtype(torch::kUInt8));
  }
  return out;
}

torch::Tensor nhwc_to_nchw(const torch::Tensor& y) {
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == torch::kFloat32 && y.dim() == 4 &&
                  y.is_contiguous(at::MemoryFormat::ChannelsLast),
              "nhwc_to_nchw: a channels-last 4-d CPU float32 tensor is needed");
  const int64_t n = y.size(0), c = y.size(1), hw = y.size(2) * y.size(3);
  auto out = torch::empty(y.sizes(), y.options());
  const float* src = y.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  constexpr int64_t kT = 32;
  for (int64_t b = 0; b < n; ++b) {
    const float* s = src + b * hw * c;  // [hw][c]
    float* d = dst + b * hw * c;        // [c][hw]
    for (int64_t p0 = 0; p0 < hw; p0 += kT) {
      const int64_t p1 = std::min(hw, p0 + kT);
      for (int64_t c0 = 0; c0 < c; c0 += kT) {
        const int64_t c1 = std::min(c, c0 + kT);
        for (int64_t ch = c0; ch < c1; ++ch)
          for (int64_t p = p0; p < p1; ++p) d[ch * hw + p] = s[p * c + ch];
      }
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nhwc_to_nchw", &nhwc_to_nchw, "contiguous copy of a channels-last float32 [N, C, H, W]");
  m.def("spikes_to_u8", &spikes_to_u8, "uint8 copy of a float32 0/1 tensor, or an empty tensor if not 0/1");
}
