"""Training: the trainer (train/distill/evaluate), CIE distillation losses and the feature taps that feed them."""
from .losses import CIELoss, ClassLoss, ce_loss, class_loss, feature_alignment_loss, soft_distillation, standardize
from .taps import FeatureTaps, feature_taps

__all__ = ["CIELoss", "ClassLoss", "FeatureTaps", "ce_loss", "class_loss", "feature_alignment_loss", "feature_taps",
           "soft_distillation", "standardize"]
