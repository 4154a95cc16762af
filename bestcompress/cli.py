"""The `bestcompress` command line: a click group; each command parses, calls one API function, prints.

Commands live in bestcompress/commands/ (one file per area, each exporting COMMANDS). Errors a user can cause
(BestcompressError) print one sentence and exit with code 2; no traceback.
"""
from __future__ import annotations

import importlib

import click

from .errors import BestcompressError

COMMAND_MODULES = ["bestcompress.commands.core", "bestcompress.commands.export", "bestcompress.commands.train"]


class UserError(click.ClickException):
    """A BestcompressError as click shows it: 'Error: <sentence>' on stderr, exit code 2."""

    exit_code = 2


class BestcompressGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BestcompressError as e:
            raise UserError(str(e)) from None


@click.group(cls=BestcompressGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bestcompress")
def cli() -> None:
    """Make spiking transformers binary (BESTformer): binarize, distill (CIE), export, inspect."""


def _register() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)  # a missing or broken command module fails loudly
        for command in getattr(module, "COMMANDS", []):
            cli.add_command(command)


_register()


def main() -> None:
    """Console entry point."""
    cli(prog_name="bestcompress")


if __name__ == "__main__":
    main()
