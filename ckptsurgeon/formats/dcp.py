"""``torch.distributed.checkpoint`` folders: a ``.metadata`` pickle plus ``*.distcp`` data files.

The ``.metadata`` pickle is scanned with :mod:`pickletools` first (nothing executed): only
DCP's own metadata classes, torch dtypes/sizes/layouts, paths and plain containers may appear.
Then the restricted unpickler reads it (:mod:`._dcpmeta`: DCP's classes as data-only
placeholders; torch's ``pickle.load`` never sees it) for names, shapes, dtypes and the byte
span of each chunk. Each tensor becomes a record whose ``loader`` reads its chunks, each a
``torch.save`` archive inside a ``.distcp`` file, with the torch zip reader's checks
(:mod:`._dcpchunk`). Non-tensor values (``BytesStorageMetadata``) stay in the tree as a short
placeholder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

from ..core.bounds import MAX_DEPTH, bounded_repr
from ..core.checkpoint import Checkpoint
from ..core.record import TensorRecord
from ..errors import FormatError, InputError, UnsafeCheckpointError
from ..pickling.globalscan import scan_globals
from ..pickling.pickles import PickleError
from . import ReadOptions
from ._dcpchunk import read_chunk
from ._dcpmeta import DcpMetadata, DcpTensor, is_allowed, read_metadata

FORMAT = "dcp"
METADATA_FILE = ".metadata"


class NotLoaded:
    """A value the reader leaves unread, shown as a plain description (not as a quoted string).

    Example:
        >>> BYTES_PLACEHOLDER
        <non-tensor value (DCP bytes entry, not loaded)>
    """

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return f"<non-tensor value ({self.what}, not loaded)>"

    def __bounded_repr__(self, render: Any, add: Any) -> None:
        add(repr(self))


BYTES_PLACEHOLDER = NotLoaded("DCP bytes entry")


def read(path: Path, options: ReadOptions | None = None) -> Checkpoint:
    """Open a DCP folder: records for every tensor (loaded on demand), placeholders for other values.

    Example:
        >>> ckpt = read(Path("step_1000"))                        # doctest: +SKIP
        >>> ckpt.weights().key, ckpt.format                       # doctest: +SKIP
        ('model', 'dcp')
    """
    folder = Path(path)
    options = options or ReadOptions()
    meta_file = folder / METADATA_FILE
    if not meta_file.is_file():
        raise InputError(f"{folder}: not a torch.distributed.checkpoint folder (no {METADATA_FILE} file)")
    used = scan_metadata(meta_file, options)
    metadata = read_metadata(meta_file)
    files = _check_data_files(folder, metadata)
    items, notes = _records(folder, metadata)
    tree = nest(items, metadata.planner_data)
    version = metadata.version
    return Checkpoint(
        path=folder,
        format=FORMAT,
        tree=tree,
        files=(meta_file, *files),
        file_size=sum(p.stat().st_size for p in (meta_file, *files)),
        metadata={"dcp_version": str(version)} if version else {},
        notes=notes,
        globals_used=tuple(used),
    )


# -- the pickle scan -------------------------------------------------------------------------
def _metadata_globals(meta_file: Path) -> list[str]:
    """Every global ``.metadata`` would import (the one scanner ``ckpt scan`` uses, executing
    nothing), and its persistent ids, which DCP metadata never holds, named so they are refused."""
    try:
        found = scan_globals(meta_file.read_bytes())
    except PickleError as exc:
        raise FormatError(f"{meta_file}: not a valid pickle ({exc}); the checkpoint is damaged") from None
    return found.globals + [f"<persistent id {kind}>" for kind in dict.fromkeys(found.persistent_kinds)]


def scan_metadata(meta_file: Path, options: ReadOptions) -> list[str]:
    """Scan ``.metadata`` and refuse globals outside the DCP allowlist (only ``options.unsafe`` overrides).

    Example:
        >>> scan_metadata(Path("ckpt/.metadata"), ReadOptions())  # doctest: +SKIP
        ['torch.distributed.checkpoint.metadata.Metadata', 'torch.Size', ...]
    """
    used = _metadata_globals(meta_file)
    if options.unsafe:
        return used
    # --allow-global is not honoured here: torch unpickles .metadata with full trust, so an
    # allowed name would really be imported and called (the zip and legacy readers never do).
    blocked = [g for g in used if not is_allowed(g)]
    if blocked:
        raise UnsafeCheckpointError(
            f"{meta_file}: the DCP metadata pickle would import {', '.join(blocked)}, which are not DCP "
            "metadata classes; refusing to load it (torch reads this pickle with full trust, so it could "
            "run code). Only --unsafe-trust-pickle opens it, for a checkpoint you made yourself",
            blocked,
        )
    return used


def _check_data_files(folder: Path, metadata: DcpMetadata) -> list[Path]:
    """Every ``*.distcp`` the metadata names must be inside the folder and hold the bytes it claims."""
    needed: dict[str, int] = {}
    counts: dict[str, int] = {}
    for rel, offset, length in metadata.spans:
        end = offset + length
        needed[rel] = max(needed.get(rel, 0), end)
        counts[rel] = counts.get(rel, 0) + 1
    files = []
    for rel, end in needed.items():
        path = data_path(folder, rel)
        if not path.is_file():
            raise FormatError(
                f"{folder}: data file {rel} is missing; it holds {counts[rel]} stored item(s); "
                "copy the whole checkpoint folder again"
            )
        if path.stat().st_size < end:
            raise FormatError(
                f"{path}: truncated: the metadata needs {end} bytes but the file has {path.stat().st_size}; "
                "copy the checkpoint folder again"
            )
        files.append(path)
    return sorted(files)


def data_path(folder: Path, rel: str) -> Path:
    pure = PurePosixPath(rel)
    full = folder / rel
    if (
        not rel
        or pure.is_absolute()
        or ".." in pure.parts
        or not full.resolve().is_relative_to(folder.resolve())
    ):
        raise FormatError(f"{folder / METADATA_FILE}: data file {rel!r} points outside the checkpoint folder")
    return full


def _records(folder: Path, metadata: DcpMetadata) -> tuple[dict[str, Any], list[str]]:
    items: dict[str, Any] = {}
    placeholders = 0
    for fqn, entry in metadata.entries.items():
        if entry is None:
            items[fqn] = BYTES_PLACEHOLDER
            placeholders += 1
        else:
            items[fqn] = TensorRecord(fqn, entry.dtype, entry.shape, loader=DcpLoader(folder, entry))
    notes = []
    if placeholders:
        notes.append(
            f"{placeholders} non-tensor value(s) stored as DCP bytes entries are shown as placeholders"
        )
    return items, notes


@dataclasses.dataclass(frozen=True, eq=False)
class DcpLoader:
    """Loads one tensor of a DCP folder into a fresh CPU tensor: each chunk read from its
    ``.distcp`` span with the restricted torch zip reader, copied into place.

    Example:
        >>> ckpt = read(Path("step_1000"))                             # doctest: +SKIP
        >>> ckpt.tree["model"]["fc.weight"].loader().shape              # doctest: +SKIP
        torch.Size([2, 4])
    """

    folder: Path
    tensor: DcpTensor = dataclasses.field(repr=False)

    def __call__(self) -> Any:
        import torch

        t = self.tensor
        whole = len(t.chunks) == 1 and t.chunks[0].sizes == t.shape
        out = None if whole else torch.empty(t.shape, dtype=getattr(torch, t.dtype))
        covered = None if whole else torch.zeros(t.shape, dtype=torch.bool)
        for chunk in t.chunks:
            piece = self._piece(chunk)
            if out is None or covered is None:  # one chunk, the whole tensor
                return piece
            where = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes, strict=True))
            if covered[where].any():
                raise FormatError(
                    f"{self.folder}: two chunks of tensor {t.fqn!r} overlap; the checkpoint is damaged"
                )
            covered[where] = True
            out[where] = piece
        if covered is not None and not bool(covered.all()):
            raise FormatError(
                f"{self.folder}: the chunks of tensor {t.fqn!r} leave gaps; the checkpoint is damaged"
            )
        return out

    def stored_record(self) -> TensorRecord | None:
        """The record of the one chunk holding this whole tensor (its bytes a span of the
        ``.distcp`` file, streamed and CRC-ed without torch), or None when it has several chunks.

        Example:
            >>> ckpt.tree["model"]["fc.weight"].loader.stored_record().file_span()  # doctest: +SKIP
            (PosixPath('step_1000/__0_0.distcp'), 1536, 32)
        """
        t = self.tensor
        if len(t.chunks) != 1 or t.chunks[0].sizes != t.shape:
            return None
        chunk = t.chunks[0]
        rec = read_chunk(self.folder / chunk.file, chunk.offset, chunk.length)
        self._check(chunk, rec)
        return rec.renamed(t.fqn)

    def _check(self, chunk: Any, rec: TensorRecord) -> None:
        if rec.dtype != self.tensor.dtype or tuple(rec.shape) != chunk.sizes:
            want = f"{self.tensor.dtype}{list(chunk.sizes)}"
            raise FormatError(
                f"{self.folder / chunk.file}: a chunk of tensor {bounded_repr(self.tensor.fqn, 80)} holds "
                f"{rec.dtype}{list(rec.shape)} where the metadata says {want}; the checkpoint is damaged"
            )

    def _piece(self, chunk: Any) -> Any:
        rec = read_chunk(self.folder / chunk.file, chunk.offset, chunk.length)
        self._check(chunk, rec)
        return rec.renamed(self.tensor.fqn).to_torch()


# -- the tree --------------------------------------------------------------------------------
def nest(items: dict[str, Any], planner_data: Any) -> Any:
    """Rebuild the saved nesting from DCP's flatten mapping (``fqn -> path``); flat on any doubt.

    Example:
        >>> nest({"model.w": 1, "step": 2}, {"model.w": ("model", "w"), "step": ("step",)})
        {'model': {'w': 1}, 'step': 2}
    """
    if not isinstance(planner_data, Mapping) or not items:
        return items
    root: dict[Any, Any] = {}
    for fqn, value in items.items():
        path = planner_data.get(fqn)
        if not _is_key_path(path) or not _place(root, path, value):
            return items
    return _lists(root)


def _is_key_path(path: Any) -> TypeGuard[tuple[str | int, ...]]:
    return (
        isinstance(path, tuple)
        and 0 < len(path) <= MAX_DEPTH
        and all(type(p) is str or (type(p) is int and p.bit_length() <= 64) for p in path)
    )


def _place(root: dict[Any, Any], path: tuple[Any, ...], value: Any) -> bool:
    node = root
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return False
        node = child
    if path[-1] in node:
        return False
    node[path[-1]] = value
    return True


def _lists(node: Any) -> Any:
    """Dicts keyed 0..n-1 by ints were lists when saved (``param_groups``)."""
    if not isinstance(node, dict):
        return node
    converted = {k: _lists(v) for k, v in node.items()}
    keys = list(converted)
    if keys and all(type(k) is int for k in keys) and sorted(keys) == list(range(len(keys))):
        return [converted[i] for i in range(len(keys))]
    return converted
