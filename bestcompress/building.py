"""Building models: zoo names, user factories, stored specs. Nothing a file names is imported or called.

A model records how it was built in `model.bc_spec`:

    {"arch": zoo name, "kwargs": {...}}          plain data: rebuilt from the registry, always allowed
    {"factory": "file.py:fn" | "pkg.mod:fn", "kwargs": {...}}   user code
    {"pickle": path}                             a pickled module (unpickling runs code)

A file (checkpoint or .bcz header) may name only registered zoo architectures and plain data. User code runs only
when the user named it (`--model`/`--teacher-model`, or the `model=` argument in Python: that factory builds the
model, whatever the file says) or passed `--trust-checkpoint` (`trust=True`).
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import nn

from .errors import CheckpointError, ModelError, short_reason

_PLAIN = (str, int, float, bool, type(None))


def load_factory(spec: str, option: str = "--model") -> Callable[..., nn.Module]:
    """The function named by 'path/to/file.py:fn' or 'package.module:fn' (the user named it)."""
    target, sep, fn_name = spec.rpartition(":")
    if not sep or not target or not fn_name:
        raise ModelError(f"{option} expects FILE.py:FUNCTION or package.module:FUNCTION, got '{spec}'.")
    if target.endswith(".py") or "/" in target or os.sep in target:
        file = Path(target)
        if not file.is_file():
            raise ModelError(f"Model file '{file}' does not exist.")
        module = _import_file(file)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ModelError(f"Cannot import module '{target}' for {option} ({type(e).__name__}: "
                             f"{short_reason(e)}).") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelError(f"'{target}' has no function '{fn_name}' to build the model.")
    return fn


def _relative_imports(file: Path) -> bool:
    try:
        tree = ast.parse(file.read_text())
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError):
        return False  # the import itself says what is wrong
    return any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))


def _packages(file: Path) -> list[Path]:
    """The package folders (with an __init__.py) that hold `file`, outermost first."""
    chain, folder = [], file.parent
    while (folder / "__init__.py").is_file() and folder.parent != folder:
        chain.insert(0, folder)
        folder = folder.parent
    return chain


def _import_file(file: Path):
    """Import a --model file as a script would be, with its own folder searched first (`from sibling import X`).
    A file inside a package that imports relatively (`from .layers import X`, as a repository's models/ package
    does) is imported as part of that package, under a private name for its outermost package folder, so its
    relative imports resolve and the package's __init__ files run as they do for the authors."""
    shown, file = file, file.resolve()
    digest = lambda p: hashlib.sha1(str(p).encode()).hexdigest()[:12]  # noqa: E731
    chain = _packages(file) if _relative_imports(file) else []
    if chain:
        root = "bc_user_pkg_" + digest(chain[0])
        name = ".".join([root, *file.relative_to(chain[0]).with_suffix("").parts])
    else:
        root = name = "bc_user_model_" + digest(file)
    if name in sys.modules:
        return sys.modules[name]
    before = set(sys.modules)
    folder = str(file.parent)
    sys.path.insert(0, folder)
    try:
        if chain:
            if root not in sys.modules:
                spec = importlib.util.spec_from_file_location(root, chain[0] / "__init__.py",
                                                              submodule_search_locations=[str(chain[0])])
                sys.modules[root] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(sys.modules[root])
            return importlib.import_module(name)
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look classes up here
        spec.loader.exec_module(module)
        return module
    except Exception as e:
        for mod in set(sys.modules) - before:
            if mod == root or mod.startswith(root + "."):
                del sys.modules[mod]
        raise ModelError(f"Importing model file '{shown}' failed ({type(e).__name__}: "
                         f"{short_reason(e)}).") from None
    finally:
        sys.path.remove(folder)


def factory_key(spec: str) -> str:
    """The spec with a file path made absolute, so the model can be rebuilt from elsewhere."""
    target, _, fn_name = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or os.sep in target:
        target = str(Path(target).resolve())
    return f"{target}:{fn_name}"


def factory_file(spec: str | None) -> Path | None:
    """The .py file a factory spec names (an input of the command), or None."""
    if not spec:
        return None
    target = spec.rpartition(":")[0]
    return Path(target) if target.endswith(".py") or "/" in target or os.sep in target else None


