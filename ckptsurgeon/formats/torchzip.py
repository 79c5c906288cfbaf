"""The torch.save zip format: a torch-free reader (records, no tensor data read) and writer.

A torch.save file is a zip (members stored, not compressed) holding ``<archive>/data.pkl``
-- the object pickled with protocol 2, tensors as ``torch._utils._rebuild_tensor_v2``
calls whose storages are persistent ids ``('storage', FloatStorage, key, location,
numel)`` -- and one member ``<archive>/data/<key>`` per storage, aligned to 64 bytes.
The reader runs data.pkl through the restricted unpickler (:mod:`ckptsurgeon.pickles`)
with :class:`TorchResolver`, which turns each tensor into a :class:`TensorRecord`
pointing at its member's bytes in the file.
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..dtypes import DTYPES
from ..errors import FormatError, OutputError
from ..pickles import Emitter, PickleError
from ..record import (
    CHUNK_SIZE,
    COPY_CHUNK,
    FileSpan,
    Storage,
    TensorRecord,
    contiguous_stride,
    expect_crc,
    file_identity,
)
from ..safety import GlobalRef
from .legacy import (
    StorageSlot,
    TorchResolver,
    check_tree,
    locations_note,
    read_unsafe,
    storage_dtype,
    unpickle,
)
from .zipio import ZipWriter, read_directory, read_stored

if TYPE_CHECKING:  # pragma: no cover
    from ..checkpoint import Checkpoint
    from . import ReadOptions

ALIGNMENT = 64
SMALL_MEMBER = COPY_CHUNK  # storages up to this size are read in one call, CRC'd and written at once


# -- the zip reader -------------------------------------------------------------------------
def read(path: Path, options: ReadOptions) -> Checkpoint:
    """Open a torch.save zip checkpoint as records, reading no tensor data.

    Example:
        >>> ckpt = read(Path("fixtures/real/tinynet_compiled.pth"), ReadOptions())  # doctest: +SKIP
        >>> ckpt.weights().tensors["_orig_mod.fc.weight"].shape                     # doctest: +SKIP
        (6, 32)
    """
    from ..checkpoint import Checkpoint

    if options.unsafe:
        return read_unsafe(path, "torch-zip")
    file_size = os.path.getsize(path)
    fast = None if options.check else _read_plain(path, file_size)
    if fast is not None:
        infos, prefix, data, byteorder = fast
    else:
        with open_zip(path) as zf:
            infos = {info.filename: info for info in zf.infolist()}
            prefix = _archive_prefix(path, infos)
            data = _member(zf, path, prefix + "data.pkl")
            byteorder = (
                _member(zf, path, prefix + "byteorder").decode("ascii", "replace").strip()
                if prefix + "byteorder" in infos
                else "little"
            )
            if options.check:
                verify_crcs(zf, path)
    if byteorder not in ("little", "big"):
        raise FormatError(f"{path}: unknown byte order {byteorder!r} in the archive; the file is damaged")
    storages = _ZipStorages(path, prefix, infos, byteorder, file_size)
    resolver = TorchResolver(options.allow_globals, storages.slot)
    try:
        tree, _ = unpickle(data, path, resolver)
    finally:
        storages.close()
    check_tree(tree, path, storages.problems)
    extra_pickles = [n for n in infos if n.endswith(".pkl") and n != prefix + "data.pkl"]
    notes = locations_note(storages.slots.values())
    if extra_pickles:
        notes.append(f"the archive also holds {', '.join(extra_pickles)} (not read)")
    if options.check:
        notes.append(f"checked: the CRC-32 of all {len(infos)} archive members matches")
    return Checkpoint(
        path=path,
        format="torch-zip",
        tree=tree,
        files=(path,),
        file_size=file_size,
        metadata={"archive": prefix.rstrip("/"), "byteorder": byteorder},
        notes=notes,
        globals_used=tuple(sorted(resolver.used)),
    )


def _read_plain(path: Path, file_size: int) -> tuple[dict[str, Any], str, bytes, str] | None:
    """The fast way in for a plain archive whose data.pkl and byteorder pass their CRC:
    (members, archive prefix, data.pkl, byte order). None sends the caller to zipfile,
    which reads anything else and names what is wrong."""
    infos = read_directory(path, file_size)
    if infos is None or not file_size:
        return None
    prefix = _archive_prefix(path, infos)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as headers:
        data = read_stored(path, headers, infos[prefix + "data.pkl"])
        order = infos.get(prefix + "byteorder")
        raw = read_stored(path, headers, order) if order is not None else b"little"
    if data is None or raw is None:
        return None
    return infos, prefix, data, raw.decode("ascii", "replace").strip()


def open_zip(path: Path) -> zipfile.ZipFile:
    """Open a zip archive; a damaged or truncated one is a one-line FormatError."""
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise FormatError(
            f"{path}: a truncated or damaged zip archive (no readable central directory); "
            "the download or save did not finish, fetch or save it again"
        ) from None
    except (OSError, ValueError, EOFError, struct.error, NotImplementedError) as exc:
        raise FormatError(
            f"{path}: a damaged zip archive ({exc.__class__.__name__}); fetch or save it again"
        ) from None


def _archive_prefix(path: Path, infos: dict[str, Any]) -> str:
    found = [n for n in infos if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if not found:
        raise FormatError(
            f"{path}: a zip archive without data.pkl: not a torch.save checkpoint (or a damaged one)"
        )
    return min(found, key=len)[: -len("data.pkl")]


# What zipfile raises for a damaged member: bad headers, truncation, encryption, bad deflate data.
MEMBER_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    EOFError,
    ValueError,
    struct.error,
    NotImplementedError,
    RuntimeError,  # zipfile: an encrypted member
    zlib.error,
)


def _member(zf: zipfile.ZipFile, path: Path, name: str) -> bytes:
    try:
        return zf.read(name)
    except KeyError:
        raise FormatError(f"{path}: the archive has no {name}; the file is damaged") from None
    except MEMBER_ERRORS as exc:
        detail = " ".join(str(exc).split())[:100]
        raise FormatError(f"{path}: member {name} cannot be read ({detail}); the file is damaged") from None


def verify_crcs(zf: zipfile.ZipFile, path: Path) -> None:
    """Read every member through zipfile, which checks its CRC-32; name the first bad one."""
    for info in zf.infolist():
        try:
            with zf.open(info) as fh:
                while fh.read(CHUNK_SIZE):
                    pass
        except MEMBER_ERRORS as exc:
            detail = " ".join(str(exc).split())[:100]
            raise FormatError(
                f"{path}: member {info.filename} fails its check ({detail}); "
                "the file is damaged, fetch it again"
            ) from None


class _ZipStorages:
    """Maps persistent ids to storages: the member's data span in the file (or a zip loader)."""

    def __init__(
        self, path: Path, prefix: str, infos: dict[str, Any], byteorder: str, file_size: int
    ) -> None:
        self.path, self.prefix, self.infos = path, prefix, infos
        self.byteorder, self.file_size = byteorder, file_size
        self.slots: dict[str, StorageSlot] = {}
        self.problems: dict[int, str] = {}
        self.identity: tuple[int, ...] | None = None
        # Local headers are read through a map of the file: no syscall per storage, no data read.
        with open(path, "rb") as fh:
            self.headers = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if file_size else b""

    def close(self) -> None:
        if isinstance(self.headers, mmap.mmap):
            self.headers.close()

    def slot(self, pid: tuple) -> StorageSlot:
        if len(pid) < 5 or not isinstance(pid[1], GlobalRef) or pid[1].extra is None:
            raise PickleError(f"malformed pickle (storage id {str(pid)[:60]})")
        key, location, numel = str(pid[2]), str(pid[3]), pid[4]
        if type(numel) is not int or numel < 0:
            raise PickleError(f"malformed pickle (storage {key} has size {numel!r})")
        found = self.slots.get(key)
        if found is None:
            dtype = storage_dtype(pid[1])
            found = self.slots[key] = StorageSlot(key, dtype, numel, location, self._open)
        return found

    def _open(self, slot: StorageSlot, dtype: str) -> Storage:
        name = f"{self.prefix}data/{slot.key}"
        info = self.infos.get(name)
        path: Path | None = self.path
        offset, loader, problem = 0, None, None
        if info is None:
            problem = f"its storage {name} is missing from the archive; the file is damaged"
        elif info.compress_type != zipfile.ZIP_STORED:
            path, loader = None, lambda p=self.path, n=name: _read_member(p, n)
        else:
            offset = self._data_offset(info)
            if offset + info.file_size > self.file_size:
                problem = f"its storage {name} runs past the end of the file; the file is truncated"
            else:  # streamed whole (convert, verify), its CRC is checked for free
                expect_crc(self._identity(), offset, info.file_size, info.CRC, f"{self.path}: member {name}")
        if info is not None and info.file_size < slot.nbytes:
            size = info.file_size
            problem = f"its storage {name} holds {size} bytes but declares {slot.nbytes}; the file is damaged"
        storage = Storage(
            f"data/{slot.key}", dtype, slot.nbytes, path, offset, slot.location, self.byteorder, loader
        )
        if problem:
            self.problems[id(storage)] = problem
        return storage

    def _identity(self) -> tuple[int, ...]:
        if self.identity is None:
            self.identity = file_identity(self.path)
        return self.identity

    def _data_offset(self, info: Any) -> int:
        header = self.headers[info.header_offset : info.header_offset + 30]
        if len(header) < 30:
            raise FormatError(f"{self.path}: member {info.filename} lies past the end of the file; truncated")
        if header[:4] != b"PK\x03\x04":
            raise FormatError(
                f"{self.path}: member {info.filename} has no valid local header; the file is damaged"
            )
        name_len, extra_len = struct.unpack_from("<HH", header, 26)
        return info.header_offset + 30 + name_len + extra_len


