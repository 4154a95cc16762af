"""Full-precision reference models, registered by name (timm habit).

    from bestcompress.zoo import create_model, list_models
    model = create_model("spikformer_cifar", num_classes=100)

Each model file says which public code it mirrors; its attribute names and parameter shapes match that code,
so the public checkpoints load with strict=True. Importing this package registers every model.
"""
from bestcompress.zoo.registry import (
    ModelEntry, create_model, detect_architecture, get_entry, list_models, register_model, tiny_model,
)
# importing the model modules registers them
from bestcompress.zoo import (  # noqa: F401
    qkformer, sdt_v1, sdt_v2, spikformer_cifar, spikformer_imagenet, spikformer_seq, spikingformer,
)

__all__ = ["ModelEntry", "create_model", "detect_architecture", "get_entry", "list_models", "register_model",
           "tiny_model"]
