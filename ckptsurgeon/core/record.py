"""The one value type every layer shares: a lazy tensor record.

A :class:`TensorRecord` describes a tensor (dtype, shape, element count, byte size)
and knows where its bytes live (a :class:`Storage`: a span of a file, or a loader),
but reads nothing until asked. Readers build records from headers or restricted
pickles without importing torch; ``inspect`` and ``diff`` work on records alone.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fileio.spans import CHUNK_SIZE, check_span, copy_span, pread_exact
from .dtypes import DTYPES, get_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True, eq=False)
class Storage:
    """A contiguous run of bytes that one or more tensors view.

    Either ``path`` + ``offset`` locate the bytes in a file (they can be streamed
    without torch), or ``reader(start, length)`` produces any range of them (a cast, converted
    as it is read, see :mod:`ckptsurgeon.surgery.casting`), or ``loader`` produces them all at once.

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
    reader: Callable[[int, int], bytes] | None = field(default=None, repr=False)

    @property
    def is_raw(self) -> bool:
        """True when the bytes sit in a file span and can be streamed directly."""
        return self.path is not None and self.byteorder == "little"

    @property
    def has_data(self) -> bool:
        """True when the bytes can be read (a file span, a reader or a loader)."""
        return self.path is not None or self.reader is not None or self.loader is not None

    def read(self, start: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes from ``start`` (the whole storage by default)."""
        if length is None:
            length = self.nbytes - start
        if start < 0 or length < 0 or start + length > self.nbytes:
            raise ValueError(f"storage {self.key}: read {start}+{length} outside {self.nbytes} bytes")
        if self.path is not None:
            data = pread_exact(self.path, self.offset + start, length)
            check_span(self.path, self.offset + start, length, data)  # a zip member read whole
            return data
        if self.reader is not None:
            return self.reader(start, length)
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
        known = DTYPES.get(self.dtype)
        return known.itemsize if known is not None else get_dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def has_data(self) -> bool:
        return self.storage is not None or self.loader is not None

    @property
    def is_contiguous(self) -> bool:
        stride = self.stride
        return stride is None or stride == contiguous_stride(self.shape) or math.prod(self.shape) <= 1

    @property
    def byte_span(self) -> tuple[int, int]:
        """(start, length) in bytes within the storage, for a contiguous record."""
        return self.storage_offset * self.itemsize, self.nbytes

    @property
    def is_raw(self) -> bool:
        """True when this tensor's bytes are one contiguous little-endian span of a file."""
        return self.storage is not None and self.storage.is_raw and self.is_contiguous and self.loader is None

    @property
    def is_ranged(self) -> bool:
        """True when the bytes can be read a range at a time without materialising the tensor:
        a raw file span, or a contiguous view of a storage with a ``reader`` (a cast)."""
        storage = self.storage
        if storage is None or self.loader is not None or not self.is_contiguous:
            return False
        return storage.reader is not None or storage.is_raw

    def file_span(self) -> tuple[Path, int, int] | None:
        """``(path, offset, length)`` of the bytes in their file when the record is raw and not
        empty (``is_raw and numel``, then ``byte_span``), else None: one call instead of four
        properties, for the loops over 20,000 records.

        Example:
            >>> s = Storage("data/0", "float32", 64, Path("m.pth"), 4096)
            >>> TensorRecord("w", "float32", (2, 4), s, storage_offset=4).file_span()
            (PosixPath('m.pth'), 4112, 32)
        """
        storage = self.storage
        if storage is None or storage.path is None or self.loader is not None:
            return None
        if storage.byteorder != "little":
            return None
        shape = self.shape
        numel = math.prod(shape)
        if not numel:
            return None
        stride = self.stride
        if stride is not None and numel > 1 and stride != contiguous_stride(shape):
            return None
        known = DTYPES.get(self.dtype)
        itemsize = known.itemsize if known is not None else get_dtype(self.dtype).itemsize
        return storage.path, storage.offset + self.storage_offset * itemsize, numel * itemsize

    def __bounded_repr__(self, render: Any, add: Any) -> None:
        """``tensor float32[2, 4]``, for :func:`ckptsurgeon.core.bounds.bounded_repr`."""
        add(f"tensor {self.dtype}")
        render(list(self.shape))

    def renamed(self, name: str) -> TensorRecord:
        """A copy of this record under another name (the data stays where it is); the record
        itself if it already has that name (records are frozen)."""
        if name == self.name:
            return self
        copy = object.__new__(type(self))  # what dataclasses.replace does, at a fifth of the cost
        copy.__dict__.update(self.__dict__)
        copy.__dict__["name"] = name
        return copy

    # -- data, on demand --------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        """The tensor's bytes, contiguous, little-endian, in row-major order."""
        if self.numel == 0:
            return b""
        if self.is_ranged and self.storage is not None:  # is_ranged: it has a storage
            start, length = self.byte_span
            return self.storage.read(start, length)
        tensor = self.to_torch()
        return tensor_to_bytes(tensor)

    def iter_bytes(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the tensor's bytes in chunks (streamed from the file, or cast, a chunk at a time
        when :attr:`is_ranged`)."""
        storage = self.storage
        if storage is None or not self.is_ranged:  # is_ranged: it has a storage
            data = self.read_bytes()
            for pos in range(0, len(data), chunk_size):
                yield data[pos : pos + chunk_size]
            return
        start, length = self.byte_span
        for pos in range(0, length, chunk_size):
            yield storage.read(start + pos, min(chunk_size, length - pos))

    def write_to(self, fh: Any, crc: int = 0, hasher: Any = None) -> int:
        """Write the tensor's bytes to ``fh`` (streamed when raw); return the running CRC-32.

        ``fh`` may be None to only checksum/hash. Memory does not grow with the tensor when
        :attr:`is_ranged` (a raw span, or a cast read a chunk at a time).
        """
        if self.numel == 0:
            return crc
        storage = self.storage
        if self.is_raw and storage is not None and storage.path is not None:  # is_raw: a file span
            start, length = self.byte_span
            return copy_span(storage.path, storage.offset + start, length, fh, crc, hasher)
        chunks = self.iter_bytes() if self.is_ranged else (self.read_bytes(),)
        for data in chunks:
            if fh is not None:
                fh.write(data)
            if hasher is not None:
                hasher.update(data)
            crc = zlib.crc32(data, crc)
        return crc

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
        if span_elems == self.numel and self.is_contiguous:  # raw is this tensor's own fresh copy
            return flat.view(self.shape)
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
            loader=lambda: tensor.detach().to("cpu").contiguous().clone(),
            is_parameter=type(tensor).__name__ == "Parameter",
        )


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides (in elements) for ``shape`` (remembered for the shapes seen most).

    Example:
        >>> contiguous_stride((2, 3, 4))
        (12, 4, 1)
    """
    known = _STRIDES.get(shape) if type(shape) is tuple else None
    if known is not None:
        return known
    strides = _contiguous_stride(shape)
    if type(shape) is tuple and len(_STRIDES) < 4096:
        _STRIDES[shape] = strides
    return strides


_STRIDES: dict[tuple[int, ...], tuple[int, ...]] = {}


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
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
