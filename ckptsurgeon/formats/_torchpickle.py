"""The torch pickle semantics the zip and legacy readers share, as records instead of tensors.

:class:`TorchResolver` gives the restricted unpickler (:mod:`ckptsurgeon.pickling.pickles`) the
meaning of what ``torch.load(weights_only=True)`` accepts: each ``torch._utils._rebuild_*``
call becomes a :class:`TensorRecord` whose storage is a :class:`StorageSlot` named by a
persistent id. :func:`unpickle` runs it with one-line errors (a refusal lists every blocked
global), and :func:`check_tree` checks that every record's span fits its storage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, replace
from dataclasses import fields as dataclass_fields
from math import prod
from pathlib import Path
from typing import Any

from ..core.bounds import bounded_repr
from ..core.dtypes import BY_STORAGE_CLASS, DTYPES
from ..core.record import Storage, TensorRecord, contiguous_stride
from ..errors import FormatError
from ..pickling.pickles import BlockedGlobal, PickleError, PickleTruncated, PickleUnsupported, Unpickler
from ..pickling.safety import (
    DTYPE_GLOBALS,
    QSCHEME_GLOBALS,
    REBUILD_FUNCTIONS,
    STORAGE_GLOBALS,
    TENSOR_CLASS_GLOBALS,
    DataResolver,
    GlobalRef,
    is_pickled_model,
    refusal,
)


@dataclass(eq=False)
class StorageSlot:
    """A storage named by a persistent id; ``open(dtype)`` gives the :class:`Storage` (cached)."""

    key: str
    dtype: str  # from the storage class ("uint8" for UntypedStorage)
    numel: int
    location: str
    opener: Callable[[StorageSlot, str], Storage]
    storage: Storage | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    def open(self, dtype: str) -> Storage:
        if self.storage is None:
            self.storage = self.opener(self, dtype)
        return self.storage


class TorchResolver(DataResolver):
    """The data-only globals plus what ``weights_only`` accepts to rebuild tensors, as records."""

    def __init__(self, allow_globals: Iterable[str], storage_slot: Callable[[tuple], StorageSlot]) -> None:
        super().__init__(allow_globals)
        self.storage_slot = storage_slot
        for full in (
            REBUILD_FUNCTIONS | DTYPE_GLOBALS | STORAGE_GLOBALS | TENSOR_CLASS_GLOBALS | QSCHEME_GLOBALS
        ):
            module, name = full.rsplit(".", 1)
            ref = self.table[full] = GlobalRef(module, name)
            if full in REBUILD_FUNCTIONS:
                ref.call = self._rebuilder(name)
            elif full in DTYPE_GLOBALS:
                ref.extra = name
            elif full in STORAGE_GLOBALS:  # the dtype it holds (UntypedStorage: bytes)
                dtype = BY_STORAGE_CLASS.get(name)
                ref.extra = dtype.name if dtype else "uint8" if name == "UntypedStorage" else name
        self.table["torch.Tensor"] = GlobalRef("torch", "Tensor")
        self.table["torch.nn.parameter.Parameter"] = GlobalRef(
            "torch.nn.parameter",
            "Parameter",
            new=lambda a, kw: _parameter(a[0], a[1] if len(a) > 1 else True),
        )

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is not tuple or not pid or pid[0] not in ("storage", b"storage"):
            raise PickleError(
                f"malformed pickle (a persistent id {bounded_repr(pid, 40)} that is not a storage)"
            )
        return self.storage_slot(pid)

    def _rebuilder(self, name: str) -> Callable[[tuple], Any]:
        table = {
            "_rebuild_tensor": lambda a: _tensor(*a[:4]),
            "_rebuild_tensor_v2": lambda a: _tensor(*a[:5]),
            "_rebuild_tensor_v3": lambda a: _tensor(*a[:5], dtype=_dtype_of(a[6]) if len(a) > 6 else None),
            "_rebuild_parameter": lambda a: _parameter(*a[:2]),
            "_rebuild_parameter_with_state": lambda a: _parameter(*a[:2]),
            "_rebuild_meta_tensor_no_storage": lambda a: TensorRecord(
                "", _dtype_of(a[0]), _ints(a[1]), None, 0, _ints(a[2]), bool(a[3]) if len(a) > 3 else False
            ),
            "_rebuild_from_type_v2": _from_type_v2,
        }
        if name in table:
            return table[name]

        def unsupported(args: tuple) -> Any:
            raise PickleUnsupported(
                f"the checkpoint holds a tensor of a kind ckptsurgeon cannot read ({name}: "
                "quantized, sparse, nested or subclass); open it with torch.load"
            )

        return unsupported


def storage_dtype(ref: GlobalRef) -> str:
    """The dtype a storage class holds, or a one-line refusal for one ckptsurgeon cannot read."""
    if ref.extra not in DTYPES:
        raise PickleUnsupported(
            f"the checkpoint holds a {ref.name}, which ckptsurgeon cannot read; open it with torch.load"
        )
    return ref.extra


_INT_ONLY = frozenset({int})  # bool is not int here: ``type(v) is int``, as torch checks
INT64 = 1 << 63  # sizes, strides and offsets are int64 in torch


def _ints(value: Any) -> tuple[int, ...]:
    if (
        type(value) is not tuple
        or not _INT_ONLY.issuperset(map(type, value))
        or not all(-INT64 <= v < INT64 for v in value)
    ):
        raise PickleError(
            f"malformed pickle (a tensor size or stride {bounded_repr(value, 40)} is not a tuple of int64s)"
        )
    return value


def storage_key(value: Any, what: str = "storage key") -> str:
    """A storage key or location from a persistent id as text: a string or an int64, nothing
    whose ``str()`` could be unbounded work."""
    if type(value) is str or (type(value) is int and -INT64 <= value < INT64):
        return str(value)
    if type(value) is bytes:
        return value.decode("latin-1")
    raise PickleError(f"malformed pickle (a {what} {bounded_repr(value, 40)} that is not a string)")


def zip_storage_slot(
    slots: dict[str, StorageSlot], pid: tuple, open_storage: Callable[[StorageSlot, str], Storage]
) -> StorageSlot:
    """The slot a torch zip's persistent id ``('storage', StorageClass, key, location, numel)``
    names, made once per key in ``slots``; a malformed id raises :class:`PickleError`. The zip
    reader and a DCP chunk (a ``torch.save`` archive) share it; legacy files have views too.

    Example:
        >>> cls = GlobalRef("torch", "FloatStorage", extra="float32")
        >>> zip_storage_slot({}, ("storage", cls, "0", "cpu", 4), lambda slot, dtype: None).nbytes
        16
    """
    if len(pid) < 5 or not isinstance(pid[1], GlobalRef) or pid[1].extra is None:
        raise PickleError(f"malformed pickle (storage id {bounded_repr(pid, 60)})")
    key, location, numel = storage_key(pid[2]), storage_key(pid[3], "storage location"), pid[4]
    if type(numel) is not int or numel < 0:
        raise PickleError(f"malformed pickle (storage {key} has size {bounded_repr(numel, 40)})")
    found = slots.get(key)
    if found is None:
        found = slots[key] = StorageSlot(key, storage_dtype(pid[1]), numel, location, open_storage)
    return found


def _dtype_of(ref: Any) -> str:
    if not isinstance(ref, GlobalRef) or ref.extra is None:
        raise PickleError(f"malformed pickle (expected a torch dtype, got {bounded_repr(ref, 40)})")
    if ref.extra not in DTYPES:
        raise PickleUnsupported(
            f"the checkpoint holds tensors of dtype torch.{ref.extra}, which ckptsurgeon cannot read"
        )
    return ref.extra


def _tensor(
    slot: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, *, dtype: str | None = None
) -> TensorRecord:
    if not isinstance(slot, StorageSlot) or type(offset) is not int or not 0 <= offset < INT64:
        raise PickleError("malformed pickle (a tensor without a storage and a storage offset)")
    dtype = dtype or slot.dtype
    if dtype not in DTYPES:
        raise PickleUnsupported(
            f"the checkpoint holds tensors of dtype {dtype}, which ckptsurgeon cannot read"
        )
    shape, strides = _ints(size), _ints(stride)
    if len(shape) != len(strides) or (shape and min(shape) < 0):
        raise PickleError(
            f"malformed pickle (a tensor of shape {bounded_repr(shape, 60)} "
            f"with stride {bounded_repr(strides, 60)})"
        )
    return _record(dtype, shape, slot.open(dtype), offset, strides, bool(requires_grad))


def _record(
    dtype: str, shape: tuple[int, ...], storage: Storage, offset: int, stride: tuple[int, ...], grad: bool
) -> TensorRecord:
    """``TensorRecord("", dtype, shape, storage, offset, stride, grad)`` without the frozen
    dataclass's per-field ``object.__setattr__`` (one per tensor, 20,000 times in a big state dict)."""
    rec = object.__new__(TensorRecord)
    fields = rec.__dict__
    fields.update(_RECORD_DEFAULTS)
    fields["dtype"], fields["shape"], fields["storage"] = dtype, shape, storage
    fields["storage_offset"], fields["stride"], fields["requires_grad"] = offset, stride, grad
    return rec


