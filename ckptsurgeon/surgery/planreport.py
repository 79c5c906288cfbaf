"""Renders a :class:`~ckptsurgeon.surgery.plan.Plan`: a headline, the renames grouped, every drop,
and every transformed tensor with what its transform does (``cast float32 -> bfloat16``).

``table`` and ``markdown`` group renames (and transformed tensors) the way ``inspect`` groups
names (``module.features.{0,2}.{bias,weight}  features.{0,2}.{bias,weight}``) unless verbose;
JSON lists every name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..core.grouping import collapse
from ..core.report import counted, dump_json, format_shape, render_table
from .plan import CONSUMED, Plan


def plan_json(plan: Plan) -> dict[str, Any]:
    """The plan as a JSON-ready dict: summary, steps, renamed, dropped (every one), unchanged and
    transformed (each: ``name``, ``transform``, ``inputs``, ``outputs`` with name, dtype, shape; the
    summary counts them when there are any).

    Example:
        >>> from .plan import make_plan, strip_prefix
        >>> plan_json(make_plan(["module.fc.w"], [strip_prefix("module.")]))["renamed"]
        [{'from': 'module.fc.w', 'to': 'fc.w'}]
    """
    transformed = plan.transformed
    summary = {
        "tensors": len(plan.entries),
        "renamed": len(plan.renamed),
        "unchanged": len(plan.unchanged),
        "dropped": len(plan.dropped),
    }
    if transformed:
        summary["transformed"] = len(transformed)
    return {
        "summary": summary,
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
        "transformed": [{"name": e.old} | e.transform.to_json() for e in transformed if e.transform],
    }


def render_plan(plan: Plan, fmt: str = "table", verbose: bool = False) -> str:
    """A headline, the renames (grouped unless ``verbose``), and every dropped tensor with its shape.

    Example:
        >>> from .plan import make_plan
        >>> print(render_plan(make_plan(["module.fc.w"], [])))
        Plan: 1 tensor: 0 renamed, 1 unchanged, 0 dropped
    """
    if fmt == "json":
        return dump_json(plan_json(plan))
    parts = [plan_headline(plan)]
    renamed = render_table(["renamed", "to"], _rename_rows(plan, verbose), fmt)
    dropped = render_table(["dropped", "dtype", "shape", "reason"], _drop_rows(plan, verbose), fmt)
    transformed = _transform_table(plan, verbose, fmt)
    return "\n\n".join(p for p in (*parts, renamed, dropped, transformed) if p)


def plan_headline(plan: Plan) -> str:
    """``Plan: 38 tensors: 36 renamed, 0 unchanged, 2 dropped (steps)``.

    Example:
        >>> from .plan import drop, make_plan
        >>> plan_headline(make_plan(["a", "fc.w"], [drop("fc.*")]))
        "Plan: 2 tensors: 0 renamed, 1 unchanged, 1 dropped (drop 'fc.*')"
    """
    n = len(plan.entries)
    steps = f" ({'; '.join(plan.steps)})" if plan.steps else ""
    transformed = len(plan.transformed)
    more = f", {transformed} transformed" if transformed else ""
    consumed = sum(1 for e in plan.dropped if e.reason.startswith(CONSUMED))
    dropped = f"{len(plan.dropped)} dropped" + (
        f" ({consumed} of them inputs of transforms)" if consumed else ""
    )
    return (
        f"Plan: {counted(n, 'tensor')}: {len(plan.renamed)} renamed, "
        f"{len(plan.unchanged)} unchanged, {dropped}{more}{steps}"
    )


def _rename_rows(plan: Plan, verbose: bool) -> list[list[str]]:
    new_of = {e.old: e.new or "" for e in plan.renamed}
    if verbose:
        return [[old, new] for old, new in new_of.items()]
    return _pair_rows(new_of, lambda _old: ())


def _transform_table(plan: Plan, verbose: bool, fmt: str) -> str:
    """The transformed tensors; without the ``to`` column when every one keeps its name (a cast)."""
    rows = _transform_rows(plan, verbose)
    if all(row[0] == row[1] for row in rows):
        return render_table(["transformed", "transform"], [[row[0], row[2]] for row in rows], fmt)
    return render_table(["transformed", "to", "transform"], rows, fmt)


def _transform_rows(plan: Plan, verbose: bool) -> list[list[str]]:
    """``[source name, output name(s), what the transform does]``, grouped by what it does."""
    what = {e.old: e.transform.description for e in plan.transformed if e.transform}
    new_of = {e.old: ", ".join(e.outputs) for e in plan.transformed}
    if verbose:
        return [[old, new, what[old]] for old, new in new_of.items()]
    return _pair_rows(new_of, lambda old: (what[old],))


def _pair_rows(new_of: dict[str, str], extra: Callable[[str], tuple[str, ...]]) -> list[list[str]]:
    """``old -> new`` pairs collapsed into groups that change names alike (and share ``extra``),
    each row ``[old label, new label, *extra]``."""
    rows = []
    grouping = collapse(
        list(new_of), attribute=lambda o: (_change(o, new_of[o]), extra(o)), merge_leaves=True
    )
    for group in grouping:
        first = group.members[0]
        target = _moved_label(group.label, _change(first, new_of[first]))
        if target is not None:
            rows.append([group.label, target, *extra(first)])
            continue
        targets = collapse([new_of[m] for m in group.members], merge_leaves=True)
        if len(targets) == 1:
            rows.append([group.label, targets[0].label, *extra(first)])
        else:
            rows.extend([m, new_of[m], *extra(m)] for m in group.members)
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
    parts = (old[: len(old) - n], new[: len(new) - n])
    found = _CHANGES.get(parts)
    if found is None:
        if len(_CHANGES) >= 4096:
            _CHANGES.clear()
        found = _CHANGES[parts] = (_NUMBERS.sub("#", parts[0]), _NUMBERS.sub("#", parts[1]))
    return found


# changed parts -> with their numbers as "#": 20,000 renames usually change the same few parts
_CHANGES: dict[tuple[str, str], tuple[str, str]] = {}
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
