"""``ckpt scan``: what a checkpoint's pickles would import, found without executing anything.

Every pickle in a file (a torch zip's ``data.pkl`` and any other ``.pkl`` member, each
pickle of a legacy torch.save file, a bare pickle) is read opcode by opcode by
:func:`~ckptsurgeon.pickling.globalscan.scan_globals`; nothing is built,
imported or called. Each global is classified by :mod:`ckptsurgeon.pickling.safety` as ``tensor``,
``data`` or ``unsafe``. A file whose pickles name only tensor and data globals is then
opened with the restricted reader, which checks its structure (and every CRC with
``check=True``). A safetensors file holds no code; its header is validated by the
safetensors reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.report import printable
from ..errors import CkptError, FormatError, InputError, UnsafeCheckpointError
from ..formats import (
    LEGACY_MAGIC_NUMBER,
    ReadOptions,
    archive_prefix,
    check_input_path,
    classify_zip_names,
    detect,
    has_zip_directory,
    looks_like_tar,
    open_checkpoint,
)
from ..formats.legacy import tar_pickles
from ..formats.torchzip import open_zip, read_member
from .globalscan import PickleGlobals, scan_globals
from .pickles import PickleError, PickleTruncated
from .safety import ALLOWED_WHY, UNSAFE, GlobalVerdict, classify, is_pickled_model

SAFE, UNREADABLE = "safe", "unreadable"
MODEL_NOTE = (
    "this file is a whole pickled model object, not a state dict; load it with "
    "torch.load(weights_only=False) only if you trust it, then save model.state_dict()"
)
PROBE_SIZE = 64 << 20  # how much of an unknown file to try as a pickle


# -- results --------------------------------------------------------------------------------
@dataclass
class FileScan:
    """The verdict on one file: its format, status and every global its pickles name."""

    path: Path
    format: str
    status: str  # "safe", "unsafe" or "unreadable"
    globals: list[GlobalVerdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def unsafe_globals(self) -> list[str]:
        return [g.name for g in self.globals if g.kind == UNSAFE]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "status": self.status,
            "globals": [{"name": g.name, "kind": g.kind, "why": g.why} for g in self.globals],
            "notes": list(self.notes),
            "error": self.error,
        }


@dataclass
class ScanResult:
    """What ``scan`` found in a file or every file of a folder.

    Example:
        >>> result = scan("fixtures/real/tinynet_compiled.pth")     # doctest: +SKIP
        >>> result.safe, result.to_json()["status"]                 # doctest: +SKIP
        (True, 'safe')
    """

    path: Path
    files: list[FileScan]

    @property
    def safe(self) -> bool:
        return all(f.status == SAFE for f in self.files)

    @property
    def status(self) -> str:
        statuses = {f.status for f in self.files}
        return UNSAFE if UNSAFE in statuses else UNREADABLE if UNREADABLE in statuses else SAFE

    def render(self, fmt: str = "table") -> str:
        """The report as ``ckpt scan`` prints it (``table`` or ``json``)."""
        if fmt == "json":
            from ..core.report import dump_json

            return dump_json(self.to_json())
        return render_table(self)

    def to_json(self) -> dict[str, Any]:
        counts = {s: sum(f.status == s for f in self.files) for s in (SAFE, UNSAFE, UNREADABLE)}
        return {
            "status": self.status,
            "path": str(self.path),
            "files": [f.to_json() for f in self.files],
            "summary": {"files": len(self.files), **counts},
        }


# -- scanning -------------------------------------------------------------------------------
def scan(path: str | os.PathLike[str], options: ReadOptions | None = None) -> ScanResult:
    """Classify every global the pickles in ``path`` (a file or a folder) would import.

    Nothing from the file is executed. A single unreadable file raises a
    :class:`~ckptsurgeon.errors.FormatError`; in a folder it is reported as ``unreadable``.

    Example:
        >>> scan("evil.pth").files[0].unsafe_globals                  # doctest: +SKIP
        ['os.system']
    """
    options = options or ReadOptions()
    from ..fileio.remote import is_remote

    if is_remote(path):
        raise InputError(
            f"{os.fspath(path)}: ckpt scan reads local files (every pickle of the file, not its headers); "
            "download it first (ckpt inspect and ckpt diff read a remote checkpoint's headers)"
        )
    path = Path(path)
    st = check_input_path(path)
    if not os.path.isdir(path):
        return ScanResult(path, [scan_file(path, options, st.st_size)])
    files = []
    dcp_spans = _dcp_spans(path)
    for file in _folder_files(path):
        try:
            if file in dcp_spans:
                files.append(_scan_dcp_data(file, dcp_spans[file], options))
            else:
                files.append(scan_file(file, options, os.path.getsize(file), in_folder=True))
        except CkptError as exc:
            files.append(FileScan(file, "unknown", UNREADABLE, error=exc.message))
    if all(f.format == "other" for f in files):
        raise InputError(f"{path}: a folder without a checkpoint or pickle in it; nothing to scan")
    return ScanResult(path, files)


def _folder_files(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        found.extend(Path(root) / n for n in sorted(names) if os.path.isfile(Path(root) / n))
    return found


def _dcp_spans(folder: Path) -> dict[Path, list[tuple[int, int]]]:
    """The byte spans of each data file a DCP folder's ``.metadata`` names (each span a
    ``torch.save`` archive torch loads on its own), or {} when there is no metadata the
    restricted reader accepts (the ``.metadata`` is then scanned and reported as a file)."""
    from ..formats._dcpmeta import read_metadata
    from ..formats.dcp import data_path

    meta_file = folder / ".metadata"
    if not meta_file.is_file():
        return {}
    try:
        metadata = read_metadata(meta_file)
        found: dict[Path, list[tuple[int, int]]] = {}
        for rel, offset, length in metadata.spans:
            found.setdefault(data_path(folder, rel), []).append((offset, length))
    except CkptError:
        return {}
    return {path: sorted(set(spans)) for path, spans in found.items()}


def _scan_dcp_data(path: Path, spans: list[tuple[int, int]], options: ReadOptions) -> FileScan:
    """A DCP data file (``.distcp``): the pickles of every ``torch.save`` archive the metadata
    places in it. torch loads its non-tensor entries with ``weights_only=False``, so a
    payload there runs on ``dcp.load``."""
    from ..formats._dcpchunk import chunk_label, chunk_pickles

    size = os.path.getsize(path)
    found: list[PickleGlobals] = []
    extra: list[str] = []
    for offset, length in spans:
        label = chunk_label(path, offset, length)
        if offset + length > size:
            raise FormatError(f"{label}: runs past the end of the file ({size:,} bytes); it is truncated")
        pickles = chunk_pickles(path, offset, length)
        try:
            scanned = [(name, scan_globals(data)) for name, data in pickles]
        except PickleError as exc:
            raise FormatError(f"{label}: {exc}; the file is damaged") from None
        found.append(scanned[0][1])
        extra.extend(f"{label} also holds {name}, which torch.load does not read" for name, _ in scanned[1:])
        found.extend(globals_ for _, globals_ in scanned[1:])
    result = _classified(path, "dcp-data", found, options)
    result.notes.append(f"the {len(spans)} torch.save archive(s) its .metadata places in it, each scanned")
    result.notes.extend(extra)
    return result


def scan_file(path: Path, options: ReadOptions, size: int, *, in_folder: bool = False) -> FileScan:
    """Scan one file (see :func:`scan`)."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    # torch.load's order: a zip by its first bytes, else a tar if tarfile reads a header, else pickles
    if head.startswith(b"PK\x03\x04"):
        if looks_like_tar(head):
            detect(path)  # refuses a zip that is also a tar
        return _scan_zip(path, options)
    if looks_like_tar(head):
        return _scan_tar(path, options)
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5 and _detected(path) != "safetensors":
        return _scan_pickle_file(path, options, also_zip=has_zip_directory(path, size))
    try:
        fmt = detect(path)
    except FormatError:
        if _is_pickle(path):
            return _scan_pickle_file(path, options, also_zip=has_zip_directory(path, size))
        if in_folder:
            return FileScan(
                path, "other", SAFE, notes=["not a checkpoint or pickle: it holds no code to run"]
            )
        raise
    if fmt == "safetensors":
        return _validated(
            FileScan(path, "safetensors", SAFE, notes=["the safetensors format holds no code"]), options
        )
    return _validated(
        FileScan(path, fmt, SAFE, notes=[f"a {fmt} checkpoint; scan its files one by one"]), options
    )


