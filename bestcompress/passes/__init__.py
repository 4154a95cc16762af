"""Graph passes: each a small class with `apply(model) -> model`, looked up by name in the registry."""
from .base import DEFAULT_PIPELINE, Pass, PassContext, PassError, Pipeline, get_pass, list_passes, register_pass
from .binarize_attention import BinarizeAttention
from .binarize_weights import BinarizeWeights
from .canonicalize_neurons import CanonicalizeNeurons
from .channels_last import ChannelsLastConvs
from .reversible import InsertReversibleCouplings
from .tracing import TraceModel

__all__ = ["DEFAULT_PIPELINE", "Pass", "PassContext", "PassError", "Pipeline", "get_pass", "list_passes",
           "register_pass", "BinarizeAttention", "BinarizeWeights", "CanonicalizeNeurons", "ChannelsLastConvs",
           "InsertReversibleCouplings", "TraceModel"]
