"""The write pipeline every writing command shares: open, choose weights, plan, cast, write, verify.

``rename``, ``strip-head``, ``convert`` and ``adapt`` differ only in the plan they make;
:func:`write_checkpoint` does the rest. Data is streamed record by record (a cast holds
one storage at a time); the output goes through :func:`~ckptsurgeon.writing.atomic_output`;
then the written file is reopened with :func:`~ckptsurgeon.formats.open_checkpoint` and
every tensor is compared bit for bit (stream hashes) before it replaces anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from .checkpoint import Checkpoint, StateDictCandidate, resolve_key
from .dtypes import DTYPES, get_dtype
from .errors import CkptError, OutputError
from .formats import ReadOptions, open_checkpoint
from .record import FD_CACHE, Storage, TensorRecord, kernel_copies, span_crcs, tensor_to_bytes
from .report import human_bytes
from .surgery import Plan
from .writing import atomic_output

PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
PROGRESS_MIN_BYTES = 256 * 2**20  # show a progress bar (TTY only) from this much data on


@dataclass(frozen=True)
class Source:
    """An opened checkpoint and the weights chosen in it."""

    checkpoint: Checkpoint
    weights: StateDictCandidate

    @property
    def tensors(self) -> dict[str, TensorRecord]:
        return self.weights.tensors


@dataclass(frozen=True)
class WriteOptions:
    """Where and how to write. ``to``: ``"pth"`` or ``"safetensors"`` (default: from the suffix).

    ``max_shard_size`` (bytes) writes a folder of shards in Hugging Face's layout.
    ``weights_only``: a ``.pth`` output holds only the weights (no optimizer, epoch ...).
    """

    output: Path
    to: str | None = None
    dtype: str | None = None
    max_shard_size: int | None = None
    weights_only: bool = False
    force: bool = False
    verify: bool = True
    progress: bool | None = None  # None: a bar when stderr is a TTY and the work is large


@dataclass
class WriteResult:
    """What was written: files, format, counts, sizes, and what was left out."""

    output: Path
    format: str  # "pth", "safetensors", "sharded-safetensors", "sharded-pth"
    files: list[Path]
    tensors: int
    source_size: int
    output_size: int
    verified: bool
    cast: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: ``wrote out.pth (pth, 36 tensors, 1.2 MiB), verified bit for bit``."""
        check = "verified bit for bit" if self.verified else "not verified (--no-verify)"
        cast = f", {self.cast} cast" if self.cast else ""
        return (
            f"wrote {self.output} ({self.format}, {self.tensors} tensors{cast}, "
            f"{human_bytes(self.output_size)}), {check}"
        )

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return data | {"output": str(self.output), "files": [str(f) for f in self.files]}


# -- opening ----------------------------------------------------------------------------------
def open_source(
    path: str | os.PathLike[str], key: str | None = None, read_options: ReadOptions | None = None
) -> Source:
    """Open any checkpoint and choose its weights (``key``: a dotted entry, else the default).

    Example:
        >>> src = open_source("fixtures/resnet_dp_6.pth")              # doctest: +SKIP
        >>> src.weights.key, len(src.tensors)                           # doctest: +SKIP
        ('', 122)
    """
    ckpt = open_checkpoint(path, read_options)
    return Source(ckpt, ckpt.weights(key))


# -- casting ----------------------------------------------------------------------------------
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
        elif rec.storage is not None and rec.loader is None and _storage_castable(rec):
            storage = cache.get(id(rec.storage))
            if storage is None:
                storage = cache[id(rec.storage)] = _cast_storage(rec.storage, target)
            out[name] = replace(rec, dtype=target, storage=storage)
        else:
            out[name] = replace(rec, dtype=target, loader=_cast_loader(rec, target))
    return out


def cast_dtype(dtype: str) -> str:
    """The canonical floating dtype for ``--dtype`` (bf16, fp16, fp32 ...), or an OutputError."""
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


# -- choosing the output ----------------------------------------------------------------------
def output_kind(options: WriteOptions) -> str:
    """``pth``, ``safetensors``, ``sharded-pth`` or ``sharded-safetensors`` for these options.

    Example:
        >>> output_kind(WriteOptions(Path("m.safetensors")))
        'safetensors'
        >>> output_kind(WriteOptions(Path("out"), max_shard_size=10**9))
        'sharded-safetensors'
    """
    to = options.to
    if to not in (None, "pth", "safetensors"):
        raise OutputError(f"--to {to}: unknown format; use pth or safetensors")
    suffix = options.output.suffix.lower()
    if options.max_shard_size is not None:
        if suffix in PTH_SUFFIXES or suffix == ".safetensors":
            raise OutputError(
                f"{options.output}: --max-shard-size writes a folder; name a folder, not a file"
            )
        return f"sharded-{to or 'safetensors'}"
    if to is None:
        if suffix == ".safetensors":
            return "safetensors"
        if suffix in PTH_SUFFIXES:
            return "pth"
        raise OutputError(
            f"{options.output}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
            "use .pth or .safetensors, or pass --to pth|safetensors"
        )
    return to


