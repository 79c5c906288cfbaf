"""``--dtype``: floating tensors cast as they are written, a bounded piece at a time.

A cast record keeps pointing at its source: its storage is a :class:`CastReader` over the
source storage, which converts the bytes of whatever range a writer (or verification) asks
for, reading the matching source bytes in pieces of at most :data:`CAST_PIECE` and
converting each with torch (imported only then; ``Tensor.copy_`` rounds exactly as
``Tensor.to`` does). Nothing is cached: memory stays flat in the size of the file, and
verification recomputes the cast from the source to check the written bytes. Tensors that
shared a storage share one cast storage, so tied weights stay tied.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..core.dtypes import DTYPES, get_dtype
from ..core.record import Storage, TensorRecord
from ..errors import OutputError
from ..fileio.spans import file_identity, pread_into, recorded_crc, remember_span_crc

CAST_PIECE = 1 << 20  # source bytes read and converted at a time


def cast_tensors(tensors: Mapping[str, TensorRecord], dtype: str) -> dict[str, TensorRecord]:
    """Floating tensors as ``dtype`` (records whose bytes are cast when read, a piece at a time).

    Integer, bool and complex tensors are unchanged. Tensors sharing a storage still share
    one (cast) storage, so tied weights stay tied.

    Example:
        >>> storage = Storage("0", "float32", 8, loader=lambda: bytes(8))
        >>> recs = {"w": TensorRecord("w", "float32", (2,), storage)}
        >>> cast_tensors(recs, "bf16")["w"].dtype
        'bfloat16'
    """
    target = cast_dtype(dtype)
    shared: dict[Any, Any] = {}
    return {name: cast_record(rec, target, shared) for name, rec in tensors.items()}


def cast_record(rec: TensorRecord, target: str, shared: dict[Any, Any]) -> TensorRecord:
    """``rec`` as the floating dtype ``target`` (canonical), its bytes cast when read; ``rec`` itself
    when it is not floating or already ``target``. Records whose storage is in ``shared`` (one
    dict for a whole state dict) share its cast storage, so tied weights stay tied.

    Example:
        >>> storage = Storage("0", "float32", 8, loader=lambda: bytes(8))
        >>> cast_record(TensorRecord("w", "float32", (2,), storage), "float16", {}).nbytes
        4
    """
    source = DTYPES.get(rec.dtype)
    if source is None or not source.is_floating or rec.dtype == target:
        return rec
    if rec.storage is None and rec.loader is None:
        return replace(rec, dtype=target)  # no data (meta): the writer says so, by name
    if rec.storage is not None and rec.loader is None and _storage_castable(rec):
        key = ("cast", _storage_key(rec.storage), target)
        storage = shared.get(key)
        if storage is None:
            storage = shared[key] = cast_storage(rec.storage, target)
        return replace(rec, dtype=target, storage=storage)
    return replace(rec, dtype=target, loader=_cast_loader(rec, target))


def cast_dtype(dtype: str) -> str:
    """The canonical floating dtype for ``--dtype`` (bf16, fp16, fp32 ...), or an OutputError.

    Example:
        >>> cast_dtype("bf16")
        'bfloat16'
    """
    try:
        target = get_dtype(dtype)
    except KeyError:
        target = None
    if target is None or not target.is_floating:
        raise OutputError(f"--dtype {dtype}: not a floating dtype; use bf16, fp16 or fp32")
    return target.name


def cast_storage(storage: Storage, target: str) -> Storage:
    """``storage`` (of a floating dtype) as ``target``: a storage whose bytes are cast as read.

    Example:
        >>> src = Storage("0", "float32", 8, loader=lambda: bytes.fromhex("0000803f000000c0"))
        >>> cast_storage(src, "bfloat16").read().hex()  # 1.0, -2.0
        '803f00c0'
    """
    reader = CastReader(storage, target)
    nbytes = reader.count * DTYPES[target].itemsize
    return Storage(key=storage.key, dtype=target, nbytes=nbytes, location="cpu", reader=reader)


class CastReader:
    """Reads any byte range of a storage cast to ``target``: the matching source elements, read
    :data:`CAST_PIECE` bytes at a time into a reused buffer and converted into the result.

    A source span whose CRC-32 its archive records is checked the first time it has been read
    whole, in order (as streaming it uncast would check it), so a damaged source is named.

    Example:
        >>> src = Storage("0", "float32", 8, loader=lambda: bytes.fromhex("0000803f000000c0"))
        >>> CastReader(src, "float16")(2, 2).hex()  # the second element, -2.0
        '00c0'
    """

    def __init__(self, source: Storage, target: str) -> None:
        self.source = source
        self.target = target
        self.source_size = DTYPES[source.dtype].itemsize
        self.target_size = DTYPES[target].itemsize
        self.count = source.nbytes // self.source_size
        self._crc: tuple[int, int] | None = None  # (source bytes read in order from 0, their CRC)
        self._checked = source.path is None  # spans of a file: checked once against their archive

    def __call__(self, start: int, length: int) -> bytes:
        """The cast storage's ``length`` bytes from byte ``start``."""
        import torch

        size = self.target_size
        first, stop = start // size, -(-(start + length) // size)
        if start < 0 or length < 0 or stop > self.count:
            raise ValueError(f"storage {self.source.key}: read {start}+{length} outside the cast storage")
        out = bytearray((stop - first) * size)
        if not out:
            return b""
        dest = torch.frombuffer(out, dtype=getattr(torch, self.target))
        step = CAST_PIECE // self.source_size
        for elem in range(first, stop, step):
            count = min(step, stop - elem)
            serial_copy(dest[elem - first : elem - first + count], self.source_elements(elem, count))
        skip = start - first * size
        # the bytearray itself, not a copy of up to 1 MiB per read; every reader of a storage's
        # bytes (write, crc32, frombuffer) takes either, but Storage.reader promises bytes
        return out if skip == 0 and len(out) == length else bytes(out[skip : skip + length])  # type: ignore[return-value]

    def source_elements(self, elem: int, count: int) -> Any:
        """``count`` (at most :data:`CAST_PIECE` bytes of) source elements from element ``elem``, as
        a torch tensor in native byte order (a view of this thread's piece buffer, valid until the
        next piece is read); a span read whole in order has its archive CRC checked."""
        import torch

        source, itemsize = self.source, self.source_size
        at, nbytes = elem * itemsize, count * itemsize
        buf = _piece_buffer()
        view = memoryview(buf)[:nbytes]
        if source.path is not None:
            pread_into(source.path, source.offset + at, view)
            if not self._checked:
                self._check_crc(source.path, at, view)
        else:
            view[:] = source.read(at, nbytes)
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes)
        if source.byteorder == "big" and itemsize > 1:
            flat = flat.view(-1, itemsize).flip(1).contiguous().view(-1)
        return flat.view(getattr(torch, source.dtype))

    def _check_crc(self, path: Path, at: int, data: memoryview) -> None:
        """Follow the source span (at ``path``) read in order; once whole, check its CRC-32
        against the archive's."""
        source = self.source
        if at == 0:
            known = recorded_crc(path, source.offset, source.nbytes)
            self._checked = known is None  # nothing recorded: nothing to check
            self._crc = None if self._checked else (0, 0)
        if self._crc is None or self._crc[0] != at:
            self._crc = None
            return
        done, crc = at + len(data), zlib.crc32(data, self._crc[1])
        self._crc = (done, crc)
        if done == source.nbytes:
            self._crc = None
            key = (*file_identity(path), source.offset, source.nbytes)
            remember_span_crc(key, crc)  # raises a one-line error when the archive says otherwise
            self._checked = True


