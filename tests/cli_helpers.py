"""What every CLI test needs: run a command in-process, and check a user error is one clear sentence."""
from __future__ import annotations

from click.testing import CliRunner

from bestcompress.cli import cli


def invoke(*args):
    """`bestcompress ARGS...` through click's CliRunner (arguments may be paths)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, *needles):
    """Exit code 2, a single 'Error: ...' line naming the problem (each needle in it), no traceback."""
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), out
    for needle in needles:
        assert needle in lines[0], out
