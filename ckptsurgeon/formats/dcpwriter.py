"""The DCP writer: a ``torch.distributed.checkpoint`` folder, written by torch's own ``dcp.save``.

One process, no process group, CPU: ``dcp.save(state_dict, storage_writer=FileSystemWriter(...),
no_dist=True)``, so FSDP / torchtitan training loads the folder with ``dcp.load`` as if a rank
had saved it. The state dict is the chosen weights, flat (``{"fc.weight": tensor}``, torchtitan's
model-only layout); a training checkpoint's other entries are left out (a ``torch.optim`` state
keyed by parameter number is no state FSDP's ``dcp.load`` takes), as safetensors leaves them out.

Memory: a record whose bytes sit in one span of a file (safetensors, a torch zip member, a shard)
becomes a tensor over a private, copy-on-write ``mmap`` of that file: its pages are the page
cache, not anonymous memory, and the writer reads them as it goes. Other records (a cast, a DCP
input) are materialised. The folder is filled under a hidden name beside the output, checked
(``check``: the pipeline's verification, our own DCP reader) and only then renamed into place;
a failure or an interrupt leaves no folder.
The reader is :mod:`ckptsurgeon.formats.dcp`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..core.record import TensorRecord
from ..errors import CkptError, OutputError
from ..fileio.writing import COMMITTED, fsync_dir, refuse_special_file
from .dcp import METADATA_FILE
from .shardwriter import _discard_staging, _publish, _signals_held, _staging_folder

DATA_FILE_SUFFIX = ".distcp"


def write(
    tensors: Mapping[str, TensorRecord],
    out_dir: Path,
    *,
    force: bool = False,
    check: Callable[[Path], None] | None = None,
    thread_count: int = 1,
    **_unused: Any,
) -> list[Path]:
    """Write ``tensors`` as a DCP folder at ``out_dir`` through ``dcp.save``; return its files.

    ``check(folder)`` runs on the complete temporary folder before it is renamed into place
    (the pipeline verifies every tensor there). ``force`` replaces an existing DCP folder (never
    a folder holding anything else). ``thread_count``: FileSystemWriter's writer threads.

    Example:
        >>> write(ckpt.weights().tensors, Path("step-0"))               # doctest: +SKIP
        [PosixPath('step-0/.metadata'), PosixPath('step-0/__0_0.distcp')]
    """
    final = Path(out_dir)
    replacing = check_output_folder(final, force=force)
    staging = _staging_folder(final)
    try:
        _save(tensors, staging, thread_count, final)
        if check is not None:
            check(staging)
    except BaseException:
        _discard_staging(staging)
        raise
    written = sorted(staging.iterdir())
    if not replacing:
        return _publish(staging, final, written)
    return _replace_folder(staging, final, written)


def check_output_folder(final: Path, *, force: bool) -> bool:
    """Refuse what a DCP output must not replace; return whether an existing folder is replaced.

    Example:
        >>> check_output_folder(Path("no-such-folder"), force=False)
        False
    """
    refuse_special_file(final)
    if not os.path.lexists(final):
        return False
    if not final.is_dir():
        raise OutputError(f"{final}: exists and is not a folder; a DCP output is a folder")
    names = os.listdir(final)
    if not names:
        return True
    if not force:
        raise OutputError(f"{final}: already exists; pass --force to overwrite it")
    if METADATA_FILE not in names:
        raise OutputError(
            f"{final}: a folder that is not a DCP checkpoint (no {METADATA_FILE}); even with --force "
            "it is not replaced: name a new folder"
        )
    other = next(  # the whole folder is replaced: a file beside the checkpoint would be deleted with it
        (
            n
            for n in sorted(names)
            if not (n == METADATA_FILE or n.endswith(DATA_FILE_SUFFIX)) or not (final / n).is_file()
        ),
        None,
    )
    if other is not None:
        raise OutputError(
            f"{final}: holds {other!r} beside its DCP checkpoint; --force replaces the whole folder, so it "
            "is not replaced: name a new folder (or move that out)"
        )
    return True


def _save(tensors: Mapping[str, TensorRecord], folder: Path, thread_count: int, final: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    with _mapped_files() as maps:
        state = {name: _tensor(rec, maps) for name, rec in tensors.items()}
        writer = dcp.FileSystemWriter(str(folder), single_file_per_rank=True, thread_count=thread_count)
        try:
            with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
                warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
                dcp.save(state, storage_writer=writer, no_dist=True)
        except CkptError:
            raise
        except (Exception, CheckpointException) as exc:  # CheckpointException (a BaseException) wraps it
            raise OutputError(f"{final}: dcp.save failed ({_first_line(exc)}); nothing was written") from None
        state.clear()


def _first_line(exc: BaseException) -> str:
    """The first line of an exception, shortened (torch's CheckpointException lists tracebacks).

    Example:
        >>> _first_line(OSError(28, "No space left on device"))
        '[Errno 28] No space left on device'
    """
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


@contextlib.contextmanager
def _mapped_files() -> Iterator[dict[Path, mmap.mmap]]:
    """The source files mapped so far (one private mapping per file), closed when the write ends."""
    maps: dict[Path, mmap.mmap] = {}
    try:
        yield maps
    finally:
        for mapped in maps.values():
            with contextlib.suppress(BufferError):  # a tensor still views it: the GC unmaps it
                mapped.close()


def _tensor(rec: TensorRecord, maps: dict[Path, mmap.mmap]) -> Any:
    """A CPU tensor of ``rec``: a view of a private file mapping when its bytes are one file span."""
    import torch

    span = rec.file_span()
    if span is None:
        return rec.to_torch()
    path, offset, length = span
    mapped = maps.get(path)
    if mapped is None:
        with open(path, "rb") as fh:
            mapped = maps[path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    if offset + length > len(mapped):
        return rec.to_torch()  # the span check of to_torch names the fault
    dtype = getattr(torch, rec.dtype)
    return torch.frombuffer(mapped, dtype=dtype, count=rec.numel, offset=offset).view(rec.shape)


def _replace_folder(staging: Path, final: Path, written: list[Path]) -> list[Path]:
    """Put a complete staged folder in place of an existing DCP folder (``--force``): the old one
    is renamed aside, the new one renamed in, the old one removed; signals wait until done."""
    with _signals_held():
        aside = _staging_folder(final)
        try:
            os.rmdir(aside)
            os.rename(final, aside)
            os.rename(staging, final)
        except OSError as exc:
            if not final.exists() and aside.exists():
                os.rename(aside, final)
            _discard_staging(staging)
            reason = exc.strerror or exc
            raise OutputError(f"{final}: could not put the new folder in place ({reason})") from None
        shutil.rmtree(aside, ignore_errors=True)
        fsync_dir(final.parent)
        COMMITTED.append(final)
    return [final / path.name for path in written]