# in field order (as the generated __init__ fills __dict__); _record sets the two without a default
_RECORD_DEFAULTS = {f.name: f.default for f in dataclass_fields(TensorRecord)}
_RECORD_DEFAULTS["name"] = ""
if [k for k, v in _RECORD_DEFAULTS.items() if v is MISSING] != ["dtype", "shape"]:  # pragma: no cover
    raise ImportError("TensorRecord gained a field without a default; _record must set it")


def _parameter(data: Any, requires_grad: Any = True) -> TensorRecord:
    if not isinstance(data, TensorRecord):
        raise PickleError("malformed pickle (a Parameter that does not wrap a tensor)")
    return replace(data, requires_grad=bool(requires_grad), is_parameter=True)


def _from_type_v2(args: tuple) -> Any:
    func, new_type, func_args = args[0], args[1], args[2]
    if not isinstance(func, GlobalRef) or func.call is None or type(func_args) is not tuple:
        raise PickleError("malformed pickle (_rebuild_from_type_v2 without a rebuild function)")
    result = func.call(func_args)
    if isinstance(new_type, GlobalRef) and new_type.full == "torch.nn.parameter.Parameter":
        return _parameter(result, result.requires_grad)
    if isinstance(new_type, GlobalRef) and new_type.full == "torch.Tensor":
        return result
    raise PickleUnsupported(
        f"the checkpoint holds a tensor subclass ({bounded_repr(new_type, 60)}); open it with torch.load"
    )


