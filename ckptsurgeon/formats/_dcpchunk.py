"""One chunk of a DCP tensor: a ``torch.save`` archive at (offset, length) of a ``.distcp`` file.

torch's ``FileSystemReader`` hands that byte range to ``torch.load(weights_only=True)``. Here it is
opened with :mod:`zipfile` through a window on the file, checked as the torch zip reader checks a
whole file (member names, bytes before the archive, stored members only), and its ``data.pkl`` run
through the restricted unpickler: the result is a :class:`TensorRecord` whose storage is a span of
the ``.distcp`` file itself (no copy, no torch).
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..core.record import Storage, TensorRecord
from ..errors import FormatError
from ..fileio.spans import expect_crc, file_identity
from . import archive_prefix
from ._torchpickle import StorageSlot, TorchResolver, check_tree, unpickle, zip_storage_slot
from .zipio import name_problem, zipfile_end_record

_LOCAL_START = struct.Struct("<4s22xHH")


class FileWindow(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file, as a seekable read-only file."""

    def __init__(self, fh: Any, start: int, length: int) -> None:
        super().__init__()
        self.fh, self.start, self.length, self.pos = fh, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, min(base + offset, self.length))
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.length - self.pos)
        if n <= 0:
            return 0
        self.fh.seek(self.start + self.pos)
        data = self.fh.read(n)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def read_chunk(path: Path, offset: int, length: int) -> TensorRecord:
    """The tensor ``torch.save`` wrote at ``offset`` (``length`` bytes) of ``path``, as a record.

    Example:
        >>> read_chunk(Path("step_1/__0_0.distcp"), 0, 1261).shape     # doctest: +SKIP
        (2, 3)
    """
    label = chunk_label(path, offset, length)
    with open(path, "rb") as fh:
        window = FileWindow(fh, offset, length)
        with _open_chunk(window, label) as (zf, infos, prefix):
            data = _member(zf, label, prefix + "data.pkl")
            order = _member(zf, label, prefix + "byteorder") if prefix + "byteorder" in infos else b"little"
        byteorder = order.decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise FormatError(f"{label}: unknown byte order in the archive; the checkpoint is damaged")
        storages = _ChunkStorages(path, label, prefix, infos, window, byteorder)
        tree, _ = unpickle(data, Path(label), TorchResolver((), storages.slot))
    check_tree(tree, Path(label), storages.problems)
    if not isinstance(tree, TensorRecord):
        raise FormatError(f"{label}: holds no tensor; the checkpoint is damaged")
    return tree


def chunk_label(path: Path, offset: int, length: int) -> str:
    """How messages name one chunk: ``step_1/__0_0.distcp (bytes 1,261+1,024)``."""
    return f"{path} (bytes {offset:,}+{length:,})"


def chunk_pickles(path: Path, offset: int, length: int) -> list[tuple[str, bytes]]:
    """(member name, bytes) of every pickle in the chunk, its ``data.pkl`` (the one torch
    loads) first: what ``ckpt scan`` reads, after the same checks as :func:`read_chunk`.

    Example:
        >>> [name for name, _ in chunk_pickles(Path("step_1/__0_0.distcp"), 0, 1261)]  # doctest: +SKIP
        ['__0_0/data.pkl']
    """
    label = chunk_label(path, offset, length)
    with open(path, "rb") as fh, _open_chunk(FileWindow(fh, offset, length), label) as (zf, infos, prefix):
        main = prefix + "data.pkl"
        others = sorted(name for name in infos if name.lower().endswith(".pkl") and name != main)
        return [(name, _member(zf, label, name)) for name in (main, *others)]


@contextmanager
def _open_chunk(window: FileWindow, label: str) -> Iterator[tuple[zipfile.ZipFile, dict[str, Any], str]]:
    """The chunk as (zip, members by name, archive prefix), checked as a whole torch zip is."""
    try:
        zf = zipfile.ZipFile(window)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError):
        raise FormatError(f"{label}: not a torch.save archive; the checkpoint is damaged") from None
    with zf:
        infos = {info.filename: info for info in zf.infolist()}
        problem = name_problem([info.orig_filename for info in zf.infolist()]) or _layout_problem(zf, window)
        if problem:
            raise FormatError(f"{label}: an ambiguous zip archive: {problem}; refusing to read it")
        yield zf, infos, archive_prefix(Path(label), list(infos))


def _member(zf: zipfile.ZipFile, label: str, name: str) -> bytes:
    try:
        return zf.read(name)  # stored (checked below for storages): the CRC is checked
    except KeyError:
        raise FormatError(f"{label}: the archive has no {name}; the checkpoint is damaged") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:80]
        raise FormatError(
            f"{label}: member {name} cannot be read ({detail}); the checkpoint is damaged"
        ) from None


def _layout_problem(zf: zipfile.ZipFile, window: FileWindow) -> str | None:
    """Bytes before the archive (zipfile skips them, torch does not), compressed members,
    or a directory that miscounts its members."""
    for info in zf.infolist():
        if info.compress_type != zipfile.ZIP_STORED:
            return f"member {info.filename} is compressed (torch.save stores every member)"
    window.seek(0)
    end = zipfile_end_record(window)
    if end is None:
        return "no end of central directory record"
    if end.bytes_before:
        return f"{end.bytes_before} bytes before the archive that its offsets do not count"
    if end.entries_total != len(zf.infolist()):
        return "its end record and its directory count different members"
    return None


class _ChunkStorages:
    """Persistent ids -> storages: each a span of the ``.distcp`` file (its CRC known to the copy)."""

    def __init__(
        self, path: Path, label: str, prefix: str, infos: dict[str, Any], window: FileWindow, byteorder: str
    ) -> None:
        self.path, self.label, self.prefix, self.infos = path, label, prefix, infos
        self.window, self.byteorder = window, byteorder
        self.slots: dict[str, StorageSlot] = {}
        self.problems: dict[int, str] = {}

    def slot(self, pid: tuple) -> StorageSlot:
        return zip_storage_slot(self.slots, pid, self._open)

    def _open(self, slot: StorageSlot, dtype: str) -> Storage:
        name = self.prefix + "data/" + slot.key
        info = self.infos.get(name)
        problem, offset = None, 0
        if info is None:
            problem = f"its storage {name} is missing from the archive; the checkpoint is damaged"
        else:
            at = info.header_offset
            self.window.seek(at)
            head = self.window.read(30)
            if len(head) < 30 or head[:4] != b"PK\x03\x04":
                raise FormatError(
                    f"{self.label}: member {name} has no valid local header; the checkpoint is damaged"
                )
            _magic, name_len, extra_len = _LOCAL_START.unpack(head)
            start = at + 30 + name_len + extra_len
            if start + info.file_size > self.window.length:
                problem = f"its storage {name} runs past the end of the chunk; the checkpoint is damaged"
            elif info.file_size < slot.nbytes:
                problem = f"its storage {name} holds {info.file_size} bytes but declares {slot.nbytes}"
            else:
                offset = self.window.start + start
                expect_crc(
                    file_identity(self.path), offset, info.file_size, info.CRC, f"{self.label}: member {name}"
                )
        storage = Storage(
            "data/" + slot.key, dtype, slot.nbytes, self.path, offset, slot.location, self.byteorder
        )
        if problem:
            self.problems[id(storage)] = problem
        return storage
