"""The torch.save zip format: a torch-free reader (records, no tensor data read) and writer.

A torch.save file is a zip (members stored, not compressed) holding ``<archive>/data.pkl``
-- the object pickled with protocol 2, tensors as ``torch._utils._rebuild_tensor_v2``
calls whose storages are persistent ids ``('storage', FloatStorage, key, location,
numel)`` -- and one member ``<archive>/data/<key>`` per storage, aligned to 64 bytes.
The reader runs data.pkl through the restricted unpickler (:mod:`ckptsurgeon.pickling.pickles`)
with :class:`TorchResolver`, which turns each tensor into a :class:`TensorRecord`
pointing at its member's bytes in the file. The writer is
:mod:`ckptsurgeon.formats._torchwriter`.
"""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.record import Storage
from ..errors import FormatError
from ..fileio.progress import Bar, progress_bar
from ..fileio.spans import CHUNK_SIZE, expect_crc, file_identity
from . import archive_prefix
from ._fulltrust import read_unsafe
from ._torchpickle import (
    StorageSlot,
    TorchResolver,
    check_tree,
    locations_note,
    unpickle,
    zip_storage_slot,
)
from .zipio import check_names, open_checked, read_directory, read_stored

if TYPE_CHECKING:  # pragma: no cover
    from ..core.checkpoint import Checkpoint
    from . import ReadOptions


# -- the zip reader -------------------------------------------------------------------------
def read(path: Path, options: ReadOptions) -> Checkpoint:
    """Open a torch.save zip checkpoint as records, reading no tensor data.

    Example:
        >>> ckpt = read(Path("fixtures/real/tinynet_compiled.pth"), ReadOptions())  # doctest: +SKIP
        >>> ckpt.weights().tensors["_orig_mod.fc.weight"].shape                     # doctest: +SKIP
        (6, 32)
    """
    from ..core.checkpoint import Checkpoint

    if options.unsafe:
        return read_unsafe(path, "torch-zip")
    file_size = os.path.getsize(path)
    infos, prefix, data, byteorder = _open_archive(path, file_size, options)
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


def data_pickle(path: Path) -> bytes:
    """The bytes of the ``data.pkl`` the reader unpickles: the same choice of member as
    :func:`read` makes (tests compare it with zipfile's and torch's choice).

    Example:
        >>> data_pickle(Path("fixtures/vgg_1000.pth"))[:2]
        b'\\x80\\x02'
    """
    from . import ReadOptions

    return _open_archive(path, os.path.getsize(path), ReadOptions())[2]


def _open_archive(path: Path, file_size: int, options: ReadOptions) -> tuple[dict[str, Any], str, bytes, str]:
    """(members by name, archive prefix, data.pkl, byte order), by the fast way for a plain
    archive, else through zipfile (which also checks every CRC with ``options.check``)."""
    fast = None if options.check else _read_plain(path, file_size)
    if fast is not None:
        return fast
    with open_zip(path) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        prefix = archive_prefix(path, list(infos))
        data = read_member(zf, path, prefix + "data.pkl")
        byteorder = (
            read_member(zf, path, prefix + "byteorder").decode("ascii", "replace").strip()
            if prefix + "byteorder" in infos
            else "little"
        )
        if options.check:
            verify_crcs(zf, path, progress=options.progress)
    return infos, prefix, data, byteorder


def _read_plain(path: Path, file_size: int) -> tuple[dict[str, Any], str, bytes, str] | None:
    """The fast way in for a plain archive whose data.pkl and byteorder pass their CRC:
    (members, archive prefix, data.pkl, byte order). None sends the caller to zipfile,
    which reads anything else and names what is wrong."""
    infos = read_directory(path, file_size)
    if infos is None or not file_size:
        return None
    check_names(path, list(infos))
    prefix = archive_prefix(path, list(infos))
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as headers:
        data = read_stored(path, headers, infos[prefix + "data.pkl"])
        order = infos.get(prefix + "byteorder")
        raw = read_stored(path, headers, order) if order is not None else b"little"
    if data is None or raw is None:
        return None
    return infos, prefix, data, raw.decode("ascii", "replace").strip()


def open_zip(path: Path) -> zipfile.ZipFile:
    """Open a zip archive; a damaged, truncated or ambiguous one is a one-line FormatError."""
    return open_checked(path)


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


# A compressed member (torch.save never compresses; a re-zipped checkpoint may) is inflated whole
# only when it is small or inflates less than this many times: a 1 MiB data.pkl of zeros can
# declare 1 GiB.
INFLATE_LIMIT = 100
INFLATE_FREE = 16 << 20


def read_member(zf: zipfile.ZipFile, path: Path, name: str) -> bytes:
    """A member's bytes, or a FormatError naming it (missing, damaged, or a zip bomb).

    Example:
        >>> with open_zip(Path("model.pth")) as zf:                    # doctest: +SKIP
        ...     read_member(zf, Path("model.pth"), "archive/data.pkl")[:2]
        b'\\x80\\x02'
    """
    try:
        _check_inflation(path, zf.getinfo(name))
        return zf.read(name)
    except KeyError:
        raise FormatError(f"{path}: the archive has no {name}; the file is damaged") from None
    except MEMBER_ERRORS as exc:
        raise FormatError(
            f"{path}: member {name} cannot be read ({_detail(exc)}); the file is damaged"
        ) from None


