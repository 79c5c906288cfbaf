"""The one value type every layer shares: a lazy tensor record.

A :class:`TensorRecord` describes a tensor (dtype, shape, element count, byte size)
and knows where its bytes live (a :class:`Storage`: a span of a file, or a loader),
but reads nothing until asked. Readers build records from headers or restricted
pickles without importing torch; ``inspect`` and ``diff`` work on records alone.
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .dtypes import DTYPES, get_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

CHUNK_SIZE = 8 * 1024 * 1024
# copy_span's step: read and written while still in the CPU cache (8 MiB steps ran up to 3x slower).
COPY_CHUNK = 256 * 1024
# Spans at least this big whose CRC-32 the source archive records may be copied by the kernel
# (copy_file_range) inside a `kernel_copies()` block; smaller ones go through Python.
KERNEL_COPY_MIN = 1 << 20


class _FdCache:
    """A few read-only file descriptors kept open, so 20,000 small reads do not reopen a file."""

    def __init__(self, limit: int = 32) -> None:
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, path: Path) -> int:
        key = os.fspath(path)
        with self._lock:
            fd = self._fds.pop(key, None)
            if fd is None:
                fd = os.open(key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._fds[key] = fd
            while len(self._fds) > self._limit:
                _, old = self._fds.popitem(last=False)
                os.close(old)
            return fd

    def forget(self, path: Path) -> None:
        with self._lock:
            fd = self._fds.pop(os.fspath(path), None)
            if fd is not None:
                os.close(fd)


FD_CACHE = _FdCache()


def pread_exact(path: Path, offset: int, length: int) -> bytes:
    """Read exactly ``length`` bytes at ``offset`` or raise ``EOFError`` (a truncated file)."""
    fd = FD_CACHE.get(path)
    parts: list[bytes] = []
    remaining = length
    pos = offset
    while remaining > 0:
        chunk = os.pread(fd, min(remaining, 1 << 30), pos)
        if not chunk:
            raise EOFError(f"{path}: file ends at byte {pos}, expected {offset + length}")
        parts.append(chunk)
        remaining -= len(chunk)
        pos += len(chunk)
    return b"".join(parts) if len(parts) != 1 else parts[0]


_LOCAL = threading.local()


def aligned_buffer(size: int = CHUNK_SIZE) -> memoryview:
    """A reused, page-aligned buffer for this thread (unaligned buffers make reads several times slower)."""
    buf = getattr(_LOCAL, "buffer", None)
    if buf is None or len(buf) < size:
        buf = memoryview(mmap.mmap(-1, size))
        _LOCAL.buffer = buf
    return buf


def copy_span(path: Path, offset: int, length: int, fh: Any, crc: int | None = 0, hasher: Any = None) -> int:
    """Stream ``length`` bytes at ``offset`` of ``path`` into ``fh`` through the aligned buffer.

    Returns the running CRC-32 (seeded with ``crc``; ``crc=None`` skips it and returns 0);
    feeds ``hasher`` if given. Memory stays at one buffer whatever the size. The CRC of a
    whole span is remembered, so checksumming it again (``fh=None``, verification after a
    write) does not read it a second time.

    Example:
        >>> copy_span(Path("model.safetensors"), 8, 1024, None)   # doctest: +SKIP
        2846725331
    """
    fd = FD_CACHE.get(path)
    key = _span_key(fd, offset, length) if crc == 0 else None
    if fh is None and hasher is None and key in _SPAN_CRCS:
        return _SPAN_CRCS[key]
    for chunk in _read_span(fd, path, offset, length):
        if fh is not None:
            fh.write(chunk)
        if crc is not None:
            crc = zlib.crc32(chunk, crc)
        if hasher is not None:
            hasher.update(chunk)
    if key is not None:
        _remember_crc(key, crc)  # type: ignore[arg-type]
    return crc or 0


@dataclass(frozen=True)
class FileSpan:
    """``length`` bytes at ``offset`` of ``path``, iterated as views of the reused aligned buffer.

    Each view is valid only until the next one is requested: write it out at once. A consumer
    that checksums the bytes anyway (a zip writer) hands the CRC-32 back with
    :meth:`remember_crc`, so verification does not read the span again.

    Example:
        >>> for chunk in FileSpan(Path("model.safetensors"), 8, 1024):   # doctest: +SKIP
        ...     out.write(chunk)
    """

    path: Path
    offset: int
    length: int

    def __iter__(self) -> Iterator[memoryview]:
        return _read_span(FD_CACHE.get(self.path), self.path, self.offset, self.length)

    def remember_crc(self, crc: int) -> None:
        """Record the CRC-32 of the whole span (as :func:`copy_span` would compute it)."""
        _remember_crc(_span_key(FD_CACHE.get(self.path), self.offset, self.length), crc)

    def read(self) -> tuple[bytes, int]:
        """The span's bytes and their CRC-32 (checked against the archive's record, remembered)."""
        fd = FD_CACHE.get(self.path)
        data = pread_exact(self.path, self.offset, self.length)
        crc = zlib.crc32(data)
        _remember_crc(_span_key(fd, self.offset, self.length), crc)
        return data, crc

    def kernel_crc(self) -> int | None:
        """The CRC-32 the kernel copy :meth:`copy_to` will vouch for, or None when it will stream.

        Only inside :func:`kernel_copies`, for spans of at least ``KERNEL_COPY_MIN`` bytes whose
        CRC is known without reading them (recorded by the source archive, or computed before).
        """
        if not getattr(_LOCAL, "kernel", False) or self.length < KERNEL_COPY_MIN:
            return None
        return recorded_crc(self.path, self.offset, self.length)

    def copy_to(self, fh: Any) -> int:
        """Write the span to ``fh``: by the kernel when :meth:`kernel_crc` allows, else streamed
        through the aligned buffer (CRC computed and checked). Returns the span's CRC-32."""
        crc = self.kernel_crc()
        if crc is not None and _copy_file_range(FD_CACHE.get(self.path), self.offset, self.length, fh):
            return crc
        return copy_span(self.path, self.offset, self.length, fh)


