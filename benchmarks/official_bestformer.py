"""The public BESTformer code (github.com/CaoHLin/BESTFormer), read at run time from a folder the user points to.

Nothing of it is vendored: `load(folder)` imports `cifar/model.py` of that folder (or `model.py` when the folder is
`cifar/` itself; its sibling `quantized_utils.py` is found through sys.path) and returns a builder of its model
function `BESTFormer(**kw)` (a `vit_snn`: tokenizer + RevSpikingTransformer blocks, two heads).

That code imports timm (layers, registry, vision_transformer helpers) and spikingjelly's `clock_driven` package
(spikingjelly ≤ 0.0.0.0.14; 2.0 renamed it `activation_based`), and builds every neuron with backend='cupy'
(CUDA only). Without those `load` returns the sentence saying what is missing and the row is skipped. With
`shim=True` it stands in for only what is missing, while importing (benchmarks/stand_ins.py, shared with
public_models.py), and says so in the result:
- timm: to_2tuple, trunc_normal_ (torch.nn.init.trunc_normal_), DropPath (stochastic depth, per example; the
  blocks construct it but never call it), register_model (returns the function), _cfg (a dict), create_model;
- spikingjelly.clock_driven.neuron.MultiStepLIFNode: spikingjelly 2.0's LIFNode(step_mode='m') with the same
  arguments and defaults (tau, v_threshold=1, v_reset=0, decay_input, Sigmoid(alpha=4) surrogate, detach_reset);
  the `backend` asked for is dropped (2.0's LIFNode takes none and picks its own CPU path; cupy is CUDA only).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

import stand_ins

CONFIG = dict(img_size_h=32, img_size_w=32, patch_size=4, embed_dims=128, num_heads=4, mlp_ratios=4,
              in_channels=3, num_classes=10, qkv_bias=False, depths=2, sr_ratios=1, T=4, drop_rate=0.0,
              drop_path_rate=0.0)
NEEDS = ("timm", "spikingjelly.clock_driven")  # what cifar/model.py imports beyond torch


def load(folder: Path, shim: bool):
    """(build, info) where build() returns a fresh model of CONFIG, or (None, reason) when it cannot be had."""
    folder = Path(folder)
    model_py = next((p for p in (folder / "cifar" / "model.py", folder / "model.py") if p.is_file()), None)
    if model_py is None:
        return None, f"no cifar/model.py (or model.py) under {folder}"
    missing = stand_ins.missing(NEEDS)
    if missing and not shim:
        return None, (f"the public code needs {', '.join(missing)}, not installed here (spikingjelly 2.0 has no "
                      "clock_driven; its neurons ask for the CUDA-only cupy backend); pass --official-shim to stand "
                      "in for them")
    spec = importlib.util.spec_from_file_location("bestformer_official_model", model_py)
    module = importlib.util.module_from_spec(spec)
    try:
        with stand_ins.installed(missing, model_py.parent):
            spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the public code needs that is not here
        return None, f"importing {model_py} failed ({type(e).__name__}: {e})"
    if not hasattr(module, "BESTFormer"):
        return None, f"{model_py} defines no BESTFormer model function"

    def build():
        torch.manual_seed(0)
        return module.BESTFormer(**CONFIG)

    info = {"file": str(model_py.relative_to(folder)), "builds": "BESTFormer(**config) -> vit_snn",
            "config": CONFIG, "stand_ins": {k: stand_ins.SHIM_SAYS[k] for k in missing}}
    return build, info


def reset(model: nn.Module) -> None:
    """Forget every neuron's membrane between steps, as the public training loop does (reset_net)."""
    for m in model.modules():
        if hasattr(m, "reset") and callable(m.reset) and m is not model:
            m.reset()
