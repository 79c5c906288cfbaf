"""``ckpt average``: the (weighted) mean of several checkpoints of one architecture, as one plan.

The inputs are opened as usual (:func:`~ckptsurgeon.core.source.open_source`) and put into one
multi-source state dict: the first input's records under their own names, input ``i``'s under
``[input i] name`` (after the key transform ``diff`` finds, e.g. a ``module.`` prefix on one
input, aligns its names with the first's). The plan then has one entry per tensor of that dict:
a floating tensor of the first input carries a :func:`weighted_mean` transform whose inputs are
that tensor in every input (the other inputs' entries are dropped as its inputs); an integer or
bool buffer (``num_batches_tracked`` ...) is the first input's, unchanged. The plan is written
through :func:`~ckptsurgeon.surgery.pipeline.write_checkpoint`, so the output is streamed one
tensor at a time (each mean reads its inputs, one tensor of each file), written atomically and
verified.

The arithmetic: each floating tensor is accumulated in float32 (float64 when an input is
float64) and cast back to the first input's dtype. Equal weights take the mean exactly as
``torch.stack(xs).mean(0)`` does; other weights (normalised to sum 1) the sum
``w0 * x0 + w1 * x1 + ...`` in that order.
"""

from __future__ import annotations

import math
import os
import threading
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..core.dtypes import DTYPES
from ..core.record import Storage, TensorRecord
from ..core.report import format_shape, printable
from ..core.source import Source, open_source
from ..errors import SurgeryError
from ..formats import ReadOptions
from .plan import Entry, Plan
from .transforms import Output, Transform

PathLike = str | os.PathLike[str]


