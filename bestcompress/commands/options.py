"""Click options shared by several commands (reuse them rather than redeclaring)."""
from __future__ import annotations

import click


def _set_threads(ctx, param, value):
    if value is not None:
        import torch
        torch.set_num_threads(value)
    return value


def threads_option(f):
    """`--threads N`: torch's CPU thread count for the command (applied while the options are parsed)."""
    return click.option("--threads", type=click.IntRange(min=1), expose_value=False, callback=_set_threads,
                        is_eager=True, metavar="N",
                        help="CPU threads torch may use [default: torch's choice, usually every core].")(f)


def device_option(f):
    """`--device NAME`, resolved (and refused with one sentence when unusable) before any work."""
    return click.option("--device", callback=check_device, metavar="NAME",
                        help="cpu, cuda, cuda:1, ... [default: cuda when available].")(f)


def check_device(ctx, param, value):
    """A click callback: `--device NAME` refused with one sentence (before any work) when it is unusable here."""
    if value is not None:
        from ..devices import resolve_device
        resolve_device(value)
    return value
