"""Legacy (non-zip) torch.save files and bare pickles; the torch pickle semantics both readers share.

A legacy file (``torch.save(..., _use_new_zipfile_serialization=False)``, and every file
from PyTorch before 1.6) is a run of pickles -- the magic number, the protocol version,
``sys_info``, the object (storages as persistent ids ``('storage', FloatStorage, key,
location, numel, view)``), the list of storage keys -- followed by each storage as an
8-byte element count and its raw bytes. A file that is one pickle and nothing else is a
*bare pickle* (format ``"pickle"``).

:class:`TorchResolver` gives the restricted unpickler the meaning of what
``torch.load(weights_only=True)`` accepts, building :class:`TensorRecord`s instead of
tensors; the zip reader (:mod:`ckptsurgeon.formats.torchzip`) uses it too.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dtypes import BY_STORAGE_CLASS, DTYPES
from ..errors import FormatError
from ..pickles import BlockedGlobal, PickleError, PickleTruncated, PickleUnsupported, Unpickler
from ..record import Storage, TensorRecord, contiguous_stride, pread_exact
from ..safety import (
    DTYPE_GLOBALS,
    QSCHEME_GLOBALS,
    REBUILD_FUNCTIONS,
    STORAGE_GLOBALS,
    TENSOR_CLASS_GLOBALS,
    DataResolver,
    GlobalRef,
    is_model_class,
    refusal,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import Checkpoint
    from . import ReadOptions

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
FIRST_READ = 1 << 20


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
            raise PickleError(f"malformed pickle (a persistent id {str(pid)[:40]!r} that is not a storage)")
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


def _ints(value: Any) -> tuple[int, ...]:
    if type(value) is not tuple or not all(type(v) is int for v in value):
        raise PickleError(
            f"malformed pickle (a tensor size or stride {str(value)[:40]} is not a tuple of ints)"
        )
    return value


def _dtype_of(ref: Any) -> str:
    if not isinstance(ref, GlobalRef) or ref.extra is None:
        raise PickleError(f"malformed pickle (expected a torch dtype, got {str(ref)[:40]})")
    if ref.extra not in DTYPES:
        raise PickleUnsupported(
            f"the checkpoint holds tensors of dtype torch.{ref.extra}, which ckptsurgeon cannot read"
        )
    return ref.extra


def _tensor(
    slot: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, *, dtype: str | None = None
) -> TensorRecord:
    if not isinstance(slot, StorageSlot) or type(offset) is not int or offset < 0:
        raise PickleError("malformed pickle (a tensor without a storage and a storage offset)")
    dtype = dtype or slot.dtype
    if dtype not in DTYPES:
        raise PickleUnsupported(
            f"the checkpoint holds tensors of dtype {dtype}, which ckptsurgeon cannot read"
        )
    shape, strides = _ints(size), _ints(stride)
    if len(shape) != len(strides) or any(d < 0 for d in shape):
        raise PickleError(f"malformed pickle (a tensor of shape {shape} with stride {strides})")
    return TensorRecord("", dtype, shape, slot.open(dtype), offset, strides, bool(requires_grad))


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
    raise PickleUnsupported(f"the checkpoint holds a tensor subclass ({new_type!r}); open it with torch.load")


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
    from ..scan import scan_globals

    try:
        found = scan_globals(data, start)
    except PickleError:
        names, strings, kinds = [first], set(), []
    else:
        names, strings, kinds = found.globals, found.strings, found.persistent_kinds
    # ``first`` is what the unpickler really met; a static scan may only see a computed name
    blocked = list(dict.fromkeys([first, *(n for n in names if not resolver.accepts(n))]))
    model = (
        any(is_model_class(n) for n in blocked) or "module" in kinds or {"_modules", "_parameters"} <= strings
    )
    return refusal(path, blocked, model=model)


def check_tree(tree: Any, path: Path, problems: dict[int, str]) -> None:
    """Check every record's span fits its storage; ``problems`` maps id(storage) -> what is wrong."""
    done: set[int] = set()
    try:
        _check(tree, "", path, problems, set(), done)
    except RecursionError:
        raise FormatError(f"{path}: the pickled object is nested too deeply to be a checkpoint") from None


def _check(
    node: Any, name: str, path: Path, problems: dict[int, str], active: set[int], done: set[int]
) -> None:
    if isinstance(node, TensorRecord):
        _check_record(node, name or "<root>", path, problems)
        return
    if isinstance(node, dict):
        children: Iterable[tuple[str, Any]] = ((str(k), v) for k, v in node.items())
    elif isinstance(node, list | tuple):
        children = ((str(i), v) for i, v in enumerate(node))
    else:
        return
    if id(node) in active:
        raise FormatError(
            f"{path}: the pickled object contains itself (at {name or 'the root'}); not a checkpoint"
        )
    if id(node) in done:
        return
    active.add(id(node))
    for key, value in children:
        _check(value, f"{name}.{key}" if name else key, path, problems, active, done)
    active.discard(id(node))
    done.add(id(node))


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