@contextlib.contextmanager
def kernel_copies() -> Iterator[None]:
    """Let :meth:`FileSpan.copy_to` copy big spans in the kernel, unread, vouched for by the
    source archive's recorded CRC-32. Use it only when the output is verified afterwards
    (the output's bytes are then checked against that CRC, which catches a damaged source).

    Example:
        >>> with kernel_copies():                                  # doctest: +SKIP
        ...     write(tensors, fh)
    """
    before = getattr(_LOCAL, "kernel", False)
    _LOCAL.kernel = True
    try:
        yield
    finally:
        _LOCAL.kernel = before


def recorded_crc(path: Path, offset: int, length: int) -> int | None:
    """The CRC-32 of a file span known without reading it: computed before, or recorded by its archive.

    Example:
        >>> recorded_crc(Path("model.pth"), 4096, 1024)            # doctest: +SKIP
        2846725331
    """
    key = _span_key(FD_CACHE.get(path), offset, length)
    found = _SPAN_CRCS.get(key)
    if found is not None:
        return found
    expected = _EXPECTED_CRCS.get(key)
    return expected[0] if expected is not None else None


def _copy_file_range(src: int, offset: int, length: int, fh: Any) -> bool:
    """Copy ``length`` bytes at ``offset`` of ``src`` to the end of ``fh`` in the kernel.

    False when the kernel cannot (no copy_file_range, another file system, not a file):
    nothing was written and the caller streams instead.
    """
    try:
        fh.flush()
        dst, pos = fh.fileno(), fh.tell()
    except (AttributeError, OSError, ValueError):
        return False
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(src, dst, length - done, offset + done, pos + done)
        except (AttributeError, OSError) as exc:
            unsupported = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF)
            if done == 0 and getattr(exc, "errno", errno.ENOSYS) in unsupported:
                return False
            raise
        if n == 0:
            raise EOFError(f"file ends at byte {offset + done}, expected {offset + length}")
        done += n
    fh.seek(pos + length)
    advance = getattr(fh, "advance", None)  # a progress counter around the file
    if advance is not None:
        advance(length)
    return True


def _read_span(fd: int, path: Path, offset: int, length: int) -> Iterator[memoryview]:
    buf = aligned_buffer()[:COPY_CHUNK]
    pos, end = offset, offset + length
    while pos < end:
        want = min(COPY_CHUNK, end - pos)
        got = os.preadv(fd, [buf[:want]], pos)
        if got <= 0:
            raise EOFError(f"{path}: file ends at byte {pos}, expected {end}")
        yield buf[:got]
        pos += got


