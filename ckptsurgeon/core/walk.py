"""The one walk over a checkpoint's tree: mappings, lists and tuples down to their leaves.

Readers build trees of dicts, lists and tuples with :class:`~ckptsurgeon.core.record.TensorRecord`
leaves; everything that needs "every tensor, with its dotted name" walks them here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .record import TensorRecord


def leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every leaf of a tree of dicts, lists and tuples, with its path of keys (as strings).

    Example:
        >>> list(leaves({"a": [1, 2], "b": 3}))
        [(('a', '0'), 1), (('a', '1'), 2), (('b',), 3)]
    """
    if isinstance(node, TensorRecord) or not isinstance(node, Mapping | list | tuple):
        yield path, node
        return
    items = node.items() if isinstance(node, Mapping) else enumerate(node)
    for k, v in items:
        if isinstance(v, TensorRecord):  # most leaves: no generator of their own
            yield (*path, str(k)), v
        else:
            yield from leaves(v, (*path, str(k)))


def records(node: Any) -> Iterator[TensorRecord]:
    """The tensor records among a tree's leaves.

    Example:
        >>> len(list(records({"w": TensorRecord("w", "float32", (1,)), "epoch": 3})))
        1
    """
    for _path, leaf in leaves(node):
        if isinstance(leaf, TensorRecord):
            yield leaf


def named_records(node: Any) -> Iterator[tuple[str, TensorRecord]]:
    """Every record below ``node`` under its dotted name (``layer.0.weight``), renamed to it.

    Example:
        >>> [(name, r.name) for name, r in named_records({"a": [TensorRecord("x", "float32", (1,))]})]
        [('a.0', 'a.0')]
    """
    if isinstance(node, TensorRecord):
        yield "", node.renamed("")
        return
    for path, leaf in leaves(node):
        if isinstance(leaf, TensorRecord):
            name = ".".join(path)
            yield name, leaf.renamed(name)
