"""File spans: reading, copying and checksumming tensor bytes where they lie in a file.

One reused page-aligned buffer per thread streams any span with memory that does not grow;
a few file descriptors are kept open; the CRC-32 of every whole span streamed is remembered
(and checked against the CRC its zip archive records, see :func:`expect_crc`), so
verification never reads a source twice. Big spans whose CRC the archive vouches for can be
copied without checksumming them on the way (:func:`vouched_copies`: the output is checked
against that CRC instead), and big outputs start their writeback early
(:func:`start_writeback`). :mod:`ckptsurgeon.core.record` builds its records on these.

The CRCs known and expected, the read-back helpers following outputs and the helper checksumming
sources live in a :class:`SpanContext`. Each write runs in its own (:func:`write_scope`, which
the write pipeline opens), so two writes in one process never see each other's CRCs or helpers;
a write sees the CRCs its sources' archives recorded when they were opened (the context outside
it), and adds nothing to them.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol

# A file span's key: (device, inode, size, mtime_ns) of its file (see file_identity), offset, length.
SpanKey = tuple[int, ...]

CHUNK_SIZE = 8 * 1024 * 1024
# copy_span's step: read and written while still in the CPU cache (8 MiB steps ran up to 3x slower).
COPY_CHUNK = 256 * 1024
# Spans at least this big are "big": inside a `vouched_copies()` block, those whose CRC-32 the
# source archive records are copied without a CRC pass; each big span written is followed by the
# read-back helper (or its writeback started). Smaller ones are checksummed as they stream.
BIG_SPAN = 1 << 20
# A big span being written is handed to the read-back helper (and its writeback started) in
# pieces this big, so the helper trails the writer by one piece, not by a whole 256 MiB tensor.
WRITEBACK_PIECE = 32 << 20


class _FdCache:
    """A few read-only file descriptors kept open, so 20,000 small reads do not reopen a file.

    Keyed by absolute path (a relative path means another file after a ``chdir``); a file
    replaced at its path since its descriptor was cached is reopened by :meth:`refresh`,
    which every open of a checkpoint calls.
    """

    def __init__(self, limit: int = 32) -> None:
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()
        # Descriptors of replaced files: a record read before the replacement may still hold
        # the number, so it is never closed and reused for another file under a reader's feet.
        self._retired: list[int] = []

    def get(self, path: Path) -> int:
        key = os.path.abspath(path)
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
            fd = self._fds.pop(os.path.abspath(path), None)
            if fd is not None:
                os.close(fd)

    def refresh(self, path: Path, st: os.stat_result) -> None:
        """Drop the cached descriptor of ``path`` if it is not the file ``st`` describes
        (the file was replaced, or rewritten in place, since it was opened)."""
        key = os.path.abspath(path)
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                return
            held = os.fstat(fd)
            if _identity(held) != _identity(st):
                del self._fds[key]
                self._retired.append(fd)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


FD_CACHE = _FdCache()

# Set by fileio.remote when a header-only mirror exists: refuses reads of bytes never fetched.
FETCH_GUARD: Callable[[Path | str, int, int], None] | None = None


def pread_exact(path: Path, offset: int, length: int) -> bytes:
    """Read exactly ``length`` bytes at ``offset`` or raise ``EOFError`` (a truncated file)."""
    if FETCH_GUARD is not None:
        FETCH_GUARD(path, offset, length)
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


def pread_into(path: Path, offset: int, view: memoryview) -> None:
    """Fill ``view`` with the bytes at ``offset`` of ``path`` (:func:`pread_exact` into a buffer
    the caller reuses), or raise ``EOFError`` (a truncated file).

    Example:
        >>> buf = bytearray(1024)
        >>> pread_into(Path("model.safetensors"), 8, memoryview(buf))   # doctest: +SKIP
    """
    if FETCH_GUARD is not None:
        FETCH_GUARD(path, offset, len(view))
    fd = FD_CACHE.get(path)
    got, length = 0, len(view)
    while got < length:
        n = os.preadv(fd, [view[got : got + (1 << 30)]], offset + got)
        if n <= 0:
            raise EOFError(f"{path}: file ends at byte {offset + got}, expected {offset + length}")
        got += n


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
    crcs = current_context().crcs
    if fh is None and hasher is None and key is not None:
        known = crcs.known_crc(key)
        if known is not None:
            return known
    start = _tell(fh) if fh is not None and length >= BIG_SPAN else None
    pieces = WritebackPieces(fh, start, length)
    written = 0
    for chunk in _read_span(fd, path, offset, length):
        if fh is not None:
            fh.write(chunk)
            written += len(chunk)
            pieces.wrote(written)
        if crc is not None:
            crc = zlib.crc32(chunk, crc)
        if hasher is not None:
            hasher.update(chunk)
    if key is not None and crc is not None:  # a key only when checksumming from 0
        crcs.remember(key, crc)
    if start is not None:
        start_writeback(fh, start, length)
    return crc or 0


def _tell(fh: Any) -> int | None:
    try:
        return fh.tell()
    except (AttributeError, OSError, ValueError):
        return None


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
        current_context().crcs.remember(_span_key(FD_CACHE.get(self.path), self.offset, self.length), crc)

    def read(self) -> tuple[bytes, int]:
        """The span's bytes and their CRC-32 (checked against the archive's record, remembered)."""
        fd = FD_CACHE.get(self.path)
        data = pread_exact(self.path, self.offset, self.length)
        crc = zlib.crc32(data)
        current_context().crcs.remember(_span_key(fd, self.offset, self.length), crc)
        return data, crc

    def vouched_crc(self) -> int | None:
        """The CRC-32 :meth:`copy_to` will return without computing it, or None when it will
        checksum the bytes as they stream.

        Only inside :func:`vouched_copies`, for spans of at least ``BIG_SPAN`` bytes whose CRC is
        known without reading them (recorded by the source archive, or computed before).
        """
        if not getattr(_LOCAL, "vouched", False) or self.length < BIG_SPAN:
            return None
        return recorded_crc(self.path, self.offset, self.length)

    def checksummed_elsewhere(self) -> bool:
        """Whether :meth:`copy_to` will leave this span's CRC to a
        :class:`~ckptsurgeon.fileio.readback.SourceCrcs` helper."""
        return bool(current_context().source_crcs) and self.length >= BIG_SPAN and self.vouched_crc() is None

    def copy_to(self, fh: Any) -> Callable[[], int]:
        """Stream the span to ``fh`` through the aligned buffer; return a function giving its
        CRC-32. A span :meth:`vouched_crc` vouches for is not checksummed here (the output is
        checked against that CRC). Any other big span, while a
        :class:`~ckptsurgeon.fileio.readback.SourceCrcs` helper runs, is handed to it and copied without
        a CRC pass: the function waits for the helper's CRC. Anything else is checksummed as it
        streams and checked against its archive's record.

        (The user-space copy through a 256 KiB buffer also beat ``copy_file_range`` here, by
        0.2-0.3 s on 2 GiB: the spans' offsets in source and output are not page-aligned alike.)"""
        vouched = self.vouched_crc()
        if vouched is not None:
            copy_span(self.path, self.offset, self.length, fh, crc=None)
            return lambda: vouched
        source_crcs = current_context().source_crcs
        if source_crcs and self.length >= BIG_SPAN:
            later = source_crcs[-1].submit(self.path, self.offset, self.length)  # read meanwhile
            copy_span(self.path, self.offset, self.length, fh, crc=None)
            return later
        crc = copy_span(self.path, self.offset, self.length, fh)
        return lambda: crc


@contextlib.contextmanager
def vouched_copies() -> Iterator[None]:
    """Let :meth:`FileSpan.copy_to` copy big spans without checksumming them, vouched for by
    the source archive's recorded CRC-32. Use it only when the output is verified afterwards
    (the output's bytes are then checked against that CRC, which catches a damaged source).

    Example:
        >>> with vouched_copies():                                  # doctest: +SKIP
        ...     write(tensors, fh)
    """
    before = getattr(_LOCAL, "vouched", False)
    _LOCAL.vouched = True
    try:
        yield
    finally:
        _LOCAL.vouched = before


def recorded_crc(path: Path, offset: int, length: int) -> int | None:
    """The CRC-32 of a file span known without reading it: computed before, or recorded by its archive.

    Example:
        >>> recorded_crc(Path("model.pth"), 4096, 1024)            # doctest: +SKIP
        2846725331
    """
    key = _span_key(FD_CACHE.get(path), offset, length)
    crcs = current_context().crcs
    found = crcs.known_crc(key)
    if found is not None:
        return found
    expected = crcs.expected_crc(key)
    return expected[0] if expected is not None else None


def span_crcs(path: Path, spans: list[tuple[int, int]], *, recorded: bool = False) -> list[int]:
    """The CRC-32 of each ``(offset, length)`` span of ``path``, reading the file once, in order.

    Nearby small spans share one read (20,000 tensors of a few hundred bytes are a few dozen
    reads, not 20,000); big ones stream through the aligned buffer. Every CRC is remembered
    and checked against the archive's record, as :func:`copy_span` does. ``recorded=True``
    takes the CRC already known for a span (see :func:`recorded_crc`) instead of reading it.

    Example:
        >>> span_crcs(Path("model.safetensors"), [(80, 512), (592, 64)])   # doctest: +SKIP
        [2846725331, 1181553424]
    """
    fd = FD_CACHE.get(path)
    st = os.fstat(fd)
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    crcs = current_context().crcs
    result = [0] * len(spans)  # every span not known yet is in todo, and CRC-ed below
    todo: list[int] = []
    for i, (offset, length) in enumerate(spans):
        key = (*identity, offset, length)
        known = crcs.known_crc(key)
        if known is None and recorded:
            expected = crcs.expected_crc(key)
            known = expected[0] if expected is not None else None
        if known is not None:
            result[i] = known
        else:
            todo.append(i)
    todo.sort(key=lambda i: spans[i][0])
    pos = 0
    while pos < len(todo):
        pos = _crc_window(fd, path, identity, spans, todo, pos, result, crcs)
    return result


def _crc_window(
    fd: int,
    path: Path,
    identity: tuple[int, ...],
    spans: list[tuple[int, int]],
    todo: list[int],
    pos: int,
    result: list[int],
    crcs: SpanCrcs,
) -> int:
    """CRC the spans ``todo[pos:]`` that fit in one read window; return the next position."""
    start, length = spans[todo[pos]]
    if length > COPY_CHUNK:
        result[todo[pos]] = copy_span(path, start, length, None)
        return pos + 1
    end = pos + 1
    stop = start + length
    while end < len(todo):
        offset, size = spans[todo[end]]
        if size > COPY_CHUNK or offset + size - start > COPY_CHUNK or offset < start:
            break
        stop = max(stop, offset + size)
        end += 1
    window = memoryview(pread_exact(path, start, stop - start))
    for i in todo[pos:end]:
        offset, size = spans[i]
        crc = zlib.crc32(window[offset - start : offset - start + size])
        crcs.remember((*identity, offset, size), crc)
        result[i] = crc
    return end


def start_writeback(fh: Any, offset: int, length: int, *, upto: int | None = None) -> None:
    """A writer has just written ``length`` bytes at ``offset`` of ``fh``: hand them to the
    :class:`~ckptsurgeon.fileio.readback.ReadBack` following ``fh`` (it reads them back for their CRC
    and starts their writeback), or else ask the kernel to start writing them to disk now
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait), so the final fsync
    finds most of a big output already written. Spans under ``BIG_SPAN`` are left to
    verification and the fsync, and so are unfollowed writes inside :func:`vouched_copies`.
    ``upto``: only the span's bytes before this file offset are written yet (a piece of a big
    span; the pieces of one span come in order, the last one without ``upto``).

    Example:
        >>> start_writeback(fh, 0, 64 << 20)                       # doctest: +SKIP
    """
    if length < BIG_SPAN:
        return
    try:
        fh.flush()
        fd = fh.fileno()
    except (AttributeError, OSError, ValueError):
        return
    end = offset + length if upto is None else upto
    follower = current_context().followers.get(fd)
    if follower is not None:
        follower.submit(offset, length, end)
    elif not getattr(_LOCAL, "vouched", False):
        sync_range(fd, offset, end - offset)  # pages already on their way to disk are skipped


class WritebackPieces:
    """Hands the span of ``length`` bytes at file offset ``start`` of ``fh`` to
    :func:`start_writeback` every ``WRITEBACK_PIECE`` bytes while a writer writes it (nothing
    when ``start`` is None); the writer then calls :func:`start_writeback` for the whole span.

    Example:
        >>> pieces = WritebackPieces(fh, fh.tell(), nbytes)            # doctest: +SKIP
        >>> for chunk in chunks:                                       # doctest: +SKIP
        ...     written += fh.write(chunk); pieces.wrote(written)
    """

    def __init__(self, fh: Any, start: int | None, length: int) -> None:
        self.fh, self.start, self.length = fh, start, length
        self.next = WRITEBACK_PIECE

    def wrote(self, written: int) -> None:
        """The span's first ``written`` bytes are in the file now."""
        if self.start is not None and self.next <= written < self.length:
            start_writeback(self.fh, self.start, self.length, upto=self.start + written)
            self.next = written + WRITEBACK_PIECE


def sync_range(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` of ``fd`` to disk without waiting (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; elsewhere, or on an error, the fsync does it)."""
    call = _sync_file_range()
    if call is not None:
        call(fd, offset, length, 2)  # errors (a return of -1) leave it to the fsync


@cache  # looked up once
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range``, or None where it is not available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return func


def _read_span(fd: int, path: Path | str, offset: int, length: int) -> Iterator[memoryview]:
    if FETCH_GUARD is not None:
        FETCH_GUARD(path, offset, length)
    buf = aligned_buffer()[:COPY_CHUNK]
    pos, end = offset, offset + length
    while pos < end:
        want = min(COPY_CHUNK, end - pos)
        got = os.preadv(fd, [buf[:want]], pos)
        if got <= 0:
            raise EOFError(f"{path}: file ends at byte {pos}, expected {end}")
        yield buf[:got]
        pos += got


def read_fd_span(fd: int, offset: int, length: int) -> Iterator[memoryview]:
    """``length`` bytes at ``offset`` of an open descriptor, as views of this thread's aligned
    buffer (each valid until the next is requested); ``EOFError`` if the file is shorter."""
    return _read_span(fd, f"file descriptor {fd}", offset, length)


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
    current_context().crcs.expect((*identity, offset, length), crc, what)


def check_span(path: Path, offset: int, length: int, data: bytes | memoryview) -> None:
    """Check bytes just read from a span whose CRC-32 the archive recorded (raise if they differ).

    Materialising a tensor (``to_torch``, ``load_into``) goes through here, so a flipped byte in
    a zip member is caught there too, not only when streaming.
    """
    crcs = current_context().crcs
    if not crcs.expects_any():
        return
    key = _span_key(FD_CACHE.get(path), offset, length)
    if crcs.expected_crc(key) is not None:
        crcs.remember(key, zlib.crc32(data))


def remember_span_crc(key: SpanKey, crc: int) -> None:
    """Record the CRC-32 of the file span ``key`` (see :func:`file_identity`) computed elsewhere
    (a helper thread reading an output back), checked against the archive's record if any."""
    current_context().crcs.remember(key, crc)


class SpanCrcs:
    """CRC-32s of file spans by :data:`SpanKey`: those computed (``known``) and those an archive
    records (``expected``, with what to call the span when its bytes differ), over ``parent``'s,
    which it reads but never changes.

    Example:
        >>> crcs = SpanCrcs()
        >>> crcs.expect((1, 2, 3, 4, 0, 8), 99, "model.pth: member data/0")
        >>> try:
        ...     SpanCrcs(parent=crcs).remember((1, 2, 3, 4, 0, 8), 98)
        ... except Exception as exc:
        ...     print(type(exc).__name__)
        FormatError
    """

    LIMIT = 1_000_000  # entries of each kind; past it the oldest are forgotten (all at once)

    def __init__(self, parent: SpanCrcs | None = None) -> None:
        self.parent = parent
        self.known: dict[SpanKey, int] = {}
        self.expected: dict[SpanKey, tuple[int, str]] = {}

    def known_crc(self, key: SpanKey) -> int | None:
        """The CRC-32 computed for the span, or None."""
        found = self.known.get(key)
        if found is None and self.parent is not None:
            return self.parent.known_crc(key)
        return found

    def expected_crc(self, key: SpanKey) -> tuple[int, str] | None:
        """The CRC-32 the span's archive records and the span's name, or None."""
        found = self.expected.get(key)
        if found is None and self.parent is not None:
            return self.parent.expected_crc(key)
        return found

    def expects_any(self) -> bool:
        """Whether any span has an expected CRC-32 (else reads need not look theirs up)."""
        return bool(self.expected) or (self.parent is not None and self.parent.expects_any())

    def expect(self, key: SpanKey, crc: int, what: str) -> None:
        """Declare the CRC-32 the span must have (see :func:`expect_crc`)."""
        if len(self.expected) >= self.LIMIT:
            self.expected.clear()
        self.expected[key] = (crc, what)

    def remember(self, key: SpanKey, crc: int) -> None:
        """Record the span's CRC-32; raise a one-line FormatError when its archive records another."""
        expected = self.expected_crc(key)
        if expected is not None and expected[0] != crc:
            from ..errors import FormatError

            raise FormatError(
                f"{expected[1]}: its bytes do not match the CRC-32 recorded in the archive; "
                "the file is damaged (flipped bytes), fetch it again"
            )
        if len(self.known) >= self.LIMIT:
            self.known.clear()
        self.known[key] = crc


class Follower(Protocol):
    """What follows an output file while it is written (:class:`~ckptsurgeon.fileio.readback.ReadBack`)."""

    def submit(self, offset: int, length: int, upto: int | None = None) -> None: ...


class SourceChecksummer(Protocol):
    """What checksums big source spans while they are copied
    (:class:`~ckptsurgeon.fileio.readback.SourceCrcs`)."""

    def submit(self, path: Path, offset: int, length: int) -> Callable[[], int]: ...


@dataclass
class SpanContext:
    """The span state one write (or the reads outside any write) works with: the CRC-32s known and
    expected, the helper following each output file descriptor while it is written, and the
    helpers checksumming big source spans (the innermost last)."""

    crcs: SpanCrcs
    followers: dict[int, Follower] = field(default_factory=dict)
    source_crcs: list[SourceChecksummer] = field(default_factory=list)


# The context of the reads outside any write: opening a checkpoint records its archive's CRCs
# there, and reads (and the writes after) check against them.
_READS = SpanContext(SpanCrcs())
# The write running now, inside write_scope(); None outside any.
_CURRENT: ContextVar[SpanContext | None] = ContextVar("ckpt_span_context", default=None)


def current_context() -> SpanContext:
    """The :class:`SpanContext` of the write running in this thread (or of the reads outside any).

    Helper threads do not inherit it: they take the writer's when they are created.
    """
    return _CURRENT.get() or _READS


@contextlib.contextmanager
def job_scope(writer: SpanContext) -> Iterator[SpanContext]:
    """Run one part of ``writer``'s write in another thread (a shard of ``--jobs``): the CRCs it
    computes or learns are the writer's (verification finds them), its helpers are its own.

    Example:
        >>> with write_scope() as writer, job_scope(writer) as job:
        ...     job.crcs is writer.crcs, job.followers is writer.followers
        (True, False)
    """
    context = SpanContext(writer.crcs)
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def write_scope() -> Iterator[SpanContext]:
    """Run one write in a :class:`SpanContext` of its own: CRCs it computes or learns, and the
    helpers it starts, are seen by it alone and dropped at the end; it sees the CRCs known before
    it (its sources' archives', recorded when they were opened).

    Example:
        >>> with write_scope() as context:
        ...     context.followers
        {}
    """
    context = SpanContext(SpanCrcs(parent=current_context().crcs))
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)
