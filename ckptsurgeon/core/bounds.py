"""Bounded work on untrusted objects: what a pickle builds is never hashed, walked or printed unbounded.

A pickle of a few hundred bytes can hold a tuple nested a million deep (hashing it overflows the
C stack), a tuple DAG with 2**40 paths (hashing or ``repr()`` of it never ends) or a 5000-digit
integer (``str()`` of it raises). So:

* :func:`check_key` -- a dict key or set member built from a pickle is an atom (``str``, ``bytes``,
  ``bool``, ``None``, an ``int`` or a ``float`` below ``2**MAX_KEY_BITS`` in size), an object hashed
  by identity (a placeholder), or a tuple/frozenset of at most ``MAX_KEY_ITEMS`` such atoms. The
  size bound also keeps keys from sharing a hash: Python hashes an integer modulo ``2**61 - 1``, so
  ``k * (2**61 - 1) + c`` are all one hash and a dict of 20,000 of them takes seconds to build,
  quadratic in their number; below ``2**60`` an integer is its own hash (a float of that size
  shares its hash with at most a few dozen others). ``complex`` keys, whose hashes can be made to
  collide from their parts, are refused.
* :func:`check_depth` -- containers nest at most ``MAX_DEPTH`` deep and never contain themselves;
  one walk, linear in the number of distinct objects. Every later tree walk may then recurse.
* :func:`bounded_repr` -- what a message, a table cell or a note shows of an untrusted value:
  rendered piece by piece and cut when ``limit`` characters are reached, never built whole.

Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

MAX_DEPTH = 100
MAX_KEY_ITEMS = 64
MAX_KEY_BITS = 60  # an int or float key below 2**60: no two share a hash (see above)
# an int wider than this is shown by its size (str() of a 5000-digit int raises; it is slow before that)
MAX_SHOWN_BITS = 1024


class BoundError(Exception):
    """An untrusted object is beyond a bound; the message is one line (no file name)."""


_ATOMS = (str, bytes, bool, type(None))


def check_key(key: Any) -> None:
    """Refuse a dict key or set member whose hash could be unbounded work.

    Example:
        >>> check_key(("layer", 3)); check_key("w")
        >>> check_key(((1,),))
        Traceback (most recent call last):
        ...
        ckptsurgeon.core.bounds.BoundError: a dict key or set member that nests containers
    """
    kind = type(key)
    if kind in _ATOMS:
        return
    if kind is tuple or kind is frozenset:
        if len(key) > MAX_KEY_ITEMS:
            raise BoundError(f"a dict key or set member that is a {kind.__name__} of {len(key):,} items")
        for part in key:
            if type(part) not in _ATOMS:
                _check_number(part, "holding", nested=True)
        return
    if kind.__hash__ is object.__hash__:  # hashed by identity: constant time
        return
    _check_number(key, "that is")


def _check_number(value: Any, how: str, *, nested: bool = False) -> None:
    """An int or float small enough that its hash is its own (see the module's docstring)."""
    if isinstance(value, int):
        if value.bit_length() > MAX_KEY_BITS:
            raise BoundError(
                f"a dict key or set member {how} an integer of {value.bit_length():,} bits (at most "
                f"{MAX_KEY_BITS}: larger ones can be made to share one hash)"
            )
        return
    if isinstance(value, float):
        if not abs(value) < 2.0**MAX_KEY_BITS and value == value:  # NaN hashes by identity
            raise BoundError(
                f"a dict key or set member {how} a float of size 2**{MAX_KEY_BITS} or more "
                "(such floats can be made to share one hash)"
            )
        return
    if nested:
        raise BoundError("a dict key or set member that nests containers")
    raise BoundError(f"a dict key or set member of type {type(value).__name__}")


def check_keys(keys: Any) -> Any:
    """:func:`check_key` for each of ``keys``; returns ``keys``."""
    for key in keys:
        if type(key) is not str:
            check_key(key)
    return keys


# -- depth --------------------------------------------------------------------------------------
def _children(node: Any) -> list[Any] | None:
    """The objects a container holds (None for a leaf)."""
    kind = type(node)
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        return list(node)
    if isinstance(node, dict):
        parts = [*node.keys(), *node.values()]
        extra = getattr(node, "__dict__", None)
        if extra:
            parts.extend(extra.values())
        return parts
    if kind is argparse.Namespace:
        return list(vars(node).values())
    parts_of = getattr(node, "__bounded_children__", None)
    if parts_of is not None:
        return parts_of()
    return None


_LEAVES = frozenset({str, bytes, int, float, bool, type(None), complex})


def check_depth(root: Any, limit: int = MAX_DEPTH) -> None:
    """Refuse containers nested more than ``limit`` deep, or containing themselves.

    Each distinct container is visited once (a DAG that reuses one tuple at every level costs its
    size, not its paths). Placeholders declare what they hold with ``__bounded_children__()``.

    Example:
        >>> check_depth({"a": [1, (2, 3)]})
        >>> deep = []
        >>> for _ in range(200): deep = [deep]
        >>> check_depth(deep)
        Traceback (most recent call last):
        ...
        ckptsurgeon.core.bounds.BoundError: containers nested more than 100 deep
    """
    heights: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Any, list[Any] | None]] = [(root, None)]
    while stack:
        node, children = stack.pop()
        key = id(node)
        if children is not None:  # every child is done: this node's height
            active.discard(key)
            height = 1 + max((heights.get(id(c), 0) for c in children), default=0)
            if height > limit:
                raise BoundError(f"containers nested more than {limit} deep")
            heights[key] = height
            continue
        if key in heights or type(node) in _LEAVES:
            continue
        parts = _children(node)
        if parts is None:
            continue
        if key in active:
            raise BoundError("an object that contains itself")
        active.add(key)
        stack.append((node, parts))
        for child in parts:
            if type(child) not in _LEAVES and id(child) not in heights:
                stack.append((child, None))


