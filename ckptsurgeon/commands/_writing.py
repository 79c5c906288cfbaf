"""What the writing commands (convert, rename, strip-head, adapt, merge-lora) share: options, call, output.

``rename``, ``strip-head`` and ``adapt`` are the same few lines over their library function
(:mod:`ckptsurgeon.surgery.operations`): :func:`run` calls it with the parsed flags and prints the result
(the plan as table, markdown or JSON; notes on stderr).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..core.report import printable
from ..formats import OUTPUT_FORMATS
from ..surgery.results import SurgeryResult
from ._options import make_read_options

F = TypeVar("F", bound=Callable[..., Any])


def conversion_options(func: F) -> F:
    """``--to``, ``--dtype``, ``--max-shard-size``, ``--weights-only``, ``--jobs``, ``-v``: every writer's."""
    func = click.option("-v", "--verbose", is_flag=True, help="List every tensor of the plan, not groups.")(
        func
    )
    func = click.option(
        "--jobs",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Shards written at once with --max-shard-size (default: one per CPU); the bytes do not change.",
    )(func)
    func = click.option(
        "--weights-only",
        is_flag=True,
        help="A .pth output keeps only the weights (no optimizer, epoch ...); prints sizes before and after.",
    )(func)
    func = click.option(
        "--max-shard-size",
        default=None,
        metavar="SIZE",
        help="Write a folder of shards no bigger than SIZE (e.g. 5GB) in Hugging Face's layout.",
    )(func)
    func = click.option(
        "--dtype",
        default=None,
        type=click.Choice(["bf16", "fp16", "fp32"]),
        help="Cast floating tensors (integer and bool tensors are kept as they are).",
    )(func)
    func = click.option(
        "--to",
        "to",
        default=None,
        type=click.Choice(OUTPUT_FORMATS),
        help="Output format (default: from the output's suffix).",
    )(func)
    return func


def mapping_options(func: F) -> F:
    """``--map``, ``--reverse``, ``--allow-ambiguous``: a mapping file, for rename and adapt."""
    func = click.option(
        "--allow-ambiguous",
        is_flag=True,
        help='Apply the mapping\'s rules marked status = "ambiguous" too (refused by default).',
    )(func)
    func = click.option(
        "--reverse", is_flag=True, help="Apply the mapping file backwards (every rule must be invertible)."
    )(func)
    func = click.option(
        "--map",
        "mapping",
        default=None,
        metavar="MAP.toml",
        help="Apply this mapping file (renames, drops, tensor transforms; docs/mapping.md) first.",
    )(func)
    return func


def run(
    func: Callable[..., SurgeryResult],
    *args: Any,
    output_format: str = "table",
    verbose: bool = False,
    allow_globals: tuple[str, ...] = (),
    unsafe: bool = False,
    no_verify: bool = False,
    trust_target: bool = False,
    **kwargs: Any,
) -> SurgeryResult:
    """Call a library write function (``ckptsurgeon.convert`` ...) with the CLI's flags; print the result.

    Example:
        >>> run(api.convert, "model.pth", "model.safetensors", dry_run=True)   # doctest: +SKIP
    """
    options = make_read_options(allow_globals, unsafe, target=trust_target)
    result = func(*args, read_options=options, verify=not no_verify, **kwargs)
    emit(result, output_format, verbose)
    return result


def emit(result: SurgeryResult, fmt: str = "table", verbose: bool = False) -> None:
    """Print ``result``: the chosen entry and notes on stderr, the rendering on stdout; an adapt
    dry run that would be refused ends with a warning and exit status 1.

    Example:
        >>> emit(ckptsurgeon.rename("m.pth", add_prefix="m.", dry_run=True))   # doctest: +SKIP
    """
    if result.weights_key:
        click.echo(f"ckpt: weights from entry {result.weights_key!r}", err=True)
    for note in result.all_notes:
        click.echo(f"ckpt: note: {printable(note)}", err=True)
    click.echo(result.render(fmt, verbose))
    alarm = getattr(result, "alarm", None)
    if alarm is not None:
        click.echo(f"ckpt: warning: {printable(alarm)}", err=True)
        raise click.exceptions.Exit(1)
