"""A DCP ``.metadata`` pickle read by the restricted unpickler, never by ``pickle.load``.

torch reads ``.metadata`` with an unrestricted unpickler, so a hostile one can run code or, with
only allowed names, rewrite classes in the reading process (``BUILD`` on ``pathlib.Path`` itself).
Here DCP's classes (``Metadata``, ``TensorStorageMetadata``, ``ChunkStorageMetadata``,
``MetadataIndex``, ``_StorageInfo`` ...) become :class:`DcpObject` placeholders that only hold
their fields, dtypes become names, ``torch.Size`` a tuple; nothing from torch.distributed is
imported. :func:`read_metadata` then checks every field it uses and returns :class:`DcpMetadata`:
plain tensors, chunks and the byte spans that hold them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from math import prod
from pathlib import Path
from typing import Any

from ..core.bounds import MAX_KEY_ITEMS, bounded_repr
from ..core.dtypes import DTYPES
from ..errors import FormatError
from ..pickling.pickles import BlockedGlobal, PickleError
from ..pickling.safety import DCP_METADATA_GLOBALS, DTYPE_GLOBALS, DataResolver, GlobalRef
from ._torchpickle import INT64, unpickle

# torch 1.13-2.0 wrote the sharded-tensor property class and its enum
OLD_PROPERTIES = "torch.distributed._shard.sharded_tensor.metadata"
DCP_CLASSES = DCP_METADATA_GLOBALS | {
    f"{OLD_PROPERTIES}.TensorProperties",
    f"{OLD_PROPERTIES}.MEM_FORMAT_ENCODING",
}
_ENUMS = frozenset({"_MEM_FORMAT_ENCODING", "MEM_FORMAT_ENCODING"})
LAYOUTS = frozenset(
    f"torch.{n}" for n in ["strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc"]
)
MEMORY_FORMATS = frozenset(
    f"torch.{n}" for n in ["contiguous_format", "channels_last", "channels_last_3d", "preserve_format"]
)
# what a .metadata pickle may name besides DCP's classes (all rebuilt as data by DataResolver)
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
        "collections.OrderedDict",
    }
)


def is_allowed(qualified: str) -> bool:
    """True for DCP's metadata classes, torch dtypes/layouts/memory formats and plain containers.

    Example:
        >>> is_allowed("torch.float32"), is_allowed("os.system")
        (True, False)
    """
    return (
        qualified in PLAIN_GLOBALS
        or qualified in DCP_CLASSES
        or qualified in DTYPE_GLOBALS
        or qualified in LAYOUTS
        or qualified in MEMORY_FORMATS
    )


class DcpObject:
    """One of DCP's metadata objects as the fields its pickle set; nothing of torch's class runs.

    Example:
        >>> DcpObject("MetadataIndex", {"fqn": "w"})
        MetadataIndex(fqn='w')
    """

    __slots__ = ("fields", "kind", "state")

    def __init__(self, kind: str, fields: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.fields: dict[str, Any] = dict(fields or {})
        self.state: Any = None  # a state that is not a dict (TensorProperties: a tuple)

    def _ckpt_build(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict | None):
            state = {**(state[0] or {}), **(state[1] if isinstance(state[1], dict) else {})}
        if isinstance(state, dict):
            if not all(type(k) is str for k in state):
                raise PickleError(f"malformed DCP metadata (a {self.kind} field name that is not a string)")
            self.fields.update(state)
        else:
            self.state = state

    def __bounded_children__(self) -> list[Any]:
        return [*self.fields.values(), self.state]

    def __bounded_repr__(self, render: Any, add: Any) -> None:
        add(f"{self.kind}(")
        for i, (name, value) in enumerate(self.fields.items()):
            add(f"{', ' if i else ''}{name}=")
            render(value)
        add(")")

    def __repr__(self) -> str:
        return bounded_repr(self, 200)


class DcpResolver(DataResolver):
    """DataResolver plus DCP's classes as :class:`DcpObject`, dtypes/layouts/formats as names.

    ``--allow-global`` is not honoured: the .metadata allowlist is fixed.
    """

    def __init__(self) -> None:
        super().__init__(())
        for full in DCP_CLASSES:
            module, name = full.rsplit(".", 1)
            if name in _ENUMS:
                self.table[full] = GlobalRef(module, name, call=partial(_enum_member, name))
            else:
                self.table[full] = GlobalRef(
                    module,
                    name,
                    call=partial(_positional, name),
                    new=partial(_instance, name),
                )
        for full in DTYPE_GLOBALS | LAYOUTS | MEMORY_FORMATS:
            module, name = full.rsplit(".", 1)
            self.table[full] = GlobalRef(module, name, extra=name)
        for full in set(self.table) - PLAIN_GLOBALS - DCP_CLASSES - DTYPE_GLOBALS - LAYOUTS - MEMORY_FORMATS:
            del self.table[full]  # DataResolver's other data classes are not DCP metadata

    def find_global(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        self.used.add(full)
        ref = self.table.get(full)
        if ref is None:
            raise BlockedGlobal(full)
        return ref

    def accepts(self, full: str) -> bool:
        return full in self.table


def _enum_member(kind: str, args: tuple) -> DcpObject:
    return DcpObject(kind, {"value": args})


def _instance(kind: str, args: tuple, kwargs: dict) -> DcpObject:
    return DcpObject(kind)


def _positional(kind: str, args: tuple) -> DcpObject:
    """A dataclass called with positional fields (``TensorProperties(dtype, ...)`` in old pickles)."""
    names = _FIELDS.get(kind, ())
    if len(args) > len(names):
        raise PickleError(f"malformed DCP metadata ({kind} with {len(args)} arguments)")
    return DcpObject(kind, dict(zip(names, args, strict=False)))


_FIELDS = {
    "TensorProperties": ("dtype", "layout", "requires_grad", "memory_format", "pin_memory"),
    "ChunkStorageMetadata": ("offsets", "sizes"),
    "MetadataIndex": ("fqn", "offset", "index"),
}


# -- what the reader uses, checked ----------------------------------------------------------------
@dataclass(frozen=True)
class DcpChunk:
    """One saved piece of a tensor: where it sits in the tensor and which bytes of which file hold it
    (a ``torch.save`` archive of just that piece)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@dataclass(frozen=True)
