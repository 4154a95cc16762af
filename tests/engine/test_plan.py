"""compile_model: binary layers packed, matmuls rewritten, BatchNorms folded only where bit-exact."""
from __future__ import annotations

import torch
from torch import fx, nn

from bestcompress.engine.layers import PackedLinear, popcount_matmul
from bestcompress.engine.plan import _bn_params, _fold_is_exact, compile_model

from .test_runtime import firing_binary


def _nodes(model, pred):
    return [n for gm in model.modules() if isinstance(gm, fx.GraphModule) for n in gm.graph.nodes if pred(gm, n)]


def test_batchnorms_fold_and_the_outputs_stay_bit_identical():
    model = firing_binary("spikformer_cifar")
    folded, plan = compile_model(model)
    plain, plain_plan = compile_model(model, fold_bn=False)
    assert plan.folded and not plain_plan.folded
    assert len(plan.folded) == len(plan.packed)  # every packed layer of this model is followed by a BatchNorm
    bn_calls = _nodes(folded, lambda gm, n: n.op == "call_module"
                      and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm))
    plain_bn_calls = _nodes(plain, lambda gm, n: n.op == "call_module"
                            and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm))
    assert len(plain_bn_calls) - len(bn_calls) == len(plan.folded)
    x = torch.rand((3,) + tuple(model.bc_input_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(folded(x), plain(x))
        assert torch.equal(folded(x), model(x))


def test_matmuls_become_popcount_matmuls_and_the_source_model_is_untouched():
    model = firing_binary("spikformer_cifar")
    before = model.code if hasattr(model, "code") else None
    compiled, plan = compile_model(model)
    assert plan.matmuls == len(_nodes(compiled, lambda gm, n: n.target is popcount_matmul)) > 0
    assert not _nodes(compiled, lambda gm, n: n.op == "call_function" and n.target is torch.matmul)
    if before is not None:
        assert model.code == before  # compile_model worked on a copy


def test_a_fold_whose_arithmetic_differs_from_pytorch_is_refused():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(64).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3.0)
        bn.weight.normal_()
        bn.bias.normal_()
    layer = PackedLinear.__new__(PackedLinear)
    nn.Module.__init__(layer)
    with torch.no_grad():
        # a transposed BN1d input takes PyTorch's strided path: ((y − μ)·inv)·γ + β, not the contiguous fma form
        assert _fold_is_exact(bn, 2, _bn_params(bn, 2), 64, layer, transposed=True)
        assert not _fold_is_exact(bn, 1, _bn_params(bn, 1), 64, layer, transposed=True)
