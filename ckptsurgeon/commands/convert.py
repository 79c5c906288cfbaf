"""``ckpt convert``: a checkpoint to another format, dtype or shard layout."""

from __future__ import annotations

from typing import Any

import click

from ._options import output_format, read_options, write_options
from ._writing import conversion_options, run


@click.command("convert")
@click.argument("src", type=click.Path(path_type=str))
@read_options
@write_options
@conversion_options
@output_format
def COMMAND(src: str, output: str | None, **flags: Any) -> None:
    """Convert a checkpoint between .pth and .safetensors, cast it, or shard it.

    The format follows OUTPUT's suffix (or --to). SRC is anything `ckpt inspect` opens,
    including a sharded folder and a torch.distributed.checkpoint folder (consolidated into
    one file set). A .pth output keeps every other entry of a training checkpoint (epoch,
    optimizer ...) unless --weights-only; a .safetensors output holds the weights only, and so
    does a DCP folder (--to dcp, written by torch's own dcp.save for FSDP/torchtitan).
    The output is written atomically, then reopened and compared bit for bit.

    \b
    Examples:
      ckpt convert fixtures/xception_dp_6.pth -o /tmp/ckpt-readme/xception.safetensors
      ckpt convert model.safetensors -o model.pth --dtype bf16
      ckpt convert last.ckpt -o weights.pth --weights-only
      ckpt convert big.pth -o big-hf/ --max-shard-size 5GB
      ckpt convert model.safetensors -o step-0/ --to dcp
    """
    from ..surgery.operations import convert

    run(convert, src, output, **flags)
