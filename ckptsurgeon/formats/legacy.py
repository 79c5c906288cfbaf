"""Legacy (non-zip) torch.save files and bare pickles.

A legacy file (``torch.save(..., _use_new_zipfile_serialization=False)``, and every file
from PyTorch before 1.6) is a run of pickles -- the magic number, the protocol version,
``sys_info``, the object (storages as persistent ids ``('storage', FloatStorage, key,
location, numel, view)``), the list of storage keys -- followed by each storage as an
8-byte element count and its raw bytes. A file that is one pickle and nothing else is a
*bare pickle* (format ``"pickle"``).

The torch pickle semantics this reader shares with the zip reader
(:class:`TorchResolver`, :func:`unpickle`, :func:`check_tree` ...) live in
:mod:`ckptsurgeon.formats._torchpickle`, full trust in :mod:`ckptsurgeon.formats._fulltrust`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..core.bounds import bounded_repr
from ..core.dtypes import DTYPES
from ..core.record import Storage
from ..errors import CkptError, FormatError
from ..fileio.spans import pread_exact
from ..pickling.globalscan import PickleGlobals, scan_globals
from ..pickling.pickles import PickleError, PickleTruncated
from ..pickling.safety import DataResolver, GlobalRef
from . import LEGACY_MAGIC_NUMBER
from ._fulltrust import read_unsafe
from ._torchpickle import (
    StorageSlot,
    TorchResolver,
    check_tree,
    locations_note,
    storage_dtype,
    storage_key,
    unpickle,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..core.checkpoint import Checkpoint
    from . import ReadOptions

MAGIC_NUMBER = LEGACY_MAGIC_NUMBER
PROTOCOL_VERSION = 1001
FIRST_READ = 1 << 20


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
    from ..core.checkpoint import Checkpoint

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
        try:
            key = storage_key(raw_key)
        except PickleError as exc:
            raise FormatError(f"{path}: {exc}; the file is damaged") from None
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
                f"{path}: truncated: the file ends inside its tensor data ({nbytes} bytes of one storage "
                "are missing); the download or save did not finish, fetch or save it again"
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
            raise PickleError(f"malformed pickle (storage id {bounded_repr(pid, 60)})")
        key, location, numel = storage_key(pid[2]), storage_key(pid[3], "storage location"), pid[4]
        root = self.slots.get(key)
        if root is None:
            dtype = storage_dtype(pid[1])
            root = self.slots[key] = StorageSlot(key, dtype, numel, location, self._open)
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return root
        if type(view) is not tuple or len(view) != 3 or not all(type(v) is int for v in view[1:]):
            raise PickleError(f"malformed pickle (storage view {bounded_repr(view, 60)})")
        if view[1] < 0 or view[2] < 0:  # would view bytes before the storage (its length field ...)
            raise PickleError(
                f"a view of storage {key} at element offset {view[1]}, {view[2]} elements: "
                "a view cannot start before its storage"
            )
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
    from ..core.checkpoint import Checkpoint

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


# -- tar checkpoints (PyTorch before 0.4) ------------------------------------------------------
# torch.load tries tarfile before anything else on a non-zip file; a tar checkpoint's members are
# pickles, some followed by raw storage or tensor bytes. They are walked here, never loaded.
TAR_MEMBERS = ("sys_info", "storages", "tensors", "pickle")


def tar_pickles(path: Path) -> tuple[list[tuple[str, PickleGlobals]], str | None]:
    """Every pickle ``torch.load`` would unpickle from a tar checkpoint, scanned (nothing runs):
    ``[(member, globals) ...]``, and why the walk stopped early (None when it saw them all).

    A member torch reads that a reader could take for another (a duplicate or respelled name,
    a link) is refused.

    Example:
        >>> found, stopped = tar_pickles(Path("old.tar"))        # doctest: +SKIP
        >>> [member for member, _ in found], stopped             # doctest: +SKIP
        (['sys_info', 'storages', 'storages', 'tensors', 'tensors', 'pickle'], None)
    """
    import tarfile

    found: list[tuple[str, PickleGlobals]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            members = _tar_members(path, tar.getmembers())
            for name in TAR_MEMBERS:
                if name in members:
                    fh = tar.extractfile(members[name])
                    if fh is None:  # pragma: no cover - only regular files are kept
                        continue
                    try:
                        stopped = _TAR_WALKERS[name](fh, members[name].size, found, name)
                    except PickleError as exc:
                        stopped = f"holds a pickle that cannot be read ({exc})"
                    if stopped:
                        return found, f"its member {name} {stopped}"
    except CkptError:
        raise
    except Exception as exc:  # tarfile on a hostile archive: ReadError, EOFError, ValueError ...
        detail = " ".join(str(exc).split())[:80] or exc.__class__.__name__
        return found, f"tarfile cannot read it ({detail})"
    return found, None


def _tar_members(path: Path, members: list[Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {}
    for member in members:
        name = member.name.split("\0", 1)[0].replace("\\", "/")
        canonical = "/".join(p for p in name.split("/") if p not in ("", "."))
        if canonical not in TAR_MEMBERS:
            continue
        if canonical in kept or member.name != canonical or not member.isreg():
            raise FormatError(
                f"{path}: an ambiguous tar checkpoint: its member {canonical} is "
                + ("listed twice" if canonical in kept else "spelled differently or not a plain file")
                + ", so loaders could read different data; refusing to scan it"
            )
        kept[canonical] = member
    return kept


def _walk_one(fh: IO[bytes], size: int, found: list[tuple[str, PickleGlobals]], name: str) -> str | None:
    found.append((name, scan_globals(fh, 0)))
    return None


def _walk_tar_storages(
    fh: IO[bytes], size: int, found: list[tuple[str, PickleGlobals]], name: str
) -> str | None:
    """A count, then per storage (key, location, storage class) and its 8-byte element count
    and bytes, then the list of storage views."""

    def skip(args: Any, pos: int) -> int | None:
        if type(args) is not tuple or len(args) != 3 or not isinstance(args[2], GlobalRef):
            return None
        dtype = DTYPES.get(str(args[2].extra))
        if dtype is None:
            return None
        fh.seek(pos)
        count = int.from_bytes(fh.read(8), "little", signed=True)
        return pos + 8 + count * dtype.itemsize if count >= 0 else None

    return _walk_records(fh, size, found, name, skip, views=True)


def _walk_tar_tensors(
    fh: IO[bytes], size: int, found: list[tuple[str, PickleGlobals]], name: str
) -> str | None:
    """A count, then per tensor (key, storage id, type) and its dims, sizes, strides, offset."""

    def skip(args: Any, pos: int) -> int | None:
        fh.seek(pos)
        ndim = int.from_bytes(fh.read(4), "little", signed=True)
        return pos + 8 + 16 * ndim + 8 if 0 <= ndim <= 64 else None

    return _walk_records(fh, size, found, name, skip, views=False)


def _walk_records(
    fh: IO[bytes],
    size: int,
    found: list[tuple[str, PickleGlobals]],
    name: str,
    skip: Callable[[Any, int], int | None],
    *,
    views: bool,
) -> str | None:
    pos = 0
    count, pos = _scanned_value(fh, pos, found, name)
    if type(count) is not int or not 0 <= count <= size:
        return "does not start with a count of records"
    for _ in range(count):
        args, end = _scanned_value(fh, pos, found, name)
        after = skip(args, end)
        if after is None or after > size:
            return "holds a record that cannot be walked past"
        pos = after
    if views:
        _scanned_value(fh, pos, found, name)
    return None


def _scanned_value(
    fh: IO[bytes], pos: int, found: list[tuple[str, PickleGlobals]], name: str
) -> tuple[Any, int]:
    """Scan the pickle at ``pos`` (recorded in ``found``), then read its value with the restricted
    unpickler: (value, end), the value None when it names anything but data and storage classes."""
    scanned = scan_globals(fh, pos)
    found.append((name, scanned))
    fh.seek(pos)
    data = fh.read(scanned.end - pos)
    try:
        value, _ = unpickle(data, Path(name), TorchResolver((), _no_storages))
    except (CkptError, PickleError):
        value = None
    return value, scanned.end


_TAR_WALKERS: dict[str, Callable[[IO[bytes], int, list[tuple[str, PickleGlobals]], str], str | None]] = {
    "sys_info": _walk_one,
    "storages": _walk_tar_storages,
    "tensors": _walk_tar_tensors,
    "pickle": _walk_one,
}
