"""CIE's information-enhancement losses (METHOD.md §3): classification, hard/soft distillation, feature alignment.

Notation: the student returns (head, head2) while training (the dual-head output of a coupled model) or a single
tensor (then that head plays both roles); y are class indices [B] or soft targets [B, C] (mixup); `teacher` are
the teacher's logits; α = cfg.alpha, τ = cfg.temperature, ls = cfg.label_smoothing, w = cfg.feature_weight.

    ce      = CE_ls(head, y)                                      (label-smoothed; soft targets used as given)
    hard    = CE(head2, argmax teacher)                           (DeiT hard distillation)
    soft    = τ² · KL(softmax(teacher/τ) ‖ softmax(head2/τ))      (mean over the batch)
    feature = mean over blocks b of MSE(std(s_b), std(t_b))       (see feature_alignment_loss)
    attention = mean over matmul operands X of MSE(R(X_s), R(X_t)), R(X) = n(X)·n(X)ᵀ with n the L2
              normalisation of each row                            (see attention_relation_loss)

    total   = (1−α)·ce + α·mean(selected of hard, soft) + w·feature + w_a·attention     (heads: split, DeiT)
    total   = mean over h in (head, head2) of [(1−α)·CE_ls(h, y) + α·mean(hard, soft of h)] + ...
                                                                                          (heads: both)
            = ce_both + w·feature + w_a·attention   when neither hard nor soft is selected, where ce_both
                                          averages CE_ls over the heads (both heads learn the labels)

w_a = cfg.attention_weight. The teacher side of every term is detached: gradients reach the student only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError, RecipeError
from ..recipe import DistillConfig

KNOWN_LOSSES = ("hard", "soft", "feature", "attention")
_EPS = 1e-5


def _heads(out) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ModelError(f"the student returned {len(out)} outputs; CIE expects one logits tensor or a pair "
                             "(head, head2).")
        return out[0], out[1]
    return out, out


def _teacher_logits(t) -> torch.Tensor:
    if isinstance(t, (tuple, list)):  # a dual-head teacher in training mode: use the mean, as in eval
        return sum(t) / len(t)
    return t


def ce_loss(logits_or_tuple, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with label smoothing; a tuple of heads gives the mean of each head's loss.

    Args:
        logits_or_tuple: [B, C] logits, or a tuple of them (dual-head training output).
        labels: class indices [B], or soft targets [B, C] (mixup; used as given, not smoothed again).
        label_smoothing: ε of the smoothed one-hot target (class indices only).
    Returns:
        The scalar loss.
    """
    if isinstance(logits_or_tuple, (tuple, list)):
        return sum(ce_loss(o, labels, label_smoothing) for o in logits_or_tuple) / len(logits_or_tuple)
    logits = logits_or_tuple
    if labels.is_floating_point() and labels.dim() == logits.dim():
        return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over every axis but the first two ([T, B, ...]: per time step and sample).

    A tensor with fewer than three axes is standardized over its last axis.
    """
    dims = tuple(range(2, x.dim())) if x.dim() >= 3 else (-1,)
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + _EPS)


def feature_alignment_loss(student_features, teacher_features) -> torch.Tensor:
    """Mutual-information surrogate between the student's and the teacher's block outputs.

    For each block b, the student's output s_b (the coupled MLP stream z_{2b}) and the teacher's block output t_b,
    both time-first [T, B, ...], are standardized per time step and sample over all remaining axes (tokens ×
    features), and compared with the mean squared error. For standardized vectors of n elements,
    MSE = 2·(1 − ρ) where ρ is their Pearson correlation; for jointly Gaussian features the mutual information
    −½·log(1 − ρ²) grows with ρ, so minimising the loss raises a lower bound on I(s_b; t_b). The blocks'
    losses are averaged. Teacher features carry no gradient. The loss is 0 when s_b = t_b (or any positive
    affine map of it).

    Args:
        student_features: list of the student's block outputs (forward order).
        teacher_features: list of the teacher's matching block outputs.
    Returns:
        The scalar loss.
    """
    if len(student_features) != len(teacher_features):
        raise ModelError(f"the feature loss got {len(student_features)} student block outputs but "
                         f"{len(teacher_features)} teacher block outputs; they must match one to one.")
    if not student_features:
        raise ModelError("the feature loss got no block outputs; run the forward passes inside feature_taps().")
    total = 0.0
    for i, (s, t) in enumerate(zip(student_features, teacher_features)):
        if s.shape != t.shape:
            raise ModelError(f"block {i} output of the student has shape {tuple(s.shape)} but the teacher's has "
                             f"{tuple(t.shape)}; feature alignment needs a teacher of the same architecture "
                             "(use distill.losses [hard] or [soft] with another teacher).")
        # at least float32: statistics over thousands of elements are too coarse in bfloat16 (AMP)
        dtype = torch.promote_types(s.dtype, torch.float32)
        total = total + F.mse_loss(standardize(s.to(dtype)), standardize(t.detach().to(dtype)))
    return total / len(student_features)


def relation(x: torch.Tensor) -> torch.Tensor:
    """R = n(X)·n(X)ᵀ over the last two axes, n normalising each row to unit L2 norm (an all-zero row stays 0)."""
    x = F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1, eps=_EPS)
    return x @ x.transpose(-1, -2)


def attention_relation_loss(student_pairs, teacher_pairs) -> torch.Tensor:
    """Attention-relation distillation (BiBERT's direction matching, applied to spiking attention).

    For every activation×activation matmul a @ b of the attention (Q·Kᵀ and A·V, or Kᵀ·V and Q·A, as the model
    computes them; collected by `feature_taps(..., attention=True)` in call order), each operand X of the student
    and the teacher gives a relation matrix R(X) = n(X)·n(X)ᵀ (cosine similarities of its rows: tokens of Q and V,
    channels of Kᵀ); the loss is the mean over operands of MSE(R(X_s), R(X_t)). It is 0 when the student's
    operands equal the teacher's up to a positive scale per row, and needs no equal magnitudes: binary spikes
    are compared with real-valued teacher activations by direction only. Teacher operands carry no gradient.

    Args:
        student_pairs, teacher_pairs: lists of (a, b) operand pairs, one per matmul, matching one to one.
    Returns:
        The scalar loss.
    """
    if len(student_pairs) != len(teacher_pairs):
        raise ModelError(f"the attention-relation loss got {len(student_pairs)} student attention matmuls but "
                         f"{len(teacher_pairs)} teacher ones; it needs a teacher with the same attention.")
    if not student_pairs:
        raise ModelError("the attention-relation loss found no matmul of two activations (Q·Kᵀ, A·V) in the "
                         "models' forward; use distill.losses without 'attention'.")
    total, count = 0.0, 0
    for i, (sp, tp) in enumerate(zip(student_pairs, teacher_pairs)):
        for s, t in zip(sp, tp):
            if s.shape != t.shape:
                raise ModelError(f"attention matmul {i} has operands of shape {tuple(s.shape)} in the student but "
                                 f"{tuple(t.shape)} in the teacher; they must match.")
            total = total + F.mse_loss(relation(s), relation(t.detach()))
            count += 1
    return total / count


def soft_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ)), averaged over the batch."""
    tau = temperature
    return F.kl_div(F.log_softmax(student_logits / tau, dim=-1), F.log_softmax(teacher_logits.detach() / tau, dim=-1),
                    reduction="batchmean", log_target=True) * (tau * tau)


def _check_cfg(cfg: DistillConfig) -> tuple[str, ...]:
    losses = tuple(cfg.losses)
    for name in losses:
        if name not in KNOWN_LOSSES:
            raise RecipeError(f"distill.losses: unknown loss '{name}' (known: {', '.join(KNOWN_LOSSES)}).")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise RecipeError(f"distill.alpha must lie in [0, 1], got {cfg.alpha}.")
    if cfg.temperature <= 0:
        raise RecipeError(f"distill.temperature must be positive, got {cfg.temperature}.")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise RecipeError(f"distill.label_smoothing must lie in [0, 1), got {cfg.label_smoothing}.")
    if cfg.feature_weight < 0:
        raise RecipeError(f"distill.feature_weight must be >= 0, got {cfg.feature_weight}.")
    if getattr(cfg, "attention_weight", 0.0) < 0:
        raise RecipeError(f"distill.attention_weight must be >= 0, got {cfg.attention_weight}.")
    return losses


class CIELoss(nn.Module):
    """The CIE training loss: classification plus the distillation terms the recipe selects (module docstring).

    Args:
        cfg: the recipe's `distill` section (losses, alpha, temperature, feature_weight, label_smoothing).
    Attributes:
        needs_teacher: True when 'hard' or 'soft' is selected (pass `teacher_logits`).
        needs_features: True when 'feature' or 'attention' is selected (pass the taps' lists from
            `feature_taps(student, teacher, **loss.tap_options)`).
        tap_options: the `feature_taps` keywords this loss needs (blocks, attention).
    """

    def __init__(self, cfg: DistillConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.losses = _check_cfg(cfg)
        self.needs_teacher = any(n in self.losses for n in ("hard", "soft"))
        self.needs_blocks = "feature" in self.losses
        self.needs_attention = "attention" in self.losses
        self.needs_features = self.needs_blocks or self.needs_attention
        self.tap_options = {"blocks": self.needs_blocks, "attention": self.needs_attention}

    def forward(self, student_out, labels: torch.Tensor, teacher_logits=None, student_features=None,
                teacher_features=None) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns (total loss, {'ce': .., 'hard': .., 'soft': .., 'feature': .., 'total': ..}) with only the
        parts in use."""
        cfg = self.cfg
        head, head2 = _heads(student_out)
        parts: dict[str, torch.Tensor] = {}
        distill_terms = []
        if self.needs_teacher:
            if teacher_logits is None:
                raise ModelError(f"the distillation losses {', '.join(self.losses)} need the teacher's logits.")
            teacher = _teacher_logits(teacher_logits).detach()
            if teacher.shape != head2.shape:
                raise ModelError(f"the teacher's logits have shape {tuple(teacher.shape)} but the student's "
                                 f"{tuple(head2.shape)}; teacher and student must predict the same classes.")
            kd_heads = (head, head2) if cfg.heads == "both" else (head2,)
            if "hard" in self.losses:
                parts["hard"] = sum(F.cross_entropy(h, teacher.argmax(dim=-1)) for h in kd_heads) / len(kd_heads)
                distill_terms.append(parts["hard"])
            if "soft" in self.losses:
                parts["soft"] = sum(soft_distillation(h, teacher, cfg.temperature) for h in kd_heads) / len(kd_heads)
                distill_terms.append(parts["soft"])
        if distill_terms:
            ce_heads = student_out if cfg.heads == "both" else head
            parts["ce"] = ce_loss(ce_heads, labels, cfg.label_smoothing)
            total = (1.0 - cfg.alpha) * parts["ce"] + cfg.alpha * sum(distill_terms) / len(distill_terms)
        else:
            parts["ce"] = ce_loss(student_out, labels, cfg.label_smoothing)
            total = parts["ce"]
        if self.needs_features and (student_features is None or teacher_features is None):
            raise ModelError(f"the '{'feature' if self.needs_blocks else 'attention'}' loss needs the student's and "
                             "the teacher's block outputs (collect them with feature_taps).")
        if self.needs_blocks:
            parts["feature"] = feature_alignment_loss(student_features, teacher_features)
            total = total + cfg.feature_weight * parts["feature"]
        if self.needs_attention:
            s_att, t_att = getattr(student_features, "attention", None), getattr(teacher_features, "attention", None)
            if s_att is None or t_att is None:
                raise ModelError("the 'attention' loss needs the attention operands: collect them with "
                                 "feature_taps(student, teacher, attention=True).")
            parts["attention"] = attention_relation_loss(s_att, t_att)
            total = total + cfg.attention_weight * parts["attention"]
        parts["total"] = total
        return total, {k: float(v.detach()) for k, v in parts.items()}


class ClassLoss(nn.Module):
    """Plain label-smoothed cross-entropy (for training the full-precision teacher), with CIELoss's interface."""

    needs_teacher = False
    needs_features = False

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, student_out, labels: torch.Tensor, teacher_logits=None, student_features=None,
                teacher_features=None) -> tuple[torch.Tensor, dict[str, float]]:
        loss = ce_loss(student_out, labels, self.label_smoothing)
        value = float(loss.detach())
        return loss, {"ce": value, "total": value}


def class_loss(cfg: DistillConfig) -> ClassLoss:
    """The classification-only loss with the recipe's label smoothing."""
    _check_cfg(cfg)
    return ClassLoss(cfg.label_smoothing)
