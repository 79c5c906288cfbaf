"""The one rule for "enough of the target loads", asked by ``adapt``, ``load_into`` and ``diff``.

Coverage is the percentage of the target's tensors that receive a tensor from the file (by
name and shape). A result is acceptable when at least ``min_coverage`` percent of the target
loads, and never when nothing does (an empty target is trivially covered). The default,
:data:`DEFAULT_MIN_COVERAGE`, is 50%: below it, a checkpoint is more likely another
architecture (or another implementation of it) than the model's own pretrained weights.

- ``ckpt adapt`` and :func:`ckptsurgeon.load_into` refuse below it (exit 2, nothing written or
  copied; ``--min-coverage`` / ``min_coverage=`` move the bar).
- ``ckpt diff`` raises its alarm below it (``--min-coverage P`` moves the bar, and then its exit
  status is 0 exactly when the alarm is not raised).
"""

from __future__ import annotations

DEFAULT_MIN_COVERAGE = 50.0  # percent of the target's tensors that must load


def coverage_percent(loaded: int, total: int) -> float:
    """Percent of ``total`` target tensors that load (100 for an empty target).

    Example:
        >>> coverage_percent(36, 38), coverage_percent(0, 0)
        (94.73684210526316, 100.0)
    """
    return 100.0 if total == 0 else 100.0 * loaded / total


def enough(loaded: int, total: int, min_coverage: float | None = None) -> bool:
    """True when at least ``min_coverage`` percent of ``total`` load, and something does.

    ``None`` means :data:`DEFAULT_MIN_COVERAGE`. Nothing loading is never enough, even with
    ``min_coverage=0``: a zero-load is the silent failure this rule exists to stop.

    Example:
        >>> enough(1, 2), enough(1, 3), enough(1, 3, min_coverage=30), enough(0, 3, min_coverage=0)
        (True, False, True, False)
        >>> enough(0, 0)
        True
    """
    if total == 0:
        return True
    threshold = DEFAULT_MIN_COVERAGE if min_coverage is None else min_coverage
    return loaded > 0 and 100.0 * loaded >= threshold * total


def threshold(min_coverage: float | None) -> float:
    """The bar in force: ``min_coverage``, or the default when it is ``None``.

    Example:
        >>> threshold(None), threshold(90)
        (50.0, 90)
    """
    return DEFAULT_MIN_COVERAGE if min_coverage is None else min_coverage
