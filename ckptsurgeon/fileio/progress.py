"""Progress bars on stderr for work that reads or writes whole files.

A bar is shown when asked (``wanted=True``), or, by default (``wanted=None``), when stderr is a
terminal and the work is at least :data:`PROGRESS_MIN_BYTES` (smaller work takes well under a
second). Nothing is ever written to stdout, and click is imported only once a bar is shown, so
a library call without a terminal pays one comparison. :class:`CountingFile` advances a bar as
a writer writes; readers call ``bar.update(n)`` themselves.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

PROGRESS_MIN_BYTES = 256 * 2**20  # show a progress bar (TTY only) from this much data on
RENDERS = 1000  # at most about this many redraws per bar, however many small writes feed it


def stderr_is_tty() -> bool:
    """True when stderr is a terminal (a closed or replaced stream counts as not one).

    Example:
        >>> isinstance(stderr_is_tty(), bool)
        True
    """
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def wants_bar(total: int, wanted: bool | None) -> bool:
    """Whether to show a bar for ``total`` bytes of work: ``wanted`` if given, else on a TTY
    for at least :data:`PROGRESS_MIN_BYTES`.

    Example:
        >>> wants_bar(10, True), wants_bar(10, None), wants_bar(2**40, False)
        (True, False, False)
    """
    if wanted is not None:
        return wanted
    return total >= PROGRESS_MIN_BYTES and stderr_is_tty()


class Bar:
    """A click progress bar counted in bytes; :meth:`update` advances it.

    Example:
        >>> with progress_bar(100, True, "copying") as bar:          # doctest: +SKIP
        ...     bar.update(60)
    """

    def __init__(self, inner: Any, total: int) -> None:
        self._inner = inner
        self.total = total
        self.done = 0

    def update(self, n: int) -> None:
        """Count ``n`` more bytes done."""
        self.done += n
        self._inner.update(n)

    def complete(self) -> None:
        """Show the work as done (totals are estimates: headers, tied tensors)."""
        if self.done < self.total:
            self.update(self.total - self.done)


@contextlib.contextmanager
def progress_bar(total: int, wanted: bool | None, label: str) -> Iterator[Bar | None]:
    """A :class:`Bar` on stderr over ``total`` bytes labelled ``label``, or None when no bar is
    wanted (see :func:`wants_bar`). On a clean exit the bar is completed.

    Example:
        >>> with progress_bar(10, None, "checking model.pth") as bar:   # not a TTY: no bar
        ...     bar is None
        True
    """
    if not wants_bar(total, wanted):
        yield None
        return
    import click

    steps = max(1, total // RENDERS)
    with click.progressbar(length=total, label=label, file=sys.stderr, update_min_steps=steps) as inner:
        bar = Bar(inner, total)
        yield bar
        bar.complete()


class CountingFile:
    """A file wrapper that advances a progress bar as bytes are written (everything else,
    ``fileno``, ``flush``, ``tell``, ``seek`` ..., goes to the file itself).

    Example:
        >>> with progress_bar(1024, True, "writing") as bar:          # doctest: +SKIP
        ...     CountingFile(fh, bar).write(bytes(1024))
        1024
    """

    def __init__(self, fh: BinaryIO, bar: Bar) -> None:
        self._fh = fh
        self._bar = bar

    def write(self, data: Any) -> int:
        n = self._fh.write(data)
        done = len(data) if n is None else n
        self._bar.update(done)
        return done

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def counting(fh: BinaryIO, bar: Bar | None) -> BinaryIO:
    """``fh`` itself without a bar, else a :class:`CountingFile` feeding ``bar``.

    Example:
        >>> counting(fh, None) is fh                                  # doctest: +SKIP
        True
    """
    return fh if bar is None else cast(BinaryIO, CountingFile(fh, bar))
