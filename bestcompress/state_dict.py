"""A leaf for state_dict key handling that the zoo and the checkpoint format both need (imports nothing)."""
from __future__ import annotations

from collections.abc import Mapping

STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


def strip_prefixes(state_dict: Mapping) -> dict:
    """A state_dict without the DDP `module.` / torch.compile `_orig_mod.` prefix that every key carries."""
    out = dict(state_dict)
    for prefix in STRIP_PREFIXES:
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out