# -- printing -----------------------------------------------------------------------------------
class _Full(Exception):
    pass


class _Out:
    def __init__(self, limit: int) -> None:
        self.parts: list[str] = []
        self.left = limit
        self.cut = False

    def add(self, text: str) -> None:
        if len(text) > self.left:
            self.parts.append(text[: self.left])
            self.left = 0
            self.cut = True
            raise _Full
        self.parts.append(text)
        self.left -= len(text)


def bounded_repr(value: Any, limit: int = 60, depth: int = 4) -> str:
    """``repr(value)`` cut to ``limit`` characters, built only that far (and ``depth`` levels deep).

    Integers wider than ``MAX_SHOWN_BITS`` bits are "an integer of N bits"; containers deeper than
    ``depth`` are ``...``; objects of other types show their type name.

    Example:
        >>> bounded_repr((1, "a", [2.5, None]))
        "(1, 'a', [2.5, None])"
        >>> bounded_repr(2 ** 5000)
        'an integer of 5,001 bits'
        >>> bounded_repr(list(range(100)), limit=20)
        '[0, 1, 2, 3, 4, 5, …'
    """
    out = _Out(max(limit, 1))
    with contextlib.suppress(_Full):
        _render(value, out, depth)
    text = "".join(out.parts)
    return text[: limit - 1] + "…" if out.cut else text


def _render(value: Any, out: _Out, depth: int) -> None:
    kind = type(value)
    if kind is str or kind is bytes or kind is bytearray:
        shown = value[: out.left + 1]
        out.add(repr(shown))
        if len(shown) < len(value):
            out.add("…")
    elif isinstance(value, bool) or value is None or isinstance(value, float | complex):
        out.add(repr(value))
    elif isinstance(value, int):
        bits = value.bit_length()
        out.add(repr(int(value)) if bits <= MAX_SHOWN_BITS else f"an integer of {bits:,} bits")
    elif kind in (list, tuple, set, frozenset) or isinstance(value, dict):
        _render_container(value, out, depth)
    else:
        custom = getattr(value, "__bounded_repr__", None)
        if custom is not None:
            custom(lambda v, d=depth: _render(v, out, d - 1), out.add)
        else:
            out.add(f"<{kind.__name__}>")


_BRACKETS: dict[type, tuple[str, str]] = {list: ("[", "]"), tuple: ("(", ")")}


def _render_container(value: Any, out: _Out, depth: int) -> None:
    kind = type(value)
    if isinstance(value, dict):
        opener, closer = "{", "}"
    else:
        opener, closer = _BRACKETS.get(kind, (f"{kind.__name__}({{", "})"))
    if depth <= 0:
        out.add(opener + ("..." if value else "") + closer)
        return
    out.add(opener)
    items = value.items() if isinstance(value, dict) else value
    for i, item in enumerate(items):
        if i:
            out.add(", ")
        if isinstance(value, dict):
            _render(item[0], out, depth - 1)
            out.add(": ")
            _render(item[1], out, depth - 1)
        else:
            _render(item, out, depth - 1)
    if kind is tuple and len(value) == 1:
        out.add(",")
    out.add(closer)
