"""Rendering helpers shared by every report: sizes, shapes, tables (tabulate, imported lazily), JSON.

Each report object (inspect, diff, plan, scan) keeps its data in fields and renders
itself through these helpers, so the table/markdown/json switch is written once.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from typing import Any

# tabulate's name for each of our --format values
TABLE_STYLES = {"table": "simple", "markdown": "github"}


def human_bytes(n: int) -> str:
    """Bytes in binary units, one decimal.

    Example:
        >>> human_bytes(1536), human_bytes(12), human_bytes(3 * 2**30)
        ('1.5 KiB', '12 B', '3.0 GiB')
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # unreachable


def plural(n: int, one: str, many: str | None = None) -> str:
    """``one`` for 1, else ``many`` (default: ``one`` + ``s``).

    Example:
        >>> plural(1, "is", "are"), plural(2, "is", "are"), plural(2, "tensor")
        ('is', 'are', 'tensors')
    """
    return one if n == 1 else many or one + "s"


def counted(n: int, one: str, many: str | None = None) -> str:
    """``1 tensor``, ``2 tensors``: the count and its noun (:func:`plural`).

    Example:
        >>> counted(1, "tensor"), counted(3, "entry", "entries")
        ('1 tensor', '3 entries')
    """
    return f"{n} {plural(n, one, many)}"


def human_count(n: int) -> str:
    """A count with thousands separators and a short form for large ones.

    Example:
        >>> human_count(5382), human_count(124_439_808)
        ('5,382', '124,439,808 (124.4M)')
    """
    if n < 1_000_000:
        return f"{n:,}"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if n >= div:
            return f"{n:,} ({n / div:.1f}{suffix})"
    return f"{n:,}"


def format_shape(shape: Sequence[int] | None) -> str:
    """``[16, 3, 3, 3]``; ``[]`` for a 0-dim tensor.

    Example:
        >>> format_shape((2, 64)), format_shape(())
        ('[2, 64]', '[]')
    """
    if shape is None:
        return "-"
    return "[" + ", ".join(str(d) for d in shape) + "]"


# Control characters (C0, DEL, C1), line and paragraph separators, bidirectional overrides: a tensor
# name holding a newline or a terminal escape must not forge lines in a report or drive the terminal.
# Shown escaped instead, as Python writes them.
_CONTROL = (
    {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
    | {c: f"\\u{c:04x}" for c in (0x200E, 0x200F, *range(0x2028, 0x202F), *range(0x2066, 0x206A))}
    # a surrogate: an undecodable byte of a file name (surrogateescape) as \xff, or a lone \ud800
    | {c: f"\\x{c - 0xDC00:02x}" if c >= 0xDC80 else f"\\u{c:04x}" for c in range(0xD800, 0xE000)}
    | {
        ord("\n"): "\\n",
        ord("\r"): "\\r",
        ord("\t"): "\\t",
    }
)


def printable(text: str) -> str:
    """``text`` with control characters escaped, for a report meant for a terminal.

    Example:
        >>> printable("w\\nFix: run this\\x1b[2K")
        'w\\\\nFix: run this\\\\x1b[2K'
    """
    return text.translate(_CONTROL) if not text.isprintable() else text


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str = "table") -> str:
    """A table in the style for ``fmt`` ("table" or "markdown"); empty string for no rows.
    Control characters in cells are shown escaped (:func:`printable`)."""
    if not rows:
        return ""
    from tabulate import tabulate

    cells = [[printable(c) if isinstance(c, str) else c for c in row] for row in rows]
    return tabulate(
        cells, headers=list(headers), tablefmt=TABLE_STYLES.get(fmt, "simple"), disable_numparse=True
    )


def render_fields(pairs: Sequence[tuple[str, str]], fmt: str = "table") -> str:
    """``label  value`` lines; in markdown, a ``| field | value |`` table (``|`` in a cell escaped).

    Example:
        >>> print(render_fields([("file", "a.pth"), ("tensors", "2")]))
        file     a.pth
        tensors  2
    """
    if fmt == "markdown":
        rows = [(k, str(v).replace("|", "\\|")) for k, v in pairs]
        return render_table(("field", "value"), rows, fmt)
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {printable(str(v))}" for k, v in pairs)


def dump_json(data: Any) -> str:
    """Stable, indented JSON (keys in insertion order, non-ASCII kept)."""
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)


def percent(part: int, whole: int) -> str:
    """``36/38`` -> ``"94.7%"``; never rounds up to 100% or down to 0% when it is not.

    Example:
        >>> percent(36, 38), percent(0, 38), percent(38, 38), percent(1999, 2000)
        ('94.7%', '0%', '100%', '99.9%')
    """
    if whole == 0 or part == whole:
        return "100%"
    if part == 0:
        return "0%"
    value = math.floor(1000 * part / whole) / 10
    return f"{max(value, 0.1):.1f}%"


def shell_quote(text: str) -> str:
    """``text`` quoted for bash or zsh: as ``shlex.quote`` does, or, when it holds control
    characters (a newline, a terminal escape), as ``$'...'`` with those escaped, so a suggested
    command stays on one line and shows what it holds.

    Example:
        >>> shell_quote("module."), shell_quote("a b"), shell_quote("x\\n\\x1b[2K'")
        ('module.', "'a b'", "$'x\\\\n\\\\x1b[2K\\\\''")
    """
    if text.isprintable():
        return shlex.quote(text)
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    # bash reads $'\x85' as the byte 0x85; a C1 character is \u0085 (UTF-8 in a UTF-8 locale)
    escaped = "".join(f"\\u{ord(c):04x}" if 0x80 <= ord(c) < 0xA0 else c for c in escaped)
    return "$'" + printable(escaped) + "'"
