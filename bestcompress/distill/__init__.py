"""Coupled Information Enhancement: distillation losses and the feature taps that feed them."""
from .losses import CIELoss, ClassLoss, ce_loss, class_loss, feature_alignment_loss, soft_distillation, standardize
from .taps import FeatureTaps, feature_taps
from .._callable_module import make_callable

make_callable(__name__, "bestcompress.distill.trainer:distill")  # bestcompress.distill(student, teacher, ...)

__all__ = ["CIELoss", "ClassLoss", "FeatureTaps", "ce_loss", "class_loss", "feature_alignment_loss", "feature_taps",
           "soft_distillation", "standardize"]