# CRC-32 of whole file spans already streamed, keyed by (device, inode, size, mtime, offset, length).
_SPAN_CRCS: dict[tuple[int, ...], int] = {}
# CRC-32 a span must have (a zip member's recorded CRC), and what to call it when it does not.
_EXPECTED_CRCS: dict[tuple[int, ...], tuple[int, str]] = {}


def file_identity(path: Path) -> tuple[int, ...]:
    """(device, inode, size, mtime) of ``path``: the first half of a span's key."""
    st = os.fstat(FD_CACHE.get(path))
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _span_key(fd: int, offset: int, length: int) -> tuple[int, ...]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, offset, length)


def expect_crc(identity: tuple[int, ...], offset: int, length: int, crc: int, what: str) -> None:
    """Declare the CRC-32 a file span must have (a zip member's): whenever the span is streamed
    whole (converting, verifying), a different CRC raises a one-line FormatError naming ``what``.
    Checking costs nothing extra: the CRC is computed while the bytes are copied anyway."""
    if len(_EXPECTED_CRCS) >= 1_000_000:
        _EXPECTED_CRCS.clear()
    _EXPECTED_CRCS[(*identity, offset, length)] = (crc, what)


def _remember_crc(key: tuple[int, ...], crc: int) -> None:
    expected = _EXPECTED_CRCS.get(key)
    if expected is not None and expected[0] != crc:
        from .errors import FormatError

        raise FormatError(
            f"{expected[1]}: its bytes do not match the CRC-32 recorded in the archive; "
            "the file is damaged (flipped bytes), fetch it again"
        )
    if len(_SPAN_CRCS) >= 1_000_000:
        _SPAN_CRCS.clear()
    _SPAN_CRCS[key] = crc


