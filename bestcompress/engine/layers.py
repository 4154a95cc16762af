"""Engine layers: a binary Conv1d/Conv2d/Linear held as packed sign bits, and the popcount matmul.

Each layer packs its input when the values allow it (spikes, or sums of spikes and ½-couplings: see kernels.py)
and otherwise computes the PyTorch layer's own float op with its ±1 weights unpacked for that call only, so the
engine equals PyTorch on every input; `stats` counts which path each call took.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

# More bit planes than this and the float op is cheaper than the popcounts (measured by bench_engine.py).
MAX_LAYER_PLANES = 12


def _signs_and_scale(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(w > 0 as {0,1}, per-channel α or None for α = 1) when every row of w is α_c·(±1); else None."""
    flat = w.detach().to(torch.float32).flatten(1)
    alpha = flat.abs().amax(1)
    if not bool((flat.abs() == alpha[:, None]).all()):
        return None
    plus = (flat > 0).to(torch.float32).view_as(w)
    return plus, None if bool((alpha == 1).all()) else alpha


class _PackedLayer(nn.Module):
    """Common part: sign bits in words [1, 1, Kw, Npad], optional α, float bias, call statistics."""

    rows_layout = False  # weight_words as rows [1, N, Kw] (convolutions) instead of columns [1, 1, Kw, Npad]

    def _setup(self, plus_rows: torch.Tensor, alpha: torch.Tensor | None, bias: torch.Tensor | None,
               out_features: int, bits: int) -> None:
        packed = kernels.pack_rows(plus_rows)
        words = packed.words if self.rows_layout else kernels.to_columns(packed.words)
        self.register_buffer("weight_words", words, persistent=False)
        self.register_buffer("alpha", alpha, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone(),
                             persistent=False)
        self.out_features = out_features
        self.stats = {"packed": 0, "float": 0}
        self.weight_bits = int(bits)  # the layer's weights, without the padding to whole words
        self.last_planes = 0
        self.last_kernel = "popcount"  # or 'int8' (multi-plane inputs on the CPU's matrix units, kernels.py)

    @property
    def weight_bytes(self) -> int:
        """Bytes the packed weights take in RAM (sign bits in 64-bit words, α and bias in float32)."""
        extra = sum(t.numel() * 4 for t in (self.alpha, self.bias) if t is not None)
        return self.weight_words.numel() * 8 + extra

    def _columns(self) -> torch.Tensor:
        return kernels.to_columns(self.weight_words) if self.rows_layout else self.weight_words

    def _float_weight(self, shape) -> torch.Tensor:
        if self.rows_layout:
            words = self.weight_words[0]
        else:
            words = self.weight_words[0, 0, :, :self.out_features].t().contiguous()  # [N, Kw]
        kw = words.shape[-1]
        bits = (words.unsqueeze(-1) >> torch.arange(64)) & 1  # [N, Kw, 64]
        w = bits.reshape(self.out_features, kw * 64).to(torch.float32) * 2 - 1
        return self._unflatten(w)[:self.out_features].reshape(shape) * (
            1.0 if self.alpha is None else self.alpha.view((-1,) + (1,) * (len(shape) - 1)))

    bn = None  # a folded BatchNorm epilogue (plan.py): (mode, [float32 per-channel tensors])
    bn_transposed = False  # that BatchNorm normalised the output's transpose (Linear -> transpose -> BN1d)

    _prep = None  # (the tensors the kernel arguments were read from, the arguments): see _linear_args

    def _linear_args(self) -> tuple:
        """The weight-side kernel arguments (addresses), read once and again only when a tensor was replaced
        (module.to(), fold_bn): a call then skips the per-argument Python work."""
        b, p = self._buffers, self._prep
        if (p is None or p[0] is not b["weight_words"] or p[1] is not b["alpha"] or p[2] is not b["bias"]
                or p[3] is not self.bn):
            args = kernels.linear_args(b["weight_words"], self.out_features, b["alpha"], b["bias"], self.bn)
            p = self._prep = (b["weight_words"], b["alpha"], b["bias"], self.bn, args)
        return p[4]

    def __getstate__(self):  # a copy (deepcopy, pickle) reads its own tensors' addresses again
        state = super().__getstate__()
        state.pop("_prep", None)
        return state

    def fold_bn(self, mode: int, params: list[torch.Tensor]) -> None:
        """Apply a BatchNorm to this layer's outputs in the kernel's epilogue (plan.py checks it is exact)."""
        for i, t in enumerate(params):
            self.register_buffer(f"bn_{i}", t.detach().to(torch.float32).contiguous().clone(), persistent=False)
        self.bn = (mode, [getattr(self, f"bn_{i}") for i in range(len(params))])

    def _float_tail(self, y: torch.Tensor, channel_axis: int) -> torch.Tensor:
        return kernels.apply_bn(y, self.bn, channel_axis) if self.bn is not None else y

    def _product(self, a: kernels.Packed) -> torch.Tensor:
        return kernels.gemm(a, self._columns(), self.out_features, alpha=self.alpha, bias=self.bias, bn=self.bn)[0]