# -- unpickling with one-line errors --------------------------------------------------------
def unpickle(
    data: bytes, path: Path, resolver: DataResolver, start: int = 0, *, more: bool = False
) -> tuple[Any, int]:
    """Run the restricted unpickler; return (object, end offset). Errors are one-line CkptErrors.

    ``more=True``: the data is a prefix of the file, so a truncated pickle raises
    :class:`PickleTruncated` for the caller to retry with more bytes.

    Example:
        >>> unpickle(b"\\x80\\x02K\\x07.", Path("x"), DataResolver())
        (7, 5)
    """
    unpickler = Unpickler(data, resolver, start=start)
    try:
        return unpickler.load(), unpickler.pos
    except BlockedGlobal as exc:
        raise blocked_error(data, path, resolver, start, exc.name) from None
    except PickleTruncated as exc:
        if more:
            raise
        raise FormatError(f"{path}: truncated: {exc}; the download or save did not finish") from None
    except PickleUnsupported as exc:
        raise FormatError(f"{path}: {exc}") from None
    except PickleError as exc:
        raise FormatError(f"{path}: {exc}; the file is damaged or not a checkpoint") from None


def blocked_error(data: bytes, path: Path, resolver: DataResolver, start: int, first: str) -> Exception:
    """List every global the resolver refuses (a scan that executes nothing); build the refusal.

    Example:
        >>> evil = b"\\x80\\x02cos\\nsystem\\n."
        >>> blocked_error(evil, Path("x.pth"), DataResolver(), 0, "os.system").blocked_globals
        ('os.system',)
    """
    from ..pickling.globalscan import scan_globals  # pickletools, only for a refusal

    try:
        found = scan_globals(data, start)
    except PickleError:
        names, strings, kinds = [first], set(), []
    else:
        names, strings, kinds = found.globals, found.strings, found.persistent_kinds
    # ``first`` is what the unpickler really met; a static scan may only see a computed name
    blocked = list(dict.fromkeys([first, *(n for n in names if not resolver.accepts(n))]))
    return refusal(path, blocked, model=is_pickled_model(blocked, kinds, strings))


# A walk that names entries by their path meets a shared container once per place it appears: a
# pickle that nests the same container twice at each of 40 levels is 2 KiB on disk and 2**40
# entries by path. Trees with more than MAX_WALKED entries by path, over SHARING_LIMIT times their
# distinct entries, are refused (a config dict saved twice is fine; a long list is fine).
MAX_WALKED = 1_000_000
SHARING_LIMIT = 100