def _detected(path: Path) -> str | None:
    try:
        return detect(path)
    except FormatError:  # damaged, or a pickle that is also a zip: scanned, then refused
        return None


def _scan_zip(path: Path, options: ReadOptions) -> FileScan:
    with open_zip(path) as zf:  # refuses an archive zip readers could read differently
        names = zf.namelist()
        fmt = classify_zip_names(path, names)
        main = archive_prefix(path, names) + "data.pkl"  # the one torch reads
        pickles = [main, *sorted(n for n in names if n.lower().endswith(".pkl") and n != main)]
        try:
            scanned = {name: scan_globals(read_member(zf, path, name)) for name in pickles}
        except PickleError as exc:
            raise FormatError(f"{path}: {exc}; the file is damaged") from None
    main_globals = scanned.pop(pickles[0])
    result = _classified(path, fmt, [main_globals], options)
    for name, other in scanned.items():
        bad = [g for g in other.globals if classify(g, options.allow_globals).kind == UNSAFE]
        suffix = f"; it imports {', '.join(bad)}" if bad else ""
        result.notes.append(f"the archive also holds {name}, which torch.load does not read{suffix}")
    return _validated(result, options)


def _scan_tar(path: Path, options: ReadOptions) -> FileScan:
    """A tar checkpoint (PyTorch before 0.4): every pickle torch.load would unpickle from it,
    and the pickle at its start if it is also one (a file that reads both ways is refused)."""
    found, stopped = tar_pickles(path)
    scanned = [g for _, g in found]
    also = []
    try:  # pickle.load would read the file from its first byte (any protocol), past the header
        with open(path, "rb") as fh:
            scanned.append(scan_globals(fh))
        also.append("a pickle (its first tar header is one)")
    except PickleError:
        pass
    if has_zip_directory(path, os.path.getsize(path)):
        also.append("a zip archive (its end holds a zip directory)")
    result = _classified(path, "torch-tar", scanned, options)
    note = "a tar checkpoint (torch.save before PyTorch 0.4): ckptsurgeon does not read it"
    if result.status == UNSAFE:
        result.notes.append(note)
        result.notes.extend(f"it also reads as {what}" for what in also)
        return result
    if also:
        raise FormatError(
            f"{path}: an ambiguous file: it reads both as a tar checkpoint and as {' and as '.join(also)}, "
            "and loaders disagree on which it is; refusing to call it safe"
        )
    if stopped:
        raise FormatError(
            f"{path}: a tar checkpoint (torch.save before PyTorch 0.4) that cannot be scanned whole: "
            f"{stopped}; its pickles may import more than was seen, so do not load it"
        )
    result.notes.append(note + "; its pickles import only the globals listed")
    return result


