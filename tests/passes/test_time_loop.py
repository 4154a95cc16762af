"""Models that step their neurons in a Python time loop (snnTorch style: `for t in range(T)`, explicit `init_leaky`
membranes or init_hidden=True neurons), unrolled by the trace: the per-step copies of the trunk are one stage, each
coupling is one module called at every step, head2 is one module, each attention has one map neuron, the summary
counts every step in one row per layer; binarize (default recipe) -> distill -> evaluate -> export verified."""
import pytest
import torch

import bestcompress as bc
from bestcompress.convert import binarize
from bestcompress.data import load_dataset
from bestcompress.exporters import export_model
from bestcompress.model_facts import example_input_for
from bestcompress.nn.attention import StepMapNeuron
from bestcompress.nn.binary import is_binary_layer
from bestcompress.nn.reversible import DualHeadOutput, ReversibleCoupling
from bestcompress.passes.reversible import coupling_nodes, coupling_steps
from bestcompress.summary import summarize
from bestcompress.trunk import find_stages

pytest.importorskip("snntorch")

MODELS = ["SnnTorchTimeLoopTransformer", "SnnTorchHiddenTransformer"]  # init_leaky state / init_hidden=True
COUPLED_IDENTITY = {"reversible.enabled": True, "reversible.eval_heads": "head2"}


def _fp(cls):
    import tests.thirdparty_models as tp
    torch.manual_seed(0)
    return getattr(tp, cls)().eval()


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cls", MODELS)
def test_the_per_step_copies_of_the_trunk_are_one_stage(cls):
    model = _fp(cls)
    gm = binarize(model, "identity").model  # traced, nothing changed
    T = model.num_steps
    (stage,) = find_stages(gm)  # before: "3 equally long chains of transformer blocks"
    assert len(stage.steps) == T == gm.bc_time_steps and stage.blocks == stage.steps[0].blocks
    assert [[sb.step for sb in copy.blocks] for copy in stage.steps] == [[t] * 4 for t in range(T)]
    assert all([sb.where for sb in copy.blocks] == [sb.where for sb in stage.blocks] for copy in stage.steps)
    assert len({sb.out for copy in stage.steps for sb in copy.blocks}) == 4 * T  # each step its own nodes


@pytest.mark.parametrize("cls", MODELS)
def test_one_coupling_per_sub_block_shared_by_every_step_computes_the_fp_model(cls):
    model = _fp(cls)
    x = example_input_for(model, seed=1) * 3
    with torch.no_grad():
        want = model(x)
    gm = binarize(model, "identity", overrides=COUPLED_IDENTITY).model.eval()
    T = model.num_steps
    couplings = sorted(n for n, m in gm.named_modules() if isinstance(m, ReversibleCoupling))
    assert couplings == ["reversible.z2", "reversible.z3", "reversible.z4"]
    assert coupling_steps(gm) == T
    for t in range(T):  # the same three modules at every step, each reading the streams of its own step
        nodes = coupling_nodes(gm, 0, t)
        assert [n.target for n in nodes] == couplings and all(n.meta["bc_time_step"] == t for n in nodes)
    assert len(coupling_nodes(gm)) == 3 * T
    # nothing duplicated: the FP model's modules plus the couplings, one head2 and the dual head
    added = {n for n, _ in gm.named_modules()} - {n for n, _ in model.named_modules()}
    assert added == {"reversible", *couplings, "head2", "dual_head"}
    assert _params(gm) == _params(model) + _params(model.head) + 2 * len(couplings)  # a_k, b_k per coupling
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls.count("head2") == calls.count("head") == T and calls.count("dual_head") == 1
    with torch.no_grad():
        got, again = gm(x), gm(x)
    assert torch.equal(again, got) and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # a = 0, b = 1: the FP function
    head_inputs = {n.args[0].args[0].target for n in gm.graph.nodes if n.op == "call_module" and n.target == "head"}
    head2_inputs = {n.args[0].args[0].target for n in gm.graph.nodes if n.op == "call_module" and n.target == "head2"}
    assert head_inputs == {"reversible.z3"} and head2_inputs == {"reversible.z4"}  # last attention / MLP stream


