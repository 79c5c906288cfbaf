"""``ckpt convert``, and the flow every writing command shares: plan, show it, write, verify.

``rename``, ``strip-head`` and ``adapt`` build a :class:`~ckptsurgeon.surgery.Plan` and
hand it to :func:`run_write`, which prints the plan (table, markdown or JSON), stops there
with ``--dry-run``, or writes through :func:`ckptsurgeon.convert.write_checkpoint`.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from ..convert import Source, WriteOptions, WriteResult, open_source, write_checkpoint
from ..errors import OutputError
from ..grouping import collapse
from ..report import dump_json, format_shape, render_table
from ..surgery import Plan, make_plan
from ._options import make_read_options, output_format, read_options, write_options

F = TypeVar("F", bound=Callable[..., Any])


def conversion_options(func: F) -> F:
    """``--to``, ``--dtype``, ``--max-shard-size``, ``--weights-only``, ``-v``: shared by every writer."""
    func = click.option("-v", "--verbose", is_flag=True, help="List every tensor of the plan, not groups.")(
        func
    )
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
        type=click.Choice(["pth", "safetensors"]),
        help="Output format (default: from the output's suffix).",
    )(func)
    return func


def run_write(
    src: str,
    make: Callable[[Source], Plan],
    *,
    output: str | None,
    key: str | None,
    allow_globals: tuple[str, ...] = (),
    unsafe: bool = False,
    output_format: str = "table",
    force: bool = False,
    dry_run: bool = False,
    no_verify: bool = False,
    to: str | None = None,
    dtype: str | None = None,
    max_shard_size: str | None = None,
    weights_only: bool = False,
    verbose: bool = False,
    after: Callable[[Source, Plan], Any] | None = None,
) -> WriteResult | None:
    """Open SRC, make the plan, print it, and write it unless ``dry_run``; return what was written.

    ``after(source, plan)`` may return a report (``render(fmt, verbose)``, ``to_json()``) shown
    after the plan, such as what the output will load into a target.
    """
    if output is None and not dry_run:
        raise OutputError("no output: name it with -o OUT (or pass --dry-run to see the plan)")
    with gc_paused():
        return _run_write(
            src,
            make,
            output,
            key,
            allow_globals,
            unsafe,
            output_format,
            force,
            dry_run,
            no_verify,
            to,
            dtype,
            max_shard_size,
            weights_only,
            verbose,
            after,
        )


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off Python's cyclic garbage collector while a command builds its records.

    A checkpoint of 20,000 tensors makes a few hundred thousand long-lived objects (records,
    dicts, tuples); the collector would traverse them again and again as they are made, which
    cost ~20 % of the command. The objects are freed by reference counting as usual; cycles
    wait until the block ends.

    Example:
        >>> with gc_paused():
        ...     pass
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _run_write(
    src: str,
    make: Callable[[Source], Plan],
    output: str | None,
    key: str | None,
    allow_globals: tuple[str, ...],
    unsafe: bool,
    output_format: str,
    force: bool,
    dry_run: bool,
    no_verify: bool,
    to: str | None,
    dtype: str | None,
    max_shard_size: str | None,
    weights_only: bool,
    verbose: bool,
    after: Callable[[Source, Plan], Any] | None,
) -> WriteResult | None:
    shard_bytes = _shard_bytes(max_shard_size)
    source = open_source(src, key, make_read_options(allow_globals, unsafe))
    plan = make(source)
    if source.weights.key:
        click.echo(f"ckpt: weights from entry {source.weights.key!r}", err=True)
    report = after(source, plan) if after is not None else None
    result = None
    if not dry_run:
        options = WriteOptions(Path(output or ""), to, dtype, shard_bytes, weights_only, force, not no_verify)
        result = write_checkpoint(source, plan, options)
        for note in result.notes:
            click.echo(f"ckpt: note: {note}", err=True)
    if output_format == "json":
        click.echo(dump_json(_json_document(src, source, plan, result, report, dry_run)))
        return result
    parts = [render_plan(plan, output_format, verbose)]
    if report is not None:
        parts.append(report.render(output_format, verbose))
    parts.append("Dry run: nothing was written." if dry_run else result.summary())  # type: ignore[union-attr]
    click.echo("\n\n".join(parts))
    return result


def _shard_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    from ..formats.sharded import parse_size

    return parse_size(text)


def _json_document(
    src: str, source: Source, plan: Plan, result: WriteResult | None, report: Any, dry_run: bool
) -> dict[str, Any]:
    return {
        "status": "dry-run" if dry_run else "ok",
        "source": src,
        "weights_key": source.weights.key,
        "plan": plan_json(plan),
        "report": report.to_json() if report is not None else None,
        "output": result.to_json() if result is not None else None,
    }


# -- plan rendering ---------------------------------------------------------------------------
def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-ready dict: summary, steps, renamed, dropped (every one) and unchanged."""
    return {
        "summary": {
            "tensors": len(plan.entries),
            "renamed": len(plan.renamed),
            "unchanged": len(plan.unchanged),
            "dropped": len(plan.dropped),
        },
        "steps": list(plan.steps),
        "renamed": [{"from": e.old, "to": e.new} for e in plan.renamed],
        "dropped": [
            {
                "name": e.old,
                "dtype": e.dtype,
                "shape": None if e.shape is None else list(e.shape),
                "reason": e.reason,
            }
            for e in plan.dropped
        ],
        "unchanged": [e.old for e in plan.unchanged],
    }