def check_tree(tree: Any, path: Path, problems: dict[int, str]) -> None:
    """Check every record's span fits its storage; ``problems`` maps id(storage) -> what is wrong.

    Also refuses a tree that reuses containers so often that a walk by paths would meet more than
    ``MAX_WALKED`` entries and ``SHARING_LIMIT`` times its distinct ones (a few KiB can hold 2**40 paths).

    Example:
        >>> check_tree({"w": TensorRecord("w", "float32", (2,))}, Path("x.pth"), {})
    """
    walked: dict[int, tuple[int, int]] = {}  # id(container) -> (entries under it by path, its own slots)
    try:
        total = _check(tree, "", path, problems, set(), walked)
    except RecursionError:
        raise FormatError(f"{path}: the pickled object is nested too deeply to be a checkpoint") from None
    distinct = 1 + sum(slots for _, slots in walked.values())  # the root, then each container's slots once
    if total > MAX_WALKED and total > SHARING_LIMIT * distinct:
        raise FormatError(
            f"{path}: the pickled object reuses the same containers so often that it has {total:,} "
            f"entries by path but only {distinct:,} distinct ones; not a checkpoint"
        )


def _check(
    node: Any,
    name: str,
    path: Path,
    problems: dict[int, str],
    active: set[int],
    walked: dict[int, tuple[int, int]],
) -> int:
    """Check ``node``; return how many entries a walk by paths meets under it (itself included)."""
    if isinstance(node, TensorRecord):
        _check_record(node, name or "<root>", path, problems)
        return 1
    if isinstance(node, dict):
        children: Iterable[tuple[Any, Any]] = node.items()
    elif isinstance(node, list | tuple):
        children = enumerate(node)
    else:
        return 1
    if id(node) in active:
        raise FormatError(
            f"{path}: the pickled object contains itself (at {name or 'the root'}); not a checkpoint"
        )
    if id(node) in walked:
        return walked[id(node)][0]
    active.add(id(node))
    total = 1
    for key, value in children:
        if type(value) is TensorRecord:  # the common leaf: its name is spelled out only on error
            if value.storage is not None and not _record_fits(value, value.storage, problems):
                _check_record(value, _child(name, key), path, problems)
            total += 1
        elif isinstance(value, TensorRecord | dict | list | tuple):
            total += _check(value, _child(name, key), path, problems, active, walked)
        else:
            total += 1
    active.discard(id(node))
    walked[id(node)] = (total, len(node))
    return total


def _child(name: str, key: Any) -> str:
    key = str(key)
    return f"{name}.{key}" if name else key


def _record_fits(rec: TensorRecord, storage: Storage, problems: dict[int, str]) -> bool:
    """The quiet form of :func:`_check_record` (``storage``: the record's): True when there is
    nothing to report."""
    if problems and id(storage) in problems:
        return False
    shape = rec.shape
    numel = prod(shape)
    if numel == 0:
        return True
    stride = rec.stride
    if stride is None or stride == contiguous_stride(shape):  # the common case: no loop
        last = rec.storage_offset + numel - 1
    else:
        last = rec.storage_offset
        for d, s in zip(shape, stride, strict=True):
            if s < 0:
                return False
            last += (d - 1) * s
    return (last + 1) * rec.itemsize <= storage.nbytes


def _check_record(rec: TensorRecord, name: str, path: Path, problems: dict[int, str]) -> None:
    storage = rec.storage
    if storage is None:
        return
    problem = problems.get(id(storage))
    if problem:
        raise FormatError(f"{path}: tensor {name!r}: {problem}")
    if rec.numel == 0:
        return
    stride = rec.stride or contiguous_stride(rec.shape)
    last = rec.storage_offset + sum((d - 1) * s for d, s in zip(rec.shape, stride, strict=True))
    if any(s < 0 for s in stride) or (last + 1) * rec.itemsize > storage.nbytes:
        raise FormatError(
            f"{path}: tensor {name!r} ({rec.dtype}{list(rec.shape)}) needs {(last + 1) * rec.itemsize} bytes "
            f"of storage {storage.key}, which holds {storage.nbytes}; the file is damaged"
        )


def locations_note(slots: Iterable[StorageSlot]) -> list[str]:
    """A note when tensors were saved on another device (they still open here, on the CPU)."""
    devices = sorted({s.location for s in slots if s.location != "cpu"})
    return [f"tensors were saved on {', '.join(devices)}; they open on the CPU here"] if devices else []
