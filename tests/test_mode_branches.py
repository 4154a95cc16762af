"""Forwards that branch on self.training (bestcompress/mode_branches.py): the traced graph holds both branches, the
training outputs in training mode (what distill trains) and the eval outputs in eval mode (what evaluate and export
use); a kd-style pair of heads is trained as a pair."""
import copy

import torch

import bestcompress as bc
from bestcompress.mode_branches import ModeSwitch
from bestcompress.nn.binary import is_binary_layer
from bestcompress.trace import trace_model
from tests.topology_models import Hierarchical, TrainingAux, TwoHeaded, example, loud


def _both(model, x):
    with torch.no_grad():
        return model.train()(x), model.eval()(x)


def test_both_branches_are_traced_into_one_graph_with_equal_outputs():
    torch.manual_seed(0)
    model = loud(TwoHeaded()).eval()
    x = example()
    gm, report = trace_model(model, example_input=x)
    assert sum(isinstance(m, ModeSwitch) for m in gm.modules()) == 1
    assert any("branches on self.training: both branches traced" in line for line in report.lines())
    assert gm.bc_two_heads is True  # (h, h2) in training, computed into the eval output together
    (h, h2), y = _both(gm, x)
    (rh, rh2), ry = _both(model, x)
    assert torch.equal(h, rh) and torch.equal(h2, rh2) and torch.equal(y, ry) and not torch.equal(h, h2)
    # the shared part is traced once: head and head2 are called once each
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"].count("head") == 1
    plain = loud(Hierarchical()).eval()  # no branch on self.training: one trace, no switch
    gm2, report2 = trace_model(plain, example_input=x)
    assert not any(isinstance(m, ModeSwitch) for m in gm2.modules()) and not report2.mode_branches


class _BNBranch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.aux = torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)

    def forward(self, x):
        y = self.bn(self.fc(x))
        if self.training:
            return y, self.aux(y)
        return y


def test_the_training_mode_trace_leaves_batchnorm_statistics_as_they_were():
    torch.manual_seed(0)
    model = _BNBranch().eval()
    x = torch.randn(5, 3) * 3 + 1
    stats = [b.clone() for b in model.buffers()]
    gm, report = trace_model(model, example_input=x)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))
    assert report.mode_branches and not getattr(gm, "bc_two_heads", False)
    ref, got = copy.deepcopy(model).train()(x), copy.deepcopy(gm).train()(x)
    assert isinstance(got, tuple) and all(torch.equal(a, b) for a, b in zip(ref, got))
    with torch.no_grad():
        assert torch.equal(gm.eval()(x), model.eval()(x))


def test_training_only_aux_outputs_are_what_distill_runs_and_eval_exports_the_logits(tmp_path):
    from bestcompress.data import load_dataset
    from bestcompress.exporters import export_all

    torch.manual_seed(0)
    teacher = loud(TrainingAux(depths=(1, 1))).eval()
    x = example(batch=2)
    running = []
    result = bc.binarize(copy.deepcopy(teacher), "bestformer", example_input=x)
    student = result.model
    assert any("branches on self.training: both branches traced" in n for n in result.notes)
    assert any(is_binary_layer(m) for m in student.modules())
    assert not getattr(student, "bc_two_heads", False)  # (logits, aux): the aux head is not a second head
    train_out, eval_out = _both(student, x)
    assert isinstance(train_out, tuple) and len(train_out) == 2 and isinstance(eval_out, torch.Tensor)
    hook = student.get_submodule("aux_head").register_forward_hook(lambda m, a, o: running.append(m.training))
    layer = next(m for m in student.modules() if is_binary_layer(m))
    before = layer.weight.detach().clone()
    data = load_dataset("synthetic", input_shape=(8, 3), num_classes=4, subset=16)
    bc.distill(student, teacher, data, overrides={"train.batch_size": 8, "train.calibrate_batches": 0},
               epochs=1, limit_batches=1, progress=False)
    hook.remove()
    assert not torch.equal(layer.weight.detach(), before)
    assert True in running  # distill ran the training branch
    results = export_all(student.eval(), {"onnx": tmp_path / "m.onnx"}, example_input=x, progress=lambda line: None)
    v = results["onnx"].verification
    assert v is not None and v.passed and v.neurons
