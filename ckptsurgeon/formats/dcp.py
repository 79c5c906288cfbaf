"""``torch.distributed.checkpoint`` folders: a ``.metadata`` pickle plus ``*.distcp`` data files.

The ``.metadata`` pickle is scanned with :mod:`pickletools` first (nothing executed):
only DCP's own metadata classes, torch dtypes/sizes/layouts, paths and plain containers
may appear. Then torch's own ``FileSystemReader`` reads it for names, shapes and dtypes.
Each tensor becomes a record whose ``loader`` loads that one tensor with
``torch.distributed.checkpoint.load(..., no_dist=True)``: no process group needed.
Non-tensor values (``BytesStorageMetadata``) stay in the tree as a short placeholder.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import os
import pickletools
import warnings
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from ..checkpoint import Checkpoint
from ..dtypes import DTYPES
from ..errors import FormatError, InputError, UnsafeCheckpointError
from ..record import TensorRecord
from . import ReadOptions

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


BYTES_PLACEHOLDER = NotLoaded("DCP bytes entry")
DCP_PACKAGE = "torch.distributed.checkpoint."
# Globals a DCP .metadata pickle may import besides DCP's own dataclasses and enums.
PLAIN_GLOBALS = frozenset(
    {
        "torch.Size",
        "torch.serialization._get_layout",
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.WindowsPath",
        "pathlib.PurePosixPath",
        "pathlib.PureWindowsPath",
        "builtins.set",
        "builtins.frozenset",
        "builtins.dict",
        "builtins.list",
        "builtins.tuple",
        "collections.OrderedDict",
        # metadata written by torch 1.13-2.0 used the sharded-tensor property class
        "torch.distributed._shard.sharded_tensor.metadata.TensorProperties",
        "torch.distributed._shard.sharded_tensor.metadata.MEM_FORMAT_ENCODING",
    }
)
_STRING_OPS = frozenset(
    {
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "UNICODE",
        "SHORT_BINSTRING",
        "BINSTRING",
        "STRING",
    }
)
_NEUTRAL_OPS = frozenset({"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME", "PROTO"})
_REFUSED_OPS = frozenset({"EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"})


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
    metadata = _read_metadata(folder)
    files = _check_data_files(folder, metadata)
    items, notes = _records(folder, metadata)
    tree = nest(items, getattr(metadata, "planner_data", None))
    version = getattr(metadata, "version", None)
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
def pickle_globals(data: bytes, where: str) -> list[str]:
    """Every global (``module.name``) a pickle would import, found without executing it.

    A ``STACK_GLOBAL`` whose operands are not plain strings is reported as
    ``<unresolvable STACK_GLOBAL>`` (so it is refused), as are extension codes and persistent ids.

    Example:
        >>> import pickle, collections
        >>> pickle_globals(pickle.dumps(collections.OrderedDict()), "x")
        ['collections.OrderedDict']
    """
    found: list[str] = []
    memo: dict[int, str | None] = {}
    pushed: list[str | None] = []  # what the last ops pushed, None when not a known string
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in _STRING_OPS:
                pushed.append(arg if isinstance(arg, str) else None)
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = pushed[-1] if pushed else None
            elif name in ("GLOBAL", "INST"):
                found.append(".".join(str(arg).split(" ", 1)))
                pushed.append(None)
            elif name == "STACK_GLOBAL":
                module, attr = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
                found.append(f"{module}.{attr}" if module and attr else "<unresolvable STACK_GLOBAL>")
                pushed.append(None)
            elif name in _REFUSED_OPS:
                found.append(f"<pickle opcode {name}>")
            elif name not in _NEUTRAL_OPS:
                pushed.append(None)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise FormatError(
            f"{where}: not a valid pickle ({exc}); the checkpoint is damaged, fetch it again"
        ) from None
    return list(dict.fromkeys(found))


def scan_metadata(meta_file: Path, options: ReadOptions) -> list[str]:
    """Scan ``.metadata`` and refuse globals outside the DCP allowlist (only ``options.unsafe`` overrides).

    Example:
        >>> scan_metadata(Path("ckpt/.metadata"), ReadOptions())  # doctest: +SKIP
        ['torch.distributed.checkpoint.metadata.Metadata', 'torch.Size', ...]
    """
    used = pickle_globals(meta_file.read_bytes(), str(meta_file))
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


def is_allowed(qualified: str) -> bool:
    """True for DCP dataclasses/enums, torch dtypes/layouts/memory formats and plain containers.

    Example:
        >>> is_allowed("torch.float32"), is_allowed("os.system")
        (True, False)
    """
    if qualified in PLAIN_GLOBALS:
        return True
    module, _, attr = qualified.rpartition(".")
    if module == "torch":
        return _is_torch_constant(attr)
    if module.startswith(DCP_PACKAGE):
        return _is_dcp_data_class(module, attr)
    return False


@functools.cache
def _is_torch_constant(attr: str) -> bool:
    import torch

    value = getattr(torch, attr, None)
    return isinstance(value, torch.dtype | torch.layout | torch.memory_format)


@functools.cache
def _is_dcp_data_class(module: str, attr: str) -> bool:
    try:
        value = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return False
    if not isinstance(value, type) or not value.__module__.startswith(DCP_PACKAGE):
        return False
    return dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)


# -- torch's reader --------------------------------------------------------------------------
def _read_metadata(folder: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as exc:  # torch raises many types for a damaged pickle
        raise FormatError(
            f"{folder / METADATA_FILE}: torch could not read the DCP metadata ({exc.__class__.__name__}: "
            f"{' '.join(str(exc).split())[:200]}); the checkpoint is damaged or from an incompatible torch"
        ) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, Mapping):
        raise FormatError(f"{folder / METADATA_FILE}: does not hold DCP Metadata; not a DCP checkpoint")
    return metadata


def _check_data_files(folder: Path, metadata: Any) -> list[Path]:
    """Every ``*.distcp`` the metadata names must be inside the folder and hold the bytes it claims."""
    needed: dict[str, int] = {}
    counts: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        needed[rel] = max(needed.get(rel, 0), end)
        counts[rel] = counts.get(rel, 0) + 1
    files = []
    for rel, end in needed.items():
        path = _data_path(folder, rel)
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


def _data_path(folder: Path, rel: str) -> Path:
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


def _records(folder: Path, metadata: Any) -> tuple[dict[str, Any], list[str]]:
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    storage = _storage_by_fqn(metadata)
    items: dict[str, Any] = {}
    placeholders = 0
    for fqn, entry in metadata.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            dtype = str(entry.properties.dtype).removeprefix("torch.")
            if dtype not in DTYPES:
                raise FormatError(
                    f"{folder}: tensor {fqn!r} has dtype {dtype}, which ckptsurgeon cannot handle"
                )
            shape = tuple(int(d) for d in entry.size)
            loader = DcpLoader(folder, fqn, dtype, shape, metadata, storage.get(fqn, {}))
            items[fqn] = TensorRecord(fqn, dtype, shape, loader=loader)
        elif isinstance(entry, BytesStorageMetadata):
            items[fqn] = BYTES_PLACEHOLDER
            placeholders += 1
        else:
            raise FormatError(f"{folder}: entry {fqn!r} has unknown DCP storage type {type(entry).__name__}")
    notes = []
    if placeholders:
        notes.append(
            f"{placeholders} non-tensor value(s) stored as DCP bytes entries are shown as placeholders"
        )
    return items, notes


def _storage_by_fqn(metadata: Any) -> dict[str, dict[Any, Any]]:
    grouped: dict[str, dict[Any, Any]] = {}
    for index, info in (metadata.storage_data or {}).items():
        grouped.setdefault(getattr(index, "fqn", None), {})[index] = info
    return grouped


@dataclasses.dataclass(frozen=True, eq=False)
class DcpLoader:
    """Loads one tensor of a DCP folder into a fresh CPU tensor (no process group).

    Torch is handed metadata trimmed to this one tensor, so each load costs the same
    whatever the number of tensors in the checkpoint.

    Example:
        >>> ckpt = read(Path("step_1000"))                             # doctest: +SKIP
        >>> ckpt.tree["model"]["fc.weight"].loader().shape              # doctest: +SKIP
        torch.Size([2, 4])
    """

    folder: Path
    fqn: str
    dtype: str
    shape: tuple[int, ...]
    metadata: Any = dataclasses.field(repr=False)
    storage: Mapping[Any, Any] = dataclasses.field(repr=False, default_factory=dict)

    def __call__(self) -> Any:
        import torch
        import torch.distributed.checkpoint as dcp

        tensor = torch.empty(self.shape, dtype=getattr(torch, self.dtype))
        reader = _cached_reader_class()(self.folder, self._trimmed_metadata())
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": single process is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({self.fqn: tensor}, storage_reader=reader, no_dist=True)
        return tensor

    def _trimmed_metadata(self) -> Any:
        planner_data = self.metadata.planner_data
        if isinstance(planner_data, Mapping) and self.fqn in planner_data:
            planner_data = {self.fqn: planner_data[self.fqn]}
        return dataclasses.replace(
            self.metadata,
            state_dict_metadata={self.fqn: self.metadata.state_dict_metadata[self.fqn]},
            storage_data=dict(self.storage),
            planner_data=planner_data,
        )


@functools.cache
def _cached_reader_class() -> type:
    """A FileSystemReader that reuses the metadata already scanned and read (no second unpickling)."""
    from torch.distributed.checkpoint import FileSystemReader

    class ScannedMetadataReader(FileSystemReader):
        def __init__(self, path: os.PathLike[str], metadata: Any) -> None:
            super().__init__(path)
            self._metadata = metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return self._metadata

    return ScannedMetadataReader


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


def _is_key_path(path: Any) -> bool:
    return isinstance(path, tuple) and bool(path) and all(type(p) in (str, int) for p in path)


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