class DcpTensor:
    fqn: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[DcpChunk, ...]


@dataclass(frozen=True)
class DcpMetadata:
    """What a ``.metadata`` says: entries by FQN (a :class:`DcpTensor`, or None for a bytes entry),
    every byte span it names (file, offset, length), the flatten mapping and the version."""

    entries: dict[str, DcpTensor | None]
    spans: list[tuple[str, int, int]]
    planner_data: Any
    version: str | None


def read_metadata(meta_file: Path) -> DcpMetadata:
    """Unpickle ``.metadata`` with the restricted unpickler and check every field the reader uses.

    Example:
        >>> meta = read_metadata(Path("step_1/.metadata"))           # doctest: +SKIP
        >>> meta.entries["model.fc.weight"].shape                    # doctest: +SKIP
        (2, 4)
    """
    root, _ = unpickle(meta_file.read_bytes(), meta_file, DcpResolver())
    try:
        return _checked(root)
    except _Bad as exc:
        raise FormatError(f"{meta_file}: not valid DCP metadata ({exc}); the checkpoint is damaged") from None


class _Bad(Exception):
    pass


def _q(name: str) -> str:
    return bounded_repr(name, 80)


def _obj(value: Any, kind: str | tuple[str, ...], where: str) -> DcpObject:
    kinds = (kind,) if isinstance(kind, str) else kind
    if not isinstance(value, DcpObject) or value.kind not in kinds:
        raise _Bad(f"{where} is {bounded_repr(value, 60)}, not a {kinds[0]}")
    return value


def _int64s(value: Any, where: str, *, size: bool = True) -> tuple[int, ...]:
    if (
        type(value) is not tuple
        or len(value) > MAX_KEY_ITEMS
        or not all(type(v) is int and (0 if size else -INT64) <= v < INT64 for v in value)
    ):
        raise _Bad(f"{where} {bounded_repr(value, 60)} is not a tuple of at most {MAX_KEY_ITEMS} sizes")
    return value


def _offset(value: Any, where: str) -> int:
    if type(value) is not int or not 0 <= value < INT64:
        raise _Bad(f"{where} {bounded_repr(value, 40)} is not a byte offset")
    return value


