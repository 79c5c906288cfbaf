"""``--dtype``: floating tensors cast as they are written, one storage at a time.

A cast record keeps pointing at its source; its bytes are converted (with torch,
imported only then) when the writer reads them. Tensors that shared a storage share
one cast storage, so tied weights stay tied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from .dtypes import DTYPES, get_dtype
from .errors import OutputError
from .record import Storage, TensorRecord, tensor_to_bytes


def cast_tensors(tensors: Mapping[str, TensorRecord], dtype: str) -> dict[str, TensorRecord]:
    """Floating tensors as ``dtype`` (records whose bytes are cast when read, one storage at a time).

    Integer, bool and complex tensors are unchanged. Tensors sharing a storage still share
    one (cast) storage, so tied weights stay tied.

    Example:
        >>> storage = Storage("0", "float32", 8, loader=lambda: bytes(8))
        >>> recs = {"w": TensorRecord("w", "float32", (2,), storage)}
        >>> cast_tensors(recs, "bf16")["w"].dtype
        'bfloat16'
    """
    target = cast_dtype(dtype)
    cache: dict[int, Storage] = {}
    out: dict[str, TensorRecord] = {}
    for name, rec in tensors.items():
        source = DTYPES.get(rec.dtype)
        if source is None or not source.is_floating or rec.dtype == target:
            out[name] = rec
        elif rec.storage is None and rec.loader is None:
            out[name] = replace(rec, dtype=target)  # no data (meta): the writer says so, by name
        elif rec.storage is not None and rec.loader is None and _storage_castable(rec):
            storage = cache.get(id(rec.storage))
            if storage is None:
                storage = cache[id(rec.storage)] = _cast_storage(rec.storage, target)
            out[name] = replace(rec, dtype=target, storage=storage)
        else:
            out[name] = replace(rec, dtype=target, loader=_cast_loader(rec, target))
    return out


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


def _storage_castable(rec: TensorRecord) -> bool:
    storage = rec.storage
    return storage is not None and storage.dtype == rec.dtype and storage.nbytes % rec.itemsize == 0


def _cast_storage(storage: Storage, target: str) -> Storage:
    count = storage.nbytes // DTYPES[storage.dtype].itemsize
    whole = TensorRecord(storage.key, storage.dtype, (count,), storage)
    cached: list[bytes] = []

    def load() -> bytes:
        if not cached:  # keep the last cast storage: its views are read one after another
            import torch

            cached.append(tensor_to_bytes(whole.to_torch().to(getattr(torch, target))))
        return cached[0]

    nbytes = count * DTYPES[target].itemsize
    return Storage(key=storage.key, dtype=target, nbytes=nbytes, location="cpu", loader=load)


def _cast_loader(rec: TensorRecord, target: str) -> Callable[[], Any]:
    def load() -> Any:
        import torch

        return rec.to_torch().to(getattr(torch, target))

    return load
