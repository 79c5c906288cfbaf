"""``ckpt strip-head``: drop the classifier head, found by structure or by a target's shapes."""

from __future__ import annotations

from typing import Any

import click

from ._options import output_format, read_options, write_options
from ._writing import conversion_options, run


@click.command("strip-head")
@click.argument("src", type=click.Path(path_type=str))
@click.option(
    "--target",
    "target",
    default=None,
    metavar="T",
    help="Drop exactly the tensors whose shapes do not fit T (a checkpoint or an architecture).",
)
@click.option(
    "--target-key",
    default=None,
    metavar="A.B",
    help="The entry that holds the weights in a --target checkpoint.",
)
@click.option(
    "--head",
    "head",
    default=None,
    metavar="NAME",
    help="The head's module name (e.g. fc, classifier.6) when it cannot be found by itself.",
)
@read_options
@write_options
@conversion_options
@output_format
def COMMAND(src: str, output: str | None, **flags: Any) -> None:
    """Drop the classifier head, and list every dropped tensor with its shape.

    With --target, drop exactly the tensors whose shape does not fit the target (after
    aligning prefixes such as module.). Without it, the head is the last layer named like
    one (fc, classifier, head, last_linear, lm_head ...) with any second head of its class
    count (head_dist, aux_head, aux1.fc2), or the file's last linear layer; --head NAME names
    it. Everything else, and every other entry of a training checkpoint, is kept (a note says
    when the kept optimizer state no longer matches; --weights-only leaves it out).

    \b
    Examples:
      ckpt strip-head fixtures/xception_dp_6.pth -o /tmp/ckpt-readme/backbone.pth
      ckpt strip-head fixtures/vgg_1000.pth --target 'fixtures/models.py:vgg_like(num_classes=2)' \\
        -o /tmp/ckpt-readme/vgg_headless.pth
      ckpt strip-head fixtures/vgg_1000.pth -o /tmp/ckpt-readme/vgg.pth --head classifier.6 --dry-run
    """
    from ..surgery.operations import strip_head

    run(strip_head, src, output, **flags)
