"""safetensors: a strict header-only reader and a torch-free streaming writer.

The file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the
data region. The reader parses the header with :mod:`json` alone (no torch, no
safetensors package) and validates it at least as strictly as the reference
implementation; every fault is a one-line :class:`~ckptsurgeon.errors.FormatError`.

Tied weights: safetensors cannot store two names for one tensor, so :func:`write`
keeps one name per shared tensor and records the others in ``__metadata__`` under
:data:`ALIASES_KEY` as a JSON object ``{"dropped name": "kept name"}``. :func:`read`
restores those names as records that share the kept tensor's :class:`Storage`, so a
``.pth`` -> safetensors -> ``.pth`` round trip gives the tied weights back.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import MISSING
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, BinaryIO

from ..core.checkpoint import Checkpoint
from ..core.dtypes import BY_SAFETENSORS, DTYPES, DType
from ..core.record import Storage, TensorRecord, contiguous_stride
from ..errors import FormatError, OutputError
from ..fileio.spans import FileSpan
from . import ReadOptions, check_input_path

FORMAT = "safetensors"
MAX_HEADER_BYTES = 100_000_000  # the reference implementation's cap
ALIASES_KEY = "ckptsurgeon.aliases"  # __metadata__ key: JSON {"dropped name": "kept name"}
_U64 = 1 << 64
_DAMAGED = "the file is damaged or was not written by a safetensors writer; download or save it again"


# -- reading -------------------------------------------------------------------------------
def read(path: Path, options: ReadOptions | None = None) -> Checkpoint:
    """Open a ``.safetensors`` file from its header alone; no tensor data is read.

    Every check is always made (``options.check`` adds nothing: the header fully
    determines the layout, including the exact file size). The work is linear in the
    header's size (at most :data:`MAX_HEADER_BYTES`); each entry's JSON is dropped as
    soon as its record is built.

    Example:
        >>> ckpt = read(Path("model.safetensors"))                # doctest: +SKIP
        >>> ckpt.weights().tensors["wte.weight"].shape            # doctest: +SKIP
        (1000, 64)
    """
    path = Path(path)
    size = check_input_path(path).st_size
    header_len, header = _read_header(path, size)
    raw = _parse_json(path, header)
    del header
    metadata = _parse_metadata(path, raw.pop("__metadata__", None))
    data_start = 8 + header_len
    tree, spans = _records(path, raw, data_start)
    _check_layout(path, spans, size - data_start)
    del spans
    notes: list[str] = []
    if options is not None and options.check:
        notes.append(
            f"checked: the header's {len(tree)} byte spans are in bounds, contiguous, "
            "non-overlapping and cover the data exactly (safetensors holds no checksums)"
        )
    aliases = parse_aliases(path, metadata, tree)
    if aliases:
        tree = restore_aliases(tree, aliases)
        notes.append(
            f"{len(aliases)} tied tensor name(s) restored from __metadata__[{ALIASES_KEY!r}] "
            f"(stored once): {', '.join(sorted(aliases))}"
        )
    return Checkpoint(
        path=path, format=FORMAT, tree=tree, files=(path,), file_size=size, metadata=metadata, notes=notes
    )


def _fault(path: Path, problem: str) -> FormatError:
    return FormatError(f"{path}: bad safetensors header: {problem}; {_DAMAGED}")


def _read_header(path: Path, size: int) -> tuple[int, bytes]:
    if size < 8:
        raise _fault(path, f"the file is {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > MAX_HEADER_BYTES:
            raise _fault(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + header_len > size:
            raise FormatError(
                f"{path}: truncated safetensors file: the header claims {header_len} bytes but the file "
                f"has only {size - 8} after the length; the download or save did not finish, fetch it again"
            )
        header = fh.read(header_len)
    if len(header) != header_len:
        raise _fault(path, "the file changed while it was read")
    return header_len, header


class DuplicateKeyError(ValueError):
    """Raised by :func:`no_duplicate_keys` (caught and reworded by the readers)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A ``json.loads`` ``object_pairs_hook`` that refuses a key given twice (JSON would keep the last).

    Example:
        >>> json.loads('{"a": 1, "a": 2}', object_pairs_hook=no_duplicate_keys)
        Traceback (most recent call last):
        ...
        ckptsurgeon.formats.safetensors.DuplicateKeyError: a
    """
    result = dict(pairs)  # built in C; only a short count sends us looking for the duplicate
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(key)
            seen.add(key)
    return result


class _NegativeZero(int):
    """JSON ``-0``: an integer to Python, a float to the reference parser (serde), never a size."""


def _json_int(text: str) -> int:
    return _NegativeZero(0) if text == "-0" else int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):  # 1e400: the reference parser refuses what it cannot hold
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_LONE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def _parse_json(path: Path, header: bytes) -> dict[str, Any]:
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _fault(path, f"not valid UTF-8 (byte {exc.start} of the header)") from None
    if not text.lstrip(" \t\n\r").startswith("{"):  # JSON whitespace first is fine, as for the reference
        raise _fault(path, "the header does not start with '{' (a JSON object)")
    try:
        raw = json.loads(
            text,
            object_pairs_hook=no_duplicate_keys,
            parse_constant=_reject_constant,
            parse_float=_json_float,
            parse_int=_json_int if "-0" in text else None,  # the hook costs a call per number
        )
    except DuplicateKeyError as exc:
        raise _fault(path, f"the key {exc.key!r} appears twice") from None
    except (ValueError, RecursionError) as exc:
        raise _fault(path, f"not valid JSON ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(raw, dict):
        raise _fault(path, f"the header is a JSON {type(raw).__name__}, not an object")
    if _LONE_SURROGATE.search(text):  # a \\ud800 escape is JSON but not Unicode (rare: look closer)
        _check_strings(path, raw)
    return raw


def _check_strings(path: Path, node: Any) -> None:
    """Refuse an escaped unpaired surrogate anywhere in the header, ignored fields included."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _check_text(path, item, "a string")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _parse_metadata(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fault(path, f"__metadata__ must be an object of strings, not a JSON {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise _fault(path, f"__metadata__[{key!r}] must be a string, not {type(item).__name__}")
        _check_text(path, key, "__metadata__ key")
        _check_text(path, item, f"__metadata__[{key!r}]")
    return dict(value)


def _check_text(path: Path, text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _fault(path, f"{what} {_short(text)} holds an unpaired surrogate (not valid Unicode)") from None


# The bounds on a shape: each dim a JSON integer 0 <= d < 2**63 (torch and numpy sizes are int64;
# the reference parser itself reads u64), the element count, multiplied left to right, and its size in
# bits below 2**64 (the reference's checked arithmetic: [2**40, 2**40, 0] overflows, [0, 2**40, 2**40]
# does not), and the byte count equal to the data_offsets span.
MAX_DIM = (1 << 63) - 1
_Span = tuple[int, int, str]


def _records(path: Path, raw: dict[str, Any], data_start: int) -> tuple[dict[str, TensorRecord], list[_Span]]:
    """Validate every entry and build its record, dropping the entry's JSON as it goes.

    The records are filled in directly rather than through the frozen dataclasses' ``__init__``
    (one ``object.__setattr__`` per field): a header can hold a million entries.
    """
    tree: dict[str, TensorRecord] = {}
    spans: list[_Span] = []
    new, storage_defaults, record_defaults = object.__new__, _STORAGE_DEFAULTS, _RECORD_DEFAULTS
    for name in list(raw):
        dtype, shape, begin, end = _parse_entry(path, name, raw.pop(name))
        storage = new(Storage)
        fields = storage.__dict__
        fields.update(storage_defaults)
        fields["key"], fields["dtype"], fields["nbytes"] = name, dtype.name, end - begin
        fields["path"], fields["offset"] = path, data_start + begin
        record = new(TensorRecord)
        fields = record.__dict__
        fields.update(record_defaults)
        fields["name"], fields["dtype"], fields["shape"], fields["storage"] = name, dtype.name, shape, storage
        tree[name] = record
        spans.append((begin, end, name))
    return tree, spans


_STORAGE_DEFAULTS = {f.name: f.default for f in dataclass_fields(Storage) if f.default is not MISSING}
_RECORD_DEFAULTS = {f.name: f.default for f in dataclass_fields(TensorRecord) if f.default is not MISSING}
if {f.name for f in dataclass_fields(Storage)} - set(_STORAGE_DEFAULTS) != {"key", "dtype", "nbytes"} or {
    f.name for f in dataclass_fields(TensorRecord)
} - set(_RECORD_DEFAULTS) != {"name", "dtype", "shape"}:  # pragma: no cover
    raise ImportError("Storage or TensorRecord gained a field without a default; _records must set it")


def _parse_entry(path: Path, name: str, value: Any) -> tuple[DType, tuple[int, ...], int, int]:
    try:  # the common case, checked in full below
        code, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
        dtype = BY_SAFETENSORS[code]
    except (TypeError, KeyError):
        return _entry_fault(path, name, value)
    if type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
        return _entry_fault(path, name, value)
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or begin < 0 or end < begin:
        return _entry_fault(path, name, value)
    numel = 1
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= MAX_DIM:
            return _entry_fault(path, name, value)
        numel *= dim
        if numel >= _U64:
            raise _fault(
                path, f"tensor {_short(name)}: shape {_short(shape)} overflows a 64-bit element count"
            )
    if numel * dtype.itemsize * 8 >= _U64:
        raise _fault(path, f"tensor {_short(name)}: shape {_short(shape)} overflows a 64-bit size in bits")
    if numel == 0 and len(shape) > 1 and _torch_refuses_empty(shape):
        raise _fault(
            path, f"tensor {_short(name)}: shape {_short(shape)} overflows torch's 64-bit sizes or strides"
        )
    if numel * dtype.itemsize != end - begin:
        raise _fault(
            path,
            f"tensor {_short(name)}: shape {_short(shape)} of {code} needs {numel * dtype.itemsize} bytes "
            f"but data_offsets span {end - begin}",
        )
    return dtype, tuple(shape), begin, end


def _torch_refuses_empty(shape: list[int]) -> bool:
    """Whether torch refuses an empty tensor of ``shape`` that the safetensors library hands it
    (its element count, multiplied from the left below 2**64, is checked by the caller): each
    contiguous stride, multiplied from the right in wrapping 64-bit arithmetic, must not come out
    negative ("Stride calculation overflowed": ``[0, 2, 2**62]``; ``[0, 2**40, 2**40]`` wraps to 0
    and loads).

    Example:
        >>> [_torch_refuses_empty(s) for s in ([0, 2, 2**62], [0, 2**40, 2**40], [2**62, 2, 0])]
        [True, False, False]
    """
    stride = 1
    for size in reversed(shape[1:]):
        stride = stride * max(size, 1) % _U64
        if stride >= 1 << 63:
            return True
    return False


def _entry_fault(path: Path, name: str, value: Any) -> Any:
    """Say what is wrong with an entry the fast path refused (never returns)."""
    _check_text(path, name, "tensor name")
    where = f"tensor {_short(name)}"
    if not isinstance(value, dict):
        raise _fault(path, f"{where}: the entry is a JSON {type(value).__name__}, not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in value:
            raise _fault(path, f"{where}: no {field!r}")
    code, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(code, str):
        raise _fault(path, f"{where}: dtype must be a string, not {type(code).__name__}")
    if code not in BY_SAFETENSORS:
        known = ", ".join(sorted(BY_SAFETENSORS))
        raise _fault(path, f"{where}: unknown dtype {_short(code)} (known: {known})")
    if not isinstance(shape, list) or not all(_is_dim(d) for d in shape):
        raise _fault(
            path, f"{where}: shape must be a list of non-negative integers below 2**63, got {_short(shape)}"
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise _fault(path, f"{where}: data_offsets must be two non-negative integers, got {_short(offsets)}")
    begin, end = offsets
    raise _fault(path, f"{where}: data_offsets end {end} is before begin {begin}")


def _is_uint(value: Any) -> bool:
    return type(value) is int and value >= 0


def _is_dim(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_DIM


def _short(value: Any, limit: int = 60) -> str:
    """``value`` as JSON for a message, cut to ``limit`` characters; built from a bounded part of it
    (a shape may be a million-long or 900-deep list).

    Example:
        >>> _short(list(range(10**6))), _short([[[[[1]]]]]), _short("a" * 100, 8)
        ('[0, 1, 2, 3, 4, 5, 6, 7, …]', '[[[[…]]]]', "'aaaaaa…")
    """
    text = repr(value[: limit + 1]) if isinstance(value, str) else _bounded_json(value, 3)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bounded_json(value: Any, depth: int) -> str:
    if isinstance(value, list | dict):
        if depth == 0:
            return "[…]" if isinstance(value, list) else "{…}"
        items = list(value.items())[:8] if isinstance(value, dict) else value[:8]
        more = ", …" if len(value) > 8 else ""
        if isinstance(value, dict):
            inner = ", ".join(f"{_short(k, 20)}: {_bounded_json(v, depth - 1)}" for k, v in items)
            return "{" + inner + more + "}"
        return "[" + ", ".join(_bounded_json(v, depth - 1) for v in items) + more + "]"
    if isinstance(value, str):
        return json.dumps(value[:40])
    return json.dumps(value) if not isinstance(value, int) or value.bit_length() < 200 else "(a huge integer)"


def _check_layout(path: Path, spans: list[_Span], data_size: int) -> None:
    """Tensors must tile the data region exactly: sorted by begin, no gap, no overlap, no tail.
    (Sorting is linear for spans listed in data order, as every writer lists them.)"""
    expected = 0
    previous = None
    spans.sort()
    for begin, end, name in spans:
        if end > data_size:
            raise FormatError(
                f"{path}: truncated safetensors file: tensor {_short(name)} ends at data byte {end} but the "
                f"data region holds {data_size} bytes; the download or save did not finish, fetch it again"
            )
        if begin < expected:
            raise _fault(
                path, f"tensor {_short(name)} (bytes {begin}..{end}) overlaps tensor {_short(previous)}"
            )
        if begin > expected:
            after = f"after tensor {_short(previous)}" if previous is not None else "at the start of the data"
            raise _fault(
                path, f"{begin - expected} bytes {after} belong to no tensor (gap before {_short(name)})"
            )
        expected, previous = end, name
    if expected != data_size:
        raise _fault(path, f"{data_size - expected} bytes after the last tensor belong to no tensor")


# -- aliases ---------------------------------------------------------------------------------
def parse_aliases(
    path: Path, metadata: Mapping[str, str], tensors: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """The ``{dropped: kept}`` tied-name map recorded by :func:`write`, checked against the
    stored ``tensors`` when given (each kept name stored, no dropped name stored).

    Example:
        >>> parse_aliases(Path("m.safetensors"), {ALIASES_KEY: '{"lm_head.weight": "wte.weight"}'},
        ...               {"wte.weight": None})
        {'lm_head.weight': 'wte.weight'}
    """
    text = metadata.get(ALIASES_KEY)
    if text is None:
        return {}
    where = f"__metadata__[{ALIASES_KEY!r}]"
    try:
        aliases = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except ValueError:
        raise _fault(path, f"{where} is not a JSON object") from None
    if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
        raise _fault(path, f"{where} must map tied names to stored names (strings)")
    if tensors is not None:
        for dropped, kept in aliases.items():
            if kept not in tensors:
                raise _fault(path, f"{where}: {dropped!r} is tied to {kept!r}, which the file does not hold")
            if dropped in tensors:
                raise _fault(path, f"{where}: tied name {dropped!r} is also stored as a tensor")
    return aliases


def restore_aliases(
    tensors: Mapping[str, TensorRecord], aliases: Mapping[str, str]
) -> dict[str, TensorRecord]:
    """Add each tied name as a record sharing its kept tensor's storage (so writers store it once).

    Example:
        >>> rec = TensorRecord("wte.weight", "float32", (2, 2))
        >>> list(restore_aliases({"wte.weight": rec}, {"lm_head.weight": "wte.weight"}))
        ['wte.weight', 'lm_head.weight']
    """
    result = dict(tensors)
    for dropped, kept in aliases.items():
        result[dropped] = tensors[kept].renamed(dropped)
    return result


def find_aliases(tensors: Mapping[str, TensorRecord]) -> dict[str, str]:
    """Names whose record views exactly the same bytes as an earlier name: ``{dropped: kept}``.

    Two records are tied when they share a :class:`Storage` object (or the same span of
    the same file) with the same offset, dtype, shape and stride. Empty tensors are never tied.

    Example:
        >>> s = Storage(key="0", dtype="float32", nbytes=8, loader=lambda: bytes(8))
        >>> a = TensorRecord("a", "float32", (2,), s)
        >>> find_aliases({"a": a, "b": a.renamed("b")})
        {'b': 'a'}
    """
    first: dict[tuple[Any, ...], str] = {}
    aliases: dict[str, str] = {}
    for name, rec in tensors.items():
        key = _tie_key(rec)
        if key is None:
            continue
        kept = first.setdefault(key, name)
        if kept != name:
            aliases[name] = kept
    return aliases


def _tie_key(rec: TensorRecord) -> tuple[Any, ...] | None:
    storage = rec.storage
    if storage is None or rec.numel == 0 or rec.loader is not None:
        return None
    where = (
        ("file", os.fspath(storage.path), storage.offset)
        if storage.path is not None
        else ("obj", id(storage))
    )
    stride = rec.stride or contiguous_stride(rec.shape)
    return (where, rec.storage_offset, rec.dtype, rec.shape, stride)


# -- writing ---------------------------------------------------------------------------------
def write_file(tensors: Mapping[str, TensorRecord], fh: BinaryIO, output: Path) -> None:
    """:func:`write` with ``{"format": "pt"}`` metadata: the one-file writer of
    :data:`ckptsurgeon.formats.WRITERS` (``"safetensors"``; ``output`` names the file written).

    Example:
        >>> with atomic_output("out.safetensors") as fh:          # doctest: +SKIP
        ...     write_file(ckpt.weights().tensors, fh, Path("out.safetensors"))
    """
    write(tensors, fh, {"format": "pt"})


def write(
    tensors: Mapping[str, TensorRecord], fh: BinaryIO, metadata: Mapping[str, str] | None = None
) -> None:
    """Stream ``tensors`` into ``fh`` as safetensors, without torch for raw records.

    The layout is safetensors' own: data sorted by dtype (widest first, in the order of
    safetensors' dtype list, so every tensor is aligned to its dtype), then by name; the header
    lists ``__metadata__`` and then the tensors in data order. With the same metadata the file
    is byte-identical to what ``safetensors.torch.save_file`` writes for the same tensors.
    ``{"format": "pt"}`` is always in the metadata (Hugging Face's ``save_pretrained`` writes it
    too). Tied tensors (see :func:`find_aliases`) are stored once and the dropped names recorded
    under :data:`ALIASES_KEY`.
    Non-contiguous records are written contiguous.

    Example:
        >>> with atomic_output("out.safetensors") as fh:          # doctest: +SKIP
        ...     write(ckpt.weights().tensors, fh)
    """
    for name, rec in tensors.items():
        _check_writable(name, rec)
    aliases = find_aliases(tensors)
    header_meta = _header_metadata(metadata, aliases)
    layout = sorted(((name, rec) for name, rec in tensors.items() if name not in aliases), key=_layout_key)
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, rec in layout:
        offsets[name] = (pos, pos + rec.nbytes)
        pos += rec.nbytes
    fh.write(_encode_header(header_meta, layout, offsets))
    for name, rec in layout:
        _write_tensor(fh, name, rec)


# safetensors' dtypes in its own order ("increasing alignment"); its writer sorts the data by
# this order, widest first, then by name.
_SAFETENSORS_DTYPE_ORDER = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)  # fmt: skip
_WRITE_ORDER = {code: rank for rank, code in enumerate(_SAFETENSORS_DTYPE_ORDER)}


def _layout_key(item: tuple[str, TensorRecord]) -> tuple[int, str]:
    name, rec = item
    # only dtypes with a safetensors code get here: the writer refuses the others first
    return (-_WRITE_ORDER[DTYPES[rec.dtype].safetensors], name)  # type: ignore[index]


def _check_writable(name: str, rec: TensorRecord) -> None:
    dtype = DTYPES.get(rec.dtype)
    if dtype is None or dtype.safetensors is None:
        raise OutputError(
            f"{name}: dtype {rec.dtype} cannot be stored in safetensors; cast it (--dtype) or write a .pth"
        )
    if not rec.has_data:
        raise OutputError(
            f"{name}: the record has no data (built on the meta device); nothing can be written"
        )


def _header_metadata(metadata: Mapping[str, str] | None, aliases: Mapping[str, str]) -> dict[str, str]:
    result = {str(k): str(v) for k, v in (metadata or {}).items() if k != ALIASES_KEY}
    result.setdefault("format", "pt")
    if aliases:
        result[ALIASES_KEY] = json.dumps(dict(aliases), ensure_ascii=False, separators=(",", ":"))
    return result


def _encode_header(
    metadata: dict[str, str], kept: Iterable[tuple[str, TensorRecord]], offsets: Mapping[str, tuple[int, int]]
) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    for name, rec in kept:
        code = DTYPES[rec.dtype].safetensors
        header[name] = {"dtype": code, "shape": list(rec.shape), "data_offsets": list(offsets[name])}
    try:
        body = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise OutputError(f"a tensor name or metadata value is not valid Unicode ({exc.reason})") from None
    body += b" " * (-len(body) % 8)  # the data region starts 8-byte aligned
    return struct.pack("<Q", len(body)) + body


def _write_tensor(fh: BinaryIO, name: str, rec: TensorRecord) -> None:
    span = rec.file_span()  # (path, offset, length) when rec.is_raw and rec.numel
    if span is not None:  # a file span, through one reused aligned buffer
        try:
            FileSpan(*span).copy_to(fh)
        except EOFError:
            raise OutputError(f"{name}: the source file ends inside the tensor; it is truncated") from None
        return
    written = 0
    for chunk in rec.iter_bytes():
        fh.write(chunk)
        written += len(chunk)
    if written != rec.nbytes:
        raise OutputError(f"{name}: produced {written} bytes, expected {rec.nbytes}; the source is damaged")
