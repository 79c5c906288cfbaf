"""``ckpt scan``: is it safe to load this file? Found without executing anything."""

from __future__ import annotations

import sys

import click

from ..errors import CkptError
from ..formats import ReadOptions
from ..pickling.scan import UNREADABLE, scan

EXIT_UNSAFE = 1


@click.command("scan")
@click.argument("path", type=click.Path(path_type=str))
@click.option(
    "--format",
    "output_format",
    type=click.Choice(("table", "json")),
    default="table",
    show_default=True,
    help="How to render the report.",
)
@click.option("--check", is_flag=True, help="Also verify every CRC and byte span (reads the whole file).")
@click.option(
    "--allow-global",
    "allow_globals",
    multiple=True,
    metavar="MODULE.NAME",
    help="Count this class as data-only (repeatable), as inspect --allow-global would accept it.",
)
def COMMAND(path: str, output_format: str, check: bool, allow_globals: tuple[str, ...]) -> None:
    """List every global the file's pickles would import, and say whether loading it can run code.

    Nothing from the file is executed: pickles are read opcode by opcode. Each global is
    tensor machinery, a data-only type, or UNSAFE (can run code). A folder is scanned file
    by file. Exit code: 0 safe, 1 unsafe, 2 unreadable.

    \b
    Examples:
      ckpt scan fixtures/real/tinynet_compiled.pth
      ckpt scan fixtures/real/hf_gpt2_tiny --format json
      ckpt scan fixtures/real/lightning_tinynet.ckpt --check
    """
    result = scan(path, ReadOptions(allow_globals=frozenset(allow_globals), check=check))
    click.echo(result.render(output_format), nl=output_format == "json")
    if result.status == UNREADABLE:
        bad = [f for f in result.files if f.status == UNREADABLE]
        raise CkptError(
            f"{bad[0].path}: could not be read ({bad[0].error})"
            + (f"; and {len(bad) - 1} more file(s)" if len(bad) > 1 else "")
        )
    if not result.safe:
        sys.exit(EXIT_UNSAFE)