class _HierarchicalLoop(torch.nn.Module):
    """A Python loop over 3 steps calling a two-stage network (downsampling between the stages) at each step."""

    def __init__(self):
        super().__init__()
        from tests.topology_models import Hierarchical
        self.net = Hierarchical(depths=(2, 1), T=1)
        self.num_steps = 3
        self.input_shape = (6, 3)

    def forward(self, x):
        out = 0
        for t in range(self.num_steps):
            out = out + self.net(x * (t + 1))
        return out


def test_a_hierarchical_time_loop_is_coupled_stage_by_stage_with_shared_couplings():
    torch.manual_seed(0)
    model = _HierarchicalLoop().eval()
    x = example_input_for(model, seed=1) * 3
    with torch.no_grad():
        want = model(x)
    gm = binarize(model, "identity", overrides=COUPLED_IDENTITY).model.eval()
    assert coupling_steps(gm) == 3
    for t in range(3):
        assert [gm.get_submodule(n.target).index for n in coupling_nodes(gm, 0, t)] == [2, 3, 4]
        assert [gm.get_submodule(n.target).index for n in coupling_nodes(gm, 1, t)] == [2]
    assert sum(isinstance(m, ReversibleCoupling) for m in gm.modules()) == 4
    with torch.no_grad():
        got = gm(x)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hidden_out", [True, False])
def test_an_output_neuron_after_the_head_is_copied_with_its_reset(hidden_out):
    from tests.thirdparty_models import SnnTorchOutputNeuronTransformer
    torch.manual_seed(0)
    model = SnnTorchOutputNeuronTransformer(hidden_out).eval()
    x = example_input_for(model, seed=1) * 3
    with torch.no_grad():
        want = model(x)
    result = binarize(model, "identity", overrides=COUPLED_IDENTITY)
    gm = result.model.eval()
    assert "'lif_out' -> 'lif_out2'" in result.notes[-1]  # head2's read-out neuron is its own
    with torch.no_grad():
        got, again = gm(x), gm(x)
    assert want.abs().max() > 0 and torch.equal(again, got)  # head2's neuron also starts each call at rest
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", MODELS)
def test_feature_taps_match_the_teachers_block_outputs_step_by_step(cls):
    from bestcompress.training.taps import feature_taps
    teacher = _fp(cls)
    student = binarize(teacher, "identity", overrides=COUPLED_IDENTITY).model.eval()
    x = example_input_for(teacher, seed=1) * 3
    with feature_taps(student, teacher) as taps, torch.no_grad():
        teacher(x)
        student(x)
    assert len(taps.student) == len(taps.teacher) == teacher.num_steps * len(teacher.blocks)  # every step's
    assert any(not torch.equal(a, b) for a, b in zip(taps.teacher, taps.teacher[1:]))
    for s, t in zip(taps.student, taps.teacher):  # a = 0, b = 1: the same streams, in the same order
        torch.testing.assert_close(s, t, rtol=0, atol=1e-6)


def test_summary_counts_every_step_in_one_row_and_the_coupled_model_costs_head2_more():
    model = _fp(MODELS[0])
    x = example_input_for(model, batch=1, seed=1)
    T, depth = model.num_steps, len(model.blocks)
    fp = summarize(model, x)
    traced = summarize(binarize(model, "identity").model, x)
    coupled = summarize(binarize(model, "identity", overrides=COUPLED_IDENTITY).model, x)
    for s in (traced, coupled):  # one row per layer and per attention matmul, not one per unrolled copy
        names = [r.name for r in s.rows]
        assert len(names) == len(set(names))
        assert sum(r.type == "MatMul" for r in s.rows) == 2 * depth
    rows = {r.name: r for r in coupled.rows}
    fp_rows = {r.name: r for r in fp.rows if r.type != "MatMul"}
    assert rows["head"].macs == T * model.head.in_features * model.head.out_features  # per step x T
    assert all(rows[n].macs == r.macs for n, r in fp_rows.items())
    assert set(rows) - set(fp_rows) - {r.name for r in coupled.rows if r.type == "MatMul"} == {"head2"}
    assert rows["head2"].macs == rows["head"].macs
    assert traced.macs == fp.macs
    assert coupled.macs == fp.macs + rows["head2"].macs


