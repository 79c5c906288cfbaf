"""The torch.save zip writer: records in, a zip ``torch.load(weights_only=True)`` reads out.

data.pkl is emitted as torch writes it (``_rebuild_tensor_v2`` / ``_v3`` calls on persistent
storage ids), then one stored, 64-byte aligned member per storage, streamed from where the
records' bytes lie: small file spans lying close together are read in one call, big ones
copied without a CRC pass when the source archive vouches for their CRC, anything else
streamed in chunks and checksummed.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..core.dtypes import DTYPES
from ..core.record import Storage, TensorRecord, contiguous_stride
from ..errors import OutputError
from ..fileio.spans import CHUNK_SIZE, COPY_CHUNK, FileSpan, file_identity, pread_exact, remember_span_crc
from ..pickling.emitter import Emitter
from .zipio import ZipWriter

ALIGNMENT = 64
SMALL_MEMBER = COPY_CHUNK  # storages up to this size are read in one call, CRC'd and written at once


def write_file(tree: Any, fh: BinaryIO, output: Path) -> None:
    """:func:`write` into ``fh``, the archive folder named after ``output`` as torch.save names it.

    The one-file writer of :data:`ckptsurgeon.formats.WRITERS` (``"pth"``).

    Example:
        >>> with atomic_output("model.pth") as fh:          # doctest: +SKIP
        ...     write_file({"w": record}, fh, Path("model.pth"))   # members model/data.pkl ...
    """
    write(tree, fh, archive_name=archive_name_for(output))


def archive_name_for(output: Path) -> str:
    """The archive folder torch.save would use for ``output``: its stem, if an identifier.

    Example:
        >>> archive_name_for(Path("resnet.best.pth")), archive_name_for(Path("my-model.pth"))
        ('resnet', 'archive')
    """
    stem = output.name.split(".", 1)[0]
    return stem if stem.isidentifier() else "archive"


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
        raise unwritable(tree, exc) from None
    prefix = archive_name.strip("/") + "/"
    zw = ZipWriter(fh, ALIGNMENT)
    zw.add(prefix + "data.pkl", emitter.out)
    zw.add(prefix + ".format_version", b"1")
    zw.add(prefix + ".storage_alignment", str(ALIGNMENT).encode())
    zw.add(prefix + "byteorder", b"little")
    _write_storages(zw, prefix, plan.jobs())
    zw.add(prefix + "version", b"3\n")
    zw.close()


def unwritable(tree: Any, exc: BaseException) -> OutputError:
    """The one-line error for a tree the pickle writer refused: which top-level entry, what in
    it, and ``--weights-only`` (which writes the weights without the other entries).

    Example:
        >>> error = unwritable({"config": object()}, TypeError("cannot write a builtins.object"))
        >>> print(error.message.split(" (")[0])
        cannot write entry 'config' to a .pth: cannot write a builtins.object
    """
    what = "it is nested too deeply" if isinstance(exc, RecursionError) else str(exc)
    entry = _unwritable_entry(tree)
    where = f"entry {entry!r}" if entry is not None else "this checkpoint"
    return OutputError(
        f"cannot write {where} to a .pth: {what} (only data ckpt reads without running code can be "
        "written back); pass --weights-only to write the weights without it"
    )


def _unwritable_entry(tree: Any) -> str | None:
    """The first top-level entry of a dict ``tree`` the pickle writer refuses, if one is."""
    if not isinstance(tree, dict):
        return None
    for key, value in tree.items():
        probe = Emitter(hook=lambda _em, obj: isinstance(obj, TensorRecord))
        try:
            probe.dump(value)
        except (TypeError, RecursionError):
            return str(key)
    return None


def _write_storages(zw: ZipWriter, prefix: str, jobs: Iterable[tuple[str, int, Any]]) -> None:
    """Every storage member, in order; runs of small file spans lying close together in one
    source file are read in one call (20,000 small tensors are a few dozen reads)."""
    run: list[tuple[str, FileSpan]] = []
    for key, nbytes, chunks in jobs:
        name = f"{prefix}data/{key}"
        if type(chunks) is FileSpan and nbytes <= SMALL_MEMBER:
            if run and not _same_window(run[0][1], chunks):
                _write_run(zw, run)
                run = []
            run.append((name, chunks))
            continue
        if run:
            _write_run(zw, run)
            run = []
        _write_member(zw, name, nbytes, chunks)
    if run:
        _write_run(zw, run)


def _same_window(first: FileSpan, span: FileSpan) -> bool:
    """Whether ``span`` can be read together with the run that starts at ``first``."""
    return (
        first.offset <= span.offset
        and span.offset + span.length - first.offset <= SMALL_MEMBER
        and (span.path is first.path or span.path == first.path)
    )


def _write_run(zw: ZipWriter, run: list[tuple[str, FileSpan]]) -> None:
    """Small members whose bytes lie in one window of one file: one read, then each member
    with its CRC-32 (checked against the source archive's record and remembered, as
    :meth:`FileSpan.read` does)."""
    first = run[0][1]
    if len(run) == 1:
        _write_member(zw, run[0][0], first.length, first)
        return
    start = first.offset
    try:
        window = memoryview(pread_exact(first.path, start, max(s.offset + s.length for _n, s in run) - start))
    except EOFError:  # one by one: the member the file ends in is named
        for name, span in run:
            _write_member(zw, name, span.length, span)
        return
    identity = file_identity(first.path)
    for name, span in run:
        at = span.offset - start
        data = window[at : at + span.length]
        crc = zlib.crc32(data)
        remember_span_crc((*identity, span.offset, span.length), crc)
        zw.add(name, data, align=True, crc=crc)


def _write_member(zw: ZipWriter, name: str, nbytes: int, chunks: Iterable[bytes | memoryview]) -> None:
    try:
        _write_storage(zw, name, nbytes, chunks)
    except EOFError:
        raise OutputError(f"{name}: the source file ends inside this storage; it is truncated") from None


def _write_storage(zw: ZipWriter, name: str, nbytes: int, chunks: Iterable[bytes | memoryview]) -> None:
    """One storage member: a small file span read at once, a big one copied without a CRC pass
    when its CRC is known (see :func:`~ckptsurgeon.fileio.spans.vouched_copies`), anything else streamed."""
    if not isinstance(chunks, FileSpan):
        zw.add_stream(name, nbytes, chunks)
        return
    if nbytes <= SMALL_MEMBER:
        data, crc = chunks.read()
        zw.add(name, data, align=True, crc=crc)
        return
    vouched = chunks.vouched_crc()
    if vouched is not None:
        zw.add_copied(name, nbytes, vouched, chunks.copy_to)
        return
    if chunks.checksummed_elsewhere():
        zw.add_deferred(name, nbytes, chunks.copy_to)  # its CRC comes from a helper, at close
        return
    chunks.remember_crc(zw.add_stream(name, nbytes, chunks))  # verification need not read it again


def iter_storage(storage: Storage, nbytes: int) -> Iterable[bytes | memoryview]:
    """Stream a whole storage's bytes in chunks (a file span through the reused aligned buffer; a
    cast storage converted a chunk at a time)."""
    if storage.path is not None:
        return FileSpan(storage.path, storage.offset, nbytes)
    return (storage.read(pos, min(CHUNK_SIZE, nbytes - pos)) for pos in range(0, nbytes, CHUNK_SIZE))


class StoragePlan:
    """Decides each record's storage entry while data.pkl is emitted, then streams the bytes.

    A storage viewed by several records is written whole, once (views keep their offsets
    and strides); any other record is written as its own contiguous bytes.
    """

    def __init__(self, tree: Any) -> None:
        self.groups: dict[int, list[TensorRecord]] = {}
        _collect_records(tree, self.groups, set())
        self.viewed = {key for key, group in self.groups.items() if len(group) > 1}  # shared storages
        self.shared: dict[int, str] = {}
        self._jobs: list[tuple[str, int, Iterable[bytes | memoryview]]] = []
        self._parts: dict[str, tuple[bytes, bytes]] = {}

    def jobs(self) -> Iterator[tuple[str, int, Iterable[bytes | memoryview]]]:
        """(member key, size, the bytes: a :class:`FileSpan` or lazy chunks) of every storage."""
        return iter(self._jobs)

    def emit(self, em: Emitter, rec: Any) -> bool:
        """The Emitter hook: write a record as torch does (``_rebuild_tensor_v2`` / ``_v3``)."""
        if not isinstance(rec, TensorRecord):
            return False
        if rec.storage is None and rec.loader is None:
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
        """``_rebuild_tensor_v2((storage id), offset, shape, stride, requires_grad, OrderedDict())``.

        The first tensor of a dtype writes its globals; after that the parts around the
        variable fields are memo references, kept as ready-made bytes (20,000 tensors are
        20,000 of these)."""
        key, count, offset, stride = self._place(rec)
        parts = self._parts.get(rec.dtype)
        if parts is None:
            self._emit_first(em, rec, key, count, offset, stride)
            return
        out = em.out
        out += parts[0]
        em.save_str(key)
        out += _CPU_STR
        em.save_int(count)
        out += b"tQ"
        em.save_int(offset)
        _save_ints(em, rec.shape)
        _save_ints(em, stride)
        out += b"\x88" if rec.requires_grad and not rec.is_parameter else b"\x89"
        out += parts[1]

    def _emit_first(
        self, em: Emitter, rec: TensorRecord, key: str, count: int, offset: int, stride: tuple[int, ...]
    ) -> None:
        """:meth:`_emit_tensor` with its globals written (or referred to) one by one; then the
        constant parts for this dtype are remembered."""
        storage_class = DTYPES[rec.dtype].storage_class
        rebuild = ("torch._utils", "_rebuild_tensor_v2" if storage_class else "_rebuild_tensor_v3")
        storage = ("torch", storage_class) if storage_class else ("torch.storage", "UntypedStorage")
        em.save_global(*rebuild)
        em.out += b"((" + _STORAGE_STR
        em.save_global(*storage)
        em.save_str(key)
        em.out += _CPU_STR
        em.save_int(count)
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
        rebuild_ref, storage_ref = em.global_ref(*rebuild), em.global_ref(*storage)
        hooks_ref = em.global_ref("collections", "OrderedDict")
        dtype_ref = em.global_ref("torch", rec.dtype) if not storage_class else b""
        if (
            rebuild_ref is not None
            and storage_ref is not None
            and hooks_ref is not None
            and dtype_ref is not None
        ):
            head = rebuild_ref + b"((" + _STORAGE_STR + storage_ref
            self._parts[rec.dtype] = (head, hooks_ref + b")R" + dtype_ref + b"tR")

    def _place(self, rec: TensorRecord) -> tuple[str, int, int, tuple[int, ...]]:
        """(storage key, its size in storage elements, the record's offset, stride) in the output."""
        storage = rec.storage
        if storage is not None and id(storage) in self.viewed and self._share_whole(storage):
            key = self.shared.get(id(storage))
            if key is None:
                key = self.shared[id(storage)] = self._add_job(
                    storage.nbytes, iter_storage(storage, storage.nbytes)
                )
            count = storage.nbytes // rec.itemsize if DTYPES[rec.dtype].storage_class else storage.nbytes
            return key, count, rec.storage_offset, rec.stride or contiguous_stride(rec.shape)
        span = rec.file_span()
        nbytes = rec.nbytes
        key = self._add_job(nbytes, FileSpan(*span) if span is not None else rec.iter_bytes())
        count = math.prod(rec.shape) if DTYPES[rec.dtype].storage_class else nbytes
        return key, count, 0, contiguous_stride(rec.shape)

    def _share_whole(self, storage: Storage) -> bool:
        group = self.groups.get(id(storage), [])
        if len(group) < 2 or storage.byteorder != "little" or not storage.has_data:
            return False
        dtype = group[0].dtype
        return (
            all(r.dtype == dtype and r.loader is None for r in group)
            and storage.nbytes % group[0].itemsize == 0
        )

    def _add_job(self, nbytes: int, chunks: Iterable[bytes | memoryview]) -> str:
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
