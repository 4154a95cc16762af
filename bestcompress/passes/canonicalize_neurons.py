"""CanonicalizeNeurons: third-party neurons -> bestcompress LIF with the same dynamics (placeholder)."""
from __future__ import annotations

from torch import nn

from .base import Pass, register_pass


@register_pass
class CanonicalizeNeurons(Pass):
    """Replace spikingjelly/snntorch/norse neurons by bestcompress LIF, verified equal on random input.

    Requires: an nn.Module. Ensures: every replaced neuron computes the same spikes as the original.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        return model