def _read_member(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(name)


# -- the zip writer -------------------------------------------------------------------------
def write(tree: Any, fh: BinaryIO, archive_name: str = "archive") -> None:
    """Write ``tree`` (records in place of tensors) as a torch.save zip, streaming tensor bytes.

    ``torch.load(weights_only=True)`` loads the result. Records sharing a storage share it in
    the file; every other tensor is written as its own contiguous bytes.

    Example:
        >>> with atomic_output("out.pth") as fh:          # doctest: +SKIP
        ...     write({"w": record}, fh)
    """
    plan = StoragePlan(tree)
    emitter = Emitter(hook=plan.emit)
    try:
        emitter.dump(tree)
    except (TypeError, RecursionError) as exc:
        raise OutputError(f"cannot write this object as a checkpoint: {exc}") from None
    prefix = archive_name.strip("/") + "/"
    zw = ZipWriter(fh, ALIGNMENT)
    zw.add(prefix + "data.pkl", emitter.out)
    zw.add(prefix + ".format_version", b"1")
    zw.add(prefix + ".storage_alignment", str(ALIGNMENT).encode())
    zw.add(prefix + "byteorder", b"little")
    for key, nbytes, chunks in plan.jobs():
        name = f"{prefix}data/{key}"
        try:
            _write_storage(zw, name, nbytes, chunks)
        except EOFError:
            raise OutputError(f"{name}: the source file ends inside this storage; it is truncated") from None
    zw.add(prefix + "version", b"3\n")
    zw.close()


def _write_storage(zw: ZipWriter, name: str, nbytes: int, chunks: Iterable[bytes | memoryview]) -> None:
    """One storage member: a small file span read at once, a big one copied by the kernel when
    its CRC is known (see :func:`~ckptsurgeon.record.kernel_copies`), anything else streamed."""
    if not isinstance(chunks, FileSpan):
        zw.add_stream(name, nbytes, chunks)
        return
    if nbytes <= SMALL_MEMBER:
        data, crc = chunks.read()
        zw.add(name, data, align=True, crc=crc)
        return
    crc = chunks.kernel_crc()
    if crc is not None:
        zw.add_copied(name, nbytes, crc, chunks.copy_to)
        return
    chunks.remember_crc(zw.add_stream(name, nbytes, chunks))  # verification need not read it again


def iter_storage(storage: Storage, nbytes: int) -> Iterable[bytes | memoryview]:
    """Stream a whole storage's bytes in chunks (a file span through the reused aligned buffer)."""
    if storage.path is not None:
        return FileSpan(storage.path, storage.offset, nbytes)
    return (storage.read(pos, min(CHUNK_SIZE, nbytes - pos)) for pos in range(0, nbytes, CHUNK_SIZE))


def _record_chunks(rec: TensorRecord) -> Iterable[bytes | memoryview]:
    """A record's bytes: views of the reused aligned buffer when raw, else ``iter_bytes``."""
    if rec.is_raw and rec.numel:
        start, length = rec.byte_span
        return FileSpan(rec.storage.path, rec.storage.offset + start, length)  # type: ignore[union-attr,arg-type]
    return rec.iter_bytes()


class StoragePlan:
    """Decides each record's storage entry while data.pkl is emitted, then streams the bytes.

    A storage viewed by several records is written whole, once (views keep their offsets
    and strides); any other record is written as its own contiguous bytes.
    """

    def __init__(self, tree: Any) -> None:
        self.groups: dict[int, list[TensorRecord]] = {}
        _collect_records(tree, self.groups, set())
        self.shared: dict[int, str] = {}
        self._jobs: list[tuple[str, int, Callable[[], Iterable[bytes | memoryview]]]] = []

    def jobs(self) -> Iterator[tuple[str, int, Iterable[bytes | memoryview]]]:
        for key, nbytes, chunks in self._jobs:
            yield key, nbytes, chunks()

    def emit(self, em: Emitter, rec: Any) -> bool:
        """The Emitter hook: write a record as torch does (``_rebuild_tensor_v2`` / ``_v3``)."""
        if not isinstance(rec, TensorRecord):
            return False
        if not rec.has_data:
            raise OutputError(f"tensor {rec.name or '<unnamed>'}: has no data (built on the meta device)")
        if rec.dtype not in DTYPES:
            raise OutputError(
                f"tensor {rec.name or '<unnamed>'}: dtype {rec.dtype} cannot be written to a .pth"
            )
        if rec.is_parameter:
            em.save_global("torch._utils", "_rebuild_parameter")
        self._emit_tensor(em, rec)
        if rec.is_parameter:
            em.save(rec.requires_grad)
            em.save_reduce("collections", "OrderedDict", (), None)
            em.out += b"\x87R"
        em.put(rec)
        return True

    def _emit_tensor(self, em: Emitter, rec: TensorRecord) -> None:
        """``_rebuild_tensor_v2((storage id), offset, shape, stride, requires_grad, OrderedDict())``,
        with the constant parts as ready-made bytes (20,000 tensors are 20,000 of these)."""
        key, nbytes, offset, stride = self._place(rec)
        storage_class = DTYPES[rec.dtype].storage_class
        em.save_global("torch._utils", "_rebuild_tensor_v2" if storage_class else "_rebuild_tensor_v3")
        em.out += b"((" + _STORAGE_STR
        if storage_class:
            em.save_global("torch", storage_class)
        else:
            em.save_global("torch.storage", "UntypedStorage")
        em.save_str(key)
        em.out += _CPU_STR
        em.save_int(nbytes // rec.itemsize if storage_class else nbytes)
        em.out += b"tQ"
        em.save_int(offset)
        _save_ints(em, rec.shape)
        _save_ints(em, stride)
        em.out += b"\x88" if rec.requires_grad and not rec.is_parameter else b"\x89"
        em.save_global("collections", "OrderedDict")
        em.out += b")R"  # OrderedDict(): the backward hooks
        if not storage_class:
            em.save_global("torch", rec.dtype)
        em.out += b"tR"

    def _place(self, rec: TensorRecord) -> tuple[str, int, int, tuple[int, ...]]:
        storage = rec.storage
        if storage is not None and self._share_whole(storage):
            key = self.shared.get(id(storage))
            if key is None:
                key = self.shared[id(storage)] = self._add_job(
                    storage.nbytes, lambda s=storage: iter_storage(s, s.nbytes)
                )
            return key, storage.nbytes, rec.storage_offset, rec.stride or contiguous_stride(rec.shape)
        key = self._add_job(rec.nbytes, lambda r=rec: _record_chunks(r))
        return key, rec.nbytes, 0, contiguous_stride(rec.shape)

    def _share_whole(self, storage: Storage) -> bool:
        group = self.groups.get(id(storage), [])
        if (
            len(group) < 2
            or storage.byteorder != "little"
            or (storage.path is None and storage.loader is None)
        ):
            return False
        dtype = group[0].dtype
        return (
            all(r.dtype == dtype and r.loader is None for r in group)
            and storage.nbytes % group[0].itemsize == 0
        )

    def _add_job(self, nbytes: int, chunks: Callable[[], Iterable[bytes | memoryview]]) -> str:
        key = str(len(self._jobs))
        self._jobs.append((key, nbytes, chunks))
        return key


_STORAGE_STR = b"X\x07\x00\x00\x00storage"
_CPU_STR = b"X\x03\x00\x00\x00cpu"
_TUPLE_OPS = (b")", b"\x85", b"\x86", b"\x87")


def _save_ints(em: Emitter, values: tuple[int, ...]) -> None:
    """A tuple of ints (a shape or a stride), not memoised: nothing refers to it again."""
    out = em.out
    if len(values) > 3:
        out += b"("
    for value in values:
        if 0 <= value < 256:
            out += b"K" + bytes((value,))
        else:
            em.save_int(value)
    out += _TUPLE_OPS[len(values)] if len(values) <= 3 else b"t"


def _collect_records(node: Any, groups: dict[int, list[TensorRecord]], seen: set[int]) -> None:
    if id(node) in seen:
        return
    if isinstance(node, TensorRecord):
        seen.add(id(node))
        if node.storage is not None:
            groups.setdefault(id(node.storage), []).append(node)
        return
    if isinstance(node, dict):
        children: Iterable[Any] = [*node.keys(), *node.values()]
    elif isinstance(node, list | tuple | set | frozenset):
        children = node
    elif hasattr(node, "__ckpt_reduce__") or hasattr(node, "__dict__"):
        children = [
            getattr(node, "args", ()),
            getattr(node, "state", None),
            getattr(node, "listitems", ()),
            getattr(node, "dictitems", ()),
            *(vars(node).values() if type(node).__name__ == "Namespace" else ()),
        ]
    else:
        return
    seen.add(id(node))
    for child in children:
        _collect_records(child, groups, seen)