# torch copies this many elements or more on several threads; with two cores shared with other
# work, waking them cost ~1 ms per call here, ten times the copy: smaller copies run serially.
_SERIAL_ELEMENTS = 1 << 15
_LOCAL = threading.local()


def serial_copy(dest: Any, source: Any) -> None:
    """``dest.copy_(source)`` (torch's rounding, as ``Tensor.to``) in slices torch copies on one thread.

    Example:
        >>> import torch
        >>> dest = torch.empty(3, dtype=torch.bfloat16)
        >>> serial_copy(dest, torch.tensor([1.0, 2.0, 3.0]))
        >>> dest.tolist()
        [1.0, 2.0, 3.0]
    """
    for at in range(0, source.numel(), _SERIAL_ELEMENTS):
        dest[at : at + _SERIAL_ELEMENTS].copy_(source[at : at + _SERIAL_ELEMENTS])


def _piece_buffer() -> bytearray:
    """This thread's reused buffer for one piece of source bytes."""
    buf = getattr(_LOCAL, "piece", None)
    if buf is None:
        buf = _LOCAL.piece = bytearray(CAST_PIECE)
    return buf


def _storage_key(storage: Storage) -> Any:
    """What identifies a source storage: its file span, else the object."""
    if storage.path is not None:
        return (str(storage.path), storage.offset, storage.nbytes, storage.dtype)
    return id(storage)


def _storage_castable(rec: TensorRecord) -> bool:
    storage = rec.storage
    return storage is not None and storage.dtype == rec.dtype and storage.nbytes % rec.itemsize == 0


def _cast_loader(rec: TensorRecord, target: str) -> Callable[[], Any]:
    def load() -> Any:
        import torch

        return rec.to_torch().to(getattr(torch, target))

    return load
