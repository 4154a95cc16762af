"""BatchNorm1d over the channel-last token layout, without the layout copies.

Transformer SNNs (Spikformer and kin) normalise a Linear's output `[B, N, C]` with `bn(x.transpose(-1, -2))`:
a `[B, C, N]` view whose channels are the innermost axis. PyTorch's CPU batch norm is slow on that layout (its
backward was the largest item of a binary Spikformer training step, ~3× the time it takes on a contiguous
`[B, C, N]`), and the `transpose(...).reshape(...)` that follows copies the whole output. `ChannelLastBatchNorm1d`
computes the same normalisation on the contiguous `[B·N, C]` memory directly (one var_mean over rows; an
explicit backward) and returns a `[B, C, N]` view of a contiguous `[B, N, C]` result, so the transpose back is
free. The column sums (x and x², then dy and dy·x in backward) and the input gradient are one pass each through
a small compiled kernel (csrc/norm.cpp, built on first use like the LIF kernel; sums in float64), torch ops where it
cannot be built or BESTCOMPRESS_NORM=torch. Same parameters, buffers, running-statistics update (unbiased variance, `momentum`) and state_dict keys
as nn.BatchNorm1d; results equal it up to float reduction order (tests: 1e-5 relative). Any other input, a
graph being traced/exported, `momentum=None` or no affine/running statistics use nn.BatchNorm1d's own forward.
"""
from __future__ import annotations

import torch
from torch import nn

from .extensions import compiled_once

_MAX_MEAN2_OVER_VAR = 1e3  # beyond this E[x²]-E[x]² loses digits: use var_mean (slower on this layout)
_MAX_MEAN2_OVER_VAR_64 = 1e8  # float64 sums (csrc/norm.cpp): their error, ~1e-16 mean², stays far below float32's
#                               resolution of var + eps up to this ratio (a constant column no longer falls back)
_kernel: dict = {}


def _cpp():
    """The compiled column-sum kernels (csrc/norm.cpp: each pair of sums and the gradient in one pass, sums in
    float64), or None where they cannot be built or BESTCOMPRESS_NORM=torch (torch ops then compute the same)."""
    return compiled_once(_kernel, "cpp", "bestcompress_norm", "norm.cpp", "BESTCOMPRESS_NORM",
                         flags=("-O3", "-ffp-contract=off"))


def _fused(x2) -> bool:
    return x2.dtype == torch.float32 and x2.is_contiguous() and x2.device.type == "cpu" and _cpp() is not None


def _stats(x2, eps):
    """(biased variance, mean, centred) per column of a contiguous [M, C]: column sums (fast on this layout) and
    E[x²]-E[x]², or torch.var_mean (centred=True) where a column's mean is so large against its spread that this
    would cancel."""
    m = x2.shape[0]
    if _fused(x2):
        s, q = _cpp().bn_stats(x2)
        mean64 = s / m
        var64 = (q / m - mean64 * mean64).clamp_min(0)
        if bool(((mean64 * mean64) > _MAX_MEAN2_OVER_VAR_64 * (var64 + eps)).any()):
            return (*torch.var_mean(x2, 0, correction=0), True)
        return var64.float(), mean64.float(), False
    mean = x2.sum(0) / m
    var = (x2 * x2).sum(0) / m - mean * mean
    if bool(((mean * mean) > _MAX_MEAN2_OVER_VAR * var.clamp_min(0)).any()):
        return (*torch.var_mean(x2, 0, correction=0), True)
    return var, mean, False


class _BatchNormRows(torch.autograd.Function):
    """Training-mode batch norm of a contiguous [M, C] (statistics over M) with an explicit backward."""

    @staticmethod
    def forward(ctx, x2, weight, bias, eps):
        var, mean, ctx.centred = _stats(x2, eps)
        invstd = torch.rsqrt(var + eps)
        scale = invstd * weight
        y = torch.addcmul(bias - mean * scale, x2, scale)
        ctx.save_for_backward(x2, mean, invstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x2, mean, invstd, weight = ctx.saved_tensors
        m = x2.shape[0]
        dy = dy.contiguous()
        fused = _fused(x2) and dy.dtype == torch.float32
        if fused and not ctx.centred:  # both sums in one pass, in float64
            s, q = _cpp().bn_grad_sums(dy, x2)
            sum_dy, sum_dy_xhat = s.float(), ((q - mean.double() * s) * invstd.double()).float()
        else:
            sum_dy = dy.sum(0)
            if ctx.centred:  # the same cancellation as in _stats: centre first
                sum_dy_xhat = (dy * (x2 - mean)).sum(0) * invstd
            else:
                sum_dy_xhat = ((dy * x2).sum(0) - mean * sum_dy) * invstd
        k = weight * invstd
        c1 = k * invstd * sum_dy_xhat / m
        c0 = c1 * mean - k * sum_dy / m
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _cpp().bn_dx(dy, x2, k, c0, c1) if fused else torch.addcmul(c0, dy, k).addcmul_(x2, -c1)
        return dx, sum_dy_xhat, sum_dy, None


def _fast_layout(bn: nn.BatchNorm1d, x) -> bool:
    return (type(x) is torch.Tensor and x.dim() == 3 and x.shape[1] == bn.num_features and x.is_floating_point()
            and x.shape[0] * x.shape[2] > 1 and x.transpose(1, 2).is_contiguous() and bn.affine
            and bn.track_running_stats and bn.running_mean is not None and bn.momentum is not None
            and x.dtype == bn.weight.dtype and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()
            and not torch.compiler.is_compiling())


class ChannelLastBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d that is fast on `x.transpose(-1, -2)` of a contiguous `[B, N, C]` (see the module doc)."""

    # a checkpoint's structure fingerprint (checkpoint.structure_of) names it as its parent: same state, same
    # numbers, so binary checkpoints saved before binarize installed it still load, and the other way round
    structure_name = "BatchNorm1d"

    def forward(self, x):
        if not _fast_layout(self, x):
            return super().forward(x)
        b, c, n = x.shape
        x2 = x.transpose(1, 2).reshape(b * n, c)  # a view: the memory is [B, N, C]
        if self.training:
            y2, mean, var = _BatchNormRows.apply(x2, self.weight, self.bias, self.eps)
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                mom = self.momentum
                self.running_mean.mul_(1 - mom).add_(mean, alpha=mom)
                self.running_var.mul_(1 - mom).add_(var * (x2.shape[0] / (x2.shape[0] - 1)), alpha=mom)
        else:
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            y2 = torch.addcmul(self.bias - self.running_mean * scale, x2, scale)
        return y2.view(b, n, c).transpose(1, 2)


def use_channel_last_batchnorm(model: nn.Module) -> int:
    """Make every plain nn.BatchNorm1d of `model` a ChannelLastBatchNorm1d in place (same state); the count."""
    count = 0
    for m in model.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = ChannelLastBatchNorm1d
            count += 1
    return count
