"""The model registry (timm habit): models are registered by name and built with create_model.

    @register_model("spikformer_cifar", family="spikformer", default_cfg={...}, tiny_cfg={...},
                    detect=detect_fn, input_shape=lambda cfg: (3, cfg["img_size"], cfg["img_size"]))
    class SpikformerCifar(nn.Module): ...

The decorated factory is any callable `factory(**kwargs) -> nn.Module` with named keyword options (a model
class or a function); its signature is the list of options create_model accepts.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import nn

from bestcompress.errors import ModelError
from bestcompress.state_dict import strip_prefixes

DetectFn = Callable[[Mapping[str, torch.Tensor]], "dict | None"]


@dataclass(frozen=True)
class ModelEntry:
    """One registered model.

    Attributes:
        name: registry name.
        family: architecture family (spikformer, spikingformer, spike_driven_transformer, ...).
        factory: callable(**kwargs) -> nn.Module.
        default_cfg: options of the reference configuration (read-only mapping).
        tiny_cfg: options overriding default_cfg for a model small enough for CPU tests (read-only mapping).
        input_shape: callable(resolved options) -> per-sample input shape, e.g. (3, 32, 32) or (1, 40).
        detect: callable(state_dict) -> options inferred from key names and shapes, or None if not this model.
    """

    name: str
    family: str
    factory: Callable[..., nn.Module]
    default_cfg: Mapping
    tiny_cfg: Mapping
    input_shape: Callable[[Mapping], tuple]
    detect: DetectFn | None = None

    def options(self) -> dict:
        """Every option the factory accepts, with its value in the reference configuration."""
        params = inspect.signature(self.factory).parameters
        resolved = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
        resolved.update(self.default_cfg)
        return resolved

    def resolve(self, **kwargs) -> dict:
        """default_cfg overridden by kwargs; unknown option names raise ModelError."""
        known = self.options()
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise ModelError(f"Model '{self.name}' has no option {', '.join(map(repr, unknown))}; "
                             f"its options are {', '.join(sorted(known))}.")
        known.update(kwargs)
        return known


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, family: str, default_cfg: dict, tiny_cfg: dict,
                   input_shape: Callable[[Mapping], tuple], detect: DetectFn | None = None):
    """Decorator registering `factory(**kwargs) -> nn.Module` under `name`; returns the factory unchanged.

    Args:
        name: registry name (unique).
        family: architecture family.
        default_cfg: reference options (the paper's configuration).
        tiny_cfg: overrides of default_cfg giving a model fast enough for CPU tests.
        input_shape: callable(resolved options) -> per-sample input shape.
        detect: callable(state_dict) -> inferred options or None.
    """

    def decorator(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        params = inspect.signature(factory).parameters
        if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values()):
            raise ValueError(f"model {name!r}: the factory must name its options (no *args/**kwargs)")
        for cfg_name, cfg in (("default_cfg", default_cfg), ("tiny_cfg", tiny_cfg)):
            extra = set(cfg) - set(params)
            if extra:
                raise ValueError(f"model {name!r}: {cfg_name} has options the factory lacks: {sorted(extra)}")
        _REGISTRY[name] = ModelEntry(name=name, family=family, factory=factory,
                                     default_cfg=MappingProxyType(dict(default_cfg)),
                                     tiny_cfg=MappingProxyType(dict(tiny_cfg)),
                                     input_shape=input_shape, detect=detect)
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """The registry entry of `name`; an unknown name raises ModelError."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"Unknown model {name!r}; known models are {', '.join(list_models())}.") from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model from its default_cfg overridden by kwargs.

    Args:
        name: registry name (see list_models()).
        **kwargs: options of that model; unknown ones raise ModelError.

    Returns:
        The model, with `model.bc_spec = {"arch": name, "kwargs": resolved options}` recording how it was built.
    """
    entry = get_entry(name)
    resolved = entry.resolve(**kwargs)
    model = entry.factory(**resolved)
    model.bc_spec = {"arch": name, "kwargs": dict(resolved)}
    return model


def tiny_model(name: str, **kwargs) -> nn.Module:
    """The entry's tiny configuration (for tests and examples), overridden by kwargs."""
    entry = get_entry(name)
    return create_model(name, **{**entry.tiny_cfg, **kwargs})


def _param_shapes(state_dict: Mapping) -> dict[str, tuple]:
    # num_batches_tracked is absent from some checkpoints and carries no architecture information.
    return {k: tuple(v.shape) for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and not k.endswith("num_batches_tracked")}


def _fits(name: str, cfg: dict, shapes: dict[str, tuple]) -> bool:
    """True when create_model(name, **cfg) has exactly these parameter/buffer names and shapes."""
    try:
        with torch.device("meta"):
            model = create_model(name, **cfg)
    except ModelError:
        return False
    return _param_shapes(model.state_dict()) == shapes


def detect_architecture(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict] | None:
    """Which registered model a state_dict belongs to, and with which sizes.

    Each entry's detect infers options from key names and shapes (depth, embed_dims, num_classes, in_channels,
    mlp_ratios; num_heads only where a parameter reveals it, else the default). A candidate is accepted only if
    the model built with those options (on the meta device, so nothing is allocated) has exactly the
    state_dict's names and shapes. A leading 'module.' (or '_orig_mod.') on every key is ignored.

    Returns:
        (name, inferred options) or None when no registered model fits.
    """
    state_dict = strip_prefixes(state_dict)
    shapes = _param_shapes(state_dict)
    for name, entry in _REGISTRY.items():
        if entry.detect is None:
            continue
        cfg = entry.detect(state_dict)
        if cfg is not None and _fits(name, cfg, shapes):
            return name, cfg
    return None