def verify_crcs(zf: zipfile.ZipFile, path: Path, *, progress: bool | None = None) -> None:
    """Read every member through zipfile, which checks its CRC-32; name the first bad one.

    ``progress``: a bar on stderr over the members' bytes (default: on a TTY, for a big file).

    Example:
        >>> with open_zip(Path("model.pth")) as zf:                    # doctest: +SKIP
        ...     verify_crcs(zf, Path("model.pth"))
    """
    infos = zf.infolist()
    total = sum(info.file_size for info in infos)
    with progress_bar(total, progress, f"checking {path.name}") as bar:
        for info in infos:
            _verify_member(zf, path, info, bar)


def _verify_member(zf: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo, bar: Bar | None) -> None:
    _check_inflation(path, info)
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(CHUNK_SIZE):
                if bar is not None:
                    bar.update(len(chunk))
    except MEMBER_ERRORS as exc:
        detail = _detail(exc)
        raise FormatError(
            f"{path}: member {info.filename} fails its check ({detail}); the file is damaged, fetch it again"
        ) from None


def _detail(exc: BaseException) -> str:
    """An exception's message on one line, at most 100 characters (its class when it has none)."""
    return " ".join(str(exc).split())[:100] or exc.__class__.__name__


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
        self.member_of = f"{path}: member "  # how an expected CRC names its member
        # Local headers are read through a map of the file: no syscall per storage, no data read.
        with open(path, "rb") as fh:
            self.headers = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if file_size else b""

    def close(self) -> None:
        if isinstance(self.headers, mmap.mmap):
            self.headers.close()

    def slot(self, pid: tuple) -> StorageSlot:
        return zip_storage_slot(self.slots, pid, self._open)

    def _open(self, slot: StorageSlot, dtype: str) -> Storage:
        key = "data/" + slot.key
        name = self.prefix + key
        info = self.infos.get(name)
        nbytes = slot.nbytes
        path: Path | None = self.path
        offset, loader, problem = 0, None, None
        if info is None:
            problem = f"its storage {name} is missing from the archive; the file is damaged"
        elif info.compress_type != zipfile.ZIP_STORED:
            path, loader = None, lambda p=self.path, n=name: _read_member(p, n)
            inflation = inflation_problem(info, self.file_size)
            if inflation:
                problem = f"its storage {name} {inflation}"
        else:
            offset, size = self._data_offset(info), info.file_size
            if offset + size > self.file_size:
                problem = f"its storage {name} runs past the end of the file; the file is truncated"
            else:  # streamed whole (convert, verify), its CRC is checked for free
                expect_crc(self.identity or self._identity(), offset, size, info.CRC, self.member_of + name)
        if info is not None and info.file_size < nbytes:
            size = info.file_size
            problem = f"its storage {name} holds {size} bytes but declares {nbytes}; the file is damaged"
        storage = Storage(key, dtype, nbytes, path, offset, slot.location, self.byteorder, loader)
        if problem:
            self.problems[id(storage)] = problem
        return storage

    def _identity(self) -> tuple[int, ...]:
        if self.identity is None:
            self.identity = file_identity(self.path)
        return self.identity

    def _data_offset(self, info: Any) -> int:
        at = info.header_offset
        try:
            magic, name_len, extra_len = _LOCAL_START.unpack_from(self.headers, at)
        except struct.error:
            raise FormatError(
                f"{self.path}: member {info.filename} lies past the end of the file; truncated"
            ) from None
        if magic != b"PK\x03\x04":
            raise FormatError(
                f"{self.path}: member {info.filename} has no valid local header; the file is damaged"
            )
        central = getattr(info, "orig_filename", info.filename)
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"  # as zipfile decodes names
        if self.headers[at + 30 : at + 30 + name_len] != central.encode(encoding, "replace"):
            raise FormatError(
                f"{self.path}: an ambiguous zip archive: the local header of member {info.filename} "
                "names another file than the central directory; refusing to read it"
            )
        return at + 30 + name_len + extra_len


# A local file header's signature and the two lengths before its data (name, extra field).
_LOCAL_START = struct.Struct("<4s22xHH")


def _read_member(path: Path, name: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        _check_inflation(path, zf.getinfo(name))
        return zf.read(name)


def _check_inflation(path: Path, info: zipfile.ZipInfo) -> None:
    if info.compress_type == zipfile.ZIP_STORED:  # as torch.save writes every member: no stat needed
        return
    problem = inflation_problem(info, os.path.getsize(path))
    if problem:
        raise FormatError(f"{path}: member {info.filename} {problem}")


def inflation_problem(info: zipfile.ZipInfo, archive_size: int | None = None) -> str | None:
    """What is wrong with a compressed member that would inflate past ``INFLATE_FREE`` bytes and
    more than ``INFLATE_LIMIT`` times its size on disk (zipfile never returns more than the
    declared size), or None.

    Example:
        >>> info = zipfile.ZipInfo("archive/data.pkl")
        >>> info.compress_type, info.compress_size, info.file_size = zipfile.ZIP_DEFLATED, 1 << 10, 1 << 30
        >>> inflation_problem(info)
        'inflates from 1,024 to 1,073,741,824 bytes (over 100 times); a zip bomb, not a checkpoint'
    """
    if info.compress_type == zipfile.ZIP_STORED or info.file_size <= INFLATE_FREE:
        return None
    # the directory's compressed size is the file's word: no member is bigger than the archive
    packed = info.compress_size if archive_size is None else min(info.compress_size, archive_size)
    if info.file_size <= INFLATE_LIMIT * max(packed, 1):
        return None
    return (
        f"inflates from {packed:,} to {info.file_size:,} bytes "
        f"(over {INFLATE_LIMIT} times); a zip bomb, not a checkpoint"
    )


__all__ = ["MEMBER_ERRORS", "open_zip", "read", "read_member", "verify_crcs"]
