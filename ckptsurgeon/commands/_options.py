"""Options shared by several commands, each defined once as a decorator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..formats import ReadOptions

F = TypeVar("F", bound=Callable[..., Any])

FORMATS = ("table", "markdown", "json")


def read_options(func: F) -> F:
    """``--key``, ``--allow-global`` and ``--unsafe-trust-pickle``: how to open a checkpoint."""
    func = click.option(
        "--unsafe-trust-pickle",
        "unsafe",
        is_flag=True,
        help="Load pickles with full trust. This CAN RUN CODE from the file: only for files you made.",
    )(func)
    func = click.option(
        "--allow-global",
        "allow_globals",
        multiple=True,
        metavar="MODULE.NAME",
        help="Also accept this data-only class in a pickle (repeatable), e.g. --allow-global mylib.Config.",
    )(func)
    func = click.option(
        "--key",
        "key",
        default=None,
        metavar="A.B",
        help="The entry that holds the weights in a training checkpoint (default: chosen and reported).",
    )(func)
    return func


def output_format(func: F) -> F:
    """``--format table|markdown|json``."""
    return click.option(
        "--format",
        "output_format",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="How to render the report.",
    )(func)


def write_options(func: F) -> F:
    """``-o``, ``--force``, ``--dry-run``, ``--no-verify``: where and how to write."""
    func = click.option(
        "--no-verify", is_flag=True, help="Skip reloading the output and comparing every tensor."
    )(func)
    func = click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")(func)
    func = click.option(
        "--force", is_flag=True, help="Overwrite OUTPUT if it exists (even if it is the input)."
    )(func)
    func = click.option(
        "-o",
        "--output",
        "output",
        type=click.Path(dir_okay=True, path_type=str),
        default=None,
        help="The file (or folder, for shards) to write.",
    )(func)
    return func


def make_read_options(
    allow_globals: tuple[str, ...] = (), unsafe: bool = False, check: bool = False, target: bool = False
) -> ReadOptions:
    """Build ReadOptions from CLI flags, warning loudly when full trust is asked for (``target``:
    the command also opens a TARGET checkpoint with these options, and the warning says so)."""
    if unsafe:
        whose = "the pickles of SOURCE and of TARGET (a checkpoint file)" if target else "the file's pickle"
        click.echo(
            f"ckpt: warning: --unsafe-trust-pickle: {whose} may run arbitrary code on this machine",
            err=True,
        )
    return ReadOptions(allow_globals=frozenset(allow_globals), unsafe=unsafe, check=check)
