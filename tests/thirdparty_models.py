"""Small spiking transformers written the way spikingjelly and snntorch users write them (for the tests).

- `SJSpikformer`: Spikformer-CIFAR-like, spikingjelly multi-step neurons (LIFNode step_mode='m', one
  ParametricLIFNode, IFNode in the MLP), time-first [T, B, ...] inside, Q·Kᵀ·V spiking self-attention.
  spikingjelly neurons keep their membrane between calls: call `functional.reset_net(model)` before each run.
- `SnnTorchSpikformer`: snntorch style: the root loops over the time steps of a batch-first [B, T, C, L] input
  (`for t in range(x.size(1))`), single-step `snn.Leaky` neurons with explicit membranes (`init_leaky()` at the
  start of forward) and one `init_hidden=True` neuron reset by its block; the attention checks `x.dim()` (both
  shape branches are specialised on the example input by the tracer).
- `SnnTorchTimeLoopTransformer`, `SnnTorchHiddenNet`: snntorch's tutorial styles (init_hidden=False with an
  explicit loop over `num_steps`; init_hidden=True with `utils.reset(self)` in forward).
- `NorseStyleNet`: norse's calling style (`z, state = cell(x, state)`), with a stand-in cell.

Both import their library lazily: tests call `pytest.importorskip` first.
"""
from __future__ import annotations

import torch
from torch import nn


# ------------------------------------------------------------------------------------------------ spikingjelly

def _sj_lif(v_threshold: float = 1.0):
    from spikingjelly.activation_based import neuron
    return neuron.LIFNode(tau=2.0, v_threshold=v_threshold, detach_reset=True, step_mode="m")


