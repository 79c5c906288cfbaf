"""Read back an output while it is written: CRC-32 and disk writeback in a second thread.

A verified write used to run three passes one after the other: copy the tensors, read the
whole output back to checksum it, then wait for the fsync. A :class:`ReadBack` does the last
two as the copy goes: each big span the writer finishes (see
:func:`ckptsurgeon.fileio.spans.start_writeback`) is read back from the output file by a helper
thread, its CRC-32 kept, and its writeback to disk started (Linux ``sync_file_range``). When
the writer is done, :meth:`ReadBack.finish` hands the CRCs to the span cache, so verification
finds every big span already checksummed, from the output's own bytes, and the fsync finds
almost nothing left to write.

The CRCs are of bytes read from the output file after they were written; the temporary file is
anonymous (or hidden) and open only here, and the writers never write a data span twice, so a
CRC taken early equals one taken at the end. Small spans are left to verification, which reads
them in a few batched reads.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import spans


class ReadBack:
    """Checksums and flushes spans of an output file in a helper thread, as they are written.

    Example:
        >>> with reading_back(fh, checksum=True) as rb:               # doctest: +SKIP
        ...     write_safetensors(tensors, fh)
        >>> rb.crcs[(80, 4096)]                                      # doctest: +SKIP
        2846725331
    """

    def __init__(self, fd: int, *, checksum: bool) -> None:
        self.fd = fd
        self.checksum = checksum
        self.crcs: dict[tuple[int, int], int] = {}
        self._queue: queue.SimpleQueue[tuple[int, int, int] | None] = queue.SimpleQueue()
        self._partial: dict[tuple[int, int], tuple[int, int]] = {}  # span -> (read up to, running CRC)
        self._error: BaseException | None = None
        self._cancelled = False
        self._done: set[tuple[int, int]] = set()
        self._thread = threading.Thread(target=self._run, name="ckpt-readback", daemon=True)
        self._thread.start()

    def submit(self, offset: int, length: int, upto: int | None = None) -> None:
        """Queue the span of ``length`` bytes at ``offset`` of the output, written (and flushed)
        up to file offset ``upto`` (the whole span by default); pieces of a span come in order."""
        self._queue.put((offset, length, offset + length if upto is None else upto))

    def finish(self) -> dict[tuple[int, int], int]:
        """Wait for the queued spans; return their CRC-32s by ``(offset, length)``; re-raise an error."""
        self._stop()
        if self._error is not None:
            raise self._error
        return self.crcs

    def cancel(self) -> None:
        """Drop the spans still queued (the write failed or was interrupted) and wait for the helper."""
        self._cancelled = True
        self._stop()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is not None or self._cancelled:
                continue  # drain: the writer learns of an error at finish()
            try:
                self._one(*job)
            except BaseException as exc:  # re-raised in the writer's thread by finish()
                self._error = exc

    def _one(self, offset: int, length: int, upto: int) -> None:
        span = (offset, length)
        if span in self._done:
            return  # handed on again after its last piece: already read and flushed
        start, crc = self._partial.pop(span, (offset, 0))
        if self.checksum:
            for chunk in spans.read_fd_span(self.fd, start, upto - start):
                crc = zlib.crc32(chunk, crc)
        spans.sync_range(self.fd, start, upto - start)
        if upto < offset + length:
            self._partial[span] = (upto, crc)
            return
        self._done.add(span)
        if self.checksum:
            self.crcs[span] = crc


@contextlib.contextmanager
def reading_back(fh: Any, *, checksum: bool) -> Iterator[ReadBack]:
    """Follow the writes to ``fh`` (big spans only) while the body runs; on a clean exit, wait
    for the helper and record the CRCs in the span cache under the output's final identity.

    Example:
        >>> with reading_back(fh, checksum=True):                     # doctest: +SKIP
        ...     write_torchzip(payload, fh)
    """
    fd = fh.fileno()
    follower = ReadBack(fd, checksum=checksum)
    context = spans.current_context()
    context.followers[fd] = follower
    try:
        yield follower
        fh.flush()
        crcs = follower.finish()
    finally:
        context.followers.pop(fd, None)
        follower.cancel()  # after finish(), nothing is left to drop
    if crcs:
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        for (offset, length), crc in crcs.items():
            context.crcs.remember((*identity, offset, length), crc)


class SourceCrcs:
    """Checksums big source spans in a helper thread while the writer copies them unchecked.

    A span with no CRC recorded anywhere (a safetensors source has none) used to be checksummed
    by the writer as it streamed: 0.3 s of CPU per 2 GiB on the writer's own thread. Inside
    :func:`checksumming_sources`, :meth:`~ckptsurgeon.fileio.spans.FileSpan.copy_to` hands such a span
    here first and copies it without a CRC pass; this thread reads the same span from the source
    (from the page cache, as a rule), computes its CRC-32 and remembers it, as the writer would
    have. A zip writer takes the CRC for the member's header when it closes the archive, and
    verification compares the output against it as before.

    Example:
        >>> with checksumming_sources() as sources:                   # doctest: +SKIP
        ...     crc_of = sources.submit(path, offset, length)
        ...     crc_of()
        2846725331
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Path, int, int] | None] = queue.SimpleQueue()
        self._crcs: dict[tuple[Path, int, int], int] = {}
        self._ready = threading.Condition()
        self._error: BaseException | None = None
        self._fd: int | None = None  # this thread's own descriptor of the file it reads
        self._path: Path | None = None
        # the CRCs of the write that started it (its thread does not see the writer's context)
        self._span_crcs = spans.current_context().crcs
        self._thread = threading.Thread(target=self._run, name="ckpt-source-crc", daemon=True)
        self._thread.start()

    def submit(self, path: Path, offset: int, length: int) -> Callable[[], int]:
        """Queue the span; return a function that waits for its CRC-32 (re-raising an error)."""
        key = (path, offset, length)
        self._queue.put(key)
        return lambda: self._wait(key)

    def finish(self) -> None:
        """Wait for every queued span; re-raise the first error."""
        self.stop()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """Let the helper finish what is queued and end (errors are kept for :meth:`finish`)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _wait(self, key: tuple[Path, int, int]) -> int:
        with self._ready:
            while key not in self._crcs and self._error is None and self._thread.is_alive():
                self._ready.wait()
        if key in self._crcs:
            return self._crcs[key]
        raise self._error if self._error is not None else RuntimeError(f"no CRC-32 for {key}")

    def _run(self) -> None:
        try:
            while (key := self._queue.get()) is not None:
                if self._error is not None:
                    continue  # drain: the writer learns of it from _wait() or finish()
                try:
                    self._crcs[key] = self._checksum(*key)
                except BaseException as exc:
                    self._error = exc
                with self._ready:
                    self._ready.notify_all()
        finally:
            self._close()
            with self._ready:
                self._ready.notify_all()

    def _checksum(self, path: Path, offset: int, length: int) -> int:
        """Read the span through this thread's own descriptor (the shared descriptor cache may
        close one while the writer opens another file), CRC it, and remember the CRC under the
        file's identity, checked against the archive's record if there is one."""
        fd = self._fd
        if fd is None or path != self._path:
            self._close()
            fd = self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._path = path
        crc = 0
        try:
            for chunk in spans.read_fd_span(fd, offset, length):
                crc = zlib.crc32(chunk, crc)
        except EOFError:
            from ..errors import FormatError

            raise FormatError(
                f"{path}: the file ends inside a tensor (bytes {offset}-{offset + length}); it is truncated"
            ) from None
        st = os.fstat(fd)
        self._span_crcs.remember((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, offset, length), crc)
        return crc

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd, self._path = None, None


@contextlib.contextmanager
def checksumming_sources() -> Iterator[SourceCrcs]:
    """Let big unvouched source spans be checksummed by a :class:`SourceCrcs` helper while the
    writer copies them; on a clean exit wait for it (errors re-raised), always stop it.

    Example:
        >>> with checksumming_sources():                              # doctest: +SKIP
        ...     write_torchzip(payload, fh)
    """
    helper = SourceCrcs()
    context = spans.current_context()
    context.source_crcs.append(helper)
    try:
        yield helper
        helper.finish()
    finally:
        context.source_crcs.remove(helper)
        helper.stop()  # after finish() the thread is gone already
