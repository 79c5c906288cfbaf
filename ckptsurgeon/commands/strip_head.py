"""``ckpt strip-head``: drop the classifier head, found by structure or by a target's shapes."""

from __future__ import annotations

from typing import Any

import click

from ..convert import Source
from ..errors import SurgeryError
from ..formats import ReadOptions
from ..report import format_shape
from ..surgery import Plan, drop_names, head_plan, make_plan
from ._options import make_read_options, output_format, read_options, write_options
from .convert import conversion_options, run_write


def target_misfit_plan(source: Source, target: str, read_options: ReadOptions | None = None) -> Plan:
    """A plan dropping exactly the tensors whose shapes do not fit ``target`` (names unchanged).

    Names are matched after the key transform ``ckpt diff`` finds (``module.`` ...), so a
    DataParallel file is compared with a plain model correctly; the names themselves stay.

    Example:
        >>> plan = target_misfit_plan(src, "fixtures/models.py:resnet_like(num_classes=2)")  # doctest: +SKIP
        >>> plan.dropped_names                                                         # doctest: +SKIP
        ['module.fc.weight', 'module.fc.bias']
    """
    from ..match import diff

    result = diff(source.tensors, target, read_options=read_options)
    reasons = {
        m.file_name: f"shape does not fit the target's {m.name} {format_shape(m.target_shape)}"
        for m in result.diagnosis.after.shape_mismatched
    }
    plan = make_plan(source.tensors, [drop_names(reasons)] if reasons else [])
    return Plan(plan.entries, (f"drop what does not fit {result.target}",))


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
def COMMAND(src: str, target: str | None, head: str | None, **flags: Any) -> None:
    """Drop the classifier head, and list every dropped tensor with its shape.

    With --target, drop exactly the tensors whose shape does not fit the target (after
    aligning prefixes such as module.). Without it, the head is the last layer named like
    one (fc, classifier, head, last_linear, lm_head ...), or the file's last linear layer;
    --head NAME names it. Everything else, and every other entry of a training checkpoint,
    is kept.

    \b
    Example:
      ckpt strip-head resnet.pth -o backbone.pth
      ckpt strip-head vgg.pth -o vgg2.pth --target 'fixtures/models.py:vgg_like(num_classes=2)'
      ckpt strip-head model.pth -o out.pth --head classifier.6 --dry-run
    """
    if target is not None and head is not None:
        raise SurgeryError("give --target or --head, not both")
    options = make_read_options(flags.get("allow_globals", ()), False)

    def make(source: Source) -> Plan:
        if target is not None:
            plan = target_misfit_plan(source, target, options)
            if not plan.dropped:
                click.echo("ckpt: note: every tensor fits the target; nothing to drop", err=True)
            return plan
        return head_plan(source.tensors, head)

    run_write(src, make, **flags)