def _checked(root: Any) -> DcpMetadata:
    meta = _obj(root, "Metadata", "the pickled object")
    entries_in = meta.fields.get("state_dict_metadata")
    if not isinstance(entries_in, dict):
        raise _Bad("state_dict_metadata is not a dict")
    storage = _storage(meta.fields.get("storage_data"))
    entries: dict[str, DcpTensor | None] = {}
    for fqn, entry in entries_in.items():
        if type(fqn) is not str:
            raise _Bad(f"an entry name {bounded_repr(fqn, 40)} that is not a string")
        if isinstance(entry, DcpObject) and entry.kind == "BytesStorageMetadata":
            entries[fqn] = None
            continue
        entries[fqn] = _tensor(fqn, _obj(entry, "TensorStorageMetadata", f"entry {_q(fqn)}"), storage)
    version = meta.fields.get("version")
    spans = [(file, off, length) for file, off, length in storage.values()]
    return DcpMetadata(
        entries, spans, meta.fields.get("planner_data"), version if type(version) is str else None
    )


def _storage(data: Any) -> dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]]:
    """storage_data: (fqn, chunk offsets) -> (relative path, offset, length)."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _Bad("storage_data is not a dict")
    found: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
    for index, info in data.items():
        index = _obj(index, "MetadataIndex", "a storage_data key")
        fqn = index.fields.get("fqn")
        if type(fqn) is not str:
            raise _Bad(f"a storage_data key names {bounded_repr(fqn, 40)}, not an entry")
        offsets = index.fields.get("offset")
        at = None if offsets is None else _int64s(offsets, f"the storage offsets of {_q(fqn)}")
        info = _obj(info, "_StorageInfo", f"the storage of {_q(fqn)}")
        path = info.fields.get("relative_path")
        if type(path) is not str:
            raise _Bad(f"the storage of {_q(fqn)} has file {bounded_repr(path, 40)}, not a file name")
        if info.fields.get("transform_descriptors"):
            raise _Bad(
                f"the storage of {_q(fqn)} is transformed (compressed or encrypted), "
                "which ckptsurgeon does not read"
            )
        found[(fqn, at)] = (
            path,
            _offset(info.fields.get("offset"), f"the offset of {_q(fqn)}"),
            _offset(info.fields.get("length"), f"the length of {_q(fqn)}"),
        )
    return found


def _tensor(fqn: str, entry: DcpObject, storage: dict[Any, tuple[str, int, int]]) -> DcpTensor:
    props = _obj(entry.fields.get("properties"), "TensorProperties", f"the properties of {_q(fqn)}")
    dtype_ref = props.fields.get("dtype")
    if dtype_ref is None and isinstance(props.state, tuple) and props.state:
        dtype_ref = props.state[0]
    if not isinstance(dtype_ref, GlobalRef) or f"torch.{dtype_ref.extra}" not in DTYPE_GLOBALS:
        raise _Bad(f"tensor {_q(fqn)} has dtype {bounded_repr(dtype_ref, 40)}, not a torch dtype")
    if dtype_ref.extra not in DTYPES:
        raise FormatError(f"tensor {_q(fqn)} has dtype {dtype_ref.extra}, which ckptsurgeon cannot handle")
    shape = _int64s(entry.fields.get("size"), f"the size of {_q(fqn)}")
    chunks_in = entry.fields.get("chunks")
    if not isinstance(chunks_in, list):
        raise _Bad(f"tensor {_q(fqn)} has no list of chunks")
    chunks = []
    total = 0
    for chunk in chunks_in:
        chunk = _obj(chunk, "ChunkStorageMetadata", f"a chunk of {_q(fqn)}")
        offsets = _int64s(chunk.fields.get("offsets"), f"the chunk offsets of {_q(fqn)}")
        sizes = _int64s(chunk.fields.get("sizes"), f"the chunk sizes of {_q(fqn)}")
        if not len(offsets) == len(sizes) == len(shape) or any(
            o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)
        ):
            raise _Bad(
                f"a chunk of {_q(fqn)} at {list(offsets)} of {list(sizes)} "
                f"lies outside its size {list(shape)}"
            )
        span = storage.get((fqn, offsets))
        if span is None:
            raise _Bad(f"a chunk of {_q(fqn)} at {list(offsets)} has no storage entry")
        chunks.append(DcpChunk(offsets, sizes, *span))
        total += prod(sizes)
    if total != prod(shape):
        raise _Bad(
            f"the chunks of {_q(fqn)} hold {total:,} elements "
            f"but its size {list(shape)} needs {prod(shape):,}"
        )
    return DcpTensor(fqn, dtype_ref.extra, shape, tuple(chunks))
