"""The human report of a diff (table or markdown), from its parts: a header (the two sides and the
headline), the comparison, the diagnosis and its explanation. ``DiffResult.render`` calls it;
``DiffResult.to_json`` is the JSON.

By default the lists are grouped and collapsed (``layer{1..4}.*.bn1.weight``,
``conv1.{bias,weight}``) and matched keys are only counted: a short summary, not a
per-key log. ``verbose`` lists every key of the four lists, one per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.grouping import collapse, natural_key, natural_sorted
from ..core.report import format_shape, printable, render_table
from .compare import Comparison
from .diagnosis import Diagnosis
from .explain import Explanation

HEADERS = ("status", "count", "keys", "file → target")


@dataclass(frozen=True)
class DiffHeader:
    """What the report's header says: the file, the target, and the headline."""

    source: str
    source_key: str | None
    source_count: int
    target: str
    target_kind: str
    target_notes: tuple[str, ...]
    headline: str


def render_text(
    header: DiffHeader,
    comparison: Comparison,
    diagnosis: Diagnosis,
    explanation: Explanation,
    fmt: str = "table",
    verbose: bool = False,
) -> str:
    """The human report (``fmt`` "table" or "markdown"): header, headline, alarm, the lists, the
    diagnosis and the fix.

    Example:
        >>> print(diff(sd, "models.py:build(num_classes=2)").render())     # doctest: +SKIP
    """
    md = fmt == "markdown"
    parts = [_header(header, comparison, md)]
    alarm = explanation.alarm
    if alarm:
        parts.append(f"> **{alarm}**" if md else f"!! {alarm}")
    parts.append(_table(_rows(comparison, verbose), fmt, verbose))
    parts.append(_diagnosis(diagnosis, explanation, md))
    commands = explanation.fix_commands
    if commands:
        parts.append(_fix(commands, md))
    return "\n\n".join(p for p in parts if p) + "\n"


def _header(header: DiffHeader, comparison: Comparison, md: bool) -> str:
    key = f", key {header.source_key!r}" if header.source_key else ""
    target_tensors = comparison.total + len(comparison.tied)
    fields = [
        ("Source", header.source, f"{header.source_count} tensors{key}"),
        ("Target", header.target, f"{header.target_kind}, {target_tensors} tensors"),
    ]
    notes = "".join(f"\nnote: {printable(note)}" for note in header.target_notes)
    if md:
        head = "  \n".join(f"**{label}:** `{value}` ({detail})" for label, value, detail in fields)
        return f"{head}{notes}\n\n**{header.headline}** ({_tally(comparison)})"
    head = "\n".join(f"{label + ':':<7} {value} ({detail})" for label, value, detail in fields)
    return f"{head}{notes}\n\n{header.headline} ({_tally(comparison)})"


def _tally(comparison: Comparison) -> str:
    counts = comparison.counts()
    shown = ["matched", "missing", "unexpected", "shape_mismatched"]
    shown += [k for k in ("tied", "dtype_differences") if counts[k]]
    return ", ".join(f"{counts[k]} {k.replace('_', '-')}" for k in shown)


def _table(rows: list[tuple[str, str, str, str]], fmt: str, verbose: bool) -> str:
    """The lists as a table; the count column only for groups, the shapes column only when used."""
    columns = [0, 2] if verbose else [0, 1, 2]
    if any(row[3] for row in rows):
        columns.append(3)
    return render_table([HEADERS[i] for i in columns], [[row[i] for i in columns] for row in rows], fmt)


def _rows(comparison: Comparison, verbose: bool) -> list[tuple[str, str, str, str]]:
    mismatch = {m.name: m for m in comparison.shape_mismatched}
    lists: list[tuple[str, Sequence[str]]] = [
        ("missing", comparison.missing),
        ("unexpected", comparison.unexpected),
        ("shape-mismatched", list(mismatch)),
    ]
    if verbose:
        lists.insert(0, ("matched", comparison.matched))
    lists.append(("tied", list(comparison.tied)))  # strict loading raises on them: always shown
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


def _diagnosis(diagnosis: Diagnosis, e: Explanation, md: bool) -> str:
    message = printable(e.message)  # it quotes the file's keys and prefixes, which may hold anything
    lines = [f"**Diagnosis:** {message}" if md else f"Diagnosis: {message}"]
    if e.filter_idiom:
        lines.append(printable(e.filter_idiom))
    proposal = diagnosis.proposed_mapping
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
