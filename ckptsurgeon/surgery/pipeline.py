"""The write pipeline every writing command shares: open, choose weights, plan, cast, write, verify.

``rename``, ``strip-head``, ``convert`` and ``adapt`` differ only in the plan they make;
:func:`write_checkpoint` does the rest. Data is streamed record by record (a transformed entry
is computed one output at a time, see :mod:`ckptsurgeon.surgery.transforms`; a cast converts a
bounded piece at a time, see :mod:`ckptsurgeon.surgery.casting`); the output goes through
:func:`~ckptsurgeon.fileio.writing.atomic_output`; then the written file is reopened and every
tensor compared bit for bit (:mod:`ckptsurgeon.surgery.verify`) before it replaces anything.
The tree around the weights is rebuilt by :mod:`ckptsurgeon.core.trees`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..core.record import TensorRecord
from ..core.report import counted, human_bytes, plural, printable
from ..core.source import Source
from ..core.trees import dropped_entries, has_unread_values, rebuilt_tree, weights_payload
from ..core.walk import records
from ..errors import CkptError, OutputError, SurgeryError
from ..fileio.progress import counting, progress_bar
from ..fileio.spans import FD_CACHE, vouched_copies, write_scope
from ..fileio.writing import atomic_output, refuse_special_file
from ..formats import (
    DEFAULT_SHARD_FORMAT,
    OUTPUT_FORMATS,
    WRITERS,
    OutputKind,
    ReadOptions,
    output_kind_by_suffix,
    output_kind_for,
)
from .plan import Plan, make_plan
from .transforms import Cast

LISTED = 5  # names listed in a note before "..."


@dataclass(frozen=True)
class WriteOptions:
    """Where and how to write. ``to``: ``"pth"`` or ``"safetensors"`` (default: from the suffix).

    ``max_shard_size`` (bytes) writes a folder of shards in Hugging Face's layout.
    ``weights_only``: a ``.pth`` output holds only the weights (no optimizer, epoch ...).
    ``jobs``: shards written at once (default: one per CPU), bytes as a serial write's.
    """

    output: Path
    to: str | None = None
    dtype: str | None = None
    max_shard_size: int | None = None
    weights_only: bool = False
    force: bool = False
    verify: bool = True
    progress: bool | None = None  # None: a bar when stderr is a TTY and the work is large
    jobs: int | None = None  # shards written at once (None: one per CPU)


@dataclass
class WriteResult:
    """What was written: files, format, counts, sizes, and what was left out."""

    output: Path
    format: str  # the output kind's name (formats.WRITERS): "pth", "sharded-safetensors" ...
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
            f"wrote {printable(str(self.output))} ({self.format}, {counted(self.tensors, 'tensor')}{cast}, "
            f"{human_bytes(self.output_size)}), {check}"
        )

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return data | {"output": str(self.output), "files": [str(f) for f in self.files]}


def listing(names: list[str], limit: int = LISTED) -> str:
    """The first ``limit`` names, comma-separated, then ``...`` when there are more.

    Example:
        >>> listing(["a", "b", "c"], 2)
        'a, b, ...'
    """
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


# -- choosing the output ----------------------------------------------------------------------
def output_kind(options: WriteOptions) -> OutputKind:
    """The registry's output kind (:data:`~ckptsurgeon.formats.WRITERS`) for these options.

    Example:
        >>> output_kind(WriteOptions(Path("m.safetensors"))).name
        'safetensors'
        >>> output_kind(WriteOptions(Path("out"), max_shard_size=10**9)).name
        'sharded-safetensors'
    """
    to = options.to
    if to is not None and to not in OUTPUT_FORMATS:
        raise OutputError(f"--to {to}: unknown format; use {' or '.join(OUTPUT_FORMATS)}")
    refuse_special_file(options.output)
    suffix = options.output.suffix.lower()
    named = output_kind_by_suffix(suffix)
    folder = next((k for k in WRITERS.values() if k.folder and k.to == to), None)
    if folder is not None:
        return _folder_kind(folder, options, named)
    if options.max_shard_size is None and options.output.is_dir():
        raise OutputError(
            f"{options.output}: is a folder; name an output file ({_file_suffixes()}), "
            "or pass --max-shard-size to write shards into it"
        )
    if options.max_shard_size is not None:
        if named is not None:
            raise OutputError(
                f"{options.output}: --max-shard-size writes a folder; name a folder, not a file"
            )
        return output_kind_for(to or DEFAULT_SHARD_FORMAT, sharded=True)
    if to is None:
        if named is not None:
            return named
        raise OutputError(
            f"{options.output}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
            f"use {_file_suffixes()}, or pass --to {'|'.join(OUTPUT_FORMATS)}"
        )
    owner = next((k.to for k in WRITERS.values() if suffix in k.own_suffixes), to)  # .bin: either
    if owner != to:  # a .safetensors file holding a torch zip (or the reverse) fools every other tool
        raise OutputError(
            f"{options.output}: --to {to} contradicts the suffix {suffix!r}; "
            f"name the output with a {to} suffix, or leave out --to"
        )
    return output_kind_for(to, sharded=False)


def _folder_kind(kind: OutputKind, options: WriteOptions, named: OutputKind | None) -> OutputKind:
    """A folder output (``--to dcp``): refused with shards or a file's suffix."""
    if options.max_shard_size is not None:
        raise OutputError(f"--to {kind.to} writes one folder; leave out --max-shard-size")
    if named is not None:
        raise OutputError(
            f"{options.output}: --to {kind.to} contradicts the suffix {options.output.suffix.lower()!r}: "
            f"--to {kind.to} writes a folder; name a folder"
        )
    if options.output.exists() and not options.output.is_dir():
        raise OutputError(f"{options.output}: exists and is not a folder; --to {kind.to} writes a folder")
    return kind


