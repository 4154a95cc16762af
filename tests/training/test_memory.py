"""train.memory: checkpointed (and reversible) backprop give plain autograd's gradients, recomputed spikes equal the
forward's, neuron state and BatchNorm statistics end as after a plain step, and far fewer bytes are saved."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from bestcompress.convert import binarize
from bestcompress.errors import RecipeError
from bestcompress.nn.lif import LIF
from bestcompress.nn.memory import SavedTally, packed_spikes
from bestcompress.recipe import load_recipe
from bestcompress.training import reversible
from bestcompress.training.memory import MODES, memory_net
from bestcompress.zoo import create_model

SMALL = dict(num_classes=10, img_size=16, embed_dims=32, num_heads=2, depths=2, T=2)


def quiet(*_):
    pass


def _step(net, model, x, y):
    """One training step's gradients (by parameter name) and the loss."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = net(x)
    out = out[0] + out[1] if isinstance(out, tuple) else out
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, float(loss)


def _assert_close(got: dict, want: dict, rel: float = 1e-5) -> None:
    """Each gradient within `rel` of plain autograd's, relative to its largest entry; a gradient that is rounding
    noise (a bias followed by BatchNorm: its true gradient is 0) must stay noise, relative to the model's largest."""
    assert set(got) == set(want)
    top = max(float(v.abs().max()) for v in want.values())
    for k in want:
        own = float(want[k].abs().max())
        err = float((got[k] - want[k]).abs().max())
        assert err <= (rel * own if own > 1e-6 * top else 1e-6 * top), (k, err, own)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    fp = create_model("spikformer_cifar", **SMALL).eval()
    student = binarize(copy.deepcopy(fp), "bestformer", overrides={"reversible.form": "paper"}).model
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(2))
    return fp, student, x, y


