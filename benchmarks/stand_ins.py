"""Stand-ins for what the public spiking-transformer code imports and this machine may lack: timm's helpers,
spikingjelly's legacy `clock_driven` package (spikingjelly <= 0.0.0.0.14; 2.0 renamed it `activation_based`),
einops and torchinfo, and the `backend=` argument of spikingjelly 0.0.0.0.14's activation_based neurons (2.0 has
none). One set of files (SHIM) serves both benchmark paths: `write(folder, names)` puts them in a
folder for child processes (on their PYTHONPATH; the clock_driven finder is a sitecustomize), and `installed(names)`
makes them importable in this process for a `with` block, leaving nothing behind. SHIM_SAYS says what each
replaces. Used by benchmarks/public_models.py and benchmarks/official_bestformer.py.
"""
from __future__ import annotations

import importlib.util
import inspect
import runpy
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

SHIM = {
    "timm": {
        "timm/__init__.py": "",
        "timm/models/__init__.py": (
            "def create_model(*a, **k):\n"
            "    raise RuntimeError('timm.create_model is not available in this stand-in')\n"),
        "timm/models/layers.py": (
            "import torch\nfrom torch import nn\ntrunc_normal_ = nn.init.trunc_normal_\n\n"
            "def to_2tuple(v):\n    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)\n\n"
            "class DropPath(nn.Module):\n"
            "    def __init__(self, drop_prob=0.0):\n        super().__init__()\n        self.p = float(drop_prob)\n\n"
            "    def forward(self, x):\n"
            "        if not self.training or self.p == 0.0:\n            return x\n"
            "        keep = (torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p)\n"
            "        return x * keep.to(x.dtype) / (1.0 - self.p)\n"),
        "timm/models/registry.py": "def register_model(fn):\n    return fn\n",
        "timm/models/vision_transformer.py": "def _cfg(url='', **kwargs):\n    return dict(url=url, **kwargs)\n",
        "timm/data/__init__.py": ("IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)\n"
                                  "IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)\n"),
    },
    "spikingjelly.clock_driven": {
        # Found through a meta-path finder (sitecustomize) appended after the real ones, so an installed
        # clock_driven wins; spikingjelly 2.0 classes with the legacy multi-step names and arguments.
        "sitecustomize.py": (
            "import importlib.abc, importlib.util, os, sys\n"
            "_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '_clock_driven')\n\n"
            "class _ClockDriven(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        parts = name.split('.')\n"
            "        if parts[:2] != ['spikingjelly', 'clock_driven']:\n            return None\n"
            "        where = os.path.join(_BASE, *parts[2:])\n"
            "        if len(parts) == 2:\n"
            "            return importlib.util.spec_from_file_location(name, os.path.join(_BASE, '__init__.py'),\n"
            "                                                          submodule_search_locations=[_BASE])\n"
            "        if os.path.isfile(where + '.py'):\n"
            "            return importlib.util.spec_from_file_location(name, where + '.py')\n"
            "        return None\n\n"
            "sys.meta_path.append(_ClockDriven())\n"),
        "_clock_driven/__init__.py": "",
        "_clock_driven/neuron.py": (
            "from spikingjelly.activation_based import neuron as _n\n\n"
            "class MultiStepLIFNode(_n.LIFNode):\n"
            "    def __init__(self, *args, backend='torch', **kw):  # cupy is CUDA only; 2.0 picks its CPU path\n"
            "        super().__init__(*args, step_mode='m', **kw)\n\n"
            "class MultiStepParametricLIFNode(_n.ParametricLIFNode):\n"
            "    def __init__(self, *args, backend='torch', **kw):\n"
            "        super().__init__(*args, step_mode='m', **kw)\n"),
        "_clock_driven/layer.py": "from spikingjelly.activation_based.layer import *  # noqa\n",
        "_clock_driven/surrogate.py": "from spikingjelly.activation_based.surrogate import *  # noqa\n",
        "_clock_driven/functional.py": "from spikingjelly.activation_based.functional import *  # noqa\n",
    },
    "spikingjelly backend=": {
        # spikingjelly 0.0.0.0.14's activation_based neurons take backend='torch'|'cupy'; 2.0 has no such argument.
        # When spikingjelly.activation_based.neuron is imported, each neuron class's own __init__ accepts and drops
        # it (cupy is CUDA only; 2.0 runs its CPU path). A finder (sitecustomize) wraps that one module's loading.
        "sitecustomize.py": (
            "import importlib.abc, inspect, sys\n\n"
            "class _DropBackend(importlib.abc.MetaPathFinder):\n"
            "    NAME = 'spikingjelly.activation_based.neuron'\n\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name != self.NAME:\n            return None\n"
            "        for f in sys.meta_path:\n"
            "            if f is self or not hasattr(f, 'find_spec'):\n                continue\n"
            "            spec = f.find_spec(name, path, target)\n"
            "            if spec is not None:\n"
            "                run = spec.loader.exec_module\n"
            "                def exec_module(module, run=run):\n"
            "                    run(module)\n"
            "                    _patch(module)\n"
            "                spec.loader.exec_module = exec_module\n"
            "                return spec\n"
            "        return None\n\n"
            "def _patch(module):\n"
            "    base = getattr(module, 'BaseNode', None)\n"
            "    for cls in list(vars(module).values()):\n"
            "        if not (isinstance(cls, type) and base and issubclass(cls, base) and '__init__' in vars(cls)):\n"
            "            continue\n"
            "        init = vars(cls)['__init__']\n"
            "        if 'backend' in inspect.signature(init).parameters:\n            continue\n"
            "        def __init__(self, *a, backend='torch', _init=init, **k):\n"
            "            _init(self, *a, **k)\n"
            "        __init__.__wrapped__ = init\n"
            "        cls.__init__ = __init__\n\n"
            "sys.meta_path.insert(0, _DropBackend())\n"),
    },
    "einops": {
        "einops/__init__.py": "", "einops/layers/__init__.py": "",
        "einops/layers/torch.py": ("class Rearrange:\n    def __init__(self, *a, **k):\n"
                                   "        raise RuntimeError('einops.layers.torch.Rearrange stand-in: not usable')\n"),
    },
    "torchinfo": {"torchinfo/__init__.py": ("def summary(*a, **k):\n"
                                            "    raise RuntimeError('torchinfo stand-in: not usable')\n")},
}
SHIM_SAYS = {
    "timm": "to_2tuple, trunc_normal_ (torch's), DropPath, register_model, _cfg, IMAGENET_DEFAULT_MEAN/STD",
    "spikingjelly.clock_driven": "MultiStepLIFNode / MultiStepParametricLIFNode = spikingjelly 2.0 LIFNode / "
                                 "ParametricLIFNode(step_mode='m'), backend='cupy' dropped; layer/surrogate/"
                                 "functional re-exported from activation_based",
    "spikingjelly backend=": "spikingjelly.activation_based neurons accept backend= (0.0.0.0.14's argument, "
                             "dropped: 2.0 has none and runs its CPU path)",
    "einops": "einops.layers.torch.Rearrange imported only (raises if built; none of the rows builds one)",
    "torchinfo": "torchinfo.summary imported only (raises if called)",
}