# --------------------------------------------------------------- the default recipe, end to end

@pytest.fixture(scope="module", params=MODELS)
def default_student(request):
    teacher = _fp(request.param)
    result = binarize(teacher, "bestformer")
    return result, teacher


def test_default_recipe_couples_once_and_binarizes_each_attention_map_once(default_student):
    result, teacher = default_student
    student, depth = result.model, len(teacher.blocks)
    assert sum(isinstance(m, StepMapNeuron) for m in student.modules()) == depth
    assert sum(isinstance(m, ReversibleCoupling) for m in student.modules()) == 2 * depth - 1
    assert sum(isinstance(m, DualHeadOutput) for m in student.modules()) == 1
    assert sum(is_binary_layer(m) for m in student.modules()) == 6 * depth  # q, k, v, out, fc1, fc2
    assert not is_binary_layer(student.head) and not is_binary_layer(student.head2)
    x = example_input_for(teacher, batch=1, seed=3)
    assert summarize(student, x).macs == summarize(teacher, x).macs + student.head2.in_features * \
        student.head2.out_features * teacher.num_steps
    assert any("shared by the 3 steps of the time loop" in n for n in result.notes)


def test_default_recipe_distills_evaluates_deterministically_and_exports_verified(default_student, tmp_path):
    result, teacher = default_student
    student = result.model
    a_before = [float(m.a) for m in student.modules() if isinstance(m, ReversibleCoupling)]
    data = load_dataset("synthetic", student, subset=48, seed=0)
    bc.distill(student, teacher, data, overrides={"train.batch_size": 16, "train.calibrate_batches": 1,
                                                  "train.lr": 1e-2, "train.warmup_epochs": 0},
               epochs=1, limit_batches=2, progress=False)  # the 2nd batch used to fail in backward
    a_after = [float(m.a) for m in student.modules() if isinstance(m, ReversibleCoupling)]
    assert a_after != a_before  # the shared coupling coefficients trained
    first = bc.evaluate(student, data)
    assert bc.evaluate(student, data) == first  # deterministic: no state survives a batch
    x = torch.rand((3,) + teacher.input_shape) * 3
    student.eval()
    with torch.no_grad():
        y = student(x)
        assert torch.equal(student(x), y)
    for fmt in ("qonnx", "onnx"):
        v = export_model(student, fmt, tmp_path / f"loop_{fmt}.onnx", example_input=x).verification
        assert v is not None and v.passed and v.max_abs_diff < 1e-4 and v.flipped_fraction == 0.0, fmt


def test_the_first_steps_streams_are_reconstructed_from_its_last_two():
    from torch import fx
    from bestcompress.passes.reversible import reconstruct_streams
    model = _fp(MODELS[0]).double()
    x = example_input_for(model, seed=1).double() * 3
    gm = binarize(model, "identity", example_input=x, overrides={"reversible.enabled": True,
                                                                 "reversible.form": "paper"}).model.eval()
    nodes = coupling_nodes(gm, 0, 0)
    wanted = [nodes[0].args[1], nodes[0].args[2], *nodes]  # z_0, z_1 (plain residual), z_2..z_4 of step 0
    seen = {}

    class _Record(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                seen[n] = out
            return out

    with torch.no_grad():
        _Record(gm).run(x)
        streams = [seen[n] for n in wanted]
        back = reconstruct_streams(gm, streams[-1], streams[-2])
    assert len(back) == 5 and streams[0].abs().sum() > 0
    for got, want in zip(back, streams):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
