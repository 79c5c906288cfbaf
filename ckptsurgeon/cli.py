"""The ``ckpt`` command line: a thin layer over the library.

Each command lives in ``ckptsurgeon/commands/<name>.py`` and is a few lines: parse,
call the library, render. Library errors become one stderr line and exit code 2
here, in one place. Nothing here imports torch; commands import it only when they
need tensor data.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

from . import __version__
from .errors import CkptError

# Modules under ckptsurgeon.commands, each defining a click command named COMMAND.
COMMAND_MODULES = (
    "inspect",
    "diff",
    "rename",
    "strip_head",
    "convert",
    "adapt",
    "scan",
)

EXIT_ERROR = 2


class CkptGroup(click.Group):
    """A click group that turns every expected failure into one line on stderr and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CkptError as exc:
            _fail(exc.message)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except click.Abort:
            raise
        except KeyboardInterrupt:
            click.echo("ckpt: interrupted; no output was written", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(0)
        except MemoryError:
            _fail("out of memory")
        except Exception as exc:  # a bug: still one line, with a way to see the traceback
            if os.environ.get("CKPT_TRACEBACK"):
                raise
            _fail(
                f"internal error ({exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}); "
                "please report it (set CKPT_TRACEBACK=1 to see the traceback)"
            )


def _fail(message: str) -> None:
    click.echo(f"ckpt: error: {message}", err=True)
    sys.exit(EXIT_ERROR)


@click.group(
    cls=CkptGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="ckpt")
def cli() -> None:
    """Inspect PyTorch checkpoints, diff them against a model, and fix them before training.

    \b
    Examples:
      ckpt inspect model.pth
      ckpt diff model.pth 'fixtures/models.py:vgg_like(num_classes=2)'
      ckpt adapt model.pth 'fixtures/models.py:vgg_like(num_classes=2)' -o fixed.pth
    """


for _name in COMMAND_MODULES:
    _module = importlib.import_module(f"ckptsurgeon.commands.{_name}")
    cli.add_command(_module.COMMAND)


def main(argv: list[str] | None = None) -> None:
    """Entry point for the ``ckpt`` and ``ckptsurgeon`` scripts."""
    try:
        cli.main(args=argv, prog_name="ckpt", standalone_mode=True)
    except SystemExit:
        raise