def _neurons_take_backend() -> bool:
    """spikingjelly.activation_based's neurons take backend= (0.0.0.0.14), or there is no activation_based."""
    try:
        from spikingjelly.activation_based import neuron
    except ImportError:
        return True  # nothing to adapt (the clock_driven stand-in needs activation_based anyway)
    return "backend" in inspect.signature(neuron.LIFNode.__init__).parameters


def missing(names=tuple(SHIM)) -> list[str]:
    """Which of `names` (keys of SHIM) cannot be imported here (or, for 'spikingjelly backend=', are unlike
    what the public code expects)."""
    out = []
    for name in names:
        if name == "spikingjelly backend=":
            if not _neurons_take_backend():
                out.append(name)
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # the parent package (spikingjelly) is absent
            found = False
        if not found:
            out.append(name)
    return out


def write(folder: Path, names) -> None:
    """The stand-in files of `names` under `folder`."""
    for name in names:
        for rel, text in SHIM[name].items():
            p = Path(folder) / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if rel == "sitecustomize.py" and p.is_file():  # two stand-ins that hook imports: run both
                text = p.read_text() + "\n" + text
            p.write_text(text)


def _under(module, folders: list[Path]) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and any(Path(file).resolve().is_relative_to(f) for f in folders)


@contextmanager
def installed(names, *folders: Path):
    """Inside the block, `names` import from stand-ins (and `folders` are searched first, as for a script);
    afterwards sys.path, sys.meta_path and sys.modules are as before: every module loaded from the stand-ins or
    from `folders` is forgotten (objects already built from them keep working)."""
    with tempfile.TemporaryDirectory(prefix="bc_stand_ins_") as tmp:
        shim = Path(tmp)
        write(shim, names)
        paths = [str(shim)] + [str(f) for f in folders]
        before, finders = set(sys.modules), list(sys.meta_path)
        sys.path[:0] = paths
        if (shim / "sitecustomize.py").is_file():
            runpy.run_path(str(shim / "sitecustomize.py"))  # the clock_driven finder, as a child would get it
        try:
            yield
        finally:
            for p in paths:
                sys.path.remove(p)
            sys.meta_path[:] = finders
            roots = [Path(p).resolve() for p in paths]
            for name in set(sys.modules) - before:
                if _under(sys.modules[name], roots):
                    del sys.modules[name]
