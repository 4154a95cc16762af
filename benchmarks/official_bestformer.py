"""The public BESTformer code (github.com/CaoHLin/BESTFormer), read at run time from a folder the user points to.

Nothing of it is vendored: `load(folder)` imports `cifar/model.py` of that folder (or `model.py` when the folder is
`cifar/` itself; its sibling `quantized_utils.py` is found through sys.path) and returns a builder of its model
function `BESTFormer(**kw)` (a `vit_snn`: tokenizer + RevSpikingTransformer blocks, two heads).

That code imports timm (layers, registry, vision_transformer helpers) and spikingjelly's `clock_driven` package
(spikingjelly ≤ 0.0.0.0.14; 2.0 renamed it `activation_based`), and builds every neuron with backend='cupy'
(CUDA only). Without those `load` returns the sentence saying what is missing and the row is skipped. With
`shim=True` it stands in for only what is missing, while importing, and says so in the result:
- timm: to_2tuple, trunc_normal_ (torch.nn.init.trunc_normal_), DropPath (stochastic depth, per example; the
  blocks construct it but never call it), register_model (returns the function), _cfg (a dict), create_model;
- spikingjelly.clock_driven.neuron.MultiStepLIFNode: spikingjelly 2.0's LIFNode(step_mode='m') with the same
  arguments and defaults (tau, v_threshold=1, v_reset=0, decay_input, Sigmoid(alpha=4) surrogate, detach_reset);
  the `backend` asked for is dropped (2.0's LIFNode takes none and picks its own CPU path; cupy is CUDA only).
"""
from __future__ import annotations

import importlib.util
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

CONFIG = dict(img_size_h=32, img_size_w=32, patch_size=4, embed_dims=128, num_heads=4, mlp_ratios=4,
              in_channels=3, num_classes=10, qkv_bias=False, depths=2, sr_ratios=1, T=4, drop_rate=0.0,
              drop_path_rate=0.0)


def _missing() -> list[str]:
    out = []
    if importlib.util.find_spec("timm") is None:
        out.append("timm")
    try:
        found = importlib.util.find_spec("spikingjelly.clock_driven") is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        out.append("spikingjelly.clock_driven")
    return out


class _DropPath(nn.Module):
    """Stochastic depth: in training each example's branch is zeroed with probability p and the rest scaled."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = (torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p).to(x.dtype)
        return x * keep / (1.0 - self.p)


def _timm_stand_in() -> dict[str, types.ModuleType]:
    def to_2tuple(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    def register_model(fn):
        return fn

    def create_model(*_, **__):
        raise RuntimeError("timm.create_model is not available in this stand-in")

    mods = {name: types.ModuleType(name) for name in
            ("timm", "timm.models", "timm.models.layers", "timm.models.registry", "timm.models.vision_transformer")}
    layers = mods["timm.models.layers"]
    layers.to_2tuple, layers.trunc_normal_, layers.DropPath = to_2tuple, nn.init.trunc_normal_, _DropPath
    mods["timm.models.registry"].register_model = register_model
    mods["timm.models.vision_transformer"]._cfg = lambda **kw: dict(kw)
    mods["timm.models"].create_model = create_model
    for name, mod in mods.items():  # parents know their children, as after a real import
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    return mods


def _clock_driven_stand_in() -> dict[str, types.ModuleType]:
    from spikingjelly.activation_based import neuron

    class MultiStepLIFNode(neuron.LIFNode):
        def __init__(self, *args, backend: str = "torch", **kw):  # 2.0 picks its implementation itself
            super().__init__(*args, step_mode="m", **kw)

    cd, cdn = types.ModuleType("spikingjelly.clock_driven"), types.ModuleType("spikingjelly.clock_driven.neuron")
    cdn.MultiStepLIFNode, cd.neuron = MultiStepLIFNode, cdn
    return {"spikingjelly.clock_driven": cd, "spikingjelly.clock_driven.neuron": cdn}


@contextmanager
def _stand_ins(mods: dict[str, types.ModuleType], path: Path):
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        sys.modules.pop("quantized_utils", None)


STAND_INS = {"timm": "timm helpers (to_2tuple, trunc_normal_, DropPath, register_model, _cfg) written here",
             "spikingjelly.clock_driven": "MultiStepLIFNode = spikingjelly 2.0 LIFNode(step_mode='m') "
                                         "on the CPU (the code asks for backend='cupy', CUDA only)"}


def load(folder: Path, shim: bool):
    """(build, info) where build() returns a fresh model of CONFIG, or (None, reason) when it cannot be had."""
    folder = Path(folder)
    model_py = next((p for p in (folder / "cifar" / "model.py", folder / "model.py") if p.is_file()), None)
    if model_py is None:
        return None, f"no cifar/model.py (or model.py) under {folder}"
    missing = _missing()
    if missing and not shim:
        return None, (f"the public code needs {', '.join(missing)}, not installed here (spikingjelly 2.0 has no "
                      "clock_driven; its neurons ask for the CUDA-only cupy backend); pass --official-shim to stand "
                      "in for them")
    mods = {}
    if "timm" in missing:
        mods.update(_timm_stand_in())
    if "spikingjelly.clock_driven" in missing:
        mods.update(_clock_driven_stand_in())
    spec = importlib.util.spec_from_file_location("bestformer_official_model", model_py)
    module = importlib.util.module_from_spec(spec)
    try:
        with _stand_ins(mods, model_py.parent):
            spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the public code needs that is not here
        return None, f"importing {model_py} failed ({type(e).__name__}: {e})"
    if not hasattr(module, "BESTFormer"):
        return None, f"{model_py} defines no BESTFormer model function"

    def build():
        torch.manual_seed(0)
        return module.BESTFormer(**CONFIG)

    info = {"file": str(model_py.relative_to(folder)), "builds": "BESTFormer(**config) -> vit_snn",
            "config": CONFIG, "stand_ins": {k: STAND_INS[k] for k in missing}}
    return build, info


def reset(model: nn.Module) -> None:
    """Forget every neuron's membrane between steps, as the public training loop does (reset_net)."""
    for m in model.modules():
        if hasattr(m, "reset") and callable(m.reset) and m is not model:
            m.reset()