class SJTokenizer(nn.Module):
    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        from spikingjelly.activation_based import neuron
        self.proj_conv = nn.Conv2d(in_channels, dim // 2, 3, padding=1, bias=False)
        self.proj_bn = nn.BatchNorm2d(dim // 2)
        self.proj_lif = neuron.ParametricLIFNode(init_tau=2.0, detach_reset=True, step_mode="m")
        self.proj_conv1 = nn.Conv2d(dim // 2, dim, 3, padding=1, bias=False)
        self.proj_bn1 = nn.BatchNorm2d(dim)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.rpe_lif = _sj_lif()
        self.rpe_conv = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(dim)

    def forward(self, x):  # [T, B, C, H, W] -> [T, B, N, D]
        T, B, C, H, W = x.shape
        x = self.proj_bn(self.proj_conv(x.flatten(0, 1)))
        x = self.proj_lif(x.reshape(T, B, -1, H, W))
        x = self.maxpool(self.proj_bn1(self.proj_conv1(x.flatten(0, 1))))
        _, D, H2, W2 = x.shape
        x = x.reshape(T, B, D, H2, W2)
        feat = x
        x = self.rpe_bn(self.rpe_conv(self.rpe_lif(x).flatten(0, 1))).reshape(T, B, D, H2, W2)
        x = x + feat
        return x.flatten(3).transpose(-1, -2)


class SJSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 0.125
        for name in ("q", "k", "v"):
            setattr(self, f"{name}_linear", nn.Linear(dim, dim))
            setattr(self, f"{name}_bn", nn.BatchNorm1d(dim))
            setattr(self, f"{name}_lif", _sj_lif())
        self.attn_lif = _sj_lif(v_threshold=0.5)
        self.proj_linear = nn.Linear(dim, dim)
        self.proj_bn = nn.BatchNorm1d(dim)
        self.proj_lif = _sj_lif()

    def _branch(self, x, name: str):
        T, B, N, D = x.shape
        y = getattr(self, f"{name}_linear")(x.flatten(0, 1))
        y = getattr(self, f"{name}_bn")(y.transpose(-1, -2)).transpose(-1, -2).reshape(T, B, N, D).contiguous()
        y = getattr(self, f"{name}_lif")(y)
        return y.reshape(T, B, N, self.heads, D // self.heads).permute(0, 1, 3, 2, 4).contiguous()

    def forward(self, x):  # [T, B, N, D]
        T, B, N, D = x.shape
        q, k, v = self._branch(x, "q"), self._branch(x, "k"), self._branch(x, "v")
        attn = (q @ k.transpose(-2, -1)) * self.scale
        y = (attn @ v).transpose(2, 3).reshape(T, B, N, D).contiguous()
        y = self.attn_lif(y)
        y = self.proj_bn(self.proj_linear(y.flatten(0, 1)).transpose(-1, -2)).transpose(-1, -2)
        return self.proj_lif(y.reshape(T, B, N, D))


class SJMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        from spikingjelly.activation_based import neuron
        self.fc1_linear = nn.Linear(dim, hidden)
        self.fc1_bn = nn.BatchNorm1d(hidden)
        self.fc1_lif = _sj_lif()
        self.fc2_linear = nn.Linear(hidden, dim)
        self.fc2_bn = nn.BatchNorm1d(dim)
        self.fc2_lif = neuron.IFNode(detach_reset=True, step_mode="m")

    def forward(self, x):
        T, B, N, D = x.shape
        y = self.fc1_bn(self.fc1_linear(x.flatten(0, 1)).transpose(-1, -2)).transpose(-1, -2)
        y = self.fc1_lif(y.reshape(T, B, N, -1))
        y = self.fc2_bn(self.fc2_linear(y.flatten(0, 1)).transpose(-1, -2)).transpose(-1, -2)
        return self.fc2_lif(y.reshape(T, B, N, D))


class SJBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.attn = SJSelfAttention(dim, heads)
        self.mlp = SJMLP(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class SJSpikformer(nn.Module):
    """Spikformer-like classifier built from spikingjelly neurons; input [B, C, H, W] (static image)."""

    def __init__(self, in_channels: int = 3, img_size: int = 8, dim: int = 16, heads: int = 2, depth: int = 1,
                 mlp_ratio: int = 2, num_classes: int = 5, T: int = 2) -> None:
        super().__init__()
        self.T = T
        self.input_shape = (in_channels, img_size, img_size)
        self.patch_embed = SJTokenizer(in_channels, dim)
        self.block = nn.ModuleList(SJBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        x = self.patch_embed(x)
        for blk in self.block:
            x = blk(x)
        return self.head(x.mean(2)).mean(0)


# ---------------------------------------------------------------------------------------------------- snntorch

class SnnSelfAttention(nn.Module):
    """One time step of spiking self-attention; membranes are passed in and returned (snntorch style)."""

    def __init__(self, dim: int, heads: int, beta: float) -> None:
        super().__init__()
        import snntorch as snn
        self.heads = heads
        self.scale = 0.125
        self.q_linear, self.k_linear, self.v_linear = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_lif, self.k_lif, self.v_lif = snn.Leaky(beta=beta), snn.Leaky(beta=beta), snn.Leaky(beta=beta)
        self.attn_lif = snn.Leaky(beta=beta, threshold=0.5)
        self.proj_linear = nn.Linear(dim, dim)

    def init_mems(self):
        return (self.q_lif.init_leaky(), self.k_lif.init_leaky(), self.v_lif.init_leaky(),
                self.attn_lif.init_leaky())

    def forward(self, x, mems):
        if x.dim() == 2:  # one unbatched sample
            x = x.unsqueeze(0)
        B, N, D = x.shape
        q, mq = self.q_lif(self.q_linear(x), mems[0])
        k, mk = self.k_lif(self.k_linear(x), mems[1])
        v, mv = self.v_lif(self.v_linear(x), mems[2])
        q = q.reshape(B, N, self.heads, D // self.heads).transpose(1, 2)
        k = k.reshape(B, N, self.heads, D // self.heads).transpose(1, 2)
        v = v.reshape(B, N, self.heads, D // self.heads).transpose(1, 2)
        attn = q @ k.transpose(-2, -1) * self.scale
        y = (attn @ v).transpose(1, 2).reshape(B, N, D)
        y, ma = self.attn_lif(y, mems[3])
        return self.proj_linear(y), (mq, mk, mv, ma)


class SnnBlock(nn.Module):
    def __init__(self, dim: int, heads: int, beta: float) -> None:
        super().__init__()
        import snntorch as snn
        self.attn = SnnSelfAttention(dim, heads, beta)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc1_lif = snn.Leaky(beta=beta, init_hidden=True)  # state kept in the neuron, reset in init_mems
        self.fc2 = nn.Linear(2 * dim, dim)

    def init_mems(self):
        self.fc1_lif.reset_mem()
        return self.attn.init_mems()

    def forward(self, x, mems):
        y, mems = self.attn(x, mems)
        x = x + y
        return x + self.fc2(self.fc1_lif(self.fc1(x))), mems


class SnnTorchSpikformer(nn.Module):
    """A spiking transformer in snntorch style; input [B, T, C, L] (T frames of a C-channel sequence)."""

    def __init__(self, in_channels: int = 1, seq_len: int = 8, dim: int = 16, heads: int = 2, depth: int = 1,
                 num_classes: int = 4, num_steps: int = 3, beta: float = 0.8) -> None:
        super().__init__()
        import snntorch as snn
        self.num_steps = num_steps
        self.input_shape = (num_steps, in_channels, seq_len)
        self.embed = nn.Conv1d(in_channels, dim, 3, padding=1)
        self.embed_lif = snn.Leaky(beta=beta)
        self.blocks = nn.ModuleList(SnnBlock(dim, heads, beta) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        mem = self.embed_lif.init_leaky()
        mems = [blk.init_mems() for blk in self.blocks]
        out = 0
        for t in range(x.size(1)):
            s, mem = self.embed_lif(self.embed(x[:, t]), mem)
            h = s.transpose(1, 2)
            for i, blk in enumerate(self.blocks):
                h, mems[i] = blk(h, mems[i])
            out = out + self.head(h.mean(1))
        return out / x.size(1)


# -------------------------------------------------------------------------------------------- softmax attention

class SoftmaxAttentionNet(nn.Module):
    """A tiny ANN-style attention (softmax): binarizing its map must be refused unless softmax=replace."""

    def __init__(self, dim: int = 8, T: int = 2) -> None:
        super().__init__()
        from bestcompress.nn.lif import LIF
        self.T = T
        self.input_shape = (4, dim)
        self.inp = nn.Linear(dim, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.lif = LIF()
        self.head = nn.Linear(dim, 3)

    def forward(self, x):  # [B, N, D]
        x = self.lif(self.inp(x).unsqueeze(0).repeat(self.T, 1, 1, 1))
        attn = torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1), dim=-1)
        return self.head((attn @ self.v(x)).mean(2)).mean(0)


# ------------------------------------------------------------------------------- snntorch, as its tutorials go

class _SnnStepAttention(nn.Module):
    """One time step of a spiking Q·Kᵀ·V attention ([B, N, D]); membranes passed in and returned."""

    def __init__(self, dim: int, heads: int, beta: float) -> None:
        super().__init__()
        import snntorch as snn
        self.heads = heads
        self.q_fc, self.k_fc, self.v_fc = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_lif, self.k_lif, self.v_lif = (snn.Leaky(beta=beta) for _ in range(3))
        self.attn_lif = snn.Leaky(beta=beta, threshold=0.5, reset_mechanism="zero")
        self.out_fc = nn.Linear(dim, dim)

    def forward(self, x, mems):
        B, N, D = x.shape
        q, m0 = self.q_lif(self.q_fc(x), mems[0])
        k, m1 = self.k_lif(self.k_fc(x), mems[1])
        v, m2 = self.v_lif(self.v_fc(x), mems[2])
        q, k, v = (t.reshape(B, N, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = ((q @ k.transpose(-2, -1)) * 0.25 @ v).transpose(1, 2).reshape(B, N, D)
        y, m3 = self.attn_lif(y, mems[3])
        return self.out_fc(y), (m0, m1, m2, m3)


class _SnnStepMLP(nn.Module):
    def __init__(self, dim: int, beta: float) -> None:
        super().__init__()
        import snntorch as snn
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.lif1, self.lif2 = snn.Leaky(beta=beta), snn.Leaky(beta=beta, reset_mechanism="zero")

    def forward(self, x, mems):
        s, m0 = self.lif1(self.fc1(x), mems[0])
        y, m1 = self.lif2(self.fc2(s), mems[1])
        return y, (m0, m1)


class _SnnStepBlock(nn.Module):
    def __init__(self, dim: int, heads: int, beta: float) -> None:
        super().__init__()
        self.attn, self.mlp = _SnnStepAttention(dim, heads, beta), _SnnStepMLP(dim, beta)

    def init_mems(self):
        a = self.attn
        return (tuple(lif.init_leaky() for lif in (a.q_lif, a.k_lif, a.v_lif, a.attn_lif)),
                (self.mlp.lif1.init_leaky(), self.mlp.lif2.init_leaky()))

    def forward(self, x, mems):
        y, a_mems = self.attn(x, mems[0])
        x = x + y
        y, m_mems = self.mlp(x, mems[1])
        return x + y, (a_mems, m_mems)


class SnnTorchTimeLoopTransformer(nn.Module):
    """snntorch's tutorial style: init_hidden=False neurons, membranes made by `init_leaky()` in forward, an
    explicit `for step in range(self.num_steps)` loop over a static input, batch-first inside each step, blocks of
    (spiking Q·Kᵀ·V attention, spiking MLP) with residuals, logits averaged over steps. Input [B, N, F]."""

    def __init__(self, tokens: int = 4, features: int = 8, dim: int = 16, heads: int = 2, depth: int = 2,
                 num_classes: int = 3, num_steps: int = 3, beta: float = 0.8) -> None:
        super().__init__()
        import snntorch as snn
        self.num_steps = num_steps
        self.input_shape = (tokens, features)
        self.embed = nn.Linear(features, dim)
        self.embed_lif = snn.Leaky(beta=beta)
        self.blocks = nn.ModuleList(_SnnStepBlock(dim, heads, beta) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        mem = self.embed_lif.init_leaky()
        mems = [blk.init_mems() for blk in self.blocks]
        out = 0
        for step in range(self.num_steps):
            h, mem = self.embed_lif(self.embed(x), mem)
            for i, blk in enumerate(self.blocks):
                h, mems[i] = blk(h, mems[i])
            out = out + self.head(h.mean(1))
        return out / self.num_steps


class SnnTorchHiddenNet(nn.Module):
    """snntorch with init_hidden=True: the neurons keep their membranes, `utils.reset(self)` starts each forward
    from rest, and the loop runs over the time axis of a [T, B, F] input (`for t in range(x.size(0))`)."""

    def __init__(self, features: int = 8, hidden: int = 12, num_classes: int = 3, T: int = 4,
                 beta: float = 0.7) -> None:
        super().__init__()
        import snntorch as snn
        self.T = T
        self.input_shape = (features,)
        self.fc1 = nn.Linear(features, hidden)
        self.lif1 = snn.Leaky(beta=beta, init_hidden=True)
        self.fc2 = nn.Linear(hidden, hidden)
        self.lif2 = snn.Leaky(beta=beta, init_hidden=True, reset_mechanism="zero")
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):  # [B, F], repeated over T steps
        from snntorch import utils
        utils.reset(self)
        out = 0
        for _ in range(self.T):
            out = out + self.head(self.lif2(self.fc2(self.lif1(self.fc1(x)))))
        return out / self.T


# -------------------------------------------------------------------------------------- norse's calling style

class NorseStyleLIFCell(nn.Module):
    """Stands in for norse.torch.LIFCell (norse is not installed here): `z, state = cell(x, state)`, state None
    at the first step, a (v, i) pair with a synaptic current; it stores nothing itself."""

    __module__ = "norse.torch.module.lif"

    def __init__(self, tau_mem_inv: float = 100.0, tau_syn_inv: float = 200.0, dt: float = 1e-3) -> None:
        super().__init__()
        self.tau_mem_inv, self.tau_syn_inv, self.dt = tau_mem_inv, tau_syn_inv, dt

    def forward(self, x, state=None):
        if state is None:
            v, i = torch.zeros_like(x), torch.zeros_like(x)
        else:
            v, i = state
        v = v + self.dt * self.tau_mem_inv * (i - v)
        i = i - self.dt * self.tau_syn_inv * i + x
        z = (v - 1.0 > 0).to(x.dtype)
        return z, (v * (1 - z), i)


class NorseStyleNet(nn.Module):
    """A norse-style classifier: the model threads each cell's state through its own loop over time."""

    def __init__(self, features: int = 6, hidden: int = 10, num_classes: int = 3, T: int = 5) -> None:
        super().__init__()
        self.T = T
        self.input_shape = (features,)
        self.fc = nn.Linear(features, hidden)
        self.cell = NorseStyleLIFCell()
        self.fc2 = nn.Linear(hidden, hidden)
        self.cell2 = NorseStyleLIFCell()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        state, state2, out = None, None, 0
        for _ in range(self.T):
            z, state = self.cell(self.fc(x) * 20, state)
            z, state2 = self.cell2(self.fc2(z) * 20 + 5, state2)
            out = out + self.head(z)
        return out


# ------------------------------------------------------------ snntorch, init_hidden=True, as a transformer

class _HiddenStepBlock(nn.Module):
    """One time step of a (spiking Q·Kᵀ·V attention, spiking MLP) block whose neurons keep their own membranes
    (snntorch init_hidden=True: each neuron returns its spikes only)."""

    def __init__(self, dim: int, heads: int, beta: float) -> None:
        super().__init__()
        import snntorch as snn
        self.heads = heads
        self.q_fc, self.k_fc, self.v_fc = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_lif, self.k_lif, self.v_lif = (snn.Leaky(beta=beta, init_hidden=True) for _ in range(3))
        self.attn_lif = snn.Leaky(beta=beta, threshold=0.5, init_hidden=True)
        self.out_fc = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.lif1 = snn.Leaky(beta=beta, init_hidden=True)
        self.lif2 = snn.Leaky(beta=beta, init_hidden=True, reset_mechanism="zero")

    def forward(self, x):  # [B, N, D]
        B, N, D = x.shape
        q, k, v = (lif(fc(x)).reshape(B, N, self.heads, D // self.heads).transpose(1, 2)
                   for lif, fc in ((self.q_lif, self.q_fc), (self.k_lif, self.k_fc), (self.v_lif, self.v_fc)))
        y = ((q @ k.transpose(-2, -1)) @ v).transpose(1, 2).reshape(B, N, D) * 0.25
        x = x + self.out_fc(self.attn_lif(y))
        return x + self.lif2(self.fc2(self.lif1(self.fc1(x))))


class SnnTorchHiddenTransformer(nn.Module):
    """A spiking transformer in snntorch's init_hidden=True style: `utils.reset(self)` at the start of forward, an
    explicit `for t in range(self.num_steps)` loop over a static [B, N, F] input, logits summed over steps."""

    def __init__(self, tokens: int = 4, features: int = 8, dim: int = 16, heads: int = 2, depth: int = 2,
                 num_classes: int = 3, num_steps: int = 3, beta: float = 0.8) -> None:
        super().__init__()
        import snntorch as snn
        self.num_steps = num_steps
        self.input_shape = (tokens, features)
        self.embed = nn.Linear(features, dim)
        self.embed_lif = snn.Leaky(beta=beta, init_hidden=True)
        self.blocks = nn.ModuleList(_HiddenStepBlock(dim, heads, beta) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        from snntorch import utils
        utils.reset(self)
        out = 0
        for t in range(self.num_steps):
            h = self.embed_lif(self.embed(x))
            for blk in self.blocks:
                h = blk(h)
            out = out + self.head(h.mean(1))
        return out


class SnnTorchOutputNeuronTransformer(SnnTorchHiddenTransformer):
    """snntorch's tutorial read-out: an output Leaky after the head whose membranes are recorded per step and
    summed (`torch.stack(mem_rec).sum(0)`); the output neuron is init_hidden=True (reset by `utils.reset(self)`)
    or explicit (`init_leaky()`, the membrane threaded through the loop)."""

    def __init__(self, hidden_out: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        import snntorch as snn
        self.hidden_out = hidden_out
        self.lif_out = snn.Leaky(beta=0.9, init_hidden=hidden_out, output=hidden_out)

    def forward(self, x):
        from snntorch import utils
        utils.reset(self)
        mem_out = None if self.hidden_out else self.lif_out.init_leaky()
        mem_rec = []
        for t in range(self.num_steps):
            h = self.embed_lif(self.embed(x))
            for blk in self.blocks:
                h = blk(h)
            if self.hidden_out:
                _, mem_out = self.lif_out(self.head(h.mean(1)))
            else:
                _, mem_out = self.lif_out(self.head(h.mean(1)), mem_out)
            mem_rec.append(mem_out)
        return torch.stack(mem_rec).sum(0)