# -- full trust -----------------------------------------------------------------------------
def read_unsafe(path: Path, fmt: str) -> Checkpoint:
    """``torch.load(weights_only=False)``: runs the file's code. Only behind --unsafe-trust-pickle."""
    import torch

    from ..checkpoint import Checkpoint

    try:
        if fmt == "pickle":
            import pickle

            with open(path, "rb") as fh:
                obj = pickle.load(fh)
        else:
            obj = torch.load(path, weights_only=False, map_location="cpu", mmap=fmt == "torch-zip")
    except Exception as exc:  # whatever the file's own code raises
        detail = " ".join(str(exc).split())[:160]
        raise FormatError(f"{path}: torch.load failed ({exc.__class__.__name__}: {detail})") from None
    notes = ["opened with --unsafe-trust-pickle (full pickle trust)"]
    if isinstance(obj, torch.nn.Module):
        notes.append(f"a whole pickled {type(obj).__name__} model; showing its state_dict()")
        obj = obj.state_dict()
    return Checkpoint(
        path=path,
        format=fmt,
        tree=_live_to_records(obj, ""),
        files=(path,),
        file_size=os.path.getsize(path),
        notes=notes,
    )


def _live_to_records(node: Any, name: str) -> Any:
    import torch

    if isinstance(node, torch.Tensor):
        return TensorRecord.from_torch(name, node)
    if isinstance(node, dict):
        out = type(node)() if type(node) in (dict, OrderedDict) else {}
        for k, v in node.items():
            out[k] = _live_to_records(v, f"{name}.{k}" if name else str(k))
        return out
    if isinstance(node, list | tuple) and type(node) in (list, tuple):
        return type(node)(_live_to_records(v, f"{name}.{i}" if name else str(i)) for i, v in enumerate(node))
    return node


# -- the legacy reader ----------------------------------------------------------------------
def read(path: Path, options: ReadOptions) -> Checkpoint:
    """Open a legacy torch.save file (or a bare pickle) as records, reading no tensor data.

    Example:
        >>> read(Path("old.pth"), ReadOptions()).format      # doctest: +SKIP
        'torch-legacy'
    """
    file_size = os.path.getsize(path)
    if options.unsafe:
        return read_unsafe(path, "torch-legacy" if _is_legacy(path, file_size) else "pickle")
    first = TorchResolver(options.allow_globals, _no_storages)
    obj, end, _ = _load_growing(path, 0, file_size, lambda: first)
    if type(obj) is int and obj != MAGIC_NUMBER and end < file_size:
        raise FormatError(
            f"{path}: starts like a legacy torch.save file but its magic number is wrong; the file is damaged"
        )
    if type(obj) is not int or obj != MAGIC_NUMBER:
        return _bare_pickle(path, obj, first, file_size)
    version, end, _ = _load_growing(path, end, file_size, lambda: DataResolver())
    if version != PROTOCOL_VERSION:
        raise FormatError(
            f"{path}: legacy torch.save protocol {version!r}, expected {PROTOCOL_VERSION}; damaged?"
        )
    sys_info, end, _ = _load_growing(path, end, file_size, lambda: DataResolver())
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True) is not False
    return _read_legacy(path, options, end, file_size, "little" if little else "big")


def _read_legacy(path: Path, options: ReadOptions, start: int, file_size: int, byteorder: str) -> Checkpoint:
    from ..checkpoint import Checkpoint

    probe = _LegacyStorages(path, byteorder, None)
    _, obj_end, data = _load_growing(
        path, start, file_size, lambda: TorchResolver(options.allow_globals, probe.slot)
    )
    keys, keys_end, _ = _load_growing(path, obj_end, file_size, lambda: DataResolver())
    if type(keys) is not list:
        raise FormatError(f"{path}: the legacy storage list is a {type(keys).__name__}; the file is damaged")
    storages = _LegacyStorages(
        path, byteorder, _walk_storages(path, keys, probe.slots, keys_end, byteorder, file_size)
    )
    resolver = TorchResolver(options.allow_globals, storages.slot)
    tree, _ = unpickle(data, path, resolver)
    check_tree(tree, path, storages.problems)
    return Checkpoint(
        path=path,
        format="torch-legacy",
        tree=tree,
        files=(path,),
        file_size=file_size,
        metadata={"byteorder": byteorder},
        notes=locations_note(storages.slots.values()),
        globals_used=tuple(sorted(resolver.used)),
    )