def _scan_pickle_file(path: Path, options: ReadOptions, *, also_zip: bool = False) -> FileScan:
    """A legacy torch.save file (a run of pickles) or a bare pickle; ``also_zip``: the file also
    ends with a zip directory (refused unless its pickles already make it unsafe)."""
    found: list[PickleGlobals] = []
    with open(path, "rb") as fh:
        try:
            found.append(scan_globals(fh, 0))
            legacy = _first_int(path) == LEGACY_MAGIC_NUMBER
            for _ in range(4 if legacy else 0):  # protocol, sys_info, object, storage keys
                found.append(scan_globals(fh, found[-1].end))
        except PickleTruncated as exc:
            raise FormatError(f"{path}: truncated: {exc}; the download or save did not finish") from None
        except PickleError as exc:
            raise FormatError(f"{path}: {exc}; the file is damaged or truncated") from None
    result = _classified(path, "torch-legacy" if legacy else "pickle", found, options)
    if also_zip:
        if result.status != UNSAFE:
            raise FormatError(
                f"{path}: an ambiguous file: it reads both as a pickle and as a zip archive (its end holds "
                "a zip directory), and loaders disagree on which it is; refusing to call it safe"
            )
        result.notes.append("it also reads as a zip archive (its end holds a zip directory)")
    return _validated(result, options)


def _first_int(path: Path) -> Any:
    from .pickles import Unpickler
    from .safety import DataResolver

    with open(path, "rb") as fh:
        head = fh.read(64)
    try:
        return Unpickler(head, DataResolver()).load()
    except Exception:  # not an int pickle: a bare pickle
        return None


def _is_pickle(path: Path) -> bool:
    with open(path, "rb") as fh:
        data = fh.read(PROBE_SIZE)
    try:
        scan_globals(data)
    except PickleError:
        return False
    return True


