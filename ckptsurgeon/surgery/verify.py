"""Verification after writing: reopen the output and compare every tensor and value, bit for bit.

What was written is fingerprinted from the CRCs computed while writing or recorded by the
source archive; the output is read once. A transformed tensor (a ``--dtype`` cast, a split:
:mod:`ckptsurgeon.surgery.transforms`) is compared with what its transform computes from the
source, recomputed one tensor at a time; a mean of ``ckpt average``, with the CRC-32 of the
bytes its reader gave the writer (computing it again would double the work, and gives the same).
A difference names its key; a damaged source (its bytes no longer match its archive's CRC) is
reported as such.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

from ..core.record import TensorRecord
from ..core.walk import leaves
from ..errors import CkptError, OutputError
from ..fileio.spans import FD_CACHE, span_crcs
from ..formats import ReadOptions, open_checkpoint


def verify(
    output: str | os.PathLike[str],
    expected: Any,
    *,
    label: str | None = None,
    read_options: ReadOptions | None = None,
) -> None:
    """Reopen ``output`` and compare every tensor (and plain value) with ``expected``, bit for bit.

    ``expected`` is what was written: a state dict of records, or a whole tree. The output is
    read once; what was written is fingerprinted from the CRCs computed while writing or
    recorded by the source archive (re-read only to explain a difference). Raises
    OutputError naming the first difference. ``read_options``: how to reopen the output (the
    source's ``--allow-global`` classes, which the output holds too).

    Example:
        >>> verify("fixed.safetensors", plan.apply(src.tensors))      # doctest: +SKIP
    """
    label = label or str(output)
    ckpt = open_checkpoint(output, read_options or ReadOptions())
    got_tree = ckpt.weights("").tensors if _is_flat_state_dict(expected) else ckpt.tree
    want = dict(leaves(expected))
    got = dict(leaves(got_tree))
    if want.keys() != got.keys():
        for path in want.keys() | got.keys():
            if path not in got or path not in want:
                where = "missing from" if path not in got else "unexpected in"
                raise OutputError(f"{label}: verification failed: {'.'.join(path)!r} is {where} the output")
    want_fp = _fingerprints(want, recorded=True)
    try:
        got_fp = _fingerprints({path: _stored(value) for path, value in got.items()})
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


def verify_open_file(fh: BinaryIO, payload: Any, out: Path, read_options: ReadOptions | None = None) -> None:
    """Verify a written temporary file before it replaces anything (through /proc when available).

    Example:
        >>> with atomic_output(out) as fh:                             # doctest: +SKIP
        ...     write_torchzip(payload, fh); fh.flush(); verify_open_file(fh, payload, out)
    """
    proc = Path(f"/proc/self/fd/{fh.fileno()}")
    if not proc.exists():
        return
    try:
        verify(proc, payload, label=str(out), read_options=read_options)
    except OutputError:
        raise
    except CkptError as exc:
        raise OutputError(
            f"{out}: verification failed: the written file does not read back ({exc.message})"
        ) from None
    finally:
        FD_CACHE.forget(proc)


def _fingerprints(items: dict[Any, Any], *, recorded: bool = False) -> dict[Any, Any]:
    """:func:`_fingerprint` of every leaf, the file spans of each file CRC-ed in one ordered pass
    (``recorded``: a span's known CRC is taken without reading it)."""
    result: dict[Any, Any] = {}
    by_file: dict[Path, list[tuple[Any, TensorRecord, tuple[int, int]]]] = {}
    for path, value in items.items():
        span = value.file_span() if isinstance(value, TensorRecord) else None
        if span is None:
            result[path] = _fingerprint(value)
            continue
        group = by_file.get(span[0])
        if group is None:
            group = by_file[span[0]] = []
        group.append((path, value, (span[1], span[2])))
    for file, group in by_file.items():
        crcs = span_crcs(file, [member for _p, _v, member in group], recorded=recorded)
        for (path, value, (_offset, length)), crc in zip(group, crcs, strict=True):
            result[path] = ("tensor", value.dtype, tuple(value.shape), length, crc)
    return result


def given_crc(rec: TensorRecord) -> int | None:
    """The CRC-32 of ``rec``'s bytes as its storage's reader gave them to the writer (a computed
    storage that keeps it, e.g. :class:`~ckptsurgeon.surgery.averaging.MeanReader`), when ``rec``
    is the whole storage and it was read whole in order; else None (then it is recomputed).

    Example:
        >>> given_crc(TensorRecord("w", "float32", (2,)))  # no storage: None
    """
    storage = rec.storage
    if storage is None or rec.loader is not None or rec.storage_offset or rec.nbytes != storage.nbytes:
        return None
    kept = getattr(storage.reader, "crc_given", None)
    if kept is None:
        return None
    crc: int | None = kept()
    return crc


def _stored(value: Any) -> Any:
    """A record read back as the bytes its file stores (a DCP tensor in one chunk: the chunk's span,
    CRC-ed in file order with the rest) rather than loaded through torch; anything else as it is."""
    stored = getattr(getattr(value, "loader", None), "stored_record", None)
    if not isinstance(value, TensorRecord) or stored is None:
        return value
    return stored() or value


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


def _is_flat_state_dict(node: Any) -> bool:
    return isinstance(node, dict) and all(isinstance(v, TensorRecord) for v in node.values())


def _fingerprint(value: Any) -> Any:
    if isinstance(value, TensorRecord):  # CRC-32 of the bytes, streamed (zip's own check, ~6 GB/s)
        crc = given_crc(value)
        if crc is None:
            crc = value.write_to(None)
        return ("tensor", value.dtype, tuple(value.shape), value.nbytes, crc)
    if value is None or isinstance(value, bool | float):  # by repr: a NaN equals itself
        return ("value", type(value).__name__, repr(value))
    if isinstance(value, int | str | bytes):  # by value: str() of a 5000-digit int raises
        return ("value", type(value).__name__, value)
    return ("object", type(value).__name__)