def parse_weights(weights: str | Sequence[float] | None, count: int) -> tuple[float, ...] | None:
    """The weights normalised to sum 1 (``None``: equal weights); refused unless ``count`` positive
    finite numbers.

    Example:
        >>> parse_weights("1,1,2", 3)
        (0.25, 0.25, 0.5)
        >>> parse_weights([2, 2], 2) is None   # equal weights: the plain mean
        True
    """
    if weights is None:
        return None
    if isinstance(weights, str):
        parts = [p.strip() for p in weights.split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise SurgeryError(
                f"--weights {weights!r}: not a comma-separated list of numbers (e.g. 0.2,0.3,0.5)"
            ) from None
    else:
        values = [float(w) for w in weights]
    if len(values) != count:
        raise SurgeryError(f"--weights: {len(values)} weight(s) for {count} inputs; give one per input")
    bad = next((v for v in values if not math.isfinite(v) or v <= 0), None)
    if bad is not None:
        raise SurgeryError(f"--weights: {bad!r} is not a positive number; every weight must be > 0")
    if all(v == values[0] for v in values):
        return None
    try:
        total = math.fsum(values)
    except OverflowError:  # 1e308,1.7e308: the weights are relative, so scale them by the largest first
        values = [v / max(values) for v in values]
        total = math.fsum(values)
    return tuple(v / total for v in values)


def accumulation_dtype(dtypes: Sequence[str]) -> str:
    """float64 when an input is float64, else float32.

    Example:
        >>> accumulation_dtype(["bfloat16", "bfloat16"]), accumulation_dtype(["float64", "float32"])
        ('float32', 'float64')
    """
    return "float64" if "float64" in dtypes else "float32"


MEAN_PIECE = 1 << 17  # elements of each input read, stacked and averaged at a time (see MeanReader)


class Scratch:
    """One reusable buffer per dtype for the stacked pieces of the means (grown to the largest):
    a fresh buffer per piece would cost a page fault per 4 KiB, as long as the copies themselves.

    Example:
        >>> Scratch().buffer("float32", (3, 2)).shape
        torch.Size([3, 2])
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._flat: dict[str, Any] = {}

    def buffer(self, dtype: str, shape: tuple[int, ...]) -> Any:
        import torch

        numel = math.prod(shape)
        flat = self._flat.get(dtype)
        if flat is None or flat.numel() < numel:
            self._flat.pop(dtype, None)
            flat = self._flat[dtype] = torch.empty(numel, dtype=getattr(torch, dtype))
        return flat[:numel].view(shape)


class MeanReader:
    """Any byte range of the (weighted) mean of ``inputs`` as ``dtype``: computed :data:`MEAN_PIECE`
    elements at a time (that piece of every input read, converted to ``acc``, averaged, cast), so
    memory holds a few pieces whatever the tensor's size.

    Bit for bit what the whole tensors give: an element's mean depends only on the inputs' values
    at it and on where torch's reduction loop ends (its last columns are summed in another order),
    so pieces start at multiples of MEAN_PIECE (a multiple of every vector width) and the last one
    ends where the tensor does. The CRC-32 of the bytes given out, when they were read whole in
    order (as writers do), is kept for verification (:meth:`crc_given`).

    Example:
        >>> import torch
        >>> def rec(values):
        ...     data = torch.tensor(values).numpy().tobytes()
        ...     storage = Storage("0", "float32", 8, reader=lambda at, n: data[at : at + n])
        ...     return TensorRecord("x", "float32", (2,), storage)
        >>> a, b = rec([1.0, 2.0]), rec([3.0, 5.0])
        >>> reader = MeanReader((a, b), None, "float32", "float32")
        >>> torch.frombuffer(bytearray(reader(0, 8)), dtype=torch.float32).tolist()
        [2.0, 3.5]
    """

    def __init__(
        self,
        inputs: tuple[TensorRecord, ...],
        weights: tuple[float, ...] | None,
        acc: str,
        dtype: str,
        scratch: Scratch | None = None,
    ) -> None:
        from .casting import CastReader

        self.inputs = inputs
        self.readers = [CastReader(rec.storage, acc) for rec in inputs if rec.storage is not None]
        self.weights, self.acc, self.dtype = weights, acc, dtype
        self.count = inputs[0].numel
        self.itemsize = DTYPES[dtype].itemsize
        self.scratch = scratch or Scratch()  # shared by a plan's means: one stacked buffer
        self._given: tuple[int, int] | None = None  # (bytes given in order from 0, their CRC-32)

    def __call__(self, start: int, length: int) -> bytes:
        """The mean's ``length`` bytes from byte ``start``."""
        import torch

        size = self.itemsize
        first, stop = start // size, -(-(start + length) // size)
        if start < 0 or length < 0 or stop > self.count:
            raise ValueError(f"mean: read {start}+{length} outside {self.count * size} bytes")
        out = bytearray((stop - first) * size)
        if out:
            dest = torch.frombuffer(out, dtype=getattr(torch, self.dtype))
            for at in range(first - first % MEAN_PIECE, stop, MEAN_PIECE):
                self._piece(at, min(at + MEAN_PIECE, self.count), dest, first, stop)
        skip = start - first * size
        # the bytearray itself when whole (no copy of 8 MiB per read), as CastReader does
        data = out if skip == 0 and len(out) == length else bytes(out[skip : skip + length])
        self._follow(start, data)
        return data  # type: ignore[return-value]

    def crc_given(self) -> int | None:
        """The CRC-32 of all the mean's bytes when they were last given out whole, in order; else None."""
        given = self._given
        return given[1] if given is not None and given[0] == self.count * self.itemsize else None

    def _follow(self, start: int, data: bytes | bytearray) -> None:
        given = (0, 0) if start == 0 else self._given
        if given is None or given[0] != start:
            self._given = None
            return
        self._given = (start + len(data), zlib.crc32(data, given[1]))

    def _piece(self, at: int, end: int, dest: Any, first: int, stop: int) -> None:
        """Elements ``at`` to ``end`` of the mean (as computed on the whole tensors), the part of
        them in ``first`` to ``stop`` written into ``dest`` (which starts at ``first``).

        Every input's piece is read into one stacked buffer, then averaged a column slice at a
        time: small enough for torch to run on one thread (on two cores shared with other work,
        waking a second thread per call cost more than the arithmetic, 5 ms per 128K-element copy).
        """
        from .casting import serial_copy

        count, inputs = end - at, len(self.inputs)
        step = max(1024, (_SERIAL_NUMEL // inputs) // 1024 * 1024)  # slices start at multiples of 1024
        with self.scratch.lock:
            stacked = self.scratch.buffer(self.acc, (inputs, count))
            for row, rec, reader in zip(stacked, self.inputs, self.readers, strict=True):
                serial_copy(row, reader.source_elements(rec.storage_offset + at, count))
            for col in range(0, count, step):
                lo, hi = max(at + col, first), min(at + col + step, end, stop)
                if lo < hi:
                    values = self._mean_of(stacked[:, col : col + step])
                    dest[lo - first : hi - first].copy_(values[lo - at - col : hi - at - col])

    def _mean_of(self, stacked: Any) -> Any:
        """The (weighted) mean of the rows of ``stacked``, as torch computes it."""
        if self.weights is None:
            return stacked.mean(0)
        total = stacked[0] * self.weights[0]
        for row, weight in zip(stacked[1:], self.weights[1:], strict=True):
            total += row * weight
        return total


# torch runs a reduction of fewer elements than this (at::internal::GRAIN_SIZE) on one thread
_SERIAL_NUMEL = 32767


@dataclass(frozen=True)
class WeightedMean(Transform):
    """The transform :func:`weighted_mean` makes: its records read through a :class:`MeanReader`
    (a piece at a time) when every input can be read a range at a time, else computed whole.

    Example:
        >>> recs = {n: TensorRecord(n, "float32", (4,)) for n in ("a", "b")}
        >>> weighted_mean(recs, ["a", "b"], "w", None).cast_to("bfloat16").outputs[0].dtype
        'bfloat16'
    """

    accumulate: str = "float32"
    weights: tuple[float, ...] | None = None
    scratch: Scratch = field(default_factory=lambda: Scratch(), repr=False, compare=False)

    def records(self, inputs: tuple[TensorRecord, ...], shared: dict[Any, Any]) -> list[TensorRecord]:
        ranged = [rec for rec in inputs if _ranged(rec)]
        if len(ranged) != len(inputs):
            return super().records(inputs, shared)
        out = self.outputs[0]
        # tied tensors (the same span of the same storage in every input) share one mean storage,
        # so the output stores them tied too, and the mean is computed once
        key = ("mean", self.accumulate, self.weights, out.dtype, tuple(_span_key(rec) for rec in inputs))
        storage = shared.get(key)
        if storage is None:
            reader = MeanReader(tuple(ranged), self.weights, self.accumulate, out.dtype, self.scratch)
            storage = shared[key] = Storage(f"mean {out.name}", out.dtype, out.nbytes, reader=reader)
        return [TensorRecord(out.name, out.dtype, out.shape, storage)]

    def renamed(self, names: Mapping[str, str]) -> Transform:
        out = self.outputs[0]
        return _mean_transform(self, Output(names.get(out.name, out.name), out.dtype, out.shape))

    def cast_to(self, target: str) -> Transform | None:
        """The mean cast once from the accumulation dtype to ``target`` (not through the inputs')."""
        out = self.outputs[0]
        return self if out.dtype == target else _mean_transform(self, Output(out.name, target, out.shape))


def weighted_mean(
    tensors: Mapping[str, TensorRecord],
    names: Sequence[str],
    output: str,
    weights: Sequence[float] | None,
    scratch: Scratch | None = None,
    dtype: str | None = None,
) -> WeightedMean:
    """The mean of the floating tensors ``names`` (one shape), ``weights`` (summing to 1, ``None``:
    equal) applied in order, as ``output`` in ``dtype`` (default: the first one's dtype).

    Accumulated in float32 (float64 when one is float64): equal weights as
    ``torch.stack(xs).mean(0)``, others as ``w0 * x0 + w1 * x1 + ...``; then cast once. Streamed
    a piece at a time (:class:`MeanReader`) when the inputs are file spans.

    Example:
        >>> recs = {n: TensorRecord(n, "bfloat16", (4,)) for n in ("a", "b")}
        >>> weighted_mean(recs, ["a", "b"], "w", [0.25, 0.75]).description
        'weighted mean in float32 (0.25, 0.75)'
    """
    names = tuple(names)
    records = [tensors[n] for n in names]
    first = records[0]
    acc = accumulation_dtype([r.dtype for r in records])
    weights = None if weights is None else tuple(weights)
    if weights is None:
        description = f"mean in {acc}"
    else:
        description = f"weighted mean in {acc} ({', '.join(f'{w:.4g}' for w in weights)})"
    output_dtype = dtype or first.dtype
    outputs = (Output(output, output_dtype, tuple(first.shape)),)
    shell = WeightedMean(description, names, outputs, _unused, acc, weights, scratch or Scratch())
    return _mean_transform(shell, outputs[0])


def _mean_transform(like: WeightedMean, output: Output) -> WeightedMean:
    """A :class:`WeightedMean` like ``like`` with ``output``; its ``compute`` (the whole tensors at
    once, for inputs that cannot be read a range at a time) as the piecewise reader computes."""
    acc, weights, scratch, shape = like.accumulate, like.weights, like.scratch, output.shape

    def compute(inputs: tuple[TensorRecord, ...], _index: int) -> Any:
        import torch

        dtype = getattr(torch, acc)
        if weights is None:
            with scratch.lock:
                stacked = scratch.buffer(acc, (len(inputs), *shape))
                for i, rec in enumerate(inputs):
                    stacked[i].copy_(rec.to_torch())
                return stacked.mean(0).to(getattr(torch, output.dtype))
        total = inputs[0].to_torch().to(dtype) * weights[0]
        for rec, weight in zip(inputs[1:], weights[1:], strict=True):
            total += rec.to_torch().to(dtype) * weight
        return total.to(getattr(torch, output.dtype))

    description = like.description.split(", cast to ")[0]
    if output.dtype != like.outputs[0].dtype or ", cast to " in like.description:
        description += f", cast to {output.dtype}"
    return WeightedMean(description, like.inputs, (output,), compute, acc, weights, scratch)


def _unused(inputs: tuple[TensorRecord, ...], index: int) -> Any:
    raise NotImplementedError  # a shell's compute: _mean_transform gives the real one


def _span_key(rec: TensorRecord) -> Any:
    """What identifies ``rec``'s elements: its storage (a file span, else the object), where in it,
    and its shape."""
    storage = rec.storage
    if storage is None:  # not a ranged record: nothing shared
        return id(rec)
    where: Any = (str(storage.path), storage.offset, storage.nbytes) if storage.path else id(storage)
    return (where, rec.storage_offset, tuple(rec.shape), rec.dtype)


def _ranged(rec: TensorRecord) -> bool:
    """True when ``rec``'s elements can be read a range at a time in its own dtype (a contiguous
    view of a file span or of a reader)."""
    storage = rec.storage
    if storage is None or rec.loader is not None or not rec.is_contiguous or not rec.numel:
        return False
    return storage.dtype == rec.dtype and (storage.path is not None or storage.reader is not None)


def input_name(index: int, name: str) -> str:
    """The name of input ``index``'s (0-based, > 0) tensor ``name`` in the multi-source dict.

    Example:
        >>> input_name(1, "fc.weight")
        '[input 2] fc.weight'
    """
    return f"[input {index + 1}] {name}"


def aligned(
    first: Source, other: Source, first_label: str, label: str
) -> tuple[dict[str, TensorRecord], str]:
    """``other``'s tensors under ``first``'s names (the key transform ``diff`` finds), and a note
    saying how they were aligned ("" when the names already agree); a one-line SurgeryError naming
    the first tensor whose name, shape or kind differs.

    Example:
        >>> aligned(open_source("a.pth"), open_source("b.pth"), "a.pth", "b.pth")  # doctest: +SKIP
        ({'fc.weight': ...}, '')
    """
    from ..diffing.diagnosis import apply_transform, best_transform

    want = first.tensors
    have = other.tensors
    note = ""
    if want.keys() != have.keys():
        shapes = {n: tuple(r.shape) for n, r in have.items()}
        transform = best_transform(shapes, {n: tuple(r.shape) for n, r in want.items()})
        if not transform.is_identity:
            have, _origin = apply_transform(have, transform)
            how = [f"strip {transform.strip!r}"] if transform.strip else []
            how += [f"add {transform.add!r}"] if transform.add else []
            note = f"{printable(label)}: names aligned with {printable(first_label)}'s ({', '.join(how)})"
    for name, rec in want.items():  # the first tensor that differs, in the first input's order
        got = have.get(name)
        if got is None:
            raise SurgeryError(
                f"average: {label} has no tensor {name!r} ({first_label} has); "
                "average checkpoints of one architecture"
            )
        if tuple(got.shape) != tuple(rec.shape):
            raise SurgeryError(
                f"average: {name!r} is {format_shape(got.shape)} in {label}, {format_shape(rec.shape)} in "
                f"{first_label}; average checkpoints of one architecture"
            )
        if _floating(got.dtype) != _floating(rec.dtype):
            raise SurgeryError(
                f"average: {name!r} is {got.dtype} in {label}, {rec.dtype} in {first_label}; "
                "a floating tensor cannot be averaged with an integer one"
            )
    extra = next((n for n in have if n not in want), None)
    if extra is not None:
        raise SurgeryError(
            f"average: {label} has a tensor {extra!r} that {first_label} has not; "
            "average checkpoints of one architecture"
        )
    return have, note


def average_plan(
    sources: Sequence[Source], labels: Sequence[str], weights: Sequence[float] | None
) -> tuple[Source, Plan, list[str]]:
    """The multi-source :class:`Source` (the first input's tree, the multi-source dict as its
    weights), the plan over it, and notes (names aligned, buffers taken from the first input).

    Example:
        >>> srcs = [open_source(p) for p in ("a.pth", "b.pth")]                     # doctest: +SKIP
        >>> source, plan, notes = average_plan(srcs, ["a.pth", "b.pth"], None)      # doctest: +SKIP
    """
    first = sources[0]
    merged: dict[str, TensorRecord] = dict(first.tensors)
    others: list[dict[str, TensorRecord]] = []
    notes: list[str] = []
    for index, (source, label) in enumerate(zip(sources[1:], labels[1:], strict=True), 1):
        have, note = aligned(first, source, labels[0], label)
        if note:
            notes.append(note)
        others.append(have)
        for name, rec in have.items():
            key = input_name(index, name)
            if key in merged:
                raise SurgeryError(f"average: {labels[0]} has a tensor named {key!r}; rename it first")
            merged[key] = rec
    entries: list[Entry] = []
    dropped: list[Entry] = []
    scratch = Scratch()  # shared by every mean of this plan: one stacked buffer, reused
    kept: list[str] = []
    for name, rec in first.tensors.items():
        shape = tuple(rec.shape)
        keys = [input_name(i, name) for i in range(1, len(sources))]
        if _floating(rec.dtype):
            transform = weighted_mean(merged, [name, *keys], name, weights, scratch)
            entries.append(Entry(name, name, "", rec.dtype, shape, transform))
            reason = f"averaged into {name}"
        else:
            kept.append(name)
            entries.append(Entry(name, name, "", rec.dtype, shape))
            reason = f"{rec.dtype}: {name} is taken from the first input"
        for key in keys:
            other = merged[key]
            dropped.append(Entry(key, None, reason, other.dtype, tuple(other.shape)))
    if not any(e.transform for e in entries):
        raise SurgeryError(f"average: {labels[0]} has no floating tensor to average")
    if kept:
        from .pipeline import listing

        notes.append(
            f"{len(kept)} integer/bool tensor(s) taken from the first input, not averaged: {listing(kept)}"
        )
    how = "equal weights" if weights is None else "weights " + ", ".join(f"{w:.4g}" for w in weights)
    plan = Plan((*entries, *dropped), (f"average {len(sources)} checkpoints ({how})",))
    source = replace(first, weights=replace(first.weights, tensors=merged))
    return source, plan, notes


def average(
    paths: Sequence[PathLike],
    output: PathLike | None = None,
    *,
    weights: str | Sequence[float] | None = None,
    keep_state: bool = False,
    key: str | None = None,
    to: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
    force: bool = False,
    verify: bool = True,
    dry_run: bool = False,
    read_options: ReadOptions | None = None,
    progress: bool | None = None,
) -> Any:
    """Average the weights of checkpoints of one architecture (a model soup, SWA by hand) into ``output``.

    Every input must hold the same tensor names and shapes (names may differ by a wrapper
    prefix, aligned as ``diff`` aligns them, e.g. ``module.``); else a one-line
    :class:`~ckptsurgeon.errors.SurgeryError` names the first tensor that differs and nothing is
    written. Floating tensors: the mean accumulated in float32 (float64 for float64 inputs), cast
    back to the first input's dtype; ``weights`` (one positive number per input, normalised to
    sum 1; a list or ``"0.2,0.3,0.5"``) make it a weighted mean. Integer and bool tensors
    (``num_batches_tracked`` ...) are taken from the first input. The output has the first input's
    names; a training checkpoint's other entries (epoch, optimizer ...) are left out unless
    ``keep_state`` (a ``.pth`` output), which takes them from the first input. ``key`` picks the
    weights entry of every input. ``dtype`` (bf16, fp16, fp32) writes the floating tensors in that
    dtype (each mean cast once from its accumulation dtype); ``to`` and ``max_shard_size`` (a folder
    of shards) as for ``convert``. Written a piece of a tensor at a time, atomically, then verified.

    Example:
        >>> import ckptsurgeon
        >>> r = ckptsurgeon.average(["fixtures/resnet_dp_6.pth"] * 2, dry_run=True)
        >>> r.averaged, r.taken
        (102, 20)
    """
    from .operations import _need_output, gc_paused, write_options
    from .pipeline import write_checkpoint
    from .results import AverageResult

    labels = [os.fspath(p) for p in paths]
    if len(labels) < 2:
        raise SurgeryError(f"average: give at least two checkpoints to average (got {len(labels)})")
    normalised = parse_weights(weights, len(labels))
    options = write_options(output, to, None, max_shard_size, not keep_state, force, verify, progress)
    _need_output(options, dry_run)
    if keep_state and options is not None:
        from .pipeline import output_kind

        if not output_kind(options).holds_tree:
            raise SurgeryError(
                f"--keep-state keeps the first input's epoch, optimizer ...: {options.output} holds "
                "the weights only; write a .pth output"
            )
    with gc_paused():
        sources = [open_source(p, key, read_options) for p in labels]
        source, plan, notes = average_plan(sources, labels, normalised)
        if dtype is not None:  # each mean cast once from its accumulation dtype (WeightedMean.cast_to)
            plan = plan.with_cast(source.tensors, dtype)
        written = None if dry_run or options is None else write_checkpoint(source, plan, options)
    if written is not None and not keep_state:
        written.notes = [n.replace("(--weights-only)", "(no --keep-state)") for n in written.notes]
    return AverageResult(
        source=labels[0],
        weights_key=sources[0].weights.key,
        plan=plan,
        written=written,
        notes=tuple(notes),
        inputs=tuple(labels),
        weights=normalised if normalised is not None else tuple(1 / len(labels) for _ in labels),
    )


def _floating(dtype: str) -> bool:
    known = DTYPES.get(dtype)
    return known is not None and known.is_floating
