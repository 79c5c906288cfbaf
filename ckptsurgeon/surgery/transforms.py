"""Value-changing surgery: a :class:`Transform` turns input tensors into output tensors.

A transform names its inputs (tensor names of the planned state dict), declares its outputs
(name, dtype, shape: known before any data is read, so a plan can be shown and a writer can lay
out its header), and computes one output at a time from the input records. A plan entry may
carry one (:meth:`ckptsurgeon.surgery.plan.Plan.with_transform`); :meth:`Plan.apply` then gives
output records whose data is computed when a writer (or verification) reads them, one output
tensor at a time, so memory holds one output and its inputs, never the whole state dict.

:class:`Cast` is the transform behind ``--dtype``: its records read through a
:class:`~ckptsurgeon.surgery.casting.CastReader` (1 MiB at a time, ties kept), not through
``compute``. :func:`average` (several inputs) and :func:`split` (several outputs) are the
built-in examples of the general form.

Example:
    >>> recs = {"a": TensorRecord("a", "float32", (2,)), "b": TensorRecord("b", "float32", (2,))}
    >>> average(recs, ["a", "b"], "ab").outputs
    (Output(name='ab', dtype='float32', shape=(2,)),)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.dtypes import DTYPES
from ..core.record import TensorRecord
from ..errors import SurgeryError
from .casting import cast_dtype, cast_record

if TYPE_CHECKING:  # pragma: no cover
    import torch

# (the input records, in the transform's input order; which output) -> that output's tensor or bytes
Compute = Callable[[tuple[TensorRecord, ...], int], "torch.Tensor | bytes"]


@dataclass(frozen=True)
class Output:
    """One output of a transform, as it will be written: name, dtype (a torch name), shape.

    Example:
        >>> Output("q", "bfloat16", (4, 8)).nbytes
        64
    """

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Transform:
    """Inputs by name -> declared outputs, computed one output at a time by ``compute``.

    ``compute(inputs, i)`` gets the input records (in ``inputs`` order; ``record.to_torch()``
    reads one) and returns output ``i`` as a tensor or as its raw little-endian bytes; a result
    whose dtype, shape or size is not the declared one is refused by name. Output records are
    plain tensors (not parameters, no ``requires_grad``).

    Example:
        >>> t = Transform("negate", ("w",), (Output("w", "float32", (2,)),),
        ...               lambda inputs, i: -inputs[0].to_torch())
        >>> w = TensorRecord.from_torch("w", __import__("torch").tensor([1.0, -2.0]))
        >>> t.value((w,), 0).tolist()
        [-1.0, 2.0]
    """

    description: str
    inputs: tuple[str, ...]
    outputs: tuple[Output, ...]
    compute: Compute = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.inputs or not self.outputs:
            raise SurgeryError(f"{self.description}: a transform needs at least one input and one output")
        names = [o.name for o in self.outputs]
        if len(set(names)) != len(names) or not all(names):
            raise SurgeryError(f"{self.description}: output names must be distinct and not empty: {names}")
        unknown = next((o.dtype for o in self.outputs if o.dtype not in DTYPES), None)
        if unknown is not None:
            raise SurgeryError(f"{self.description}: unknown output dtype {unknown!r}")

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    def to_json(self) -> dict[str, Any]:
        """``{"transform": description, "inputs": [...], "outputs": [{name, dtype, shape}]}``."""
        return {
            "transform": self.description,
            "inputs": list(self.inputs),
            "outputs": [o.to_json() for o in self.outputs],
        }

    # -- values -----------------------------------------------------------------------------
    def records(self, inputs: tuple[TensorRecord, ...], shared: dict[Any, Any]) -> list[TensorRecord]:
        """One lazy record per output: reading it computes that output (nothing is read now).

        ``shared`` is one dict per :meth:`Plan.apply`, for what transforms share (:class:`Cast`
        shares one cast storage per source storage).
        """
        return [
            TensorRecord(out.name, out.dtype, out.shape, loader=_Loader(self, inputs, i))
            for i, out in enumerate(self.outputs)
        ]

    def value(self, inputs: tuple[TensorRecord, ...], index: int) -> torch.Tensor:
        """Output ``index`` computed from ``inputs``, checked against its declaration."""
        return _as_declared(self.description, self.outputs[index], self.compute(inputs, index))

    # -- derived transforms -----------------------------------------------------------------
    def renamed(self, names: Mapping[str, str]) -> Transform:
        """This transform with its outputs renamed by ``names`` (old output name -> new)."""
        outputs = tuple(Output(names.get(o.name, o.name), o.dtype, o.shape) for o in self.outputs)
        return _with(self, outputs=outputs)

    def cast_to(self, target: str) -> Transform | None:
        """This transform with its floating outputs cast to ``target`` (``--dtype`` after it)."""
        recast = [DTYPES[o.dtype].is_floating and o.dtype != target for o in self.outputs]
        if not any(recast):
            return self
        inner = self.compute
        pairs = zip(self.outputs, recast, strict=True)
        outputs = tuple(Output(o.name, target, o.shape) if again else o for o, again in pairs)

        def compute(inputs: tuple[TensorRecord, ...], index: int) -> Any:
            value = _as_declared(self.description, self.outputs[index], inner(inputs, index))
            return value.to(_torch_dtype(target)) if recast[index] else value

        description = f"{self.description}, cast to {target}"
        return _with(self, description=description, outputs=outputs, compute=compute)


@dataclass(frozen=True)
class Cast(Transform):
    """``--dtype``: one floating input as ``target``, read through a streaming cast storage.

    Its records are the source records with a :class:`~ckptsurgeon.surgery.casting.CastReader`
    storage (converted 1 MiB at a time when read; tensors sharing a source storage share one cast
    storage, so ties stay tied); ``compute`` (``Tensor.to``, the same rounding) is what the others use.

    Example:
        >>> cast_transform("w", "w", "float32", (2,), "bf16").description
        'cast float32 -> bfloat16'
    """

    source_dtype: str = ""

    def records(self, inputs: tuple[TensorRecord, ...], shared: dict[Any, Any]) -> list[TensorRecord]:
        out = self.outputs[0]
        return [cast_record(inputs[0].renamed(out.name), out.dtype, shared)]

    def renamed(self, names: Mapping[str, str]) -> Transform:
        out = self.outputs[0]
        new = names.get(out.name, out.name)
        return cast_transform(self.inputs[0], new, self.source_dtype, out.shape, out.dtype)

    def cast_to(self, target: str) -> Transform | None:
        """A cast from the source straight to ``target`` (None when that is the source's dtype)."""
        out = self.outputs[0]
        if target == out.dtype:
            return self
        if target == self.source_dtype:
            return None
        return cast_transform(self.inputs[0], out.name, self.source_dtype, out.shape, target)


def cast_transform(name: str, new: str, dtype: str, shape: tuple[int, ...], target: str) -> Cast:
    """The cast of tensor ``name`` (of ``dtype`` and ``shape``) to ``target``, written as ``new``.

    Example:
        >>> cast_transform("w", "w", "float32", (3,), "fp16").outputs[0]
        Output(name='w', dtype='float16', shape=(3,))
    """
    target = cast_dtype(target)

    def compute(inputs: tuple[TensorRecord, ...], _index: int) -> Any:
        return inputs[0].to_torch().to(_torch_dtype(target))

    output = Output(new, target, tuple(shape))
    return Cast(f"cast {dtype} -> {target}", (name,), (output,), compute, source_dtype=dtype)


def castable(dtype: str, target: str) -> bool:
    """True when ``--dtype target`` changes a tensor of ``dtype`` (floating, another dtype).

    Example:
        >>> castable("float32", "bfloat16"), castable("int64", "bfloat16")
        (True, False)
    """
    known = DTYPES.get(dtype)
    return known is not None and known.is_floating and dtype != target


# -- built-in transforms --------------------------------------------------------------------------
def average(tensors: Mapping[str, TensorRecord], names: Sequence[str], output: str) -> Transform:
    """The element-wise mean of the floating tensors ``names`` (same dtype and shape) as ``output``.

    Computed as torch does ``(a + b + ...) / n`` in their dtype, one input read at a time.

    Example:
        >>> recs = {n: TensorRecord(n, "float32", (4,)) for n in ("ema", "swa")}
        >>> average(recs, ["ema", "swa"], "w").description
        'average of ema, swa'
    """
    names = tuple(names)
    first = _input(tensors, names[0], "average") if names else None
    if first is None or len(names) < 2:
        raise SurgeryError("average: name at least two tensors")
    for name in names[1:]:
        rec = _input(tensors, name, "average")
        if (rec.dtype, rec.shape) != (first.dtype, first.shape):
            raise SurgeryError(
                f"average: {name!r} is {rec.dtype}{list(rec.shape)}, {names[0]!r} is "
                f"{first.dtype}{list(first.shape)}; average tensors of one dtype and shape"
            )
    if not DTYPES[first.dtype].is_floating:
        raise SurgeryError(f"average: {names[0]!r} is {first.dtype}; only floating tensors can be averaged")

    def compute(inputs: tuple[TensorRecord, ...], _index: int) -> Any:
        total = inputs[0].to_torch() + inputs[1].to_torch()  # a new tensor: no input is changed
        for rec in inputs[2:]:
            total += rec.to_torch()
        return total / len(inputs)

    description = f"average of {', '.join(names)}"
    return Transform(description, names, (Output(output, first.dtype, tuple(first.shape)),), compute)


def split(tensors: Mapping[str, TensorRecord], name: str, outputs: Sequence[str], dim: int = 0) -> Transform:
    """Tensor ``name`` cut into ``len(outputs)`` equal parts along ``dim`` (a fused qkv into q, k, v).

    Example:
        >>> recs = {"qkv": TensorRecord("qkv", "float32", (12, 4))}
        >>> [o.shape for o in split(recs, "qkv", ["q", "k", "v"]).outputs]
        [(4, 4), (4, 4), (4, 4)]
    """
    rec = _input(tensors, name, "split")
    parts = len(outputs)
    if not rec.shape or not -len(rec.shape) <= dim < len(rec.shape):
        raise SurgeryError(f"split: {name!r} has shape {list(rec.shape)}, no dimension {dim}")
    dim %= len(rec.shape)
    if parts < 2 or rec.shape[dim] % parts:
        raise SurgeryError(
            f"split: {name!r} has {rec.shape[dim]} along dimension {dim}, not divisible into {parts} parts"
        )
    size = rec.shape[dim] // parts
    shape = (*rec.shape[:dim], size, *rec.shape[dim + 1 :])

    def compute(inputs: tuple[TensorRecord, ...], index: int) -> Any:
        return inputs[0].to_torch().narrow(dim, index * size, size)

    declared = tuple(Output(out, rec.dtype, shape) for out in outputs)
    return Transform(f"split along dimension {dim} into {parts}", (name,), declared, compute)


def only_outputs(transform: Transform, indices: Sequence[int]) -> Transform:
    """``transform`` writing only its outputs at ``indices`` (the others are not computed).

    Example:
        >>> recs = {"qkv": TensorRecord("qkv", "float32", (6, 2))}
        >>> only_outputs(split(recs, "qkv", ["q", "k", "v"]), [0, 2]).output_names
        ('q', 'v')
    """
    chosen = tuple(indices)
    inner = transform.compute

    def compute(inputs: tuple[TensorRecord, ...], index: int) -> Any:
        return inner(inputs, chosen[index])

    outputs = tuple(transform.outputs[i] for i in chosen)
    return _with(transform, outputs=outputs, compute=compute)


# -- helpers ----------------------------------------------------------------------------------
class _Loader:
    """A transformed record's loader: output ``index`` of ``transform`` (a class, not a closure,
    so a record's repr and pickling stay plain)."""

    __slots__ = ("index", "inputs", "transform")

    def __init__(self, transform: Transform, inputs: tuple[TensorRecord, ...], index: int) -> None:
        self.transform, self.inputs, self.index = transform, inputs, index

    def __call__(self) -> torch.Tensor:
        return self.transform.value(self.inputs, self.index)


def _input(tensors: Mapping[str, TensorRecord], name: str, what: str) -> TensorRecord:
    rec = tensors.get(name)
    if rec is None:
        raise SurgeryError(f"{what}: no tensor {name!r}")
    return rec


def _as_declared(description: str, out: Output, result: Any) -> torch.Tensor:
    """``result`` (a tensor, or raw little-endian bytes) as the contiguous CPU tensor ``out``
    declares; a SurgeryError naming the output when its dtype, shape or size differ."""
    import torch

    if isinstance(result, bytes | bytearray | memoryview):
        if len(result) != out.nbytes:
            raise SurgeryError(
                f"{description}: output {out.name!r} came out {len(result)} bytes, declared {out.nbytes}"
            )
        if not out.nbytes:
            return torch.empty(out.shape, dtype=getattr(torch, out.dtype))
        flat = torch.frombuffer(bytearray(result), dtype=torch.uint8)
        return flat.view(getattr(torch, out.dtype)).reshape(out.shape)
    got = (str(result.dtype).removeprefix("torch."), tuple(result.shape))
    if got != (out.dtype, out.shape):
        raise SurgeryError(
            f"{description}: output {out.name!r} came out {got[0]}{list(got[1])}, "
            f"declared {out.dtype}{list(out.shape)}"
        )
    return result.detach().to("cpu").contiguous()


def _with(
    transform: Transform,
    *,
    description: str | None = None,
    outputs: tuple[Output, ...] | None = None,
    compute: Compute | None = None,
) -> Transform:
    """A plain :class:`Transform` like ``transform``, with the fields given changed."""
    return Transform(
        transform.description if description is None else description,
        transform.inputs,
        transform.outputs if outputs is None else outputs,
        transform.compute if compute is None else compute,
    )


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)