def _file_suffixes() -> str:
    """``.pth or .safetensors``: the suffix proposed for each one-file output kind."""
    return " or ".join(k.suffixes[0] for k in WRITERS.values() if not k.sharded and k.suffixes)


# -- writing ----------------------------------------------------------------------------------
def write_checkpoint(source: Source, plan: Plan | None, options: WriteOptions) -> WriteResult:
    """Apply ``plan`` to the chosen weights, cast, write atomically, reload and verify.

    ``options.dtype`` adds its cast to the plan (:meth:`Plan.with_cast`) unless the plan already
    casts so; transformed entries are written as their transforms compute them, one at a time,
    and verified against that.

    Example:
        >>> src = open_source("model.pth")                             # doctest: +SKIP
        >>> plan = make_plan(src.tensors, [strip_prefix("module.")])   # doctest: +SKIP
        >>> write_checkpoint(src, plan, WriteOptions(Path("fixed.safetensors"))).summary()  # doctest: +SKIP
        'wrote fixed.safetensors (safetensors, 122 tensors, 1.1 MiB), verified bit for bit'
    """
    kind = output_kind(options)
    if options.dtype is not None:  # the cast is a transform of the plan's entries (already there: kept)
        plan = (plan or make_plan(source.tensors, [])).with_cast(source.tensors, options.dtype)
    tensors = plan.apply(source.tensors) if plan is not None else dict(source.tensors)
    if not tensors:
        raise SurgeryError(
            f"{source.checkpoint.path}: the plan drops every tensor ({len(source.tensors)}); "
            "nothing was written"
        )
    cast = sum(1 for e in plan.transformed if isinstance(e.transform, Cast)) if plan is not None else 0
    unread = has_unread_values(source)
    keep_tree = kind.holds_tree and not options.weights_only and not unread
    left_out = [] if keep_tree else dropped_entries(source)
    notes = _left_out_notes(left_out, kind, options.weights_only, unread)
    notes += _layout_notes(tensors, kind, options.max_shard_size)
    if keep_tree:
        payload = rebuilt_tree(source, tensors, plan)
    else:
        payload = weights_payload(source, tensors, plan, kind.holds_tree)
    with write_scope():  # this write's CRCs and helpers, seen by no other write
        if kind.folder:
            files = _write_folder(tensors, options, kind, source.verify_options)
        elif kind.sharded:
            files = _write_sharded(tensors, options, kind, source.verify_options)
        else:
            files = [_write_single(payload, options, kind, source.verify_options)]
    output_size = sum(f.stat().st_size for f in files)
    size = source.checkpoint.file_size
    if left_out:
        notes.append(f"size: {human_bytes(size)} -> {human_bytes(output_size)}")
    return WriteResult(
        options.output, kind.name, files, len(tensors), size, output_size, options.verify, cast, notes
    )


def _left_out_notes(left_out: list[str], kind: OutputKind, weights_only: bool, unread: bool) -> list[str]:
    if not left_out:
        return []
    why = f"{kind.to} holds the weights only" if kind.tensors_only else "--weights-only"
    if unread and kind.holds_tree and not weights_only:
        why = "the reader does not load this folder's non-tensor values, so only the weights are written"
    entries = counted(len(left_out), "non-weight entry", "non-weight entries")
    return [f"left out {entries} ({why}): " + ", ".join(left_out)]