def rebuilt_tree(source: Source, tensors: dict[str, TensorRecord], plan: Plan | None = None) -> Any:
    """The checkpoint's tree with ``tensors`` in place of the chosen weights entry (all else kept).

    The weights keep their container type and torch's ``_metadata`` (module versions), with
    module names renamed as ``plan`` renames the tensors.

    Example:
        >>> rebuilt_tree(src, {"fc.weight": rec})                      # doctest: +SKIP
        {'epoch': 3, 'state_dict': {'fc.weight': ...}, 'optimizer': {...}}
    """
    key = source.weights.key
    node = resolve_key(source.checkpoint.tree, key)
    weights = weights_node(node, tensors, plan)
    if key == "":
        return weights
    return _substitute(source.checkpoint.tree, node, weights)


def weights_node(original: Any, tensors: dict[str, TensorRecord], plan: Plan | None) -> Any:
    """``tensors`` in the container type of ``original``, with its ``_metadata`` renamed by ``plan``.

    Example:
        >>> weights_node({}, {"w": rec}, None)                         # doctest: +SKIP
        {'w': ...}
    """
    metadata = getattr(original, "_metadata", None)
    node = _copy_dict(original, dict(tensors)) if isinstance(original, dict) else dict(tensors)
    if isinstance(metadata, dict) and hasattr(node, "__dict__"):
        node._metadata = type(metadata)(_renamed_modules(metadata, plan))
    return node


def _renamed_modules(metadata: dict[str, Any], plan: Plan | None) -> dict[str, Any]:
    """Module names (``_metadata`` keys) renamed the way the plan renames their tensors."""
    if plan is None or plan.is_identity:
        return dict(metadata)
    modules: dict[str, str] = {}
    for e in plan.entries:
        if e.new is None:
            continue
        old, new = e.old.split(".")[:-1], e.new.split(".")[:-1]
        while True:
            modules.setdefault(".".join(old), ".".join(new))
            if not old or not new or old[-1] != new[-1]:
                break
            old, new = old[:-1], new[:-1]
    out: dict[str, Any] = {}
    for name, value in metadata.items():
        if name in modules and modules[name] not in out:
            out[modules[name]] = value
    return out


def _substitute(node: Any, old: Any, new: Any) -> Any:
    if node is old:
        return new
    if isinstance(node, dict):
        return _copy_dict(node, {k: _substitute(v, old, new) for k, v in node.items()})
    if isinstance(node, list):
        return [_substitute(v, old, new) for v in node]
    if type(node) is tuple:
        return tuple(_substitute(v, old, new) for v in node)
    return node


def _copy_dict(original: dict[Any, Any], items: dict[Any, Any]) -> dict[Any, Any]:
    if type(original) is dict:
        return items
    try:
        copy = type(original)(items)
        copy.__dict__.update(getattr(original, "__dict__", {}))
        return copy
    except TypeError:
        return items


def dropped_entries(source: Source) -> list[str]:
    """Top-level entries besides the weights (what a weights-only output leaves out)."""
    if source.weights.key == "":
        return []
    return [e.key for e in source.checkpoint.top_level(source.weights.key) if e.kind != "weights"]


# -- writing ----------------------------------------------------------------------------------
def write_checkpoint(source: Source, plan: Plan | None, options: WriteOptions) -> WriteResult:
    """Apply ``plan`` to the chosen weights, cast, write atomically, reload and verify.

    Example:
        >>> src = open_source("model.pth")                             # doctest: +SKIP
        >>> plan = make_plan(src.tensors, [strip_prefix("module.")])   # doctest: +SKIP
        >>> write_checkpoint(src, plan, WriteOptions(Path("fixed.safetensors"))).summary()  # doctest: +SKIP
        'wrote fixed.safetensors (safetensors, 122 tensors, 1.1 MiB), verified bit for bit'
    """
    kind = output_kind(options)
    tensors = plan.apply(source.tensors) if plan is not None else dict(source.tensors)
    cast = 0
    if options.dtype is not None:
        before = tensors
        tensors = cast_tensors(before, options.dtype)
        cast = sum(1 for name, rec in tensors.items() if rec.dtype != before[name].dtype)
    notes: list[str] = []
    unread = _has_unread_values(source)
    keep_tree = kind == "pth" and not options.weights_only and not unread
    left_out = [] if keep_tree else dropped_entries(source)
    if left_out:
        why = "safetensors holds the weights only" if "safetensors" in kind else "--weights-only"
        if unread and kind == "pth" and not options.weights_only:
            why = "the reader does not load this folder's non-tensor values, so only the weights are written"
        notes.append(
            f"left out {len(left_out)} non-weight entr{'y' if len(left_out) == 1 else 'ies'} ({why}): "
            + ", ".join(left_out)
        )
    payload = rebuilt_tree(source, tensors, plan) if keep_tree else _flat_payload(source, tensors, plan, kind)
    if kind.startswith("sharded-"):
        files = _write_sharded(tensors, options, kind.removeprefix("sharded-"))
    else:
        files = [_write_single(payload, options, kind)]
    output_size = sum(f.stat().st_size for f in files)
    if left_out:
        notes.append(f"size: {human_bytes(source.checkpoint.file_size)} -> {human_bytes(output_size)}")
    size = source.checkpoint.file_size
    return WriteResult(
        options.output, kind, files, len(tensors), size, output_size, options.verify, cast, notes
    )


