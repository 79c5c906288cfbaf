"""Render a :class:`~ckptsurgeon.diffing.result.DiffResult` as a table, markdown or JSON.

By default the lists are grouped and collapsed (``layer{1..4}.*.bn1.weight``,
``conv1.{bias,weight}``) and matched keys are only counted: a short summary, not a
per-key log. ``verbose`` lists every key of the four lists, one per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..core.coverage import threshold
from ..core.grouping import collapse, natural_key, natural_sorted
from ..core.report import dump_json, format_shape, printable, render_table

if TYPE_CHECKING:  # pragma: no cover
    from .result import DiffResult

HEADERS = ("status", "count", "keys", "file → target")


def render(result: DiffResult, fmt: str = "table", verbose: bool = False) -> str:
    """The report in ``fmt`` ("table", "markdown" or "json").

    Example:
        >>> print(render(diff(sd, "models.py:build(num_classes=2)")))     # doctest: +SKIP
    """
    if fmt == "json":
        return dump_json(to_json(result))
    return render_text(result, fmt, verbose)


def to_json(result: DiffResult) -> dict[str, Any]:
    """The documented JSON shape (see docs/diff-json.md).

    Example:
        >>> to_json(result)["status"]                                       # doctest: +SKIP
        'mismatch'
    """
    d, e = result.diagnosis, result.explanation
    mismatched = sorted(result.shape_mismatched, key=lambda m: natural_key(m.name))
    return {
        "status": result.comparison.status,
        "passes": result.passes(),
        "min_coverage": threshold(result.min_coverage),
        "headline": result.headline,
        "source": {"path": result.source, "key": result.source_key, "tensors": result.source_count},
        "target": {
            "spec": result.target,
            "kind": result.target_kind,
            "notes": list(result.target_notes),
            "tensors": len(result.matched)
            + len(result.missing)
            + len(result.shape_mismatched)
            + len(result.tied),
        },
        "summary": result.summary(),
        "matched": natural_sorted(result.matched),
        "missing": natural_sorted(result.missing),
        "unexpected": natural_sorted(result.unexpected),
        "shape_mismatched": [m.to_dict() for m in mismatched],
        "dtype_differences": [
            x.to_dict() for x in sorted(result.dtype_differences, key=lambda x: natural_key(x.name))
        ],
        "tied": [{"name": alias, "tied_to": held} for alias, held in result.tied.items()],
        "diagnosis": {
            "message": e.message,
            "alarm": e.alarm,
            "transform": None if d.transform.is_identity else d.transform.to_dict(),
            "loads_after_transform": d.loads_after,
            "after_transform": d.after.counts(),
            "head": d.head.to_dict() if d.head else None,
            "vocabulary": d.vocabulary.to_dict() if d.vocabulary else None,
            "filter_idiom": {
                "message": e.filter_idiom,
                "as_saved": d.filter_as_saved.to_dict(),
                "after_transform": d.filter_after.to_dict(),
            },
            "proposed_mapping": [{"source": s, "target": t} for s, t in d.proposed_mapping],
            "ambiguous": list(d.ambiguous),
            "drop": list(d.drop),
            "extra": list(d.extra),
            "fix_commands": list(e.fix_commands),
            "proposal_commands": list(e.proposal_commands),
        },
    }


def render_text(result: DiffResult, fmt: str = "table", verbose: bool = False) -> str:
    """The human report: header, headline, alarm, the lists, the diagnosis and the fix."""
    md = fmt == "markdown"
    parts = [_header(result, md)]
    alarm = result.explanation.alarm
    if alarm:
        parts.append(f"> **{alarm}**" if md else f"!! {alarm}")
    parts.append(_table(_rows(result, verbose), fmt, verbose))
    parts.append(_diagnosis(result, md))
    commands = result.explanation.fix_commands
    if commands:
        parts.append(_fix(commands, md))
    return "\n\n".join(p for p in parts if p) + "\n"


def _header(result: DiffResult, md: bool) -> str:
    key = f", key {result.source_key!r}" if result.source_key else ""
    fields = [
        ("Source", result.source, f"{result.source_count} tensors{key}"),
        ("Target", result.target, f"{result.target_kind}, {result.total + len(result.tied)} tensors"),
    ]
    notes = "".join(f"\nnote: {printable(note)}" for note in result.target_notes)
    if md:
        head = "  \n".join(f"**{label}:** `{value}` ({detail})" for label, value, detail in fields)
        return f"{head}{notes}\n\n**{result.headline}** ({_tally(result)})"
    head = "\n".join(f"{label + ':':<7} {value} ({detail})" for label, value, detail in fields)
    return f"{head}{notes}\n\n{result.headline} ({_tally(result)})"


def _tally(result: DiffResult) -> str:
    counts = result.comparison.counts()
    shown = ["matched", "missing", "unexpected", "shape_mismatched"]
    shown += [k for k in ("tied", "dtype_differences") if counts[k]]
    return ", ".join(f"{counts[k]} {k.replace('_', '-')}" for k in shown)


def _table(rows: list[tuple[str, str, str, str]], fmt: str, verbose: bool) -> str:
    """The lists as a table; the count column only for groups, the shapes column only when used."""
    columns = [0, 2] if verbose else [0, 1, 2]
    if any(row[3] for row in rows):
        columns.append(3)
    return render_table([HEADERS[i] for i in columns], [[row[i] for i in columns] for row in rows], fmt)


def _rows(result: DiffResult, verbose: bool) -> list[tuple[str, str, str, str]]:
    mismatch = {m.name: m for m in result.shape_mismatched}
    lists: list[tuple[str, Sequence[str]]] = [
        ("missing", result.missing),
        ("unexpected", result.unexpected),
        ("shape-mismatched", list(mismatch)),
    ]
    if verbose:
        lists.insert(0, ("matched", result.matched))
    lists.append(("tied", list(result.tied)))  # strict loading raises on them: always shown
    rows: list[tuple[str, str, str, str]] = []
    for status, names in lists:
        rows += _status_rows(status, names, verbose, _shapes_of(mismatch))
    return rows


def _shapes_of(mismatch: dict[str, Any]) -> Callable[[str], str]:
    def shapes(name: str) -> str:
        m = mismatch.get(name)
        return "" if m is None else f"{format_shape(m.source_shape)} → {format_shape(m.target_shape)}"

    return shapes


def _status_rows(
    status: str, names: Sequence[str], verbose: bool, shapes: Callable[[str], str]
) -> list[tuple[str, str, str, str]]:
    if not names:
        return []
    groups: list[tuple[str, tuple[str, ...]]]
    if verbose:
        groups = [(name, (name,)) for name in natural_sorted(names)]
    else:
        groups = [(g.label, g.members) for g in collapse(list(names), attribute=shapes, merge_leaves=True)]
    rows = []
    for i, (label, members) in enumerate(groups):
        rows.append((status if i == 0 else "", str(len(members)), label, shapes(members[0])))
    return rows


def _diagnosis(result: DiffResult, md: bool) -> str:
    e = result.explanation
    message = printable(e.message)  # it quotes the file's keys and prefixes, which may hold anything
    lines = [f"**Diagnosis:** {message}" if md else f"Diagnosis: {message}"]
    if e.filter_idiom:
        lines.append(printable(e.filter_idiom))
    proposal = result.diagnosis.proposed_mapping
    if proposal:
        rows = [(s, t) for s, t in sorted(proposal, key=lambda p: natural_key(p[1]))]
        table = render_table(("file key (proposed)", "target key"), rows, "markdown" if md else "table")
        lines.append(table)
        commands = [printable(c) for c in e.proposal_commands]
        if commands:
            if md:
                lines.append("To apply the proposal after review:\n\n```sh\n" + "\n".join(commands) + "\n```")
            else:
                lines.append("To apply the proposal after review:\n" + "\n".join(f"  {c}" for c in commands))
    return "\n\n".join(lines)


def _fix(commands: Sequence[str], md: bool) -> str:
    first, rest = commands[0], commands[1:]
    if md:
        text = f"**Fix:**\n\n```sh\n{first}\n```"
        if rest:
            text += "\n\nor step by step:\n\n```sh\n" + "\n".join(rest) + "\n```"
        return text
    text = f"Fix:\n  {first}"
    if rest:
        text += "\nor step by step:\n" + "\n".join(f"  {c}" for c in rest)
    return text