def _layout_notes(tensors: Mapping[str, TensorRecord], kind: OutputKind, max_shard: int | None) -> list[str]:
    """What a reader of the output should know: tied names stored once, oversized shards."""
    notes: list[str] = []
    aliases: dict[str, str] = {}
    if kind.tensors_only or max_shard is not None:
        from ..formats.safetensors import ALIASES_KEY, find_aliases

        aliases = find_aliases(tensors) if _storages_shared(tensors) else {}
        if aliases and kind.tensors_only and not kind.ties_kept:
            pairs = [f"{alias} -> {kept}" for alias, kept in aliases.items()]
            whose = "its alias" if len(aliases) == 1 else "their aliases"
            notes.append(
                f"{counted(len(aliases), 'tied tensor')} written once, {whose} recorded in the metadata "
                f"({ALIASES_KEY!r}, as safetensors' save_model does): {listing(pairs)}; ckpt reads "
                "aliases back, plain safetensors.load_file returns only the kept name"
            )
    if max_shard is not None:
        big = [n for n, r in tensors.items() if r.nbytes > max_shard and n not in aliases]
        if big:
            sizes = [f"{n} ({human_bytes(tensors[n].nbytes)})" for n in big]
            which = "it" if len(big) == 1 else "each"
            notes.append(
                f"{counted(len(big), 'tensor')} {plural(len(big), 'is', 'are')} bigger than the "
                f"shard size limit ({human_bytes(max_shard)}), so {which} got a shard of its own: "
                f"{listing(sizes)}"
            )
    return notes


def _storages_shared(tensors: Mapping[str, TensorRecord]) -> bool:
    """True when two records read the same storage: the cheap test before looking for tied names."""
    seen: set[Any] = set()
    for rec in tensors.values():
        storage = rec.storage
        if storage is None:
            continue
        where = (storage.path, storage.offset) if storage.path is not None else id(storage)
        if where in seen:
            return True
        seen.add(where)
    return False


def _write_single(payload: Any, options: WriteOptions, kind: OutputKind, verify_options: ReadOptions) -> Path:
    from ..fileio.readback import checksumming_sources, reading_back
    from .verify import verify_open_file

    out = options.output
    total = sum(r.nbytes for r in records(payload))
    with (
        atomic_output(out, force=options.force) as fh,
        progress_bar(total, options.progress, f"writing {out.name}") as bar,
    ):
        sink = counting(fh, bar)
        # verified outputs may copy big archive members without a CRC pass: verification checks them;
        # a helper thread reads big spans back for their CRC and starts their writeback meanwhile,
        # and another checksums big source spans that have no recorded CRC while they are copied
        with (
            vouched_copies() if options.verify else contextlib.nullcontext(),
            reading_back(fh, checksum=options.verify),
            checksumming_sources(),
        ):
            kind.load_writer()(payload, sink, out)
        fh.flush()
        if bar is not None:
            bar.complete()  # the total is an estimate; verification follows
        with _syncing(fh):
            if options.verify:
                verify_open_file(fh, payload, out, verify_options)
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


def _write_sharded(
    tensors: dict[str, TensorRecord], options: WriteOptions, kind: OutputKind, verify_options: ReadOptions
) -> list[Path]:
    inputs = {r.storage.path.parent for r in tensors.values() if r.storage is not None and r.storage.path}
    if options.output.is_dir() and any(_same_dir(options.output, p) for p in inputs):
        raise OutputError(
            f"{options.output}: holds the input's shards; write the new shards to another folder"
        )

    from ..formats.shardwriter import default_jobs

    files = kind.load_writer()(
        tensors,
        options.output,
        max_shard_bytes=options.max_shard_size or 1,
        fmt=kind.to,
        force=options.force,
        metadata={"format": "pt"},
        read_back=options.verify,
        progress=options.progress,
        jobs=options.jobs or default_jobs(),
    )
    for f in files:
        FD_CACHE.forget(f)
    if options.verify:
        from .verify import verify

        try:
            verify(options.output, tensors, read_options=verify_options)
        except OutputError:
            for f in files:
                with contextlib.suppress(OSError):
                    f.unlink()
            raise
    return files


def _write_folder(
    tensors: dict[str, TensorRecord], options: WriteOptions, kind: OutputKind, verify_options: ReadOptions
) -> list[Path]:
    """A folder output (DCP): built in a hidden folder beside the output, verified there (every tensor
    read back by our reader and compared), then renamed into place."""
    from .verify import verify

    def check(folder: Path) -> None:
        if not options.verify:
            return
        try:
            verify(folder, tensors, label=str(options.output), read_options=verify_options)
        except OutputError:
            raise
        except CkptError as exc:
            raise OutputError(
                f"{options.output}: verification failed: the written folder does not read back "
                f"({exc.message}); nothing was kept"
            ) from None
        finally:  # the temporary folder's files get other names: no descriptor may outlive them
            for f in folder.iterdir():
                FD_CACHE.forget(f)

    files: list[Path] = kind.load_writer()(tensors, options.output, force=options.force, check=check)
    for f in files:
        FD_CACHE.forget(f)
    return files


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
