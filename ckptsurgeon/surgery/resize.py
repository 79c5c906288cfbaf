"""Keep learned weights when only the row count changed: vocabulary resizing and class selection.

Two transforms (:class:`~ckptsurgeon.surgery.transforms.Transform`), planned from names and shapes:

- :func:`resize_rows`: an embedding table or LM head ``[V, D]`` (or its bias ``[V]``) to ``V'``
  rows. The first ``min(V, V')`` rows are kept bit for bit; new rows are the mean of the old rows
  (computed in float32 and cast back, as Hugging Face's ``resize_token_embeddings`` does by
  default, ``mean_resizing=True``) or zeros.
- :func:`select_rows`: chosen rows of a classifier head, in the order given
  (``--keep-classes 3,17,42``).

:class:`Resizing` applies them to an adaptation plan, only when asked: ``ckpt adapt
--resize-vocab [--new-rows mean|zeros]`` resizes every tensor of ``diff``'s
:class:`~ckptsurgeon.diffing.diagnosis.Vocabulary`, and ``--keep-classes`` selects rows of every
tensor of its :class:`~ckptsurgeon.diffing.diagnosis.Head`. A head tied to its embedding in the
target follows the embedding: its rows are computed from the embedding's.

Example:
    >>> recs = {"wte.weight": TensorRecord("wte.weight", "float32", (99, 8))}
    >>> resize_rows(recs, "wte.weight", 120).outputs
    (Output(name='wte.weight', dtype='float32', shape=(120, 8)),)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.dtypes import DTYPES
from ..core.record import TensorRecord
from ..errors import SurgeryError
from .plan import Entry, Plan
from .transforms import Output, Transform

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..diffing.diagnosis import Diagnosis

NEW_ROWS = ("mean", "zeros")
MAX_CLASS_INDICES = 1_000_000


def resize_rows(
    tensors: Mapping[str, TensorRecord],
    name: str,
    rows: int,
    *,
    new_rows: str = "mean",
    dim: int = 0,
    output: str | None = None,
    rows_from: str | None = None,
) -> Transform:
    """Tensor ``name`` with ``rows`` entries along ``dim``: the first kept, new ones from ``new_rows``.

    ``new_rows`` is ``"mean"`` (the mean of the old rows, in float32, cast to the tensor's dtype:
    Hugging Face's default) or ``"zeros"``. ``rows_from`` names the tensor whose rows are used
    (a head tied to its embedding); it must have ``name``'s dtype and shape.

    Example:
        >>> import torch
        >>> w = TensorRecord.from_torch("w", torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> t = resize_rows({"w": w}, "w", 3)
        >>> t.description, t.value((w,), 0).tolist()
        ('resize 2 -> 3 rows (1 new from the mean of the old rows)', [[1.0, 2.0], [3.0, 4.0], [2.0, 3.0]])
    """
    if new_rows not in NEW_ROWS:
        raise SurgeryError(f"new rows: {new_rows!r} is not one of {', '.join(NEW_ROWS)}")
    rec = _input(tensors, name, "resize")
    source = rec if rows_from is None else _input(tensors, rows_from, "resize")
    if (source.dtype, tuple(source.shape)) != (rec.dtype, tuple(rec.shape)):
        raise SurgeryError(
            f"resize: {name!r} is {rec.dtype}{list(rec.shape)}, its tied {rows_from!r} is "
            f"{source.dtype}{list(source.shape)}; they should be one tensor"
        )
    if not rec.shape or not -len(rec.shape) <= dim < len(rec.shape):
        raise SurgeryError(f"resize: {name!r} has shape {list(rec.shape)}, no dimension {dim}")
    dim %= len(rec.shape)
    old = rec.shape[dim]
    if rows < 1:
        raise SurgeryError(f"resize: {name!r} to {rows} rows; give at least one")
    if rows > old and old == 0 and new_rows == "mean":
        raise SurgeryError(f"resize: {name!r} has no rows to average; use new rows 'zeros'")
    if rows > old and new_rows == "mean" and not DTYPES[rec.dtype].is_floating:
        raise SurgeryError(f"resize: {name!r} is {rec.dtype}; only floating rows can be averaged (use zeros)")
    shape = (*rec.shape[:dim], rows, *rec.shape[dim + 1 :])

    def compute(inputs: tuple[TensorRecord, ...], _index: int) -> Any:
        return _resized(inputs[-1].to_torch(), dim, rows, new_rows)

    description = _resize_description(old, rows, new_rows, dim)
    if rows_from is not None:
        description += f", from its tied {rows_from}"
    inputs = (name,) if rows_from is None else (name, rows_from)
    return Transform(description, inputs, (Output(output or name, rec.dtype, shape),), compute)


def select_rows(
    tensors: Mapping[str, TensorRecord], name: str, indices: Sequence[int], *, output: str | None = None
) -> Transform:
    """Rows ``indices`` of tensor ``name`` (along its first dimension), in that order.

    Example:
        >>> import torch
        >>> b = TensorRecord.from_torch("fc.bias", torch.arange(5.0))
        >>> t = select_rows({"fc.bias": b}, "fc.bias", [3, 0])
        >>> t.description, t.value((b,), 0).tolist()
        ('keep classes 3, 0 of 5', [3.0, 0.0])
    """
    rec = _input(tensors, name, "keep classes")
    if not rec.shape:
        raise SurgeryError(f"--keep-classes: {name!r} is a scalar; there are no rows to choose")
    chosen = check_indices(indices, rec.shape[0], name)
    shape = (len(chosen), *rec.shape[1:])

    def compute(inputs: tuple[TensorRecord, ...], _index: int) -> Any:
        import torch

        return inputs[0].to_torch().index_select(0, torch.tensor(chosen, dtype=torch.long))

    description = f"keep classes {_index_list(chosen)} of {rec.shape[0]}"
    return Transform(description, (name,), (Output(output or name, rec.dtype, shape),), compute)


def check_indices(indices: Sequence[int], count: int, what: str) -> tuple[int, ...]:
    """``indices`` as a tuple, refused in one line when empty, out of ``range(count)`` or repeated.

    Example:
        >>> check_indices([2, 0], 3, "fc.weight")
        (2, 0)
    """
    chosen = tuple(int(i) for i in indices)
    if not chosen:
        raise SurgeryError(f"--keep-classes: no class index given for {what}")
    outside = [i for i in chosen if not 0 <= i < count]
    if outside:
        raise SurgeryError(
            f"--keep-classes: {_index_list(outside)} out of range for {what}, which has {count} classes "
            f"(indices 0 to {count - 1})"
        )
    repeated = sorted(i for i, n in Counter(chosen).items() if n > 1)
    if repeated:
        raise SurgeryError(f"--keep-classes: class {_index_list(repeated)} given more than once")
    return chosen


def parse_class_indices(spec: str | Iterable[int]) -> tuple[int, ...]:
    """``--keep-classes``: ``"3,17,42"``, ``"@classes.txt"`` or the path of a file with one index
    per line (blank lines and ``#`` comments ignored), or already a sequence of ints.

    Example:
        >>> parse_class_indices("3, 17,42")
        (3, 17, 42)
    """
    if not isinstance(spec, str):
        return tuple(_as_index(i, "--keep-classes") for i in spec)
    text, where = spec, "--keep-classes"
    path = Path(spec[1:]) if spec.startswith("@") else Path(spec)
    listed = "," not in spec and not spec.strip().lstrip("-").isdigit()
    if spec.startswith("@") or (listed and path.is_file()):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problem = exc.__class__.__name__
            raise SurgeryError(f"--keep-classes {spec}: cannot read {path} ({problem})") from None
        where = f"--keep-classes {path}"
        lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        items = [item for line in lines for item in line.split(",")]
    else:
        items = text.split(",")
    items = [item.strip() for item in items if item.strip()]
    if len(items) > MAX_CLASS_INDICES:
        raise SurgeryError(f"{where}: more than {MAX_CLASS_INDICES} indices")
    return tuple(_as_index(item, where) for item in items)


def _as_index(item: object, where: str) -> int:
    if isinstance(item, bool):
        raise SurgeryError(f"{where}: {item!r} is not a class index (a whole number)")
    try:
        return int(item) if isinstance(item, int | str) else int(str(item))
    except ValueError:
        shown = str(item)[:40]
        raise SurgeryError(f"{where}: {shown!r} is not a class index (a whole number)") from None


# -- applied to an adaptation ---------------------------------------------------------------------
@dataclass(frozen=True)
class Resizing:
    """What to do with rows whose count changed, applied only when asked.

    ``new_rows``: ``None`` (vocabulary tensors are dropped as misfits), ``"mean"`` or ``"zeros"``
    (``--resize-vocab --new-rows ...``). ``keep_classes``: the rows of the classifier head to keep,
    in order (``--keep-classes``), or ``None``.

    Example:
        >>> Resizing("mean").active, Resizing().active
        (True, False)
    """

    new_rows: str | None = None
    keep_classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.new_rows is not None and self.new_rows not in NEW_ROWS:
            raise SurgeryError(f"--new-rows {self.new_rows}: give one of {', '.join(NEW_ROWS)}")

    @property
    def active(self) -> bool:
        return self.new_rows is not None or self.keep_classes is not None

    def apply(
        self, plan: Plan, records: Mapping[str, TensorRecord], diagnosis: Diagnosis, tied: Mapping[str, str]
    ) -> Plan:
        """``plan`` (an adaptation plan: misfits dropped) with the vocabulary resized and/or the
        head's classes selected; the transformed tensors load under their target names.

        ``tied`` is the target's alias -> canonical name: a tied head takes the embedding's rows.
        """
        transforms: dict[str, Transform] = {}
        steps: list[str] = []
        if self.new_rows is not None:
            found, step = _vocabulary_transforms(records, diagnosis, tied, self.new_rows)
            transforms |= found
            steps.append(step)
        if self.keep_classes is not None:
            found, step = _class_transforms(records, diagnosis, self.keep_classes)
            both = next((n for n in found if n in transforms), None)
            if both is not None:
                raise SurgeryError(
                    f"{both}: both --resize-vocab and --keep-classes would change it; give one of them"
                )
            transforms |= found
            steps.append(step)
        return _with_row_transforms(plan, transforms, steps)


def _vocabulary_transforms(
    records: Mapping[str, TensorRecord], diagnosis: Diagnosis, tied: Mapping[str, str], new_rows: str
) -> tuple[dict[str, Transform], str]:
    """File name -> its resize, for every tensor of the diagnosis' vocabulary; the plan's step."""
    v = diagnosis.vocabulary
    if v is None:
        raise SurgeryError(
            "--resize-vocab: no embedding or LM head changes size between the file and the target; "
            "nothing to resize"
        )
    file_of = {m.name: m.file_name for m in diagnosis.after.shape_mismatched}
    out: dict[str, Transform] = {}
    for m in v.tensors:
        dim = next(i for i, (a, b) in enumerate(zip(m.source_shape, m.target_shape, strict=True)) if a != b)
        canonical = tied.get(m.name)
        rows_from = file_of.get(canonical) if canonical is not None else None
        if rows_from is not None and tuple(records[rows_from].shape) != tuple(records[m.file_name].shape):
            rows_from = None  # not the same tensor in the file: resize its own rows
        out[m.file_name] = resize_rows(
            records,
            m.file_name,
            m.target_shape[dim],
            new_rows=new_rows,
            dim=dim,
            output=m.name,
            rows_from=rows_from,
        )
    return out, f"resize the vocabulary {v.source_tokens} -> {v.target_tokens} tokens (new rows: {new_rows})"


def _class_transforms(
    records: Mapping[str, TensorRecord], diagnosis: Diagnosis, indices: tuple[int, ...]
) -> tuple[dict[str, Transform], str]:
    """File name -> its row selection, for every tensor of the diagnosis' head; the plan's step."""
    head = diagnosis.head
    if head is None:
        raise SurgeryError(
            "--keep-classes: no classifier head changes its class count between the file and the target; "
            "nothing to select"
        )
    src, tgt = head.source_classes, head.target_classes
    if tgt > src:
        raise SurgeryError(
            f"--keep-classes: the target's head has {tgt} classes, more than the file's {src}; "
            "classes can only be selected from a larger head"
        )
    chosen = check_indices(indices, src, f"the head {', '.join(head.modules)}")
    if len(chosen) != tgt:
        raise SurgeryError(
            f"--keep-classes: {len(chosen)} class indices given, the target's head has {tgt} classes; "
            f"give exactly {tgt} indices below {src}"
        )
    found = {m.file_name: select_rows(records, m.file_name, chosen, output=m.name) for m in head.tensors}
    return found, f"keep {len(chosen)} of the {src} classes of the head"


def _with_row_transforms(plan: Plan, transforms: Mapping[str, Transform], steps: Sequence[str]) -> Plan:
    """``plan`` with each named entry (dropped as a misfit, or kept) replaced by its transform.

    Unlike :meth:`Plan.with_transform`, an input may be shared with another entry (a tied head
    reads its embedding's rows, which are resized by their own entry).
    """
    entries = []
    for e in plan.entries:
        transform = transforms.get(e.old)
        if transform is not None:
            e = Entry(e.old, transform.outputs[0].name, "", e.dtype, e.shape, transform)
        entries.append(e)
    if not transforms:
        return plan
    kept = [s for s in plan.steps if not s.startswith("drop ")]
    misfits = sum(1 for e in entries if e.dropped and e.reason.startswith("shape does not fit"))
    others = sum(1 for e in entries if e.dropped) - misfits
    if misfits:
        kept.append(f"drop {misfits} tensor(s) whose shape does not fit the target")
    if others:
        kept.append(f"drop {others} tensor(s) with no place in the target")
    return Plan(tuple(entries), (*kept, *steps))


# -- helpers --------------------------------------------------------------------------------------
def _resized(old: torch.Tensor, dim: int, rows: int, new_rows: str) -> torch.Tensor:
    import torch

    count = old.shape[dim]
    if rows <= count:
        return old.narrow(dim, 0, rows).clone()
    shape = list(old.shape)
    shape[dim] = rows
    out = torch.zeros(shape, dtype=old.dtype)
    out.narrow(dim, 0, count).copy_(old)
    if new_rows == "mean":
        mean = torch.mean(old.to(torch.float32), dim=dim, keepdim=True).to(old.dtype)
        out.narrow(dim, count, rows - count).copy_(mean.expand_as(out.narrow(dim, count, rows - count)))
    return out


def _resize_description(old: int, rows: int, new_rows: str, dim: int) -> str:
    along = f" along dimension {dim}" if dim else ""
    if rows < old:
        return f"resize {old} -> {rows} rows{along} (keeps the first {rows})"
    added = rows - old
    source = "from the mean of the old rows" if new_rows == "mean" else "of zeros"
    return f"resize {old} -> {rows} rows{along} ({added} new {source})"


def _index_list(indices: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" ... ({len(indices)} in all)" if len(indices) > limit else "")


def _input(tensors: Mapping[str, TensorRecord], name: str, what: str) -> TensorRecord:
    rec = tensors.get(name)
    if rec is None:
        raise SurgeryError(f"{what}: no tensor {name!r}")
    return rec


def resizing(
    resize_vocab: bool = False, new_rows: str = "mean", keep_classes: str | Iterable[int] | None = None
) -> Resizing | None:
    """The :class:`Resizing` that ``adapt``'s and ``load_into``'s keyword arguments ask for (``None``:
    nothing asked, misfits are dropped).

    Example:
        >>> resizing(True, "zeros", "3,1")
        Resizing(new_rows='zeros', keep_classes=(3, 1))
    """
    if new_rows not in NEW_ROWS:
        raise SurgeryError(f"--new-rows {new_rows}: give one of {', '.join(NEW_ROWS)}")
    classes = None if keep_classes is None else parse_class_indices(keep_classes)
    asked = Resizing(new_rows if resize_vocab else None, classes)
    return asked if asked.active else None
