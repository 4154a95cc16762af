"""A forward that branches on self.training mid-network (SpikingResformer's attention habit): after binarize
(mode_branches.split_branches) each mode computes its own branch only: outputs equal to the merged graph's and the
original's in both modes, every module called once per forward, MACs equal FP + the second head."""
import copy
from collections import Counter
from pathlib import Path

import torch
from torch import fx, nn

import bestcompress as bc
from bestcompress.mode_branches import BranchSwitch, ModeSwitch, split_branches
from bestcompress.summary import summarize
from bestcompress.trace import trace_model
from tests.topology_models import MLP, Block, _lif, example, loud


class BranchyMLP(MLP):
    """An MLP whose hidden scale differs between training and eval (a branch deep inside the model)."""

    def forward(self, x):
        h = self.fc1(x)
        h = h * 0.5 if self.training else h * 0.75
        return self.lif2(self.fc2(self.lif1(h)))


class _BranchyBlock(Block):
    def __init__(self, d):
        super().__init__(d)
        self.mlp = BranchyMLP(d)


class MidBranch(nn.Module):
    """[B, N, C] -> logits; block `branch_at`'s MLP branches on self.training, the blocks after it follow."""

    def __init__(self, c=3, d=8, classes=4, T=2, branch_at=0):
        super().__init__()
        self.T = T
        self.embed, self.embed_lif = nn.Linear(c, d), _lif()
        self.blocks = nn.ModuleList([_BranchyBlock(d) if i == branch_at else Block(d) for i in range(3)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.embed_lif(self.embed(x.unsqueeze(0).repeat(self.T, 1, 1, 1)))
        for blk in self.blocks:
            x = blk(x)
        return self.head(x.mean(2).mean(0))


def _calls(model, x, training):
    """(output, {module path: calls}) of one forward in the given mode, for every module the model's graph (or a
    branch's graph) calls, switches excepted."""
    graphs = [model] + [b for m in model.modules() if isinstance(m, BranchSwitch) for b in m.branches]
    targets = {n.target for g in graphs if isinstance(g, fx.GraphModule) for n in g.graph.nodes
               if n.op == "call_module"}
    counts, hooks = Counter(), []
    for name, m in model.named_modules():
        if name in targets and not isinstance(m, (ModeSwitch, BranchSwitch)):
            hooks.append(m.register_forward_hook(lambda mod, a, o, name=name: counts.update([name])))
    try:
        with torch.no_grad():
            out = model.train(training)(x)
    finally:
        for h in hooks:
            h.remove()
        model.eval()
    return out, counts


def test_split_graph_computes_one_branch_with_the_original_outputs():
    torch.manual_seed(0)
    model = loud(MidBranch()).eval()
    x = example(batch=2)
    merged, _ = trace_model(copy.deepcopy(model), example_input=x)
    assert sum(isinstance(m, ModeSwitch) for m in merged.modules()) == 1
    split = copy.deepcopy(merged)
    assert split_branches(split) == 1
    assert not any(isinstance(m, ModeSwitch) for m in split.modules())
    assert sum(isinstance(m, BranchSwitch) for m in split.modules()) == 1
    assert split.state_dict().keys() == merged.state_dict().keys()
    twin = copy.deepcopy(split)  # a copy's branches call the copy's modules, and the copy keeps every module
    assert twin.state_dict().keys() == split.state_dict().keys()
    assert fx.GraphModule(split, split.graph).state_dict().keys() == split.state_dict().keys()  # a rebuild too
    for br in next(m for m in twin.modules() if isinstance(m, BranchSwitch)).branches:
        for n in br.graph.nodes:
            if n.op == "call_module":
                assert br.get_submodule(n.target) is twin.get_submodule(n.target)
    for training in (True, False):
        with torch.no_grad():
            want = copy.deepcopy(model).train(training)(x)
        got_m, calls_m = _calls(merged, x, training)
        got, calls = _calls(split, x, training)
        assert torch.equal(got, want) and torch.equal(got_m, want)
        assert max(calls_m.values()) == 2  # the merged graph ran both branches' layers
        assert set(calls.values()) == {1} and set(calls) == set(calls_m)  # each module once
    with torch.no_grad():
        assert not torch.equal(split.train()(x), split.eval()(x))  # the branches differ: the check is not vacuous
    mlp = twin.get_submodule("blocks.2.mlp")  # a module the owner swaps later (the engine's packed layers do)
    mlp.fc2, seen = copy.deepcopy(mlp.fc2), []
    mlp.fc2.register_forward_hook(lambda m, a, o: seen.append(m.training))
    with torch.no_grad():
        twin.eval()(x), twin.train()(x)
    assert seen == [False, True]  # the branch of each mode calls the owner's module of now


def test_binarize_splits_the_branches_macs_equal_fp_and_distill_and_export_work(tmp_path):
    from bestcompress.data import load_dataset

    torch.manual_seed(0)
    # the branch in the last block: BinarizeAttention threads an attention-map neuron's state from a training-branch
    # call into an eval-branch call of the same module (it takes the two copies for time steps), a real dependency
    # the split keeps; so attention after the branch is not checked here, and the couplings (which need whole
    # (attention, MLP) pairs on the trunk) are off
    teacher = loud(MidBranch(branch_at=2)).eval()
    x = example(batch=2)
    student = bc.binarize(copy.deepcopy(teacher), "bestformer", example_input=x,
                          overrides={"reversible.enabled": False}).model
    assert any(isinstance(m, BranchSwitch) for m in student.modules())
    assert not any(isinstance(m, ModeSwitch) for m in student.modules())
    for training in (True, False):
        _, calls = _calls(student, x, training)
        assert set(calls.values()) == {1} and "blocks.2.mlp.fc2" in calls and "head" in calls, calls
    fp, binary = summarize(teacher, x), summarize(student.eval(), x)
    assert binary.totals()["macs"] == fp.totals()["macs"]
    data = load_dataset("synthetic", input_shape=(8, 3), num_classes=4, subset=16)
    before = [p.detach().clone() for p in student.parameters()]
    bc.distill(student, teacher, data, epochs=1, limit_batches=1, log=lambda *a: None,
               overrides={"train.batch_size": 8, "train.calibrate_batches": 0, "reversible.enabled": False})
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    out = bc.export(student.eval(), "qonnx", tmp_path / "m.onnx", example_input=x)  # raises unless verified
    assert Path(out).stat().st_size > 0