def _walk_storages(
    path: Path, keys: list[Any], slots: dict[str, StorageSlot], offset: int, byteorder: str, file_size: int
) -> dict[str, tuple[int, int]]:
    """Each storage's (data offset, byte size), from the 8-byte element counts; no data is read."""
    found: dict[str, tuple[int, int]] = {}
    order = "<q" if byteorder == "little" else ">q"
    for raw_key in keys:
        key = str(raw_key)
        slot = slots.get(key)
        if slot is None:
            raise FormatError(f"{path}: storage {key} is listed but no tensor uses it; the file is damaged")
        try:
            (count,) = struct.unpack(order, pread_exact(path, offset, 8))
        except EOFError:
            raise FormatError(
                f"{path}: truncated: the data of storage {key} is missing; the save did not finish"
            ) from None
        nbytes = count * DTYPES[slot.dtype].itemsize
        if count < 0 or offset + 8 + nbytes > file_size:
            raise FormatError(
                f"{path}: truncated: storage {key} needs {nbytes} bytes past the end of the file"
            )
        found[key] = (offset + 8, nbytes)
        offset += 8 + nbytes
    return found


class _LegacyStorages:
    """Storages of a legacy file; ``offsets=None`` is a first pass that only learns their sizes."""

    def __init__(self, path: Path, byteorder: str, offsets: dict[str, tuple[int, int]] | None) -> None:
        self.path, self.byteorder, self.offsets = path, byteorder, offsets
        self.slots: dict[str, StorageSlot] = {}
        self.problems: dict[int, str] = {}

    def slot(self, pid: tuple) -> StorageSlot:
        if (
            len(pid) < 5
            or not isinstance(pid[1], GlobalRef)
            or pid[1].extra is None
            or type(pid[4]) is not int
        ):
            raise PickleError(f"malformed pickle (storage id {str(pid)[:60]})")
        key, location, numel = str(pid[2]), str(pid[3]), pid[4]
        root = self.slots.get(key)
        if root is None:
            dtype = storage_dtype(pid[1])
            root = self.slots[key] = StorageSlot(key, dtype, numel, location, self._open)
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return root
        if type(view) is not tuple or len(view) != 3 or not all(type(v) is int for v in view[1:]):
            raise PickleError(f"malformed pickle (storage view {str(view)[:60]})")
        view_key = f"{key}/view/{view[0]}"
        if view_key not in self.slots:
            opener = self._view_opener(root, view[1])
            self.slots[view_key] = StorageSlot(view_key, root.dtype, view[2], location, opener)
        return self.slots[view_key]

    def _open(self, slot: StorageSlot, dtype: str, start: int = 0, root_key: str | None = None) -> Storage:
        key = root_key or slot.key
        storage = Storage(
            key=slot.key, dtype=dtype, nbytes=slot.nbytes, location=slot.location, byteorder=self.byteorder
        )
        if self.offsets is None:  # the first pass: sizes only
            return storage
        offset, stored = self.offsets.get(key, (0, -1))
        storage = replace(storage, path=self.path, offset=offset + start)
        if stored < 0:
            self.problems[id(storage)] = f"its storage {key} is not in the file; the file is damaged"
        elif start + slot.nbytes > stored:
            self.problems[id(storage)] = (
                f"its storage {slot.key} needs {start + slot.nbytes} bytes but the file holds {stored}; "
                "the file is damaged"
            )
        return storage

    def _view_opener(self, root: StorageSlot, elem_offset: int) -> Callable[[StorageSlot, str], Storage]:
        def opener(slot: StorageSlot, dtype: str) -> Storage:
            return self._open(slot, dtype, elem_offset * DTYPES[root.dtype].itemsize, root.key)

        return opener


def _no_storages(pid: tuple) -> StorageSlot:
    raise PickleError("the pickle refers to tensor storages it does not carry (not a torch.save file)")


def _load_growing(
    path: Path, start: int, file_size: int, make_resolver: Callable[[], DataResolver]
) -> tuple[Any, int, bytes]:
    """Unpickle one pickle at ``start``, reading more of the file until its STOP is in view."""
    size = FIRST_READ
    with open(path, "rb") as fh:
        while True:
            fh.seek(start)
            data = fh.read(size)
            if not data:
                raise FormatError(
                    f"{path}: truncated: the file ends at byte {start} where a pickle should start"
                )
            try:
                obj, end = unpickle(data, path, make_resolver(), more=start + len(data) < file_size)
            except PickleTruncated:
                size *= 4
                continue
            return obj, start + end, data


def _is_legacy(path: Path, file_size: int) -> bool:
    try:
        obj, _, _ = _load_growing(path, 0, file_size, lambda: DataResolver())
    except FormatError:
        return False
    return type(obj) is int and obj == MAGIC_NUMBER


def _bare_pickle(path: Path, tree: Any, resolver: DataResolver, file_size: int) -> Checkpoint:
    from ..checkpoint import Checkpoint

    check_tree(tree, path, {})
    checkpoint = Checkpoint(
        path=path,
        format="pickle",
        tree=tree,
        files=(path,),
        file_size=file_size,
        notes=["a plain pickle, not a torch.save file"],
        globals_used=tuple(sorted(resolver.used)),
    )
    if not checkpoint.candidates():
        checkpoint.notes.append("it holds no tensors")
    return checkpoint
