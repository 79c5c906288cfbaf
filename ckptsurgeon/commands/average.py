"""``ckpt average``: the (weighted) mean of several checkpoints of one architecture."""

from __future__ import annotations

from typing import Any

import click

from ..formats import OUTPUT_FORMATS
from ._options import output_format, read_options, write_options
from ._writing import run


@click.command("average")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@read_options
@write_options
@click.option(
    "--weights",
    default=None,
    metavar="W1,W2,...",
    help="One positive weight per input, normalised to sum 1 (default: equal weights).",
)
@click.option(
    "--keep-state",
    is_flag=True,
    help="Keep the first input's other entries (epoch, optimizer ...); .pth output only.",
)
@click.option(
    "--to",
    "to",
    default=None,
    type=click.Choice(OUTPUT_FORMATS),
    help="Output format (default: from the output's suffix).",
)
@click.option(
    "--dtype",
    default=None,
    type=click.Choice(["bf16", "fp16", "fp32"]),
    help="Write the floating tensors in this dtype (each mean cast once from float32/float64).",
)
@click.option(
    "--max-shard-size",
    default=None,
    metavar="SIZE",
    help="Write a folder of shards no bigger than SIZE (e.g. 5GB) in Hugging Face's layout.",
)
@click.option("-v", "--verbose", is_flag=True, help="Show the whole plan, every tensor.")
@output_format
def COMMAND(inputs: tuple[str, ...], output: str | None, **flags: Any) -> None:
    """Average checkpoints of one architecture (a model soup, SWA by hand) into one.

    Every INPUT must hold the same tensor names and shapes (a wrapper prefix such as
    module. on one is aligned, as `ckpt diff` aligns it); else the first tensor that differs
    is named and nothing is written. Floating tensors: the mean, accumulated in float32
    (float64 for float64 inputs) and written in the first input's dtype; --weights makes it
    a weighted mean (normalised to sum 1); --dtype writes them in another dtype, cast once
    from the accumulation dtype. Integer and bool tensors (num_batches_tracked ...)
    are taken from the first input. The output has the first input's names and holds the
    weights only, unless --keep-state keeps the first input's epoch, optimizer ... (.pth).
    Written a piece of a tensor at a time (memory does not grow with the files), atomically,
    then reopened and compared bit for bit.

    \b
    Examples:
      ckpt average fixtures/resnet_dp_6.pth fixtures/resnet_dp_6.pth -o /tmp/ckpt-readme/same.pth
      ckpt average run1.pth run2.pth run3.pth -o soup.safetensors --weights 0.2,0.3,0.5
      ckpt average epoch8.ckpt epoch9.ckpt epoch10.ckpt -o swa.ckpt --keep-state
      ckpt average a.safetensors b.safetensors -o soup/ --dtype bf16 --max-shard-size 5GB
    """
    from ..surgery.averaging import average

    weights = flags.pop("weights")
    run(average, list(inputs), output, weights=weights, **flags)
