"""Small spiking transformers written here in the style of public code, one per residual topology the couplings
must handle (not copies of public code): time-first [T, B, N, D] tensors, Linear+LIF sub-blocks.

- Hierarchical: QKFormer-like; stage 1 token attention (a Hadamard mask, no matmul), a patch-merging downsample,
  stage 2 Q·Kᵀ attention; optional auxiliary logits from stage 1 (returned after the main logits).
- TwoHeaded: the public BESTformer habit: `head` on the last attention stream, `head2` on the last MLP stream,
  their mean in eval.
- TrainingAux: Hierarchical with auxiliary logits in training only.
- LogitsAndNone: Spike-driven Transformer v1's habit of returning `(logits, None)`.
"""
import torch
from torch import nn

from bestcompress.nn.lif import LIF


def _lif(v=1.0):
    return LIF(tau=2.0, v_threshold=v, v_reset=0.0, decay_input=True, detach_reset=True)


class TokenAttention(nn.Module):
    """Token attention without matmul: q masked by a spike of the column sums of k."""

    def __init__(self, d):
        super().__init__()
        self.q_linear, self.k_linear, self.proj_linear = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.q_lif, self.k_lif, self.mask_lif, self.proj_lif = _lif(), _lif(), _lif(0.5), _lif()

    def forward(self, x):
        q = self.q_lif(self.q_linear(x))
        k = self.k_lif(self.k_linear(x))
        mask = self.mask_lif(k.sum(dim=-2, keepdim=True))
        return self.proj_lif(self.proj_linear(q * mask))


class SpikingSelfAttention(nn.Module):
    """Spikformer-style: LIF(q), LIF(k), LIF(v), (q @ kᵀ)·0.125 @ v, LIF_0.5, projection."""

    def __init__(self, d):
        super().__init__()
        self.q_linear, self.k_linear, self.v_linear = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj_linear = nn.Linear(d, d)
        self.q_lif, self.k_lif, self.v_lif, self.attn_lif, self.proj_lif = _lif(), _lif(), _lif(), _lif(0.5), _lif()

    def forward(self, x):
        q, k, v = self.q_lif(self.q_linear(x)), self.k_lif(self.k_linear(x)), self.v_lif(self.v_linear(x))
        y = self.attn_lif((q @ k.transpose(-2, -1)) * 0.125 @ v)
        return self.proj_lif(self.proj_linear(y))