def _classified(path: Path, fmt: str, found: list[PickleGlobals], options: ReadOptions) -> FileScan:
    names = list(dict.fromkeys(n for f in found for n in f.globals))
    verdicts = [classify(n, options.allow_globals) for n in names]
    order = {UNSAFE: 0, "tensor": 1, "data": 2}
    verdicts.sort(key=lambda v: (order.get(v.kind, 3), v.name))
    result = FileScan(path, fmt, UNSAFE if any(v.kind == UNSAFE for v in verdicts) else SAFE, verdicts)
    kinds = {k for f in found for k in f.persistent_kinds}
    strings = {s for f in found for s in f.strings}
    unsafe = result.unsafe_globals
    if unsafe and is_pickled_model(unsafe, kinds, strings):
        result.notes.append(MODEL_NOTE)
    odd = sorted(kinds - {"storage"})
    if odd:
        result.notes.append(f"persistent ids of kind {', '.join(odd)} (only 'storage' is expected)")
    return result


def _validated(result: FileScan, options: ReadOptions) -> FileScan:
    """Open a file whose pickles are safe with the restricted reader, to check its structure."""
    if result.status != SAFE:
        return result
    if result.path.name == ".metadata" and result.format == "pickle":  # a DCP folder's metadata
        from ..formats._dcpmeta import read_metadata

        read_metadata(result.path)  # the restricted reader with DCP's classes (a refusal is an error)
        result.notes.append("structure checked (DCP metadata)")
        return result
    try:
        # the same options (--check, --allow-global, progress), never full trust
        checkpoint = open_checkpoint(result.path, replace(options, unsafe=False))
    except ModuleNotFoundError as exc:  # a reader that is not installed
        result.notes.append(f"structure not checked ({exc.name} is missing)")
        return result
    except UnsafeCheckpointError as exc:  # data-only classes the checkpoint readers do not rebuild
        result.notes.append(
            f"not opened by ckptsurgeon's readers (they do not rebuild {exc.blocked_globals[0]} ...)"
        )
        return result
    result.notes.extend(n for n in checkpoint.notes if n not in result.notes)
    checked = {"torch-zip": " (every CRC-32)", "safetensors": " (every byte span)"}.get(checkpoint.format, "")
    result.notes.append("structure checked" + (checked if options.check else ""))
    return result


# -- rendering ------------------------------------------------------------------------------
def render_table(result: ScanResult) -> str:
    """The human report: one block per file, then the verdict line."""
    blocks = [_render_file(f) for f in result.files]
    return "\n\n".join([*blocks, _verdict(result)]) + "\n"


def _render_file(file: FileScan) -> str:
    status = file.status.upper() if file.status != SAFE else SAFE
    # a hostile pickle's global names may hold newlines or terminal escapes: shown escaped
    lines = [f"{printable(str(file.path))}: {file.format}, {status}"]
    if file.error:
        lines.append(f"  error: {printable(file.error)}")
    names = [printable(g.name) for g in file.globals]
    width = max((len(n) for n in names), default=0)
    lines.extend(f"  {g.kind:<6}  {n:<{width}}  {g.why}" for g, n in zip(file.globals, names, strict=True))
    lines.extend(f"  note: {printable(n)}" for n in file.notes)
    return "\n".join(lines)


def _verdict(result: ScanResult) -> str:
    if result.status == SAFE:
        count = len(result.files)
        what = "this file" if count == 1 else f"these {count} files"
        vouched = list(dict.fromkeys(g.name for f in result.files for g in f.globals if g.why == ALLOWED_WHY))
        if vouched:  # the user's word, not ours: other loaders would call these
            names = printable(", ".join(vouched))
            one = len(vouched) == 1
            kept, it = ("is kept as a placeholder", "it") if one else ("are kept as placeholders", "them")
            return (
                f"verdict: safe only as you declared with --allow-global: {names} {kept} here, "
                f"but torch.load(weights_only=False) would call {it}; nothing else in {what} can run code"
            )
        return f"verdict: safe: nothing in {what} can run code when loaded"
    if result.status == UNSAFE:
        bad = [n for f in result.files for n in f.unsafe_globals]
        return (
            f"verdict: UNSAFE: loading with pickle or torch.load(weights_only=False) can run code "
            f"({', '.join(dict.fromkeys(map(printable, bad)))}); do not load it unless you trust its source"
        )
    unreadable = [str(f.path) for f in result.files if f.status == UNREADABLE]
    return f"verdict: unreadable: {printable(', '.join(unreadable))} could not be read"
