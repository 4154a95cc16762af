"""binarize(model, recipe): a full-precision spiking transformer in, a binary BESTformer out."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch import fx, nn

from .errors import ModelError
from .model_facts import example_input_for, input_shape_hint, model_time_steps
from .mode_branches import split_branches
from .passes.base import PassContext, PassError, Pipeline
from .passes.neuron_check import deepcopy_module
from .recipe import Recipe, load_recipe
from .trace import TraceReport


@dataclass
class BinarizeResult:
    model: nn.Module
    recipe: Recipe
    notes: list[str] = field(default_factory=list)
    trace: TraceReport = field(default_factory=TraceReport)


def build_pipeline(recipe: Recipe, ctx: PassContext) -> Pipeline:
    """The recipe's passes in order (DEFAULT_PIPELINE, tracing included), each built from its recipe section."""
    import bestcompress.passes  # noqa: F401  (registers every pass)
    return Pipeline.from_recipe(recipe, ctx)


def binarize(model: nn.Module, recipe: str | Recipe | None = "bestformer", example_input: torch.Tensor | None = None,
             input_shape=None, overrides: dict | None = None) -> BinarizeResult:
    """Turn a full-precision spiking transformer into a binary BESTformer.

    Args:
        model: the full-precision model (left unchanged: a copy is transformed).
        recipe: a recipe name, YAML path or Recipe.
        example_input: a batch the model accepts; made from `input_shape` or the model's zoo entry if None.
        input_shape: per-sample input shape used when `example_input` is None.
        overrides: dotted recipe overrides, e.g. {'attention.map': 'qk'}.
    Returns:
        BinarizeResult with the binary model (a torch.fx GraphModule, or an eager root holding traced
        children), the resolved recipe and notes on what each pass did.
    """
    recipe = load_recipe(recipe, overrides)
    if not any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) for m in model.modules()):
        raise ModelError("the model has no Conv1d, Conv2d or Linear layer to binarize.")
    inferred = example_input is None and input_shape is None  # the shape comes from the model's attributes
    if example_input is None:
        example_input = example_input_for(model, input_shape)
    if example_input is None:
        raise ModelError(f"The model's input shape is unknown; {input_shape_hint(model)}, or in Python give "
                         "input_shape= or example_input=.")
    try:
        return _binarize_passes(model, recipe, example_input)
    except PassError as e:
        if not inferred:
            raise
        frames = _event_frames(model, example_input)
        if frames is not None:  # [B, T, C, H, W]: the model refuses [B, C, H, W] and takes its declared T frames
            result = _binarize_passes(model, recipe, frames)
            result.notes.insert(0, f"input shape: {','.join(map(str, frames.shape[1:]))} (event frames: the model "
                                   f"refuses {','.join(map(str, example_input.shape[1:]))} and declares "
                                   f"T={frames.shape[1]})")
            return result
        shape = ",".join(str(s) for s in example_input.shape[1:])
        raise PassError(f"{str(e).rstrip('. ')}; binarize ran the model on samples of shape {shape}, read from its "
                        "attributes: if it takes another shape (e.g. event frames T,C,H,W), pass --input-shape.") from e


def _event_frames(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor | None:
    """[B, T, *shape] when a copy of the model (eval, no grad) fails on the inferred [B, *shape] batch but runs on
    [B, T, *shape] with the T it declares (an event-camera model, e.g. CIFAR10-DVS); else None."""
    t = model_time_steps(model)
    if t is None or not isinstance(example_input, torch.Tensor) or isinstance(example_input, FakeTensor):
        return None
    frames = example_input.unsqueeze(1).expand(-1, t, *example_input.shape[1:]).contiguous()
    probe = deepcopy_module(model).eval()
    for x, wanted in ((example_input, False), (frames, True)):
        try:
            with torch.no_grad():
                probe(x)
        except Exception:  # noqa: BLE001 - the model refusing the input is the answer
            if wanted:
                return None
            continue
        if not wanted:
            return None  # it takes the inferred shape: the pass failed for another reason
        return frames
    return None


def _binarize_passes(model: nn.Module, recipe: Recipe, example_input: torch.Tensor) -> BinarizeResult:
    fake = _fake_copy(example_input) if _worth_faking(model, example_input) else None
    if fake is not None:
        # The passes read only shapes and call order from the example input: a FakeTensor gives both without
        # computing anything (seconds instead of minutes on a 224-px model). A pass that needs real values, or
        # fake state left in the model, falls back to the real input below.
        try:
            result = _binarize_once(model, recipe, fake)
            if not holds_fake(result.model):
                return result
        except Exception:  # the real run below raises the real error, if there is one
            pass
    return _binarize_once(model, recipe, example_input)


# A FakeTensor costs a fixed dispatch per op, a real forward per element: below this many parameters × input
# elements per sample the real example is the faster one (benchmarks/bench_fake_input.py: tiny zoo configurations
# 4-5x faster with the real input; Spikformer-4-384 at 32 px 1.6x, kept on the fake input, which turns minutes
# into seconds on 224-px models).
FAKE_MIN_WORK = 1e10


def _worth_faking(model: nn.Module, x) -> bool:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return True
    return sum(p.numel() for p in model.parameters()) * x[0].numel() >= FAKE_MIN_WORK


def _fake_copy(x: torch.Tensor | None):
    if x is None or isinstance(x, FakeTensor):
        return None
    return FakeTensorMode(allow_non_fake_inputs=True).from_tensor(x)


def holds_fake(model: nn.Module) -> bool:
    """True if a FakeTensor was left in a parameter, buffer or attribute of any module."""
    for m in model.modules():
        values = list(m._parameters.values()) + list(m._buffers.values()) + list(vars(m).values())
        if any(isinstance(t, FakeTensor) for t in values):
            return True
    return False


def _binarize_once(model: nn.Module, recipe: Recipe, example_input) -> BinarizeResult:
    work = deepcopy_module(model)  # copy.deepcopy fails on a neuron state left by a forward with autograd
    was_training = work.training
    work.eval()
    ctx = PassContext(recipe=recipe, example_input=example_input, time_steps=model_time_steps(model))
    result = build_pipeline(recipe, ctx).apply(work)
    if isinstance(result, fx.GraphModule) and split_branches(result):  # after every pass: one branch a mode
        ctx.notes.append("self.training branches: each mode computes only its own branch's nodes")
    result.train(was_training)
    result.bc_recipe = recipe.to_dict()
    return BinarizeResult(result, recipe, list(ctx.notes), ctx.trace_report or TraceReport())
