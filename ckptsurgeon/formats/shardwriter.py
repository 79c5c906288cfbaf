"""The sharded writer: Hugging Face's ``model-0000i-of-0000N`` layout plus its ``*.index.json``.

:func:`plan_shards` packs tensors greedily under ``--max-shard-size`` (:func:`parse_size`),
keeping tied names with the tensor they share; :func:`write` writes each shard atomically
(safetensors or torch zip) and the index last, so an interrupted write leaves no index; a new
folder is filled under a hidden name and renamed into place whole.
The reader is :mod:`ckptsurgeon.formats.sharded`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, BinaryIO, cast

from ..core.record import TensorRecord
from ..errors import CkptError, OutputError
from ..fileio.progress import Bar, counting, progress_bar
from ..fileio.writing import COMMITTED, atomic_output, check_output_path, fsync_dir
from .safetensors import ALIASES_KEY, find_aliases

LAYOUT = {  # fmt -> (single file, shard pattern, index file)
    "safetensors": (
        "model.safetensors",
        "model-{i:05d}-of-{n:05d}.safetensors",
        "model.safetensors.index.json",
    ),
    "pth": ("pytorch_model.bin", "pytorch_model-{i:05d}-of-{n:05d}.bin", "pytorch_model.bin.index.json"),
}
_UNITS = {"": 1, "b": 1} | {
    unit: base**power
    for power, prefix in enumerate("kmgt", start=1)
    for unit, base in ((f"{prefix}b", 1000), (f"{prefix}ib", 1024))
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


class SizeError(CkptError):
    """A size such as ``--max-shard-size`` could not be understood."""


def parse_size(text: str | int) -> int:
    """A byte count from ``"5GB"`` (10^9, like Hugging Face), ``"2GiB"`` (2^30), ``"500MB"`` or ``"1024"``.

    Example:
        >>> parse_size("5GB"), parse_size("1.5 GiB"), parse_size("1024")
        (5000000000, 1610612736, 1024)
    """
    value = Decimal(text) if isinstance(text, int) and not isinstance(text, bool) else _size_value(text)
    if value < 1:
        raise SizeError(f"invalid size {text!r}: must be at least one byte")
    return int(value)


def _size_value(text: str | bool) -> Decimal:
    """The byte count a size text such as ``"1.5 GiB"`` names, or a SizeError saying what is accepted."""
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is not None and unit in _UNITS:
        with contextlib.suppress(InvalidOperation):
            return Decimal(match.group(1)) * _UNITS[unit]
    raise SizeError(f"invalid size {text!r}; use bytes or a size such as 500MB, 5GB or 2GiB")


def plan_shards(tensors: Mapping[str, TensorRecord], max_shard_bytes: int) -> list[list[str]]:
    """Greedy packing in the given (name) order: a new shard starts when the next tensor would
    overflow the limit; a tensor bigger than the limit gets a shard of its own. Tied names
    (see :func:`~ckptsurgeon.formats.safetensors.find_aliases`) go with the tensor they share.

    Example:
        >>> recs = {n: TensorRecord(n, "float32", (10,)) for n in "abc"}
        >>> plan_shards(recs, 80)
        [['a', 'b'], ['c']]
    """
    aliases = find_aliases(tensors)
    shards: list[list[str]] = [[]]
    size = 0
    where: dict[str, int] = {}
    for name, rec in tensors.items():
        if name in aliases:
            continue
        if shards[-1] and size + rec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += rec.nbytes
        where[name] = len(shards) - 1
    for dropped, kept in aliases.items():
        shards[where[kept]].append(dropped)
    return shards


def write(
    tensors: Mapping[str, TensorRecord],
    out_dir: Path,
    *,
    max_shard_bytes: int,
    fmt: str = "safetensors",
    force: bool = False,
    metadata: Mapping[str, str] | None = None,
    read_back: bool = False,
    progress: bool | None = None,
    jobs: int = 1,
) -> list[Path]:
    """Write ``tensors`` into ``out_dir`` in Hugging Face's sharded layout; return the paths written.

    Shards are ``model-00001-of-0000N.safetensors`` (``pytorch_model-...bin`` for ``fmt="pth"``)
    plus ``model.safetensors.index.json``; one shard is written as plain ``model.safetensors``
    with no index, as ``save_pretrained`` does. Each file is written atomically, the index
    last, so an interrupted write leaves no index. Tied names are stored once (safetensors:
    recorded in the shard's metadata and left out of the weight_map). ``read_back``: checksum each
    big span from the shard as it is written (see :mod:`ckptsurgeon.fileio.readback`), for a verification
    that follows; write-back starts early either way. ``progress``: one bar on stderr over all
    shards (default: on a TTY, for big writes; see :mod:`ckptsurgeon.fileio.progress`). ``jobs``:
    shards written at once, each by a thread of its own (the bytes are those of a serial write;
    one failure stops the others and nothing is left).

    Example:
        >>> write(ckpt.weights().tensors, Path("out"), max_shard_bytes=parse_size("5GB"))  # doctest: +SKIP
        [PosixPath('out/model-00001-of-00002.safetensors'), ...,
         PosixPath('out/model.safetensors.index.json')]
    """
    if fmt not in LAYOUT:
        raise OutputError(f"{out_dir}: unknown shard format {fmt!r}; use one of {', '.join(LAYOUT)}")
    if max_shard_bytes < 1:
        raise SizeError(f"max shard size must be at least one byte, got {max_shard_bytes}")
    final = Path(out_dir)
    created = not os.path.lexists(final)
    if not created and not final.is_dir():
        raise OutputError(f"{final}: exists and is not a folder; sharded output needs a folder")
    shards = plan_shards(tensors, max_shard_bytes)
    names = _shard_names(fmt, len(shards))
    index_name = LAYOUT[fmt][2] if len(shards) > 1 else None
    if not created:
        for name in [*names, LAYOUT[fmt][2]]:
            check_output_path(final / name, force=force)
    # the set is written into a hidden folder beside the output, then put in place in one step:
    # an interrupt (even kill -9) never leaves a partial set, nor spoils an existing one, under
    # the output's name
    staging = _staging_folder(final)
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    try:
        with progress_bar(_data_bytes(tensors), progress, f"writing {final.name}") as bar:
            parts = [{name: tensors[name] for name in shard} for shard in shards]

            def one(path: Path, part: Mapping[str, TensorRecord]) -> Path:
                return _write_shard(path, part, fmt, force, metadata, read_back, bar)

            items = [(staging / name, part) for name, part in zip(names, parts, strict=True)]
            written += run_jobs(one, items, jobs)
            for file_name, part in zip(names, parts, strict=True):
                weight_map.update(dict.fromkeys(_stored_names(part, fmt), file_name))
            if index_name is not None:
                written.append(_write_index(staging / index_name, tensors, weight_map, force, metadata))
    except BaseException:
        _discard_staging(staging)
        raise
    if created:
        return _publish(staging, final, written)
    return _replace_set(staging, final, fmt, written)


def default_jobs() -> int:
    """``--jobs`` when not given: the CPUs this process may run on.

    Example:
        >>> default_jobs() >= 1
        True
    """
    affinity = getattr(os, "sched_getaffinity", None)
    return max(1, len(affinity(0)) if affinity is not None else (os.cpu_count() or 1))


class Stopped(CkptError):
    """A job stopped because another one failed (never the error reported)."""


def run_jobs(
    work: Callable[[Path, Mapping[str, TensorRecord]], Path],
    items: Sequence[tuple[Path, Mapping[str, TensorRecord]]],
    jobs: int,
) -> list[Path]:
    """``work(path, part)`` for every item, ``jobs`` at a time (threads: the copying is pread/write
    and zlib, which release the GIL), results in the items' order. The first failure stops the
    others at their next write and is raised (the first item's, in order) once they have stopped;
    an interrupt (Ctrl-C, SIGTERM) in the main thread stops them too and is raised at once (the
    threads are daemons: a stalled write never holds the process).

    Example:
        >>> run_jobs(lambda path, part: path, [(Path("a"), {}), (Path("b"), {})], jobs=2)
        [PosixPath('a'), PosixPath('b')]
    """
    if jobs <= 1 or len(items) <= 1:
        return [work(path, part) for path, part in items]
    from ..fileio.spans import current_context, job_scope

    writer = current_context()
    stop, finished, lock = threading.Event(), threading.Event(), threading.Lock()
    order = iter(range(len(items)))
    results: list[Path | None] = [None] * len(items)
    errors: list[BaseException | None] = [None] * len(items)
    running = [min(jobs, len(items))]

    def worker() -> None:
        with job_scope(writer), _stoppable(stop):
            while not stop.is_set():
                with lock:
                    i = next(order, None)
                if i is None:
                    break
                try:
                    results[i] = work(*items[i])
                except BaseException as exc:  # handed to the main thread
                    errors[i] = exc
                    stop.set()
        with lock:
            running[0] -= 1
            if not running[0]:
                finished.set()

    for n in range(running[0]):
        threading.Thread(target=worker, name=f"ckpt-shard-{n}", daemon=True).start()
    try:
        while not finished.wait(0.1):  # a timed wait: signals reach the main thread meanwhile
            pass
    except BaseException:
        stop.set()
        raise
    failures = [e for e in errors if e is not None]
    if failures:
        raise next((e for e in failures if not isinstance(e, Stopped)), failures[0])
    return [path for path in results if path is not None]


_STOP = threading.local()


@contextlib.contextmanager
def _stoppable(stop: threading.Event) -> Iterator[None]:
    """Make this thread's shard writes (:func:`_write_shard`) raise :class:`Stopped` once ``stop`` is set."""
    _STOP.event = stop
    try:
        yield
    finally:
        _STOP.event = None


class _StoppableFile:
    """A write sink that raises :class:`Stopped` when another job has failed."""

    def __init__(self, fh: BinaryIO, stop: threading.Event) -> None:
        self._fh = fh
        self._stop = stop

    def write(self, data: Any) -> int:
        if self._stop.is_set():
            raise Stopped("stopped: another shard failed")
        return int(self._fh.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _discard_staging(staging: Path) -> None:
    """After a failed or interrupted write: remove the hidden folder and all it holds."""
    import shutil

    shutil.rmtree(staging, ignore_errors=True)
    _forget_staged(staging)


def _forget_staged(staging: Path) -> None:
    """The staged shards are no outputs of their own: the set is (once in place) or nothing is."""
    COMMITTED[:] = [p for p in COMMITTED if Path(p).parent != staging]


def _replace_set(staging: Path, final: Path, fmt: str, written: list[Path]) -> list[Path]:
    """Move a complete staged set into an existing folder (``--force``): the old index goes first,
    then the shards, the new index last, then the old set's leftovers; signals wait until done."""
    with _signals_held():
        return _move_set(staging, final, fmt, written)


def _move_set(staging: Path, final: Path, fmt: str, written: list[Path]) -> list[Path]:
    try:
        with contextlib.suppress(FileNotFoundError):
            (final / LAYOUT[fmt][2]).unlink()
        moved = [final / path.name for path in written]
        for path, target in zip(written, moved, strict=True):
            os.replace(path, target)
        _discard(_stale_files(final, fmt, moved))
        _discard_staging(staging)
        fsync_dir(final)
        COMMITTED.append(final)
    except OSError as exc:
        _discard_staging(staging)
        raise OutputError(f"{final}: could not put the new shards in place ({exc.strerror or exc})") from None
    return moved


def _staging_folder(final: Path) -> Path:
    """A new, hidden folder beside ``final`` (made with the umask's permissions, as ``final`` would be)."""
    parent = final.parent  # Path("x").parent is Path(".")
    if not parent.is_dir():
        raise OutputError(f"{final}: the folder {parent} does not exist")
    for attempt in range(100):
        staging = parent / f".{final.name}.{os.getpid()}.{attempt}.ckpt-tmp"
        try:
            staging.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"{final}: cannot create a folder beside it ({exc.strerror or exc})") from None
        return staging
    raise OutputError(f"{final}: could not create a temporary folder beside it")


def _publish(staging: Path, final: Path, written: list[Path]) -> list[Path]:
    """Rename the filled ``staging`` folder to ``final``; return the files' final paths."""
    with _signals_held():
        try:
            os.rename(staging, final)  # replaces nothing but an empty folder that appeared meanwhile
        except OSError as exc:
            _discard_staging(staging)
            reason = exc.strerror or exc
            raise OutputError(f"{final}: appeared while writing ({reason}); nothing was written") from None
        fsync_dir(final.parent)
        _forget_staged(staging)
        COMMITTED.append(final)
    return [final / path.name for path in written]


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP (where the platform can) while a set is put in place; they
    are delivered right after, when the output is whole."""
    import signal

    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:
        yield
        return
    held = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}
    previous = mask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, previous)


def _stored_names(part: Mapping[str, TensorRecord], fmt: str) -> list[str]:
    """The names a shard's weight_map entry lists: all of them, but a safetensors shard's tied ones."""
    if fmt == "pth":
        return list(part)
    aliases = find_aliases(part)
    return [name for name in part if name not in aliases]


def _data_bytes(tensors: Mapping[str, TensorRecord]) -> int:
    """The tensor bytes a sharded write copies: each tied tensor once (the progress bar's length)."""
    aliases = find_aliases(tensors)
    return sum(rec.nbytes for name, rec in tensors.items() if name not in aliases)


def _discard(paths: list[Path]) -> None:
    """Remove files of an earlier set that the new set does not reuse (after ``--force``)."""
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def _stale_files(out_dir: Path, fmt: str, written: list[Path]) -> list[Path]:
    """Files of an earlier set in our own layout that the new set does not reuse (after ``--force``)."""
    single, pattern, index = LAYOUT[fmt]
    stem, suffix = re.escape(pattern.split("{")[0]), re.escape(Path(single).suffix)
    shard_name = re.compile(stem + r"\d{5}-of-\d{5}" + suffix)
    keep = {p.name for p in written}
    return [
        out_dir / name
        for name in os.listdir(out_dir)
        if name not in keep and (name in (single, index) or shard_name.fullmatch(name))
    ]


def _shard_names(fmt: str, count: int) -> list[str]:
    single, pattern, _ = LAYOUT[fmt]
    if count == 1:
        return [single]
    return [pattern.format(i=i, n=count) for i in range(1, count + 1)]


def _write_shard(
    path: Path,
    part: Mapping[str, TensorRecord],
    fmt: str,
    force: bool,
    metadata: Mapping[str, str] | None,
    read_back: bool,
    bar: Bar | None = None,
) -> Path:
    from ..fileio.readback import checksumming_sources, reading_back

    # the read-back helper follows the file itself; the writers write through the bar's counter;
    # big source spans with no recorded CRC are checksummed by another helper meanwhile
    with (
        atomic_output(path, force=force) as fh,
        reading_back(fh, checksum=read_back),
        checksumming_sources(),
    ):
        sink = counting(fh, bar)
        stop = getattr(_STOP, "event", None)
        if stop is not None:
            sink = cast(BinaryIO, _StoppableFile(sink, stop))
        if fmt == "safetensors":
            from .safetensors import write as write_safetensors

            write_safetensors(part, sink, metadata)
        else:
            from ._torchwriter import write as write_torchzip

            write_torchzip(dict(part), sink)
    return path


def _write_index(
    path: Path,
    tensors: Mapping[str, TensorRecord],
    weight_map: Mapping[str, str],
    force: bool,
    metadata: Mapping[str, str] | None,
) -> Path:
    total = _data_bytes(tensors)
    extra = {str(k): str(v) for k, v in (metadata or {}).items() if k not in ("total_size", ALIASES_KEY)}
    index = {"metadata": {"total_size": total, **extra}, "weight_map": dict(weight_map)}
    with atomic_output(path, force=force) as fh:
        fh.write((json.dumps(index, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return path
