"""Evaluation and the checks a run makes before training: top-1 (per head for dual-head models) on the validation
or test split, non-finite outputs, model/data fit, stateful-neuron resets, unused-parameter detection for DDP."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from ..errors import DataError, ModelError, short_reason
from .distributed import DistInfo, all_reduce_sum, unwrap
from .outputs import mean_logits, time_note, two_headed

EVAL_BATCH = 256
SPLITS = ("test", "val")


def pick_device(device, info: DistInfo) -> torch.device:
    """The run's device (default: this rank's GPU when CUDA is available); a sentence for an unusable name."""
    from ..devices import resolve_device
    return resolve_device(device, info.local_rank)


def neuron_reset_fn(model: nn.Module) -> Callable[[], None] | None:
    """A function that puts every neuron of `model` at rest, or None when no neuron keeps state between calls
    (bestcompress.nn.state.reset_state knows every neuron kind bestcompress produces or keeps)."""
    from ..nn.state import has_state, reset_state
    return (lambda: reset_state(model)) if has_state(model) else None


def _dual_heads(model: nn.Module) -> list[nn.Module]:
    from ..nn.reversible import DualHeadOutput
    return [m for m in model.modules() if isinstance(m, DualHeadOutput)]


def resolve_data(data, model: nn.Module, encoding: str, subset: int | None, seed: int):
    from ..data import DataBundle, load_dataset
    if isinstance(data, DataBundle):
        return data
    return load_dataset(data, model, encoding=encoding, subset=subset, seed=seed)


def check_model_fits(model: nn.Module, data, device: torch.device) -> str | None:
    """Run the model once on two encoded training samples (eval mode) before training starts; returns a note
    when its logits are per time step (averaged over time, `outputs.time_note`)."""
    x, y = data.train.tensors
    batch = data.encode(x[:2], torch.Generator().manual_seed(0)).to(device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            raw = model(batch)
            out = mean_logits(raw, two_headed(model), model, len(batch))
            note = time_note(raw, model, len(batch))
    except (RuntimeError, ValueError, IndexError) as e:
        raise DataError(f"The model cannot run on '{data.name}' samples of shape {tuple(batch.shape[1:])} "
                        f"({short_reason(e, 200)}).") from None
    finally:
        model.train(was)
        reset = neuron_reset_fn(model)
        if reset:
            reset()
    if out.dim() != 2:
        raise ModelError(f"The model returned logits of shape {tuple(out.shape)}; a classifier returns [B, classes].")
    top = int(max(y.max(), data.test.tensors[1].max()))
    if top >= out.shape[1]:
        raise DataError(f"Label {top} in '{data.name}' is out of range for a model with {out.shape[1]} outputs.")
    return note


def has_unused_parameters(model: nn.Module, data, device: torch.device) -> bool:
    """True when some trainable parameter gets no gradient (DDP must then look for unused parameters).

    Runs one forward in eval mode (no BN statistics change) with gradients and asks autograd what it reaches.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    x = data.encode(data.train.tensors[0][:2], torch.Generator().manual_seed(0)).to(device)
    was = model.training
    model.eval()
    try:
        out = mean_logits(model(x), two_headed(model), model, len(x))
        grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    finally:
        model.train(was)
        reset = neuron_reset_fn(model)
        if reset:
            reset()
    return any(g is None for g in grads)


# ------------------------------------------------------------------------------------------------ evaluation

def evaluate_split(model: nn.Module, data, device: torch.device, info: DistInfo, limit_batches: int | None = None,
                   batch_size: int = EVAL_BATCH, amp: bool = False, split: str = "test") -> dict:
    """Top-1 on data.test or data.val (sharded over ranks, summed); raises ModelError on non-finite outputs."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    part = data.test if split == "test" else data.val
    if part is None:
        raise DataError(f"'{data.name}' has no validation set (set train.val_fraction above 0).")
    model = unwrap(model)
    two = two_headed(model)
    was = model.training
    model.eval()
    reset = neuron_reset_fn(model)
    heads = _dual_heads(model)
    captured: list = []
    hooks = [h.register_forward_pre_hook(lambda mod, args: captured.append(args)) for h in heads[-1:]]
    x_all, y_all = part.tensors
    idx = torch.arange(info.rank, len(x_all), info.world_size)  # no padding: every sample counted once
    gen = torch.Generator().manual_seed(12345 + info.rank)
    correct = correct1 = correct2 = 0.0
    count = bad = 0.0
    try:
        with torch.no_grad():
            for b, start in enumerate(range(0, len(idx), batch_size)):
                if limit_batches is not None and b >= limit_batches:
                    break
                sel = idx[start:start + batch_size]
                x = data.encode(x_all[sel], gen).to(device, non_blocking=True)
                y = y_all[sel].to(device)
                captured.clear()
                ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else nullcontext()
                with ctx:
                    out = mean_logits(model(x), two, model, len(y))
                if reset:
                    reset()
                bad += float((~torch.isfinite(out.float())).flatten(1).any(1).sum())
                correct += float((out.argmax(-1) == y).sum())
                if captured:
                    h1, h2 = captured[-1][0], captured[-1][1]
                    correct1 += float((h1.argmax(-1) == y).sum())
                    correct2 += float((h2.argmax(-1) == y).sum())
                count += len(sel)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    correct, correct1, correct2, count, bad = all_reduce_sum([correct, correct1, correct2, count, bad], info,
                                                             device)
    if bad:
        name = "validation" if split == "val" else "test"
        raise ModelError(f"The model's outputs are not finite (NaN or Inf) on {int(bad)} of {int(count)} {name} "
                         "samples, so no accuracy can be given: its weights may be corrupt or its training diverged.")
    result = {"top1": 100.0 * correct / max(count, 1.0), "n": int(count)}
    if heads:
        result["top1_head"] = 100.0 * correct1 / max(count, 1.0)
        result["top1_head2"] = 100.0 * correct2 / max(count, 1.0)
    return result


def evaluate(model: nn.Module, data, *, encoding: str = "direct", subset: int | None = None,
             limit_batches: int | None = None, batch_size: int = EVAL_BATCH, device=None,
             split: str = "test") -> dict:
    """Top-1 accuracy (%) on the test split (or the DataBundle's validation split).

    Args:
        model: any classifier; a dual-head (coupled) model is scored with its eval heads (mean by default) and
            each head alone.
        data: a DataBundle or a data set name/path (fitted to the model with `load_dataset`).
        encoding, subset: as for load_dataset.
        limit_batches: score only this many batches.
        batch_size: evaluation batch size.
        device: where to run (default: CUDA if available, else CPU).
        split: 'test', or 'val' for a DataBundle made by validation_split.
    Returns:
        {'top1': %, 'n': samples} plus 'top1_head' and 'top1_head2' for dual-head models.
    Raises:
        ModelError: the model's outputs are NaN or infinite on some sample.
    """
    info = DistInfo()
    dev = pick_device(device, info)
    data = resolve_data(data, model, encoding, subset, 0)
    model.to(dev)
    return evaluate_split(model, data, dev, info, limit_batches, batch_size, amp=dev.type == "cuda", split=split)
