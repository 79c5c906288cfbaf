"""``ckpt rename``: strip, add or replace key prefixes, drop or keep tensors by glob."""

from __future__ import annotations

from typing import Any

import click

from ._options import output_format, read_options, write_options
from ._writing import conversion_options, mapping_options, run


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
@mapping_options
@read_options
@write_options
@conversion_options
@output_format
def COMMAND(
    src: str,
    output: str | None,
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

    --map MAP.toml applies a mapping file (renames, drops, split/concat/transpose/permute/
    reshape/rotary_permute; docs/mapping.md) before the other steps; --reverse applies it
    backwards. Tensors no rule touches are kept as they are and listed.

    \b
    Examples:
      ckpt rename fixtures/resnet_dp_6.pth -o /tmp/ckpt-readme/resnet_6.pth --strip-prefix module.
      ckpt rename last.ckpt -o bb.pth --keep 'model.backbone.*' --strip-prefix model.backbone.
      ckpt rename model.pth -o out.pth --replace '^encoder\\.' 'backbone.' --dry-run
      ckpt rename fused.pth -o split.pth --map qkv.toml
    """
    from ..surgery.operations import rename

    run(
        rename,
        src,
        output,
        strip_prefix=strip,
        add_prefix=add,
        replace=replacements,
        drop=drops,
        keep=keeps,
        **flags,
    )