class MLP(nn.Module):
    def __init__(self, d, hidden=None):
        super().__init__()
        hidden = hidden or 2 * d
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.lif1, self.lif2 = _lif(), _lif()

    def forward(self, x):
        return self.lif2(self.fc2(self.lif1(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, d, attn=SpikingSelfAttention):
        super().__init__()
        self.attn, self.mlp = attn(d), MLP(d)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class PatchMerge(nn.Module):
    """Halve the tokens: neighbouring pairs concatenated, Linear(2·D -> D2), LIF."""

    def __init__(self, d, d2):
        super().__init__()
        self.reduction, self.lif = nn.Linear(2 * d, d2), _lif()

    def forward(self, x):
        T, B, N, D = x.shape
        return self.lif(self.reduction(x.reshape(T, B, N // 2, 2 * D)))


def _time_first(x, T):
    return x.unsqueeze(0).repeat(T, 1, 1, 1)


class Hierarchical(nn.Module):
    """[B, N, C] -> logits; two stages separated by downsampling (QKFormer-like)."""

    def __init__(self, c=3, d1=8, d2=16, depths=(1, 2), classes=4, T=2, aux=False):
        super().__init__()
        self.T, self.aux = T, aux
        self.embed, self.embed_lif = nn.Linear(c, d1), _lif()
        self.stage1 = nn.ModuleList([Block(d1, TokenAttention) for _ in range(depths[0])])
        self.down = PatchMerge(d1, d2)
        self.stage2 = nn.ModuleList([Block(d2) for _ in range(depths[1])])
        self.head = nn.Linear(d2, classes)
        if aux:
            self.aux_head = nn.Linear(d1, classes)

    def forward(self, x):
        x = self.embed_lif(self.embed(_time_first(x, self.T)))
        for blk in self.stage1:
            x = blk(x)
        early = x
        x = self.down(x)
        for blk in self.stage2:
            x = blk(x)
        logits = self.head(x.mean(2).mean(0))
        if self.aux:
            return logits, self.aux_head(early.mean(2).mean(0))
        return logits


class TrainingAux(Hierarchical):
    """Hierarchical with its stage-1 auxiliary logits returned in training only (`if self.training: return
    logits, aux`), as knowledge-distillation and deep-supervision code does."""

    def __init__(self, **kw):
        super().__init__(aux=True, **kw)

    def forward(self, x):
        logits, aux = super().forward(x)
        if self.training:
            return logits, aux
        return logits


class TwoHeaded(nn.Module):
    """A model that already has coupled streams and two heads (the public BESTformer habit): x2 = A(x1) + (x0 + x1)/2,
    x3 = M(x2) + (x1 + x2)/2; head on the last attention stream, head2 on the last MLP stream, (head, head2) in
    training and their mean in eval."""

    def __init__(self, c=3, d=8, depth=2, classes=4, T=2):
        super().__init__()
        self.T = T
        self.embed, self.embed_lif = nn.Linear(c, d), _lif()
        self.attn = nn.ModuleList([SpikingSelfAttention(d) for _ in range(depth)])
        self.mlp = nn.ModuleList([MLP(d) for _ in range(depth)])
        self.head, self.head2 = nn.Linear(d, classes), nn.Linear(d, classes)

    def forward(self, x):
        x0, x1 = None, self.embed_lif(self.embed(_time_first(x, self.T)))
        for attn, mlp in zip(self.attn, self.mlp):
            x2 = attn(x1) + (x1 if x0 is None else (x0 + x1) / 2)
            x3 = mlp(x2) + (x1 + x2) / 2
            x0, x1 = x2, x3
        h, h2 = self.head(x0.mean(2).mean(0)), self.head2(x1.mean(2).mean(0))
        if self.training:
            return h, h2
        return (h + h2) / 2


class LogitsAndNone(nn.Module):
    """Returns (logits, None), as Spike-driven Transformer v1 does."""

    def __init__(self, c=3, d=8, depth=2, classes=4, T=2):
        super().__init__()
        self.T = T
        self.embed, self.embed_lif = nn.Linear(c, d), _lif()
        self.block = nn.ModuleList([Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed_lif(self.embed(_time_first(x, self.T)))
        for blk in self.block:
            x = blk(x)
        return self.head(x.mean(2).mean(0)), None


def example(batch=3, n=8, c=3, seed=0, dtype=torch.float32):
    """A seeded input [B, N, C] that makes the small models above fire."""
    return 2 * torch.rand(batch, n, c, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------ models that need the tracer's fallbacks
# Written here in the style of public code (issue 10): more than 32 untraceable submodules (Meta-SpikeFormer's
# BNAndPadLayer habit), a forward that branches on the input's rank (Spike-driven Transformer v1), a root forward
# fx cannot trace at all. Attention is multi-head ([T, B, heads, N, d]) as in the public models.

class MultiHeadSSA(nn.Module):
    """Spikformer-style multi-head spiking self-attention on [T, B, N, D]."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.q_linear, self.k_linear, self.v_linear = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj_linear = nn.Linear(d, d)
        self.q_lif, self.k_lif, self.v_lif, self.attn_lif, self.proj_lif = _lif(), _lif(), _lif(), _lif(0.5), _lif()

    def _split(self, x):
        T, B, N, D = x.shape
        return x.reshape(T, B, N, self.heads, D // self.heads).permute(0, 1, 3, 2, 4)

    def forward(self, x):
        T, B, N, D = x.shape
        q = self._split(self.q_lif(self.q_linear(x)))
        k = self._split(self.k_lif(self.k_linear(x)))
        v = self._split(self.v_lif(self.v_linear(x)))
        y = (q @ k.transpose(-2, -1)) * 0.125 @ v
        y = self.attn_lif(y.permute(0, 1, 3, 2, 4).reshape(T, B, N, D))
        return self.proj_lif(self.proj_linear(y))


class BNAndPad(nn.Module):
    """BatchNorm, then a border of `pad` pixels filled with the value BatchNorm gives a zero input, written by
    slice assignment (which torch.fx cannot trace)."""

    def __init__(self, channels, pad=1):
        super().__init__()
        self.bn, self.pad = nn.BatchNorm2d(channels), pad

    def forward(self, x):
        border = self.bn.bias - self.bn.running_mean * self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        B, C, H, W = x.shape
        p = self.pad
        out = border.view(1, C, 1, 1).expand(B, C, H + 2 * p, W + 2 * p).clone()
        out[:, :, p:-p, p:-p] = self.bn(x)
        return out


class PadPool(nn.Module):
    """BNAndPad, then a 3x3 average without padding: the spatial size is kept."""

    def __init__(self, channels):
        super().__init__()
        self.pad = BNAndPad(channels)

    def forward(self, x):
        return nn.functional.avg_pool2d(self.pad(x), 3, stride=1)


class ManyPads(nn.Module):
    """[B, C, H, W] -> logits; a spiking conv stem whose `units` parallel PadPool branches (more than 32
    untraceable BNAndPad modules; re-parameterisable multi-branch convs) are averaged, then tokens [T, B, H·W, D]
    through multi-head attention blocks."""

    def __init__(self, c=2, d=8, units=34, depth=1, classes=4, T=2):
        super().__init__()
        self.T = T
        self.stem, self.stem_lif = nn.Conv2d(c, d, 3, padding=1), _lif()
        self.units = nn.ModuleList([PadPool(d) for _ in range(units)])
        self.units_lif = _lif(0.5)
        self.block = nn.ModuleList([Block(d, MultiHeadSSA) for _ in range(depth)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.stem_lif(self.stem(x).unsqueeze(0).repeat(self.T, 1, 1, 1, 1))
        flat = x.flatten(0, 1)
        x = self.units_lif(torch.stack([unit(flat) for unit in self.units]).mean(0).reshape(x.shape))
        x = x.flatten(3).transpose(-2, -1)  # [T, B, H·W, D]
        for blk in self.block:
            x = blk(x)
        return self.head(x.mean(2).mean(0))


class RankBranching(nn.Module):
    """Spike-driven Transformer v1's habit: the forward branches on the input's rank (`len(x.shape) < 5`: a static
    input is repeated over T steps) and returns (logits, None)."""

    def __init__(self, c=3, d=8, depth=2, classes=4, T=2):
        super().__init__()
        self.T = T
        self.embed, self.embed_lif = nn.Linear(c, d), _lif()
        self.block = nn.ModuleList([Block(d, MultiHeadSSA) for _ in range(depth)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        if len(x.shape) < 4:  # [B, N, C]: a static input
            x = x.unsqueeze(0).repeat(self.T, 1, 1, 1)
        x = self.embed_lif(self.embed(x))
        for blk in self.block:
            x = blk(x)
        return self.head(x.mean(2).mean(0)), None


class SlotTokens(nn.Module):
    """A root forward torch.fx cannot trace at all: the embedded tokens are written into a zero tensor with one
    register slot in front by slice assignment (`x[:, :, 1:] = e`), so no leaf can stand in for the failing
    code; torch.export (strict=False) captures it."""

    def __init__(self, c=3, d=8, depth=2, classes=4, T=2):
        super().__init__()
        self.T = T
        self.embed, self.embed_lif = nn.Linear(c, d), _lif()
        self.block = nn.ModuleList([Block(d, MultiHeadSSA) for _ in range(depth)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        e = self.embed_lif(self.embed(_time_first(x, self.T)))
        T, B, N, D = e.shape
        x = e.new_zeros(T, B, N + 1, D)
        x[:, :, 1:] = e
        for blk in self.block:
            x = blk(x)
        return self.head(x[:, :, 1:].mean(2).mean(0))


# ------------------------------------------------------------------ models that already carry coupled streams
# Written here in the style of public code (issue 9 item 2): a single head, but the blocks already pass two
# streams to each other, so the couplings pass must recognise them and leave the model alone.

class RevBlock(nn.Module):
    """RevViT's reversible block (F attention, G MLP) on the stream pair (X_1, X_2):
    Y_1 = X_1 + F(X_2), Y_2 = X_2 + G(Y_1); X_1 = (Y_1 − F(X_2)) is recovered from the outputs alone."""

    def __init__(self, d):
        super().__init__()
        self.F, self.G = SpikingSelfAttention(d), MLP(d)

    def forward(self, X_1, X_2):
        f_X_2 = self.F(X_2)
        Y_1 = X_1 + f_X_2
        g_Y_1 = self.G(Y_1)
        Y_2 = X_2 + g_Y_1
        return Y_1, Y_2


class RevViT(nn.Module):
    """[B, N, C] -> logits; RevViT style: the tokens doubled into two streams (`cat([x, x])`, `chunk`), passed as
    pairs through reversible blocks, fused by their mean (two-stream fusion 'avg') before one head."""

    def __init__(self, c=3, d=8, depth=2, classes=4, T=2):
        super().__init__()
        self.T = T
        self.embed, self.embed_lif = nn.Linear(c, d), _lif()
        self.rev_blocks = nn.ModuleList([RevBlock(d) for _ in range(depth)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed_lif(self.embed(_time_first(x, self.T)))
        x = torch.cat([x, x], dim=-1)
        X_1, X_2 = torch.chunk(x, 2, dim=-1)
        for blk in self.rev_blocks:
            X_1, X_2 = blk(X_1, X_2)
        x = (X_1 + X_2) / 2
        return self.head(x.mean(2).mean(0))


class TwoStreamBlock(nn.Module):
    """The public BESTformer block on the stream pair (x0, x1): x2 = A(x1) + (x0 + x1)/2, x3 = M(x2) + (x1 + x2)/2
    (x0 None in the first block: a plain residual); returns the next pair (x2, x3)."""

    def __init__(self, d):
        super().__init__()
        self.attn, self.mlp = SpikingSelfAttention(d), MLP(d)

    def forward(self, x0, x1):
        x2 = self.attn(x1) + (x1 if x0 is None else (x0 + x1) / 2)
        x3 = self.mlp(x2) + (x1 + x2) / 2
        return x2, x3


class TwoStreamOneHead(nn.Module):
    """[B, N, C] -> logits; BESTformer-style coupled streams passed as pairs between blocks, one head on the last
    (MLP) stream."""

    def __init__(self, c=3, d=8, depth=2, classes=4, T=2):
        super().__init__()
        self.T = T
        self.embed, self.embed_lif = nn.Linear(c, d), _lif()
        self.block = nn.ModuleList([TwoStreamBlock(d) for _ in range(depth)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x0, x1 = None, self.embed_lif(self.embed(_time_first(x, self.T)))
        for blk in self.block:
            x0, x1 = blk(x0, x1)
        return self.head(x1.mean(2).mean(0))


def loud(model, gain=4.0, shift=1.0):
    """Scale every Linear of a freshly built model above (weight × gain, bias + shift) so that its neurons fire on
    `example()` (a fresh one is silent: every sub-block would output 0 and equal-output checks would be vacuous)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(gain)
                m.bias.add_(shift)
    return model
