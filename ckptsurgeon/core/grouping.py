"""Make long key lists readable: natural order, and collapsed groups such as
``layers.{0..31}.attn.q.weight`` or ``conv1.{weight,bias}``.

Every name is split into its text and digit runs once; buckets, products and orders then
work on those parts (20,000 names collapse in a few tens of milliseconds).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that puts ``layer.2`` before ``layer.10``: a flat tuple of (kind, part) pairs,
    digit runs ``0, int`` before text runs ``1, text`` at the same place.

    Example:
        >>> sorted(["l.10", "l.2", "l.1"], key=natural_key)
        ['l.1', 'l.2', 'l.10']
        >>> natural_key("l.10")
        (1, 'l.', 0, 10)
    """
    key: list[object] = []
    text = True
    for part in _DIGITS.split(name):  # text, digits, text, digits, ..., text
        if not text:
            key += (0, int(part))
        elif part:
            key += (1, part)
        text = not text
    return tuple(key)


def natural_sorted(names: Iterable[str]) -> list[str]:
    """Names in natural order."""
    return sorted(names, key=natural_key)


@dataclass(frozen=True)
class Group:
    """A display label and the names it stands for (in natural order)."""

    label: str
    members: tuple[str, ...]


# A name split once: (its numbers, the name, its digit runs as written).
_Split = tuple[tuple[int, ...], str, list[str]]
_VALUES = itemgetter(0)


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
    buckets: dict[tuple[tuple[str, ...], object], list[_Split]] = {}  # (text runs, attribute) -> names
    split = _DIGITS.split
    for name in names:
        parts = split(name)
        digits = parts[1::2]
        key = (tuple(parts[0::2]), attr(name))
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = []
        bucket.append((tuple(map(int, digits)), name, digits))
    groups: list[Group] = []
    for (texts, _attr), members in buckets.items():
        members.sort(key=_VALUES)  # natural order: the text runs are the same
        groups.extend(_product_groups(texts, members))
    if merge_leaves:
        groups = _merge_leaves(groups, attr)
    if natural:
        return sorted(groups, key=lambda g: natural_key(g.members[0]))
    position: dict[str, int] = {}
    for i, name in enumerate(names):
        position.setdefault(name, i)
    return sorted(groups, key=lambda g: min(position[m] for m in g.members))


def _product_groups(texts: tuple[str, ...], members: list[_Split]) -> list[Group]:
    """One label if the members are a full product of their numeric values, else split and recurse."""
    positions = range(len(members[0][0]))
    values = [sorted({s[0][i] for s in members}) for i in positions]
    varying = [i for i in positions if len(values[i]) > 1]
    count = 1
    for i in varying:
        count *= len(values[i])
    if count == len(members):
        digits = list(members[0][2])
        for i in varying:
            digits[i] = _format_values(values[i])
        return [Group(_join(texts, digits), tuple(s[1] for s in members))]
    if not varying:  # the same numbers written differently ("01" and "1"): one group each
        return [Group(s[1], (s[1],)) for s in members]
    first = varying[0]
    by_value: dict[int, list[_Split]] = {}
    for s in members:  # members are sorted, so each subset stays sorted
        by_value.setdefault(s[0][first], []).append(s)
    groups: list[Group] = []
    for value in values[first]:
        groups.extend(_product_groups(texts, by_value[value]))
    return groups


def _join(texts: tuple[str, ...], digits: list[str]) -> str:
    out = [texts[0]]
    for digit, text in zip(digits, texts[1:], strict=True):
        out.append(digit)
        out.append(text)
    return "".join(out)


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
