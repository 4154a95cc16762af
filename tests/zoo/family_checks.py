"""The acceptance path every zoo family is held to (issue 10): binarize with a recipe, MACs at most FP + the
second head, one distillation step that changes the weights, then qonnx and onnx exports verified spike by spike."""
from __future__ import annotations

import torch

import bestcompress as bc
from bestcompress.data import load_dataset
from bestcompress.exporters import export_all
from bestcompress.nn.binary import is_binary_layer
from bestcompress.nn.lif import LIF


def fp_macs_and_head(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    s = bc.summarize(model, example_input=x[:1])
    return s.macs, next(r.macs for r in s.rows if r.name == "head")


def binarize_and_check_macs(model: torch.nn.Module, recipe: str, x: torch.Tensor):
    """binarize(model, recipe); asserts 1-bit layers exist and MACs <= FP + head2. Returns the result."""
    fp_macs, head_macs = fp_macs_and_head(model, x)
    result = bc.binarize(model, recipe)
    student = result.model
    assert sum(is_binary_layer(m) for m in student.modules()) > 0
    macs = bc.summarize(student.eval(), example_input=x[:1]).macs
    has_head2 = any(n.endswith("head2") for n, _ in student.named_modules())
    assert macs <= fp_macs + (head_macs if has_head2 else 0), (macs, fp_macs, head_macs)
    return result


def distill_one_step(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """One CIE step on synthetic data; asserts a binary layer's latent weights moved and spikes flow."""
    layer = next(m for m in student.modules() if is_binary_layer(m))
    before = layer.weight.detach().clone()
    data = load_dataset("synthetic", teacher, subset=16, seed=0)
    bc.distill(student, teacher, data, overrides={"train.batch_size": 8, "train.calibrate_batches": 1},
               epochs=1, limit_batches=1, progress=False)
    assert not torch.equal(layer.weight.detach(), before)


def spikes_fired(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Fraction of 1s over every LIF output of one eval forward (a silent model makes export checks vacuous)."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, a, out: seen.append(out.detach().float().mean()))
             for m in model.modules() if isinstance(m, LIF)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return float(torch.stack(seen).mean())


def exports_verified(student: torch.nn.Module, x: torch.Tensor, folder) -> dict:
    """qonnx and onnx (one shared trace), each verified against PyTorch; returns {format: ExportResult}."""
    results = export_all(student.eval(), {"qonnx": folder / "m.qonnx.onnx", "onnx": folder / "m.onnx"},
                         example_input=x, progress=lambda line: None)
    for fmt, res in results.items():
        v = res.verification
        assert v is not None and v.passed, (fmt, v.message() if v else None)
        assert v.neurons and v.flipped_fraction == 0.0
        assert res.path.stat().st_size > 0
    return results