class PackedLinear(_PackedLayer):
    """y = x·Wᵀ + b with W ∈ {±α_c}, popcounts when x packs."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        split = _signs_and_scale(layer.binary_weight())
        if split is None:
            raise ValueError("weights are not ±α per output channel")
        self.in_features = layer.in_features
        self._setup(split[0], split[1], layer.bias, layer.out_features, layer.weight.numel())

    def _unflatten(self, w: torch.Tensor) -> torch.Tensor:
        return w[:, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and kernels._state["backend"] == "compiled":
            done = kernels.linear_prepared(x, self._linear_args(), MAX_LAYER_PLANES)
            if done is not None:
                self.stats["packed"] += 1
                # plain attributes written to the instance dict: nn.Module.__setattr__'s checks cost ~1 us each
                d = self.__dict__
                d["last_planes"], d["last_kernel"] = done[1], done[2]
                return done[0]
        lead = x.shape[:-1]
        self.last_kernel = "popcount"
        packed = kernels.pack_rows(x.reshape(-1, self.in_features), MAX_LAYER_PLANES)
        if packed is None:
            self.stats["float"] += 1
            y = F.linear(x, self._float_weight((self.out_features, self.in_features)), self.bias)
            return self._float_tail(y, -1)
        self.stats["packed"] += 1
        self.last_planes = packed.planes
        return self._product(packed).view(lead + (self.out_features,))


class PackedConv(_PackedLayer):
    """Conv1d/Conv2d (zero padding, groups = 1) with W ∈ {±α_c}: bit im2col over channel-packed pixels."""

    rows_layout = True

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError("only groups=1, zero padding with explicit sizes")
        split = _signs_and_scale(layer.binary_weight())
        if split is None:
            raise ValueError("weights are not ±α per output channel")
        w = split[0]
        self.dims = w.dim() - 2
        w4 = w if self.dims == 2 else w.unsqueeze(2)  # [Cout, Cin, kh, kw]
        cout, cin, kh, kw = w4.shape
        self.in_channels, self.kernel = cin, (kh, kw)
        two = (lambda v: (1,) + tuple(v)) if self.dims == 1 else tuple
        self.stride, self.padding, self.dilation = two(layer.stride), two(layer.padding), two(layer.dilation)
        if self.dims == 1:
            self.padding = (0,) + self.padding[1:]
        self.cw = kernels.words_for(cin)
        rows = torch.zeros((cout, kh, kw, self.cw * 64))
        rows[..., :cin] = w4.permute(0, 2, 3, 1)
        self._shape = tuple(layer.weight.shape)
        self._setup(rows.reshape(cout, kh * kw * self.cw * 64), split[1], layer.bias, cout, layer.weight.numel())
        self._torch_args = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)

    def _unflatten(self, w: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel
        w = w.view(-1, kh, kw, self.cw * 64)[..., :self.in_channels].permute(0, 3, 1, 2)
        return w if self.dims == 2 else w[:, :, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x4 = x if self.dims == 2 else x.unsqueeze(2)
        if kernels.backend() == "compiled" and x4.dtype == torch.float32:
            done = kernels.conv_nchw(x4, self.weight_words, self.out_features, self.kernel, self.stride,
                                     self.padding, self.dilation, self.alpha, self.bias, MAX_LAYER_PLANES, self.bn)
            if done is not None:
                self.stats["packed"] += 1
                y, self.last_planes, self.last_kernel = done
                return y if self.dims == 2 else y[:, :, 0]
        self.last_kernel = "popcount"
        n, c, h, w = x4.shape
        pixels = kernels.pack_rows(x4.permute(0, 2, 3, 1).reshape(n * h * w, c), MAX_LAYER_PLANES)
        if pixels is None:
            self.stats["float"] += 1
            conv = F.conv2d if self.dims == 2 else F.conv1d
            return self._float_tail(conv(x, self._float_weight(self._shape), self.bias, **self._torch_args), 1)
        self.stats["packed"] += 1
        self.last_planes = pixels.planes
        if self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0):
            patches, ho, wo = pixels, h, w
        else:
            patches, ho, wo = kernels.im2col(pixels, n, h, w, self.kernel, self.stride, self.padding, self.dilation)
        y = self._product(patches).view(n, ho, wo, self.out_features).permute(0, 3, 1, 2).contiguous()
        return y if self.dims == 2 else y[:, :, 0]


MATMUL_STATS = {"packed": 0, "float": 0}


def popcount_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b by popcounts when both operands pack (spike × spike attention), else torch.matmul."""
    if (a.dim() < 2 or b.dim() < 2 or a.shape[:-2] != b.shape[:-2] or a.dtype != torch.float32
            or b.dtype != torch.float32 or a.requires_grad or b.requires_grad):
        MATMUL_STATS["float"] += 1
        return torch.matmul(a, b)
    lead, (m, k), n = a.shape[:-2], a.shape[-2:], b.shape[-1]
    batch = int(torch.Size(lead).numel())
    pa = kernels.pack_rows(a.reshape(batch * m, k), MAX_LAYER_PLANES)
    pb = None if pa is None else kernels.pack_rows(b.transpose(-1, -2).reshape(batch * n, k), MAX_LAYER_PLANES)
    if pa is None or pb is None or pa.planes * pb.planes > MAX_LAYER_PLANES:
        MATMUL_STATS["float"] += 1
        return torch.matmul(a, b)
    MATMUL_STATS["packed"] += 1
    cols = kernels.to_columns(pb.words, batch)
    out = kernels.gemm(pa, cols, n, batch=batch, b_planes=pb.planes, b_lsb=pb.lsb, weights=False)
    return out.view(lead + (m, n))