def _has_unread_values(source: Source) -> bool:
    """True when the tree holds placeholders for values the reader did not load (DCP bytes entries)."""
    if source.checkpoint.format != "dcp":
        return False
    from .formats.dcp import BYTES_PLACEHOLDER

    return any(leaf == BYTES_PLACEHOLDER for _path, leaf in _leaves(source.checkpoint.tree, ()))


def _flat_payload(source: Source, tensors: dict[str, TensorRecord], plan: Plan | None, kind: str) -> Any:
    if kind != "pth":
        return tensors
    return weights_node(resolve_key(source.checkpoint.tree, source.weights.key), tensors, plan)


def _write_single(payload: Any, options: WriteOptions, kind: str) -> Path:
    out = options.output
    total = sum(r.nbytes for r in _records(payload))
    with (
        atomic_output(out, force=options.force) as fh,
        _progress(total, options.progress, f"writing {out.name}") as bar,
    ):
        sink: BinaryIO = _CountingFile(fh, bar) if bar is not None else fh
        # verified outputs may take big archive members by kernel copy: verification checks them
        with kernel_copies() if options.verify else contextlib.nullcontext():
            if kind == "safetensors":
                from .formats.safetensors import write as write_safetensors

                write_safetensors(payload, sink, {"format": "pt"})
            else:
                from .formats.torchzip import write as write_torchzip

                write_torchzip(payload, sink, archive_name=_archive_name(out))
        fh.flush()
        with _syncing(fh):
            if options.verify:
                _verify_open_file(fh, payload, out)
    FD_CACHE.forget(out)  # the path now names the new file; cached descriptors see the old one
    return out


@contextlib.contextmanager
def _syncing(fh: BinaryIO) -> Iterator[None]:
    """fsync ``fh`` in a background thread while the body runs (verification reads the page cache
    meanwhile), so atomic_output's own fsync finds nothing left to write. An error is re-raised.

    Example:
        >>> with _syncing(fh):                                        # doctest: +SKIP
        ...     verify(...)
    """
    import threading

    errors: list[OSError] = []

    def run() -> None:
        try:
            os.fsync(fh.fileno())
        except OSError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="ckpt-fsync", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()
    if errors:
        raise errors[0]


def _write_sharded(tensors: dict[str, TensorRecord], options: WriteOptions, fmt: str) -> list[Path]:
    from .formats.sharded import write as write_shards

    inputs = {r.storage.path.parent for r in tensors.values() if r.storage is not None and r.storage.path}
    if options.output.is_dir() and any(_same_dir(options.output, p) for p in inputs):
        raise OutputError(
            f"{options.output}: holds the input's shards; write the new shards to another folder"
        )

    files = write_shards(
        tensors,
        options.output,
        max_shard_bytes=options.max_shard_size or 1,
        fmt=fmt,
        force=options.force,
        metadata={"format": "pt"},
    )
    for f in files:
        FD_CACHE.forget(f)
    if options.verify:
        try:
            verify(options.output, tensors)
        except OutputError:
            for f in files:
                with contextlib.suppress(OSError):
                    f.unlink()
            raise
    return files


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _archive_name(out: Path) -> str:
    stem = out.name.split(".", 1)[0]
    return stem if stem.isidentifier() else "archive"


