"""bestcompress: make spiking transformers binary (BESTformer), recover accuracy with CIE, export verified graphs.

The spine of the API, one function per arrow:
    load_model(...)  ->  binarize(model, recipe)  ->  distill(student, teacher, data, recipe)
                     ->  export(model, format, path)  and  summarize(model)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load_model": "bestcompress.checkpoint",
    "save_fp": "bestcompress.checkpoint",
    "save_binary": "bestcompress.checkpoint",
    "load_binary": "bestcompress.checkpoint",
    "binarize": "bestcompress.binarize",
    "distill": "bestcompress.distill",  # the subpackage, callable as distill(student, teacher, data, recipe)
    "train": "bestcompress.distill.trainer",
    "evaluate": "bestcompress.distill.trainer",
    "export": "bestcompress.export",  # the subpackage, callable as export(model, format, path)
    "load_exported": "bestcompress.export",
    "load_packed": "bestcompress.export.packed",
    "summarize": "bestcompress.summary",
    "load_recipe": "bestcompress.recipe",
    "list_recipes": "bestcompress.recipe",
    "create_model": "bestcompress.zoo",
    "list_models": "bestcompress.zoo",
    "register_model": "bestcompress.zoo",
    "load_dataset": "bestcompress.data",
    "BestcompressError": "bestcompress.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    # Lazy: `import bestcompress` stays cheap and the CLI only loads what a command needs.
    if name in _API:
        module = importlib.import_module(_API[name])
        return module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
    raise AttributeError(f"module 'bestcompress' has no attribute {name!r}")
