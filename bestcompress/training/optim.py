"""The optimizer and learning-rate schedule of a run (recipe.train)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..recipe import Recipe


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW; biases, BN and other parameters with fewer than 2 dimensions get no weight decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=recipe.train.lr)


def make_scheduler(optimizer, recipe: Recipe, steps_per_epoch: int, epochs: int):
    """Per-step schedule: linear warm-up over warmup_epochs (at most half the run), then cosine to min_lr."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(recipe.train.warmup_epochs * steps_per_epoch, total // 2)
    floor = recipe.train.min_lr / recipe.train.lr if recipe.train.lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
