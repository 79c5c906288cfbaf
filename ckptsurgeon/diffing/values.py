"""``compare_values()``: how far apart the values of two checkpoints are, tensor by tensor.

Names are paired through the key transform ``diff`` finds (:func:`~.diagnosis.best_transform`: a
``module.`` wrapper on one side only still pairs), then each pair is read and measured a piece
(4M elements) at a time, so the peak memory is a few pieces, not a tensor or a checkpoint.

Every pair is measured in float64 (complex tensors as complex128, by their real and imaginary
parts), whatever the two dtypes: ``A`` is the reference.

* ``max_abs``: max |a - b| (0 where both hold the same infinity);
* ``rel_l2``: ||a - b|| / ||a||; when ||a|| = 0 it is 0 if b is all zeros too, else ``inf``
  (``null`` in JSON);
* ``cosine``: a.b / (||a|| ||b||), undefined (``None``) when either norm is 0;
* ``bit_equal``: the same dtype and the same bytes. A pair holding a NaN on either side has status
  ``nan``, never ``equal``, and is never within a tolerance;
* ``within`` (with ``atol``/``rtol``): ``torch.allclose(b, a, rtol, atol)`` in float64, i.e.
  |b - a| <= atol + rtol * |a| everywhere, NaN never within; the one not given is 0.

Example:
    >>> import torch
    >>> v = compare_values({"w": torch.ones(3)}, {"w": torch.ones(3) * 1.5})   # doctest: +SKIP
    >>> v.tensors[0].max_abs, v.passes()                                     # doctest: +SKIP
    (0.5, False)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.grouping import collapse, natural_key, natural_sorted
from ..core.record import Storage, TensorRecord
from ..core.report import counted, dump_json, format_shape, printable, render_table
from ..errors import CkptError, FormatError
from ..fileio.progress import Bar, progress_bar
from .diagnosis import KeyTransform, apply_transform, best_transform

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..core.checkpoint import Checkpoint
    from ..formats import ReadOptions

__all__ = ["TensorValues", "ValueDiff", "compare_values", "measure"]

# statuses, most changed first
STATUSES = ("nan", "changed", "same-values", "equal")


@dataclass(frozen=True)
class TensorValues:
    """One compared pair: ``name`` in A, ``other`` in B, and the measures (module docstring)."""

    name: str
    other: str
    shape: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    bit_equal: bool
    max_abs: float
    rel_l2: float
    cosine: float | None
    norm_a: float
    nan_a: int = 0
    nan_b: int = 0
    within: bool | None = None

    @property
    def has_nan(self) -> bool:
        return bool(self.nan_a or self.nan_b)

    @property
    def status(self) -> str:
        """``nan`` (a NaN on either side), ``equal`` (bit for bit), ``same-values`` (equal in
        float64 but not bit for bit: another dtype, or -0.0 against 0.0), else ``changed``."""
        if self.has_nan:
            return "nan"
        if self.bit_equal:
            return "equal"
        return "same-values" if self.max_abs == 0 else "changed"

    def change_key(self) -> tuple[Any, ...]:
        """Sort key: most changed first (NaN, then relative L2, then max |a-b|), then by name."""
        rank = STATUSES.index(self.status)
        rel = -self.rel_l2 if not math.isnan(self.rel_l2) else -math.inf
        size = -self.max_abs if not math.isnan(self.max_abs) else -math.inf
        return (rank, rel, size, natural_key(self.name))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "b_name": self.other,
            "shape": list(self.shape),
            "a_dtype": self.dtype_a,
            "b_dtype": self.dtype_b,
            "status": self.status,
            "bit_equal": self.bit_equal,
            "max_abs": _finite(self.max_abs),
            "rel_l2": _finite(self.rel_l2),
            "cosine": _finite(self.cosine),
            "a_norm": _finite(self.norm_a),
            "nan_a": self.nan_a,
            "nan_b": self.nan_b,
            "within": self.within,
        }


@dataclass(frozen=True)
class Unpaired:
    """A pair with the same name (after the key transform) but another shape: listed, not compared."""

    name: str
    other: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "b_name": self.other,
            "a_shape": list(self.shape_a),
            "b_shape": list(self.shape_b),
        }


@dataclass(frozen=True)
class Side:
    """One checkpoint: its label, the entry chosen, how many tensors."""

    path: str
    key: str | None
    tensors: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "key": self.key, "tensors": self.tensors}


@dataclass(frozen=True)
class ValueDiff:
    """The answer of :func:`compare_values`: every compared pair (most changed first), the names on
    one side only, the shape mismatches, and the tolerance if one was set.

    :meth:`passes` is what ``ckpt diff --values`` exits 0 on.
    """

    a: Side
    b: Side
    transform: KeyTransform
    tensors: tuple[TensorValues, ...]
    only_in_a: tuple[str, ...] = ()
    only_in_b: tuple[str, ...] = ()
    shape_mismatched: tuple[Unpaired, ...] = ()
    atol: float | None = None
    rtol: float | None = None

    @property
    def checked(self) -> bool:
        """True when a tolerance was set (``atol`` or ``rtol``)."""
        return self.atol is not None or self.rtol is not None

    def counts(self) -> dict[str, int]:
        by_status = {s: 0 for s in STATUSES}
        for t in self.tensors:
            by_status[t.status] += 1
        return {
            "compared": len(self.tensors),
            "equal": by_status["equal"],
            "same_values": by_status["same-values"],
            "changed": by_status["changed"],
            "nan": by_status["nan"],
            "within_tolerance": sum(1 for t in self.tensors if t.within),
            "only_in_a": len(self.only_in_a),
            "only_in_b": len(self.only_in_b),
            "shape_mismatched": len(self.shape_mismatched),
        }

    @property
    def unpaired(self) -> int:
        return len(self.only_in_a) + len(self.only_in_b) + len(self.shape_mismatched)

    def passes(self) -> bool:
        """Every tensor paired and compared (at least one), and each within the tolerance (when one
        is set) or else equal bit for bit."""
        if self.unpaired or not self.tensors:
            return False
        if self.checked:
            return all(t.within for t in self.tensors)
        return all(t.bit_equal for t in self.tensors)

    @property
    def headline(self) -> str:
        c = self.counts()
        parts = [f"{c['equal']} equal bit for bit"]
        if c["same_values"]:
            parts.append(f"{c['same_values']} equal in value only")
        parts.append(f"{c['changed']} changed")
        if c["nan"]:
            parts.append(f"{c['nan']} with NaN")
        line = f"{counted(c['compared'], 'tensor')} compared: " + ", ".join(parts)
        if self.checked:
            line += f"; {c['within_tolerance']} of {c['compared']} within tolerance"
        return line

    def render(self, fmt: str = "table", verbose: bool = False) -> str:
        """The report as ``ckpt diff --values`` prints it: ``table``, ``markdown`` or ``json``."""
        if fmt == "json":
            return dump_json(self.to_json())
        return _render_text(self, fmt, verbose)

    def to_json(self) -> dict[str, Any]:
        return {
            "passes": self.passes(),
            "headline": self.headline,
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
            "transform": None if self.transform.is_identity else self.transform.to_dict(),
            "tolerance": {"atol": self.atol or 0.0, "rtol": self.rtol or 0.0} if self.checked else None,
            "summary": self.counts(),
            "tensors": [t.to_dict() for t in self.tensors],
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "shape_mismatched": [m.to_dict() for m in self.shape_mismatched],
        }


def compare_values(
    a: str | Path | Checkpoint | Any,
    b: str | Path | Checkpoint | Any,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    key: str | None = None,
    b_key: str | None = None,
    read_options: ReadOptions | None = None,
    progress: bool | None = None,
) -> ValueDiff:
    """Compare the values of ``a`` and ``b`` tensor by tensor (``a`` is the reference).

    ``a``/``b``: a path (any checkpoint ``open_checkpoint`` reads; ``key``/``b_key`` pick a nested
    entry), a :class:`Checkpoint`, a state dict (records or tensors) or an ``nn.Module``.
    ``atol``/``rtol`` set a tolerance (the other one is then 0): :meth:`ValueDiff.passes` holds
    when every tensor is within it; without, when every tensor is equal bit for bit.
    Pairs are read one at a time, a piece at a time, and freed; ``progress`` shows a bar on
    stderr (default: on a TTY, for 256 MiB or more).
    """
    from .result import source_records

    for label, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise CkptError(f"{label} must be a finite number >= 0, not {value!r}")
    side_a = source_records(a, key, read_options, "A")
    side_b = source_records(b, b_key, read_options, "B")
    if side_a is None or side_b is None:
        bad = a if side_a is None else b
        raise TypeError(f"compare_values: cannot read a checkpoint of type {type(bad).__name__}")
    recs_a, recs_b = side_a.records, side_b.records
    transform = best_transform(_shapes(recs_a), _shapes(recs_b))
    renamed, origin = apply_transform(recs_a, transform)
    pairs: list[tuple[TensorRecord, TensorRecord, str]] = []
    mismatched: list[Unpaired] = []
    for new, rec in renamed.items():
        other = recs_b.get(new)
        if other is None:
            continue
        if tuple(rec.shape) != tuple(other.shape):
            mismatched.append(Unpaired(origin[new], new, tuple(rec.shape), tuple(other.shape)))
        else:
            pairs.append((rec, other, new))
    total = sum(rec.nbytes + other.nbytes for rec, other, _name in pairs)
    with progress_bar(total, progress, "comparing values") as bar:
        measured = [_measure_pair(rec, other, name, atol, rtol, bar) for rec, other, name in pairs]
    return ValueDiff(
        a=Side(side_a.label, side_a.key, len(recs_a)),
        b=Side(side_b.label, side_b.key, len(recs_b)),
        transform=transform,
        tensors=tuple(sorted(measured, key=TensorValues.change_key)),
        only_in_a=tuple(natural_sorted(origin[n] for n in renamed if n not in recs_b)),
        only_in_b=tuple(natural_sorted(n for n in recs_b if n not in renamed)),
        shape_mismatched=tuple(sorted(mismatched, key=lambda m: natural_key(m.name))),
        atol=atol,
        rtol=rtol,
    )


def _shapes(records: dict[str, TensorRecord]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(rec.shape) for name, rec in records.items()}


def _measure_pair(
    rec_a: TensorRecord,
    rec_b: TensorRecord,
    other: str,
    atol: float | None,
    rtol: float | None,
    bar: Bar | None = None,
) -> TensorValues:
    """The measures of one pair, both read :data:`PIECE` elements at a time (whole only when a
    record cannot be read a range at a time: a loader, a strided view)."""
    pieces_a, pieces_b = _pieces(rec_a, "A"), _pieces(rec_b, "B")
    shape = tuple(int(d) for d in rec_a.shape)
    sums = _Sums()
    for a, b in zip(pieces_a, pieces_b, strict=True):
        sums.add(a, b, atol, rtol)
        if bar is not None:
            bar.update(a.numel() * a.element_size() + b.numel() * b.element_size())
    return sums.result(rec_a.name, other, shape, rec_a.dtype, rec_b.dtype, atol, rtol)


def _pieces(rec: TensorRecord, side: str) -> Iterator[torch.Tensor]:
    """``rec``'s elements, flat, :data:`PIECE` at a time (each piece a fresh tensor)."""
    try:
        storage = rec.storage
        if not rec.is_ranged or storage is None or storage.dtype != rec.dtype:
            flat = rec.to_torch().contiguous().reshape(-1)
            for start in range(0, max(flat.numel(), 1), PIECE):
                yield flat[start : start + PIECE]
            return
        yield from _ranged_pieces(rec, storage)
    except CkptError:
        raise
    except (ValueError, RuntimeError, OSError) as exc:
        raise FormatError(f"{side}: cannot read tensor {rec.name!r}: {exc}") from exc