def render_plan(plan: Plan, fmt: str = "table", verbose: bool = False) -> str:
    """A headline, the renames (grouped unless ``verbose``), and every dropped tensor with its shape.

    Example:
        >>> print(render_plan(make_plan(["module.fc.w"], [])))
        Plan: 1 tensor: 0 renamed, 1 unchanged, 0 dropped
    """
    if fmt == "json":
        return dump_json(plan_json(plan))
    parts = [plan_headline(plan)]
    renamed = render_table(["renamed", "to"], _rename_rows(plan, verbose), fmt)
    dropped = render_table(["dropped", "dtype", "shape", "reason"], _drop_rows(plan, verbose), fmt)
    return "\n\n".join(p for p in (*parts, renamed, dropped) if p)


def plan_headline(plan: Plan) -> str:
    """``Plan: 38 tensors: 36 renamed, 0 unchanged, 2 dropped (steps)``."""
    n = len(plan.entries)
    steps = f" ({'; '.join(plan.steps)})" if plan.steps else ""
    return (
        f"Plan: {n} tensor{'s' if n != 1 else ''}: {len(plan.renamed)} renamed, "
        f"{len(plan.unchanged)} unchanged, {len(plan.dropped)} dropped{steps}"
    )


def _rename_rows(plan: Plan, verbose: bool) -> list[list[str]]:
    new_of = {e.old: e.new or "" for e in plan.renamed}
    if verbose:
        return [[old, new] for old, new in new_of.items()]
    rows = []
    for group in collapse(list(new_of), attribute=lambda o: _change(o, new_of[o]), merge_leaves=True):
        target = _moved_label(group.label, _change(group.members[0], new_of[group.members[0]]))
        if target is not None:
            rows.append([group.label, target])
            continue
        targets = collapse([new_of[m] for m in group.members], merge_leaves=True)
        if len(targets) == 1:
            rows.append([group.label, targets[0].label])
        else:
            rows.extend([m, new_of[m]] for m in group.members)
    return rows


def _moved_label(label: str, change: tuple[str, str]) -> str | None:
    """The target label of a group whose members all change ``old`` into ``new`` in front of the
    same kind of tail, when the old label is ``old + tail label``: ``new + tail label``, which is
    what collapsing the new names gives (no numbers in the changed part, the last dot in the tail).
    None when that cannot be told this way (then the new names are collapsed)."""
    old, new = change
    if "#" in old or "#" in new or not label.startswith(old):
        return None
    tail = label[len(old) :]
    if not tail.rpartition(".")[0] or "{" in old or "{" in new:
        return None
    return new + tail


def _change(old: str, new: str) -> tuple[str, str]:
    """What a rename changes, without the tail both names share: ``("module.", "")``."""
    if old.endswith(new):  # a stripped prefix: the common case, decided without a loop
        n = len(new)
    elif new.endswith(old):
        n = len(old)
    else:
        n = 0
        while n < min(len(old), len(new)) and old[-1 - n] == new[-1 - n]:
            n += 1
    return _NUMBERS.sub("#", old[: len(old) - n]), _NUMBERS.sub("#", new[: len(new) - n])


_NUMBERS = re.compile(r"\d+")


def _drop_rows(plan: Plan, verbose: bool) -> list[list[str]]:
    by_name = {e.old: e for e in plan.dropped}
    if verbose:
        return [[e.old, e.dtype, format_shape(e.shape), e.reason] for e in by_name.values()]
    rows = []
    for group in collapse(
        list(by_name), attribute=lambda n: (by_name[n].dtype, by_name[n].shape, by_name[n].reason)
    ):
        e = by_name[group.members[0]]
        rows.append([group.label, e.dtype, format_shape(e.shape), e.reason])
    return rows


# -- the command ------------------------------------------------------------------------------
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
    optimizer ...) unless --weights-only; a .safetensors output holds the weights only.
    The output is written atomically, then reopened and compared bit for bit.

    \b
    Example:
      ckpt convert model.pth -o model.safetensors
      ckpt convert model.safetensors -o model.pth --dtype bf16
      ckpt convert last.ckpt -o weights.pth --weights-only
      ckpt convert big.pth -o big-hf/ --max-shard-size 5GB
    """
    run_write(src, lambda source: make_plan(source.tensors, []), output=output, **flags)