@dataclass(frozen=True, eq=False)
class Storage:
    """A contiguous run of bytes that one or more tensors view.

    Either ``path`` + ``offset`` locate the bytes in a file (they can be streamed
    without torch), or ``loader`` produces them (formats with no raw span, live tensors).

    Example:
        >>> s = Storage(key="data/0", dtype="float32", nbytes=16, path=None, loader=lambda: bytes(16))
        >>> len(s.read())
        16
    """

    key: str
    dtype: str
    nbytes: int
    path: Path | None = None
    offset: int = 0
    location: str = "cpu"
    byteorder: str = "little"
    loader: Callable[[], bytes] | None = field(default=None, repr=False)

    @property
    def is_raw(self) -> bool:
        """True when the bytes sit in a file span and can be streamed directly."""
        return self.path is not None and self.byteorder == "little"

    def read(self, start: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes from ``start`` (the whole storage by default)."""
        if length is None:
            length = self.nbytes - start
        if start < 0 or length < 0 or start + length > self.nbytes:
            raise ValueError(f"storage {self.key}: read {start}+{length} outside {self.nbytes} bytes")
        if self.path is not None:
            return pread_exact(self.path, self.offset + start, length)
        if self.loader is not None:
            return bytes(memoryview(self.loader())[start : start + length])
        raise ValueError(f"storage {self.key}: no data (built on the meta device)")


@dataclass(frozen=True, eq=False)
class TensorRecord:
    """A tensor described without its data: name, dtype, shape, and where the bytes are.

    ``storage_offset`` and ``stride`` are in elements, as in torch. ``stride=None``
    means contiguous. A record with ``storage=None`` and no ``loader`` has a shape only
    (an architecture built on the meta device).

    Example:
        >>> r = TensorRecord("fc.weight", "float32", (2, 4))
        >>> (r.numel, r.nbytes, r.is_contiguous)
        (8, 32, True)
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    storage: Storage | None = None
    storage_offset: int = 0
    stride: tuple[int, ...] | None = None
    requires_grad: bool = False
    is_parameter: bool = False
    loader: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    # -- what it is -------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize if self.dtype in DTYPES else get_dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def has_data(self) -> bool:
        return self.storage is not None or self.loader is not None

    @property
    def is_contiguous(self) -> bool:
        return self.stride is None or self.stride == contiguous_stride(self.shape) or self.numel <= 1

    @property
    def byte_span(self) -> tuple[int, int]:
        """(start, length) in bytes within the storage, for a contiguous record."""
        return self.storage_offset * self.itemsize, self.nbytes

    @property
    def is_raw(self) -> bool:
        """True when this tensor's bytes are one contiguous little-endian span of a file."""
        return self.storage is not None and self.storage.is_raw and self.is_contiguous and self.loader is None

    def renamed(self, name: str) -> TensorRecord:
        """A copy of this record under another name (the data stays where it is)."""
        copy = object.__new__(type(self))  # what dataclasses.replace does, at a fifth of the cost
        copy.__dict__.update(self.__dict__)
        copy.__dict__["name"] = name
        return copy

    # -- data, on demand --------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        """The tensor's bytes, contiguous, little-endian, in row-major order."""
        if self.numel == 0:
            return b""
        if self.is_raw:
            start, length = self.byte_span
            return self.storage.read(start, length)  # type: ignore[union-attr]
        tensor = self.to_torch()
        return tensor_to_bytes(tensor)

    def iter_bytes(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the tensor's bytes in chunks (streamed from the file when possible)."""
        if not self.is_raw:
            data = self.read_bytes()
            for pos in range(0, len(data), chunk_size):
                yield data[pos : pos + chunk_size]
            return
        start, length = self.byte_span
        for pos in range(0, length, chunk_size):
            yield self.storage.read(start + pos, min(chunk_size, length - pos))  # type: ignore[union-attr]

    def write_to(self, fh: Any, crc: int = 0, hasher: Any = None) -> int:
        """Write the tensor's bytes to ``fh`` (streamed when raw); return the running CRC-32.

        ``fh`` may be None to only checksum/hash. Memory does not grow with the tensor when raw.
        """
        if self.numel == 0:
            return crc
        if self.is_raw:
            start, length = self.byte_span
            storage = self.storage
            return copy_span(storage.path, storage.offset + start, length, fh, crc, hasher)  # type: ignore[union-attr,arg-type]
        data = self.read_bytes()
        if fh is not None:
            fh.write(data)
        if hasher is not None:
            hasher.update(data)
        return zlib.crc32(data, crc)

    def to_torch(self) -> torch.Tensor:
        """Materialise this record as a CPU ``torch.Tensor`` (a fresh copy)."""
        import torch

        if self.loader is not None:
            return self.loader()
        torch_dtype = getattr(torch, self.dtype)
        if self.storage is None:
            raise ValueError(f"{self.name}: no data (built on the meta device)")
        if self.numel == 0:
            return torch.empty(self.shape, dtype=torch_dtype)
        stride = self.stride or contiguous_stride(self.shape)
        span_elems = 1 + sum((dim - 1) * st for dim, st in zip(self.shape, stride, strict=True))
        start = self.storage_offset * self.itemsize
        raw = bytearray(self.storage.read(start, span_elems * self.itemsize))
        flat = torch.frombuffer(raw, dtype=torch.uint8).view(torch_dtype)
        if self.storage.byteorder == "big" and self.itemsize > 1:
            flat = _byteswap(flat, self.itemsize)
        return flat.as_strided(self.shape, stride, 0).clone(memory_format=torch.contiguous_format)

    @classmethod
    def from_torch(cls, name: str, tensor: torch.Tensor) -> TensorRecord:
        """A record for a live tensor (meta tensors give a shape-only record)."""
        dtype = str(tensor.dtype).removeprefix("torch.")
        shape = tuple(int(d) for d in tensor.shape)
        if tensor.device.type == "meta":
            return cls(name, dtype, shape)
        return cls(
            name,
            dtype,
            shape,
            loader=lambda t=tensor: t.detach().to("cpu").contiguous().clone(),
            is_parameter=type(tensor).__name__ == "Parameter",
        )


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides (in elements) for ``shape``."""
    strides: list[int] = []
    acc = 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= max(dim, 1)
    return tuple(reversed(strides))


def tensor_to_bytes(tensor: Any) -> bytes:
    """Raw little-endian bytes of a torch tensor (any dtype, bf16 and float8 included)."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def _byteswap(flat: Any, itemsize: int) -> Any:
    import torch

    as_bytes = flat.view(torch.uint8).reshape(-1, itemsize).flip(1).contiguous()
    return as_bytes.reshape(-1).view(flat.dtype)
