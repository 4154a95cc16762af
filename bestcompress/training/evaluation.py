"""Evaluation and the checks a run makes before training: top-1 (per head for dual-head models), model/data fit,
stateful-neuron resets, unused-parameter detection for DDP."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from ..errors import DataError, ModelError
from .distributed import DistInfo, all_reduce_sum

EVAL_BATCH = 256


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def pick_device(device, info: DistInfo) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def neuron_reset_fn(model: nn.Module) -> Callable[[], None] | None:
    """A function that clears the state of stateful third-party neurons, or None when the model has none.

    bestcompress LIF and the zoo models are stateless; spikingjelly and snntorch neurons keep their membrane
    between calls and must be reset between batches.
    """
    roots = {type(m).__module__.split(".")[0] for m in model.modules()}
    fns = []
    if "spikingjelly" in roots:
        from spikingjelly.activation_based import functional
        fns.append(lambda: functional.reset_net(model))
    if "snntorch" in roots:
        from snntorch import utils as sn_utils
        fns.append(lambda: sn_utils.reset(model))
    if not fns:
        return None
    return lambda: [fn() for fn in fns]


def mean_logits(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return sum(o.float() for o in out) / len(out)
    return out


def _dual_heads(model: nn.Module) -> list[nn.Module]:
    from ..nn.reversible import DualHeadOutput
    return [m for m in model.modules() if isinstance(m, DualHeadOutput)]


def resolve_data(data, model: nn.Module, encoding: str, subset: int | None, seed: int):
    from ..data import DataBundle, load_dataset
    if isinstance(data, DataBundle):
        return data
    return load_dataset(data, model, encoding=encoding, subset=subset, seed=seed)


def check_model_fits(model: nn.Module, data, device: torch.device) -> None:
    """Run the model once on two encoded training samples (eval mode) before training starts."""
    x, y = data.train.tensors
    batch = data.encode(x[:2], torch.Generator().manual_seed(0)).to(device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = mean_logits(model(batch))
    except (RuntimeError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(f"The model cannot run on '{data.name}' samples of shape {tuple(batch.shape[1:])} ({first}).") \
            from None
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


def has_unused_parameters(model: nn.Module, data, device: torch.device) -> bool:
    """True when some trainable parameter gets no gradient (DDP must then look for unused parameters).

    Runs one forward in eval mode (no BN statistics change) with gradients and asks autograd what it reaches.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    x = data.encode(data.train.tensors[0][:2], torch.Generator().manual_seed(0)).to(device)
    was = model.training
    model.eval()
    try:
        out = mean_logits(model(x))
        grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    finally:
        model.train(was)
        reset = neuron_reset_fn(model)
        if reset:
            reset()
    return any(g is None for g in grads)


# ------------------------------------------------------------------------------------------------ evaluation

def evaluate_split(model: nn.Module, data, device: torch.device, info: DistInfo, limit_batches: int | None = None,
              batch_size: int = EVAL_BATCH, amp: bool = False) -> dict:
    model = unwrap(model)
    was = model.training
    model.eval()
    reset = neuron_reset_fn(model)
    heads = _dual_heads(model)
    captured: list = []
    hooks = [h.register_forward_pre_hook(lambda mod, args: captured.append(args)) for h in heads[-1:]]
    x_all, y_all = data.test.tensors
    idx = torch.arange(info.rank, len(x_all), info.world_size)  # no padding: every sample counted once
    gen = torch.Generator().manual_seed(12345 + info.rank)
    correct = correct1 = correct2 = 0.0
    count = 0.0
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
                    out = mean_logits(model(x))
                if reset:
                    reset()
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
    correct, correct1, correct2, count = all_reduce_sum([correct, correct1, correct2, count], info, device)
    result = {"top1": 100.0 * correct / max(count, 1.0), "n": int(count)}
    if heads:
        result["top1_head"] = 100.0 * correct1 / max(count, 1.0)
        result["top1_head2"] = 100.0 * correct2 / max(count, 1.0)
    return result


def evaluate(model: nn.Module, data, *, encoding: str = "direct", subset: int | None = None,
             limit_batches: int | None = None, batch_size: int = EVAL_BATCH, device=None) -> dict:
    """Top-1 accuracy (%) on the test split.

    Args:
        model: any classifier; a dual-head (coupled) model is scored with its eval heads (mean by default) and
            each head alone.
        data: a DataBundle or a data set name/path (fitted to the model with `load_dataset`).
        encoding, subset: as for load_dataset.
        limit_batches: score only this many batches.
        batch_size: evaluation batch size.
        device: where to run (default: CUDA if available, else CPU).
    Returns:
        {'top1': %, 'n': samples} plus 'top1_head' and 'top1_head2' for dual-head models.
    """
    info = DistInfo()
    dev = pick_device(device, info)
    data = resolve_data(data, model, encoding, subset, 0)
    model.to(dev)
    return evaluate_split(model, data, dev, info, limit_batches, batch_size, amp=dev.type == "cuda")
