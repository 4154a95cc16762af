"""The `bestcompress` command line: a click group; each command parses, calls one API function, prints.

Commands live in bestcompress/commands/ (one file per area, each exporting COMMANDS). Errors a user can cause
(BestcompressError) print one sentence and exit with code 2; no traceback.
"""
from __future__ import annotations

import importlib
import logging

import click

from .errors import BestcompressError

# spikingjelly registers Triton kernels at import; without Triton torch logs "Triton not available" each time.
logging.getLogger("torch._library.triton").setLevel(logging.ERROR)

COMMAND_MODULES = ["bestcompress.commands.core", "bestcompress.commands.export", "bestcompress.commands.train",
                   "bestcompress.commands.report", "bestcompress.commands.run"]


class UserError(click.ClickException):
    """A BestcompressError as click shows it: 'Error: <sentence>' on stderr, exit code 2."""

    exit_code = 2


def _sentence(text: str) -> str:
    text = " ".join(str(text).split())
    return text if text.endswith((".", "?", "!")) else text + "."


class BestcompressGroup(click.Group):
    """Runs a command; a user error (ours, or click's usage errors) becomes one sentence and exit code 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:  # the group's own options (`bestcompress --bogus`)
            raise _usage(e) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BestcompressError as e:
            raise UserError(_sentence(e)) from None
        except click.UsageError as e:
            raise _usage(e) from None


def _usage(e: click.UsageError) -> UserError:
    """click's usage error (usage line, hint, message) as one sentence naming the command's --help."""
    where = e.ctx.command_path if e.ctx is not None else "bestcompress"
    return UserError(_sentence(e.format_message()).rstrip(".") + f" (see `{where} --help`).")


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
