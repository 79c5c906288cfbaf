"""``ckpt adapt``: apply ``diff``'s diagnosis in one go and say what the output will load."""

from __future__ import annotations

from typing import Any

import click

from ..convert import Source
from ..loading import LoadReport, adapt_plan, fit_report
from ..surgery import Plan
from ._options import make_read_options, output_format, read_options, write_options
from .convert import conversion_options, run_write


@click.command("adapt")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("target")
@read_options
@write_options
@conversion_options
@output_format
def COMMAND(src: str, target: str, **flags: Any) -> None:
    """Make SRC load into TARGET: align key prefixes, drop the head and what has no place.

    TARGET is what `ckpt diff` accepts: a checkpoint, an inspect JSON, or an architecture
    such as 'torchvision.models.resnet50(num_classes=2)' or 'models.py:build(num_classes=2)'.
    The report says what the output loads with load_state_dict(strict=False): exactly the
    missing keys listed (the target keeps its own values there), nothing unexpected.

    \b
    Example:
      ckpt adapt resnet_dp.pth 'fixtures/models.py:resnet_like(num_classes=2)' -o resnet2.pth
      ckpt adapt vgg.pth 'torch.nn.DataParallel(fixtures/models.py:vgg_like(num_classes=2))' -o v.pth
      ckpt adapt last.ckpt model.safetensors -o fixed.safetensors --dry-run
    """
    from ..match import diff
    from ..target import resolve_target

    options = make_read_options(flags.get("allow_globals", ()), False)
    resolved = resolve_target(target, options)
    state: dict[str, Any] = {}

    def make(source: Source) -> Plan:
        result = diff(source.tensors, resolved, source_label=src)
        state["diagnosis"] = result.diagnosis
        return adapt_plan(source.tensors, result.diagnosis)

    def report(source: Source, plan: Plan) -> LoadReport:
        return fit_report(plan.apply(source.tensors), resolved, plan, src, state["diagnosis"])

    run_write(src, make, after=report, **flags)