def build_from_factory(spec: str, kwargs: Mapping | None = None, option: str = "--model") -> nn.Module:
    """Call a user factory 'file.py:fn' with kwargs; the model gets its bc_spec."""
    fn = load_factory(spec, option)
    kwargs = dict(kwargs or {})
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise ModelError(f"Model factory '{spec}' raised {type(e).__name__}: {short_reason(e)}.") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"Model factory '{spec}' returned a {type(model).__name__}, not a torch nn.Module.")
    model.bc_spec = {"factory": factory_key(spec), "kwargs": kwargs}
    return model


def _check_plain(value, source: str, where: str = "kwargs") -> None:
    """Stored options must be plain data (numbers, strings, lists, dicts), never objects."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, source, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{source} stores a model option key {k!r} that is not a string.")
            _check_plain(v, source, f"{where}.{k}")
        return
    raise CheckpointError(f"{source} stores the model option '{where}' as a {type(value).__name__}; only plain "
                          "data (numbers, strings, lists, mappings) is accepted.")


def build_from_spec(spec, *, factory: str | None = None, factory_kwargs: Mapping | None = None,
                    trust: bool = False, source: str = "The checkpoint", option: str = "--model") -> nn.Module:
    """Rebuild a model (random weights) from a stored spec, running no code the file names without consent.

    Args:
        spec: the stored `bc_spec` (from a checkpoint or a .bcz header).
        factory: the factory the user named ('file.py:fn'); it builds the model whatever the spec says, with
            `factory_kwargs` (default: the spec's kwargs).
        trust: the user passed --trust-checkpoint: a spec naming a factory or a pickle is followed.
        source: how to name the file in messages ("Checkpoint 'x.pt'").
        option: the command-line option that names a factory (--model, --teacher-model).
    Raises:
        CheckpointError: a spec naming code without consent (the sentence says which factory to pass), or a
            spec that is not plain data.
    """
    if not isinstance(spec, Mapping):
        raise CheckpointError(f"{source} stores a model spec that is not a mapping ({type(spec).__name__}).")
    kwargs = spec.get("kwargs") or {}
    _check_plain(kwargs, source)
    if factory is not None:
        if factory_kwargs is None:
            factory_kwargs = kwargs if "factory" in spec else {}
        return build_from_factory(factory, factory_kwargs, option)
    if "arch" in spec:
        from .zoo import create_model, list_models
        arch = spec["arch"]
        if not isinstance(arch, str) or arch not in list_models():
            raise CheckpointError(f"{source} names the architecture {arch!r}, which is not a registered zoo model "
                                  f"(known: {', '.join(list_models())}); pass {option} FILE.py:FN to build it.")
        return create_model(arch, **dict(kwargs))
    if "factory" in spec:
        name = spec["factory"]
        if not isinstance(name, str):
            raise CheckpointError(f"{source} stores a model factory that is not a string.")
        if not trust:
            raise CheckpointError(f"{source} was built by the model factory '{name}', and bestcompress runs no code "
                                  f"a file names; pass {option} {name} if that is your code (or "
                                  "--trust-checkpoint if you trust the file).")
        return build_from_factory(name, kwargs, option)
    if "pickle" in spec:
        if not trust:
            raise CheckpointError(f"{source} was built from a pickled module ('{spec['pickle']}'), which runs code "
                                  f"when loaded; pass {option} FILE.py:FN to build the model, or --trust-checkpoint "
                                  "only if you trust the file.")
        from .fileio import load_checkpoint_file
        obj = load_checkpoint_file(spec["pickle"], trust=True)
        if not isinstance(obj, nn.Module):
            raise CheckpointError(f"'{spec['pickle']}' no longer holds a pickled model.")
        obj.bc_spec = {"pickle": spec["pickle"]}
        return obj
    raise CheckpointError(f"{source} stores a model spec that names no arch, factory or pickle.")


def arch_model(arch: str, state_dict: Mapping | None, model_kwargs: Mapping) -> nn.Module:
    """A zoo model whose sizes not in `model_kwargs` are read from the state_dict's shapes."""
    from .zoo import create_model, get_entry
    entry = get_entry(arch)
    cfg = {}
    if state_dict is not None and entry.detect is not None:
        cfg = dict(entry.detect(state_dict) or {})
    cfg.update(model_kwargs)
    return create_model(arch, **cfg)


def looks_like(state_dict: Mapping) -> str:
    """'; it looks like a NAME checkpoint' when a registered model fits the state_dict, else ''."""
    from .zoo import detect_architecture
    found = detect_architecture(state_dict)
    return f"; it looks like a '{found[0]}' checkpoint" if found else ""
