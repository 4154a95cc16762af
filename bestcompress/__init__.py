"""bestcompress: make spiking transformers binary (BESTformer), recover accuracy with CIE, export verified graphs.

The spine of the API, one plain function per arrow:
    load(path)  ->  binarize(model, recipe)  ->  distill(student, teacher, data, recipe)
                ->  export(model, format, path)  and  summarize(model), evaluate(model, data), train(model, data)
No public function shares its name with a module (the modules are convert, training/, exporters/, ...).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "load": "bestcompress.loading",
    "Loaded": "bestcompress.loading",
    "save_fp": "bestcompress.checkpoint",
    "save_binary": "bestcompress.checkpoint",
    "binarize": "bestcompress.convert",
    "distill": "bestcompress.training.trainer",
    "train": "bestcompress.training.trainer",
    "evaluate": "bestcompress.training.trainer",
    "export": "bestcompress.exporters",
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
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'bestcompress' has no attribute {name!r}")