@pytest.mark.parametrize("which", ["fp", "student"])
def test_checkpoint_gradients_equal_plain_and_spikes_recompute_equal(models, which):
    fp, student, x, y = models
    model = fp if which == "fp" else student
    plain_model, ckpt_model = copy.deepcopy(model), copy.deepcopy(model)
    want, loss_plain = _step(plain_model, plain_model, x, y)

    calls: list[torch.Tensor] = []
    neurons = [m for m in ckpt_model.modules() if isinstance(m, LIF)]
    handles = [m.register_forward_hook(lambda mod, a, out: calls.append(out.detach().clone())) for m in neurons]
    lines = []
    net = memory_net(ckpt_model, "checkpoint", lines.append)
    assert net.runner is not None and "segments" in lines[0]
    ckpt_model.train()
    ckpt_model.zero_grad(set_to_none=True)
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # recompute whole segments (neurons included)
        out = net(x)
    out = out[0] + out[1] if isinstance(out, tuple) else out
    n_forward = len(calls)
    assert n_forward >= len(neurons)  # every neuron ran in the forward
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    for h in handles:
        h.remove()
    got = {n: p.grad.clone() for n, p in ckpt_model.named_parameters() if p.grad is not None}
    assert float(loss) == loss_plain
    _assert_close(got, want)
    # the backward recomputed the neurons of every segment, and each recomputed spike map equals the forward's
    recomputed = calls[n_forward:]
    assert len(recomputed) >= len(neurons) - 2  # (the head's neurons, if any, are not in a segment)
    by_shape: dict = {}
    for s in calls[:n_forward]:
        by_shape.setdefault(tuple(s.shape), []).append(s)
    for s in recomputed:
        assert any(torch.equal(s, f) for f in by_shape[tuple(s.shape)])
    # BatchNorm statistics were updated once, as by the plain step
    for (k, a), b in zip(plain_model.state_dict().items(), ckpt_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_saves_far_fewer_bytes(models):
    _, student, x, _ = models
    sizes = {}
    for mode in ("plain", "checkpoint"):
        model = copy.deepcopy(student).train()
        net = memory_net(model, mode, quiet, pack=mode != "plain")  # plain autograd as it was: nothing packed
        tally = SavedTally()
        with packed_spikes(False, tally):  # count everything the forward leaves for backward
            net(x)
        sizes[mode] = tally.bytes
    assert sizes["checkpoint"] * 8 < sizes["plain"]


class _StepNeuronBlock(nn.Module):
    """A sub-block that loops over T itself with a single-step neuron: its membrane is kept between calls."""

    def __init__(self, d: int, steps: int = 3) -> None:
        super().__init__()
        self.steps = steps
        self.fc = nn.Linear(d, d)
        self.lif = LIF(step_mode="s", v_threshold=0.5)

    def forward(self, x):
        return torch.stack([self.lif(self.fc(x[t])) for t in range(self.steps)])


class _StatefulBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn, self.mlp = _StepNeuronBlock(d), _StepNeuronBlock(d)

    def forward(self, z):
        q = self.attn(z)
        z = z + q @ q.transpose(-2, -1) @ z / 8  # an activation x activation matmul: an attention sub-block
        return z + self.mlp(z)


class StatefulNet(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.block = nn.ModuleList([_StatefulBlock(d) for _ in range(2)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):  # x [T, B, 3]
        z = self.embed(x)
        for blk in self.block:
            z = blk(z)
        return self.head(z.mean(0))


def test_checkpoint_replays_kept_neuron_state():
    torch.manual_seed(0)
    model = StatefulNet()
    x = 2 * torch.rand(3, 5, 3, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0])
    for m in model.modules():  # a state left by an earlier call: the step must start from it, not from rest
        if isinstance(m, LIF):
            m.v = torch.full((5, 8), 0.3)
    plain, ckpt = copy.deepcopy(model), copy.deepcopy(model)
    want, _ = _step(plain, plain, x, y)
    net = memory_net(ckpt, "checkpoint", quiet)
    assert net.runner is not None
    got, _ = _step(net, ckpt, x, y)
    _assert_close(got, want)
    for a, b in zip(plain.modules(), ckpt.modules()):
        if isinstance(a, LIF):
            assert torch.equal(a.v, b.v) and a._steps == b._steps


def test_untraceable_model_falls_back_to_plain_and_says_so():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: not traceable
                return self.fc(x)
            return x

    lines = []
    net = memory_net(Branchy(), "checkpoint", lines.append)
    assert net.runner is None and net.mode == "plain"
    assert len(lines) == 1 and "plain autograd" in lines[0]


def test_recipe_key_memory():
    assert load_recipe().train.memory == "plain"
    assert set(MODES) == {"plain", "checkpoint", "reversible"}
    assert load_recipe(overrides={"train.memory": "checkpoint"}).train.memory == "checkpoint"
    with pytest.raises(RecipeError, match="train.memory"):
        load_recipe(overrides={"train.memory": "swap"})


# ------------------------------------------------------------------------------------------------ reversible

def _coupled(models, form: str, a: float | None = None):
    fp, _, x, y = models
    student = binarize(copy.deepcopy(fp), "bestformer", overrides={"reversible.form": form}).model
    if a is not None:
        with torch.no_grad():
            for m in student.modules():
                if isinstance(getattr(m, "a", None), nn.Parameter):
                    m.a.fill_(a)
                    m.b.fill_(0.7)
    return student, x, y


@pytest.mark.parametrize("form, a", [("paper", None), ("preserving", 0.6)])
def test_reversible_gradients_equal_plain(models, form, a):
    student, x, y = _coupled(models, form, a)
    plain, rev = copy.deepcopy(student), copy.deepcopy(student)
    want, loss_plain = _step(plain, plain, x, y)
    lines = []
    net = memory_net(rev, "reversible", lines.append)
    assert net.mode == "reversible" and any("rebuilt in backward" in line for line in lines)
    got, loss = _step(net, rev, x, y)
    assert loss == loss_plain
    _assert_close(got, want)
    for (k, u), v in zip(plain.state_dict().items(), rev.state_dict().values()):
        assert torch.equal(u, v), k  # BatchNorm statistics updated once


def test_reversible_keeps_fewer_streams_than_checkpoint(models):
    torch.manual_seed(0)
    fp = create_model("spikformer_cifar", **dict(SMALL, depths=4)).eval()
    student = binarize(fp, "bestformer", overrides={"reversible.form": "paper"}).model
    x = models[2]
    sizes = {}
    for mode in ("checkpoint", "reversible"):
        tally = SavedTally()
        with packed_spikes(False, tally):
            memory_net(copy.deepcopy(student).train(), mode, quiet)(x)
        sizes[mode] = tally.bytes
    stream = 2 * 4 * 32 * 16 * 4  # one float stream [T, B, C, N] (16 px images: 16 tokens)
    assert sizes["reversible"] + 2 * stream < sizes["checkpoint"]  # z_4, z_5, z_6 are rebuilt, not kept


def test_reversible_recomputes_exactly_when_a_rebuilt_stream_flips_spikes(models, monkeypatch):
    student, x, y = _coupled(models, "paper")
    plain, rev = copy.deepcopy(student), copy.deepcopy(student)
    want, _ = _step(plain, plain, x, y)
    exact = reversible.rebuild
    noise = torch.Generator().manual_seed(3)
    monkeypatch.setattr(reversible, "rebuild",  # a badly drifted inverse
                        lambda *args: exact(*args) + torch.randn(args[0].shape, generator=noise))
    net = memory_net(rev, "reversible", quiet)
    got, _ = _step(net, rev, x, y)
    stage = next(m for m in net.runner.modules() if isinstance(m, reversible.ReversibleStage))
    assert stage.chain.exact_recomputes > 0  # the drift flipped spikes, was seen, and was recomputed exactly
    _assert_close(got, want)


def test_reversible_with_flat_couplings_keeps_their_inputs_and_says_so(models):
    student, x, y = _coupled(models, "preserving")  # a_k = 0: plain residuals, not invertible
    plain, rev = copy.deepcopy(student), copy.deepcopy(student)
    want, _ = _step(plain, plain, x, y)
    lines = []
    net = memory_net(rev, "reversible", lines.append)
    got, _ = _step(net, rev, x, y)
    net(x)  # a second forward: said once
    _assert_close(got, want)
    flat = [line for line in lines if "a_k = 0" in line]
    assert len(flat) == 1 and "kept" in flat[0]


def test_reversible_runs_checkpointed_under_coupling_hooks(models):
    student, x, y = _coupled(models, "paper")
    plain, rev = copy.deepcopy(student), copy.deepcopy(student)
    want, _ = _step(plain, plain, x, y)
    lines = []
    net = memory_net(rev, "reversible", lines.append)
    seen = []
    for m in rev.modules():
        if type(m).__name__ == "ReversibleCoupling":
            m.register_forward_hook(lambda mod, a, out: seen.append(out.requires_grad))
    got, _ = _step(net, rev, x, y)
    _assert_close(got, want)
    for (k, u), v in zip(plain.state_dict().items(), rev.state_dict().values()):
        assert torch.equal(u, v), k  # BatchNorm statistics updated once, recomputations included
    assert seen and all(seen)  # the hooks saw tensors with a graph (a feature loss can use them)
    assert any("feature taps" in line for line in lines)


def test_trainer_runs_the_switch_and_learns_the_same_weights():
    from bestcompress.data import load_dataset
    from bestcompress.training.trainer import train
    tiny = dict(img_size=8, embed_dims=16, num_heads=2, depths=1, T=2)
    torch.manual_seed(0)
    start = create_model("spikformer_cifar", **tiny)
    data = load_dataset("synthetic", start, subset=32)
    weights, logs = {}, {}
    for mode in ("plain", "checkpoint"):
        model, lines = copy.deepcopy(start), []
        train(model, data, "bestformer", epochs=1, limit_batches=2, log=lines.append,
              overrides={"train.batch_size": 8, "train.memory": mode, "train.val_fraction": 0.0})
        weights[mode], logs[mode] = model.state_dict(), lines
    assert any("train.memory=checkpoint" in line for line in logs["checkpoint"])
    assert not any("train.memory" in line for line in logs["plain"])
    for k, v in weights["plain"].items():
        assert torch.allclose(weights["checkpoint"][k], v, rtol=1e-5, atol=1e-7), k
    assert any(not torch.equal(weights["plain"][k], v) for k, v in start.state_dict().items())  # it trained


def test_checkpoint_cuts_a_model_without_trunk_at_its_neurons():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), LIF(), nn.Linear(16, 16), LIF(v_reset=None), nn.Linear(16, 4))
    x = 3 * torch.rand(2, 5, 3, generator=torch.Generator().manual_seed(0))  # [T, B, features]
    y = torch.tensor([0, 1, 2, 3, 0])
    plain, ckpt = copy.deepcopy(model), copy.deepcopy(model)

    def mean_over_t(net):
        return lambda inp: net(inp).mean(0)
    want, _ = _step(mean_over_t(plain), plain, x, y)
    lines = []
    net = memory_net(ckpt, "checkpoint", lines.append)
    assert net.runner is not None and "2 segments" in lines[0]
    got, _ = _step(mean_over_t(net), ckpt, x, y)
    _assert_close(got, want)
