"""``ckpt inspect``: what is in a checkpoint."""

from __future__ import annotations

import click

from ..inspection import inspect
from ._options import make_read_options, output_format, read_options


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@read_options
@output_format
@click.option("--all", "show_all", is_flag=True, help="One row per tensor instead of grouped rows.")
@click.option("--hash", "with_hash", is_flag=True, help="Add the file's SHA-256 (reads the whole file).")
@click.option("--check", is_flag=True, help="Also verify every CRC and byte span (reads the whole file).")
def COMMAND(
    path: str,
    key: str | None,
    allow_globals: tuple[str, ...],
    unsafe: bool,
    output_format: str,
    show_all: bool,
    with_hash: bool,
    check: bool,
) -> None:
    """Show what a checkpoint holds: tensors, shapes, dtypes, sizes, where the weights are.

    Reads headers only (no tensor data): a multi-GB file is described in well under a second.
    PATH is a torch.save file (.pth .pt .bin .ckpt), a .safetensors file, a sharded folder or
    index, a model folder, a PEFT adapter folder (rank, alpha, targets and base model shown),
    or a torch.distributed.checkpoint folder.

    \b
    Examples:
      ckpt inspect fixtures/vgg_1000.pth
      ckpt inspect fixtures/real/lightning_tinynet.ckpt --key state_dict --all
      ckpt inspect fixtures/real/hf_gpt2_tiny/model.safetensors --format json
    """
    options = make_read_options(allow_globals, unsafe, check)
    report = inspect(path, key=key, options=options, with_hash=with_hash)
    click.echo(report.render(output_format, show_all=show_all))
