"""Make long key lists readable: natural order, and collapsed groups such as
``layers.{0..31}.attn.q.weight`` or ``conv1.{weight,bias}``."""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that puts ``layer.2`` before ``layer.10``.

    Example:
        >>> sorted(["l.10", "l.2", "l.1"], key=natural_key)
        ['l.1', 'l.2', 'l.10']
    """
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _DIGITS.split(name) if p != "")


def natural_sorted(names: Iterable[str]) -> list[str]:
    """Names in natural order."""
    return sorted(names, key=natural_key)


@dataclass(frozen=True)
class Group:
    """A display label and the names it stands for (in natural order)."""

    label: str
    members: tuple[str, ...]


def collapse(
    names: Sequence[str],
    attribute: Callable[[str], Hashable] | None = None,
    merge_leaves: bool = False,
    natural: bool = True,
) -> list[Group]:
    """Collapse names that differ only in numeric components (and share ``attribute``).

    ``merge_leaves`` also folds siblings into one label: ``conv1.{weight,bias}``.
    Groups come in natural order of their first member, or (``natural=False``) in the
    order their first member appears in ``names`` (module order for torch state dicts).

    Example:
        >>> [g.label for g in collapse(["l.0.w", "l.1.w", "l.2.w", "head.w"])]
        ['head.w', 'l.{0..2}.w']
        >>> [g.label for g in collapse(["conv1.weight", "conv1.bias"], merge_leaves=True)]
        ['conv1.{bias,weight}']
    """
    attr = attribute or (lambda _name: None)
    buckets: dict[tuple[object, ...], list[str]] = {}
    for name in names:
        pattern = tuple(None if p.isdigit() else p for p in _tokens(name))
        buckets.setdefault((pattern, attr(name)), []).append(name)
    groups: list[Group] = []
    for members in buckets.values():
        groups.extend(_product_groups(natural_sorted(members)))
    if merge_leaves:
        groups = _merge_leaves(groups, attr)
    if natural:
        return sorted(groups, key=lambda g: natural_key(g.members[0]))
    position = {name: i for i, name in enumerate(names)}
    return sorted(groups, key=lambda g: min(position[m] for m in g.members))


def _product_groups(members: list[str]) -> list[Group]:
    """One label if the members are a full product of their numeric values, else split and recurse."""
    split = [_tokens(m) for m in members]
    positions = [i for i, p in enumerate(split[0]) if p.isdigit()]
    values = {i: sorted({int(s[i]) for s in split}) for i in positions}
    varying = [i for i in positions if len(values[i]) > 1]
    count = 1
    for i in varying:
        count *= len(values[i])
    if count == len(members):
        label_parts = list(split[0])
        for i in varying:
            label_parts[i] = _format_values(values[i])
        return [Group("".join(label_parts), tuple(members))]
    first = varying[0]
    groups: list[Group] = []
    for value in values[first]:
        subset = [m for m, s in zip(members, split, strict=True) if int(s[first]) == value]
        groups.extend(_product_groups(subset))
    return groups


def _tokens(name: str) -> list[str]:
    """``layer12.0.conv1`` -> ``['layer', '12', '.', '0', '.conv', '1']``: digit runs apart."""
    return [t for t in _DIGITS.split(name) if t != ""]


def _format_values(values: list[int]) -> str:
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 2:
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(str(v) for v in values) + "}"


def _merge_leaves(groups: list[Group], attr: Callable[[str], Hashable]) -> list[Group]:
    """Fold groups whose labels differ only in the last component: ``a.{weight,bias}``."""
    by_parent: dict[tuple[str, int, Hashable], list[Group]] = {}
    for group in groups:
        parent = group.label.rpartition(".")[0]
        by_parent.setdefault((parent, len(group.members), attr(group.members[0])), []).append(group)
    merged: list[Group] = []
    for (parent, _count, _attr), siblings in by_parent.items():
        if len(siblings) == 1 or not parent:
            merged.extend(siblings)
            continue
        leaves = sorted(g.label.rpartition(".")[2] for g in siblings)
        members = tuple(natural_sorted(m for g in siblings for m in g.members))
        merged.append(Group(f"{parent}.{{{','.join(leaves)}}}", members))
    return merged
