"""Least-squares fit of a binary model's full-precision classifier heads to the full-precision model's heads.

Binarizing the layers before the heads changes the features the heads read; the heads' weights, trained on the
full-precision features, then map them to poor logits. Given the same input batches, each head's weight and bias
are set to the ridge-regression solution

    [W b]ᵀ = (FᵀF + λI)⁻¹ (FᵀY + λ[W₀ b₀]ᵀ),   F = [features 1] of the binary model,  Y = the full-precision
    head's outputs, [W₀ b₀] = the head as it was,  λ = ridge · tr(FᵀF) / columns(F)

(ridge regression shrunk toward the head's own weights, not toward 0),

row by row of the head's input (every row a head sees: a sample, or a sample's time step or token when the head
runs on those). The target is the teacher's *own* head output, so whatever follows the head (a mean over time
steps, a mean of two heads) follows it unchanged. A second head that the couplings added (no module of that name in
the full-precision model) is fitted to the full-precision model's head of the same shape.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import fx, nn


def output_linears(model: nn.Module) -> list[str]:
    """Full-precision nn.Linear layers nearest the output of a traced model (walking back through weightless ops:
    passes.binarize_weights.output_layers); [] when the model is not traced or a binary/conv layer comes first on
    every path."""
    if not isinstance(model, fx.GraphModule):
        return []
    from ..passes.binarize_weights import output_layers
    nearest = output_layers(model, (nn.Linear, nn.modules.conv._ConvNd))
    return sorted({n for n in nearest if type(model.get_submodule(n)) is nn.Linear})


def _teacher_heads(names: list[str], student: nn.Module, teacher: nn.Module) -> dict[str, nn.Linear]:
    t_mods = dict(teacher.named_modules())
    pairs = {}
    for n in names:
        t = t_mods.get(n)
        if type(t) is nn.Linear and t.weight.shape == student.get_submodule(n).weight.shape:
            pairs[n] = t
    for n in names:  # a head the couplings added: the teacher head of the same shape, when there is one
        if n not in pairs:
            shape = student.get_submodule(n).weight.shape
            same = {id(t): t for t in pairs.values() if t.weight.shape == shape}
            if len(same) == 1:
                pairs[n] = next(iter(same.values()))
    return pairs


def fit_heads(model: nn.Module, teacher: nn.Module, batches: Iterable[torch.Tensor], *, ridge: float = 0.01,
              reset: Callable[[], None] | None = None, teacher_reset: Callable[[], None] | None = None) -> int:
    """Fit the heads of `model` to the heads of `teacher` on `batches` (module docstring); both run in eval mode
    without gradients. Returns the number of heads fitted (0: no head found, or no batch)."""
    names = output_linears(model)
    pairs = _teacher_heads(names, model, teacher)
    if not pairs:
        return 0
    teachers = {id(t): t for t in pairs.values()}  # a teacher head serves the student heads fitted to it
    feats: dict[str, list] = {n: [] for n in pairs}
    targets: dict[int, list] = {key: [] for key in teachers}

    def grab(store, key, what):
        def hook(_mod, args, out):
            x = args[0] if what == "in" else out
            store[key].append(x.detach().reshape(-1, x.shape[-1]).double())
        return hook

    handles = [model.get_submodule(n).register_forward_hook(grab(feats, n, "in")) for n in pairs]
    handles += [t.register_forward_hook(grab(targets, key, "out")) for key, t in teachers.items()]
    model.eval()
    teacher.eval()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
                teacher(x)
                for r in (reset, teacher_reset):
                    if r is not None:
                        r()
    finally:
        for h in handles:
            h.remove()
    done = 0
    for n, t in pairs.items():
        if not feats[n]:
            continue
        f, y = torch.cat(feats[n]), torch.cat(targets[id(t)])
        if f.shape[0] != y.shape[0]:  # the head sees other rows than the teacher's: leave it
            continue
        head = model.get_submodule(n)
        prior = head.weight.detach().double().T
        if head.bias is not None:
            f = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1)
            prior = torch.cat([prior, head.bias.detach().double()[None]], 0)
        gram = f.T @ f
        lam = ridge * torch.diagonal(gram).mean().clamp_min(1e-12)
        sol = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), f.T @ y + lam * prior)
        with torch.no_grad():
            head.weight.copy_(sol[:head.in_features].T.to(head.weight))
            if head.bias is not None:
                head.bias.copy_(sol[-1].to(head.bias))
        done += 1
    return done