def _ranged_pieces(rec: TensorRecord, storage: Storage) -> Iterator[torch.Tensor]:
    """A contiguous record of a file span or a reader, :data:`PIECE` elements at a time, read in
    the storage's order through a :class:`~ckptsurgeon.surgery.casting.CastReader` (which checks
    the archive's CRC-32 of a storage read whole)."""
    import torch

    from ..surgery.casting import CAST_PIECE, CastReader, serial_copy

    reader = CastReader(storage, rec.dtype)
    dtype = getattr(torch, rec.dtype)
    step = max(1, CAST_PIECE // rec.itemsize)
    total = rec.numel
    for start in range(0, max(total, 1), PIECE):
        count = min(PIECE, total - start)
        piece = torch.empty(count, dtype=dtype)
        for at in range(0, count, step):
            part = min(step, count - at)
            serial_copy(piece[at : at + part], reader.source_elements(rec.storage_offset + start + at, part))
        yield piece


def measure(
    name: str,
    other: str,
    a: torch.Tensor,
    b: torch.Tensor,
    atol: float | None = None,
    rtol: float | None = None,
) -> TensorValues:
    """The measures of one pair of tensors of the same shape (see the module docstring).

    Example:
        >>> import torch
        >>> m = measure("w", "w", torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0], dtype=torch.float16))
        >>> m.status, m.max_abs, m.rel_l2, m.bit_equal
        ('same-values', 0.0, 0.0, False)
    """
    sums = _Sums()
    flat_a, flat_b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    for start in range(0, max(flat_a.numel(), 1), PIECE):  # float64 copies of a piece at a time
        sums.add(flat_a[start : start + PIECE], flat_b[start : start + PIECE], atol, rtol)
    dtype_a, dtype_b = (str(t.dtype).removeprefix("torch.") for t in (a, b))
    return sums.result(name, other, tuple(int(d) for d in a.shape), dtype_a, dtype_b, atol, rtol)


# Elements measured at a time: their float64 copies (a, b and the difference) take 96 MiB, whatever
# the tensor's size (a 400 MiB embedding held four float64 copies of itself, 3 GiB, before).
PIECE = 1 << 22


class _Sums:
    """What :func:`measure` needs of a pair, summed piece by piece in float64."""

    def __init__(self) -> None:
        self.nan_a = self.nan_b = 0
        self.sq_a = self.sq_b = self.sq_d = self.dot = self.max_abs = 0.0
        self.within = True
        self.same_bytes = True

    def add(self, a: torch.Tensor, b: torch.Tensor, atol: float | None, rtol: float | None) -> None:
        import torch

        self.same_bytes = self.same_bytes and a.dtype == b.dtype and _same_bytes(a, b)
        if not a.numel():
            return
        a64, b64 = _as_float64(a), _as_float64(b)
        self.nan_a += int(torch.isnan(a64).sum())
        self.nan_b += int(torch.isnan(b64).sum())
        delta = a64 - b64
        delta[a64 == b64] = 0  # the same infinity on both sides is no difference
        self.sq_a += float(torch.sum(a64 * a64))
        self.sq_b += float(torch.sum(b64 * b64))
        self.sq_d += float(torch.sum(delta * delta))
        self.max_abs = max(self.max_abs, float(delta.abs().max()))
        self.dot += float(torch.dot(a64.reshape(-1), b64.reshape(-1)))
        if (atol is not None or rtol is not None) and self.within:
            self.within = bool(torch.allclose(b64, a64, rtol=rtol or 0.0, atol=atol or 0.0, equal_nan=False))

    def result(
        self,
        name: str,
        other: str,
        shape: tuple[int, ...],
        dtype_a: str,
        dtype_b: str,
        atol: float | None,
        rtol: float | None,
    ) -> TensorValues:
        """The measures of the pair whose pieces were added."""
        nan_a, nan_b = self.nan_a, self.nan_b
        norm_a, norm_b, norm_d = math.sqrt(self.sq_a), math.sqrt(self.sq_b), math.sqrt(self.sq_d)
        max_abs = self.max_abs
        if nan_a or nan_b:
            max_abs = norm_d = math.nan
        if norm_a == 0:
            rel_l2 = norm_d if math.isnan(norm_d) else (0.0 if norm_d == 0 else math.inf)
        else:
            rel_l2 = norm_d / norm_a
        cosine: float | None = None
        if nan_a or nan_b:
            cosine = math.nan
        elif norm_a > 0 and norm_b > 0:
            cosine = max(-1.0, min(1.0, self.dot / (norm_a * norm_b)))
        within = None
        if atol is not None or rtol is not None:
            within = self.within and not (nan_a or nan_b)
        return TensorValues(
            name=name,
            other=other,
            shape=shape,
            dtype_a=dtype_a,
            dtype_b=dtype_b,
            bit_equal=self.same_bytes and dtype_a == dtype_b and not (nan_a or nan_b),
            max_abs=max_abs,
            rel_l2=rel_l2,
            cosine=cosine,
            norm_a=norm_a,
            nan_a=nan_a,
            nan_b=nan_b,
            within=within,
        )


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    flat_a = a.contiguous().reshape(-1)
    flat_b = b.contiguous().reshape(-1)
    if flat_a.numel() == 0:
        return flat_b.numel() == 0
    return torch.equal(flat_a.view(torch.uint8), flat_b.view(torch.uint8))


def _as_float64(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 (a fresh tensor); complex as its (real, imaginary) pairs in float64."""
    import torch

    if t.is_complex():
        return torch.view_as_real(t.to(torch.complex128)).clone()
    return t.to(torch.float64, copy=True)


def _finite(value: float | None) -> float | None:
    """A JSON number: ``None`` for NaN or an infinity (JSON has neither)."""
    if value is None or not math.isfinite(value):
        return None
    return value


# -- the human report -----------------------------------------------------------------------------
def _render_text(v: ValueDiff, fmt: str, verbose: bool) -> str:
    md = fmt == "markdown"
    parts = [_header(v, md)]
    rows = _rows(v, verbose)
    if rows:
        headers = ["status", "count", "tensors", "max abs diff", "rel L2", "cosine"]
        if v.checked:
            headers.append("within")
        if verbose:
            headers.remove("count")
            rows = [row[:1] + row[2:] for row in rows]
        parts.append(render_table(headers, rows, fmt))
    unchanged = _unchanged(v, verbose, md)
    if unchanged:
        parts.append(unchanged)
    unpaired = _unpaired(v, md)
    if unpaired:
        parts.append(unpaired)
    parts.append(_verdict(v, md))
    return "\n\n".join(parts) + "\n"


def _side_line(label: str, side: Side, md: bool) -> str:
    key = f", key {side.key!r}" if side.key else ""
    if md:
        return f"**{label}:** `{printable(side.path)}` ({side.tensors} tensors{key})"
    return f"{label}: {printable(side.path)} ({side.tensors} tensors{key})"


def _header(v: ValueDiff, md: bool) -> str:
    lines = [_side_line("A", v.a, md), _side_line("B", v.b, md)]
    if not v.transform.is_identity:
        t = v.transform
        how = " and ".join(
            x for x in (f"strip {t.strip!r}" if t.strip else "", f"add {t.add!r}" if t.add else "") if x
        )
        lines.append(f"Names paired as `diff` pairs them: {printable(how)} on A's names")
    lines.append("Measured in float64, A the reference: rel L2 = ||a-b||/||a|| (inf when ||a|| = 0, b not)")
    if v.checked:
        lines.append(
            f"Tolerance: |b-a| <= atol + rtol*|a| with atol={v.atol or 0.0:g}, rtol={v.rtol or 0.0:g} "
            "(torch.allclose; NaN never within)"
        )
    joiner = "  \n" if md else "\n"
    headline = f"**{v.headline}**" if md else v.headline
    return joiner.join(lines) + "\n\n" + headline


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.3e}"


def _cosine(value: float | None) -> str:
    if value is None or math.isnan(value):
        return _number(value)
    return f"{value:.6f}"


def _within(items: Sequence[TensorValues]) -> str:
    inside = sum(1 for t in items if t.within)
    if inside == len(items):
        return "yes"
    return "no" if inside == 0 else f"{inside} of {len(items)}"


def _rows(v: ValueDiff, verbose: bool) -> list[list[str]]:
    """One row per group of changed tensors (or per tensor, ``verbose``), most changed first;
    a group shows its worst member on each measure."""
    changed = [t for t in v.tensors if t.status in ("nan", "changed")]
    if not changed:
        return []
    by_name = {t.name: t for t in changed}
    if verbose:
        groups: list[tuple[str, list[TensorValues]]] = [(t.name, [t]) for t in changed]
    else:
        collapsed = collapse(
            [t.name for t in changed], attribute=lambda n: (by_name[n].status, by_name[n].within)
        )
        groups = [(g.label, [by_name[m] for m in g.members]) for g in collapsed]
        groups.sort(key=lambda g: min(t.change_key() for t in g[1]))
    rows = []
    for label, items in groups:
        worst = min(items, key=TensorValues.change_key)
        nan = worst.status == "nan"
        row = [
            worst.status if not nan else f"nan ({_nan_sides(items)})",
            str(len(items)),
            label,
            "nan" if nan else _number(max(t.max_abs for t in items)),
            "nan" if nan else _number(max(t.rel_l2 for t in items)),
            "nan" if nan else _cosine(_min_cosine(items)),
        ]
        if v.checked:
            row.append(_within(items))
        rows.append(row)
    return rows


def _nan_sides(items: Iterable[TensorValues]) -> str:
    in_a = any(t.nan_a for t in items)
    in_b = any(t.nan_b for t in items)
    return "in A and B" if in_a and in_b else "in A" if in_a else "in B"


def _min_cosine(items: Sequence[TensorValues]) -> float | None:
    values = [t.cosine for t in items if t.cosine is not None]
    return min(values) if values else None


def _names_line(title: str, names: Sequence[str], md: bool, verbose: bool, detail: str = "") -> str:
    """A titled list of names, collapsed unless ``verbose``: comma-separated in markdown, one per line
    (indented) in a table."""
    labels = list(names) if verbose else [g.label for g in collapse(list(names), merge_leaves=True)]
    head = f"{title} ({counted(len(names), 'tensor')}{detail})"
    if md:
        return f"**{head}**: " + ", ".join(f"`{printable(x)}`" for x in labels)
    return f"{head}:\n" + "\n".join(f"  {printable(x)}" for x in labels)


def _unchanged(v: ValueDiff, verbose: bool, md: bool) -> str:
    lines = []
    equal = [t.name for t in v.tensors if t.status == "equal"]
    if equal:
        lines.append(_names_line("Unchanged, bit for bit", natural_sorted(equal), md, verbose))
    same = [t for t in v.tensors if t.status == "same-values"]
    if same:
        retyped = sum(1 for t in same if t.dtype_a != t.dtype_b)
        detail = ", another dtype" if retyped == len(same) else ", -0.0 against 0.0" if not retyped else ""
        names = natural_sorted(t.name for t in same)
        lines.append(_names_line("Equal in value, not bit for bit", names, md, verbose, detail))
    return "\n\n".join(lines)


def _unpaired(v: ValueDiff, md: bool) -> str:
    lines = []
    if v.only_in_a:
        lines.append(_names_line("Only in A, not compared", v.only_in_a, md, False))
    if v.only_in_b:
        lines.append(_names_line("Only in B, not compared", v.only_in_b, md, False))
    if v.shape_mismatched:
        shapes = ", ".join(
            f"{printable(m.name)} {format_shape(m.shape_a)} → {format_shape(m.shape_b)}"
            for m in v.shape_mismatched
        )
        title = f"Shape mismatched, not compared ({counted(len(v.shape_mismatched), 'tensor')})"
        lines.append(f"**{title}**: {shapes}" if md else f"{title}: {shapes}")
    return "\n\n".join(lines)


def _verdict(v: ValueDiff, md: bool) -> str:
    if v.passes():
        text = "PASS: every tensor within tolerance" if v.checked else "PASS: every tensor equal bit for bit"
    elif not v.tensors:
        text = "FAIL: no tensor of A pairs with one of B"
    elif v.unpaired and all(t.within if v.checked else t.bit_equal for t in v.tensors):
        text = f"FAIL: {counted(v.unpaired, 'tensor')} not paired"
    else:
        bad = sum(1 for t in v.tensors if not (t.within if v.checked else t.bit_equal))
        what = "outside tolerance" if v.checked else "not equal bit for bit"
        text = f"FAIL: {bad} of {counted(len(v.tensors), 'tensor')} {what}"
        if v.unpaired:
            text += f", {counted(v.unpaired, 'tensor')} not paired"
    return f"**{text}**" if md else text
