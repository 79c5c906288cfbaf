"""``ckpt rename``: strip, add or replace key prefixes, drop or keep tensors by glob."""

from __future__ import annotations

from typing import Any

import click

from ..errors import SurgeryError
from ..surgery import Step, add_prefix, drop, keep, make_plan, replace, strip_prefix
from ._options import output_format, read_options, write_options
from .convert import conversion_options, run_write


def rename_steps(
    strip: tuple[str, ...] = (),
    add: tuple[str, ...] = (),
    replacements: tuple[tuple[str, str], ...] = (),
    drops: tuple[str, ...] = (),
    keeps: tuple[str, ...] = (),
) -> list[Step]:
    """The steps in the order ``ckpt rename`` applies them: drop, keep (on the file's names),
    then strip prefixes, replacements (in order), add prefixes.

    Example:
        >>> [s.description for s in rename_steps(strip=("module.",), drops=("fc.*",))]
        ["drop 'fc.*'", "strip prefix 'module.'"]
    """
    steps: list[Step] = []
    if drops:
        steps.append(drop(*drops))
    if keeps:
        steps.append(keep(*keeps))
    steps += [strip_prefix(p) for p in strip]
    steps += [replace(pattern, repl) for pattern, repl in replacements]
    steps += [add_prefix(p) for p in add]
    return steps


@click.command("rename")
@click.argument("src", type=click.Path(path_type=str))
@click.option(
    "--strip-prefix", "strip", multiple=True, metavar="P", help="Remove prefix P where keys have it."
)
@click.option("--add-prefix", "add", multiple=True, metavar="P", help="Put prefix P in front of every key.")
@click.option(
    "--replace",
    "replacements",
    multiple=True,
    nargs=2,
    metavar="REGEX REPL",
    help="Substitute REGEX with REPL (Python re.sub) in every key; repeatable, applied in order.",
)
@click.option("--drop", "drops", multiple=True, metavar="GLOB", help="Drop tensors whose key matches GLOB.")
@click.option("--keep", "keeps", multiple=True, metavar="GLOB", help="Keep only tensors matching GLOB.")
@read_options
@write_options
@conversion_options
@output_format
def COMMAND(
    src: str,
    strip: tuple[str, ...],
    add: tuple[str, ...],
    replacements: tuple[tuple[str, str], ...],
    drops: tuple[str, ...],
    keeps: tuple[str, ...],
    **flags: Any,
) -> None:
    """Rename, drop or extract tensors; show the plan, then write it.

    Order: --drop and --keep match the file's own keys; then --strip-prefix, --replace
    (in the order given) and --add-prefix. A step that matches nothing, or two keys that
    would get one name, is an error. Every other entry of a training checkpoint is kept.

    \b
    Example:
      ckpt rename model.pth -o fixed.pth --strip-prefix module.
      ckpt rename last.ckpt -o bb.pth --keep 'model.backbone.*' --strip-prefix model.backbone.
      ckpt rename model.pth -o out.pth --replace '^encoder\\.' 'backbone.' --dry-run
    """
    steps = rename_steps(strip, add, replacements, drops, keeps)
    if not steps:
        raise SurgeryError("nothing to do: give --strip-prefix, --add-prefix, --replace, --drop or --keep")
    run_write(src, lambda source: make_plan(source.tensors, steps), **flags)