# -- verification -----------------------------------------------------------------------------
def verify(output: str | os.PathLike[str], expected: Any, *, label: str | None = None) -> None:
    """Reopen ``output`` and compare every tensor (and plain value) with ``expected``, bit for bit.

    ``expected`` is what was written: a state dict of records, or a whole tree. The output is
    read once; what was written is fingerprinted from the CRCs computed while writing or
    recorded by the source archive (re-read only to explain a difference). Raises
    OutputError naming the first difference.

    Example:
        >>> verify("fixed.safetensors", plan.apply(src.tensors))      # doctest: +SKIP
    """
    label = label or str(output)
    ckpt = open_checkpoint(output, ReadOptions())
    got_tree = ckpt.weights("").tensors if _is_flat_state_dict(expected) else ckpt.tree
    want = dict(_leaves(expected, ()))
    got = dict(_leaves(got_tree, ()))
    if want.keys() != got.keys():
        for path in want.keys() | got.keys():
            if path not in got or path not in want:
                where = "missing from" if path not in got else "unexpected in"
                raise OutputError(f"{label}: verification failed: {'.'.join(path)!r} is {where} the output")
    want_fp = _fingerprints(want, recorded=True)
    try:
        got_fp = _fingerprints(got)
    except CkptError:
        for value in want.values():
            _check_source(value)  # a damaged source explains it better than the output's fault
        raise
    for path, value in want.items():
        if want_fp[path] != got_fp[path]:
            _check_source(value)
            raise OutputError(
                f"{label}: verification failed: {'.'.join(path)!r} differs from what was written "
                "(the disk or the source changed?); nothing was kept"
            )


def _fingerprints(leaves: dict[Any, Any], *, recorded: bool = False) -> dict[Any, Any]:
    """:func:`_fingerprint` of every leaf, the file spans of each file CRC-ed in one ordered pass
    (``recorded``: a span's known CRC is taken without reading it)."""
    result: dict[Any, Any] = {}
    by_file: dict[Path, list[tuple[Any, TensorRecord, tuple[int, int]]]] = {}
    for path, value in leaves.items():
        if isinstance(value, TensorRecord) and value.numel and value.is_raw:
            start, length = value.byte_span
            storage = value.storage
            span = (storage.offset + start, length)  # type: ignore[union-attr]
            by_file.setdefault(storage.path, []).append((path, value, span))  # type: ignore[union-attr,arg-type]
        else:
            result[path] = _fingerprint(value)
    for file, items in by_file.items():
        crcs = span_crcs(file, [span for _p, _v, span in items], recorded=recorded)
        for (path, value, _span), crc in zip(items, crcs, strict=True):
            result[path] = ("tensor", value.dtype, tuple(value.shape), value.nbytes, crc)
    return result


def _check_source(value: Any) -> None:
    """Read a written record's source bytes again: a source whose bytes do not match its
    archive's CRC raises that one-line error (as an OutputError, which nothing rewords)."""
    if not isinstance(value, TensorRecord):
        return
    try:
        value.write_to(None)
    except CkptError as exc:
        raise OutputError(exc.message) from None
    except (OSError, EOFError, ValueError):
        return  # the source cannot be read again: the caller's error stands


def _verify_open_file(fh: BinaryIO, payload: Any, out: Path) -> None:
    """Verify the temporary file before it replaces anything (through /proc when available)."""
    proc = Path(f"/proc/self/fd/{fh.fileno()}")
    if not proc.exists():
        return
    try:
        verify(proc, payload, label=str(out))
    except OutputError:
        raise
    except CkptError as exc:
        raise OutputError(
            f"{out}: verification failed: the written file does not read back ({exc.message})"
        ) from None
    finally:
        FD_CACHE.forget(proc)


def _is_flat_state_dict(node: Any) -> bool:
    return isinstance(node, dict) and all(isinstance(v, TensorRecord) for v in node.values())


def _leaves(node: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, TensorRecord) or not isinstance(node, dict | list | tuple):
        yield path, node
        return
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in items:
        if isinstance(v, TensorRecord):  # most leaves: no generator of their own
            yield (*path, str(k)), v
        else:
            yield from _leaves(v, (*path, str(k)))


def _fingerprint(value: Any) -> Any:
    if isinstance(value, TensorRecord):  # CRC-32 of the bytes, streamed (zip's own check, ~6 GB/s)
        return ("tensor", value.dtype, tuple(value.shape), value.nbytes, value.write_to(None))
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return ("value", type(value).__name__, repr(value))
    return ("object", type(value).__name__)


def _records(node: Any) -> Iterator[TensorRecord]:
    for _path, leaf in _leaves(node, ()):
        if isinstance(leaf, TensorRecord):
            yield leaf


# -- progress ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _progress(total: int, wanted: bool | None, label: str) -> Iterator[Any]:
    show = wanted if wanted is not None else (sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES)
    if not show:
        yield None
        return
    import click

    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar


class _CountingFile:
    """A file wrapper that advances a progress bar as bytes are written (everything else delegated)."""

    def __init__(self, fh: BinaryIO, bar: Any) -> None:
        self._fh = fh
        self._bar = bar

    def write(self, data: Any) -> int:
        n = self._fh.write(data)
        self._bar.update(len(data) if n is None else n)
        return len(data) if n is None else n

    def advance(self, n: int) -> None:
        """Count ``n`` bytes written behind the wrapper's back (a kernel copy)."""
        self._bar.update(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)
