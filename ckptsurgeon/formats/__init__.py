"""Format detection by content and the registry of readers and writers.

Every reader is a function ``read(path, options) -> Checkpoint`` in its own module,
imported only when needed (so inspecting a safetensors file never imports torch).
Every output kind (:data:`WRITERS`) names its writer the same way, with the suffixes that
choose it and the ``--to`` value that asks for it.
"""

from __future__ import annotations

import importlib
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatError, InputError, NotAStateDictError

if TYPE_CHECKING:  # pragma: no cover
    from ..core.checkpoint import Checkpoint


@dataclass(frozen=True)
class ReadOptions:
    """How carefully, and how trustingly, to read a file.

    ``allow_globals``: extra pickle globals the user declared data-only (``--allow-global``).
    ``unsafe``: full pickle trust (``--unsafe-trust-pickle``), which can run code.
    ``check``: verify every CRC and every byte span, not only the structure.
    ``progress``: a bar on stderr while ``check`` reads a whole file (None: on a TTY, for big files).
    ``headers_only``: the caller reads records, never tensor bytes, so a remote checkpoint is
    fetched as headers only (``inspect``, ``diff``); else it is downloaded (see fileio.remote).
    """

    allow_globals: frozenset[str] = frozenset()
    unsafe: bool = False
    check: bool = False
    progress: bool | None = None
    headers_only: bool = False


# format name -> "module:function"
READERS: dict[str, str] = {
    "torch-zip": "ckptsurgeon.formats.torchzip:read",
    "torch-legacy": "ckptsurgeon.formats.legacy:read",
    "safetensors": "ckptsurgeon.formats.safetensors:read",
    "sharded": "ckptsurgeon.formats.sharded:read",
    "dcp": "ckptsurgeon.formats.dcp:read",
    "peft": "ckptsurgeon.formats.peft:read",
}


@dataclass(frozen=True)
class OutputKind:
    """One kind of output the write commands produce, and everything that chooses or writes it.

    ``name``: what a result reports (``"sharded-pth"``). ``to``: the ``--to`` value asking for
    it. ``sharded``: a folder of shards (``--max-shard-size``), written by
    ``writer(tensors, folder, max_shard_bytes=, fmt=to, ...)``; else one file, written by
    ``writer(payload, fh, output_path)``. ``suffixes``: the output suffixes that choose it
    when ``--to`` is not given (the first is proposed for new files); ``own_suffixes``: those
    that contradict any other ``--to``; ``proposed_suffixes``: those a suggested output
    name may keep from its source. ``holds_tree``: the file keeps a training checkpoint's
    entries around the weights; ``tensors_only``: the format holds nothing but tensors (a
    training checkpoint's other entries are left out, tied tensors are stored once unless
    ``ties_kept``). ``folder``: one folder written whole by
    ``writer(tensors, folder, force=, check=)`` (``check`` verifies it before it is renamed into
    place), chosen by ``--to`` only.

    Example:
        >>> WRITERS["safetensors"].suffixes, WRITERS["sharded-pth"].to
        (('.safetensors',), 'pth')
    """

    name: str
    to: str
    writer: str  # "module:function"
    sharded: bool = False
    suffixes: tuple[str, ...] = ()
    own_suffixes: tuple[str, ...] = ()
    proposed_suffixes: tuple[str, ...] = ()
    holds_tree: bool = False
    tensors_only: bool = False
    folder: bool = False
    ties_kept: bool = False

    def load_writer(self) -> Callable[..., Any]:
        """The writer function, imported now (writing a safetensors file never imports torch).

        Example:
            >>> WRITERS["pth"].load_writer().__name__
            'write_file'
        """
        module_name, func_name = self.writer.split(":")
        return getattr(importlib.import_module(module_name), func_name)


# output kind -> what writes it and what chooses it
WRITERS: dict[str, OutputKind] = {
    kind.name: kind
    for kind in (
        OutputKind(
            "pth",
            "pth",
            "ckptsurgeon.formats._torchwriter:write_file",
            suffixes=(".pth", ".pt", ".bin", ".ckpt", ".tar"),
            own_suffixes=(".pth", ".pt"),
            proposed_suffixes=(".pth", ".pt", ".bin", ".ckpt"),  # a .tar also names pre-0.4 tar files
            holds_tree=True,
        ),
        OutputKind(
            "safetensors",
            "safetensors",
            "ckptsurgeon.formats.safetensors:write_file",
            suffixes=(".safetensors",),
            own_suffixes=(".safetensors",),
            proposed_suffixes=(".safetensors",),
            tensors_only=True,
        ),
        OutputKind("sharded-pth", "pth", "ckptsurgeon.formats.shardwriter:write", sharded=True),
        OutputKind(
            "sharded-safetensors",
            "safetensors",
            "ckptsurgeon.formats.shardwriter:write",
            sharded=True,
            tensors_only=True,
        ),
        OutputKind(
            "dcp",
            "dcp",
            "ckptsurgeon.formats.dcpwriter:write",
            tensors_only=True,
            folder=True,
            ties_kept=True,
        ),
    )
}
# the --to values, in the registry's order
OUTPUT_FORMATS = tuple(dict.fromkeys(kind.to for kind in WRITERS.values()))
DEFAULT_SHARD_FORMAT = "safetensors"  # --max-shard-size without --to: Hugging Face's default


def output_kind_for(to: str, sharded: bool) -> OutputKind:
    """The output kind ``--to`` asks for, as one file or as shards.

    Example:
        >>> output_kind_for("pth", sharded=True).name
        'sharded-pth'
    """
    return next(k for k in WRITERS.values() if k.to == to and (k.sharded == sharded or k.folder))


def output_kind_by_suffix(suffix: str) -> OutputKind | None:
    """The one-file output kind a suffix chooses (``.bin``: pth), or ``None``.

    Example:
        >>> output_kind_by_suffix(".SafeTensors").name, output_kind_by_suffix(".txt")
        ('safetensors', None)
    """
    suffix = suffix.lower()
    return next((k for k in WRITERS.values() if suffix in k.suffixes), None)


SUPPORTED = (
    "torch.save files (.pth .pt .bin .ckpt .tar, zip or legacy), .safetensors, "
    "sharded folders with a *.index.json, model folders, PEFT adapter folders, "
    "torch.distributed.checkpoint folders"
)

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C


def open_checkpoint(path: str | os.PathLike[str], options: ReadOptions | None = None) -> Checkpoint:
    """Open any supported checkpoint lazily: records only, no tensor data read.

    Example:
        >>> ckpt = open_checkpoint("fixtures/vgg_1000.pth")          # doctest: +SKIP
        >>> len(ckpt.weights().tensors)                              # doctest: +SKIP
        38
    """
    options = options or ReadOptions()
    from ..fileio.remote import is_remote

    if is_remote(path):
        return _open_remote(os.fspath(path), options)
    path = Path(path)
    fmt = detect(path)
    module_name, func_name = READERS[fmt].split(":")
    reader = getattr(importlib.import_module(module_name), func_name)
    return reader(path, options)


def _open_remote(url: str, options: ReadOptions) -> Checkpoint:
    """A remote checkpoint, read through a local mirror of its headers (or of all of it)."""
    from ..errors import CkptError
    from ..fileio.remote import map_error, open_mirror

    mirror = open_mirror(url, options.headers_only and not options.check and not options.unsafe)
    try:
        return open_checkpoint(mirror.local, options)
    except CkptError as exc:
        raise map_error(exc, mirror) from None


def detect(path: Path) -> str:
    """Name the format of ``path`` from its content; raise a one-line error for anything else."""
    st = check_input_path(path)
    if stat.S_ISDIR(st.st_mode):
        return _detect_directory(path)
    if path.name.endswith(".index.json"):
        return "sharded"
    head = _read_head(path, 512)
    return _detect_bytes(path, head, st.st_size)


def check_input_path(path: Path) -> os.stat_result:
    """Stat ``path`` and refuse what no reader should open (missing, FIFO, device, loop)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputError(f"{path}: a symbolic link to a file that does not exist") from None
        raise InputError(f"{path}: no such file or directory") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as exc:  # ELOOP, ENAMETOOLONG ...
        raise InputError(f"{path}: cannot be opened ({exc.strerror or exc})") from None
    if stat.S_ISREG(st.st_mode):
        from ..fileio.spans import FD_CACHE

        FD_CACHE.refresh(path, st)  # a file replaced at this path since it was last read
        return st
    if stat.S_ISDIR(st.st_mode):
        return st
    kind = "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
    raise InputError(f"{path}: {kind}; give the path of a checkpoint file or folder")


def _read_head(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _detect_bytes(path: Path, head: bytes, size: int) -> str:
    # torch.load's order: a zip (by its first bytes), else a tar (if tarfile reads a first
    # header), else pickles; a file that more than one reader takes is refused
    if size == 0:
        raise FormatError(f"{path}: the file is empty (0 bytes); the download or save did not finish")
    if head.startswith(ZIP_MAGIC):
        if looks_like_tar(head):
            raise _two_formats(path, "a zip archive", "a tar archive")
        return _detect_zip(path)
    if head.startswith(EMPTY_ZIP_MAGIC):
        raise FormatError(f"{path}: an empty zip archive, not a checkpoint")
    if looks_like_tar(head):
        raise NotAStateDictError(
            f"{path}: a tar checkpoint (the torch.save format of PyTorch before 0.4), which ckptsurgeon "
            "does not read; run `ckpt scan` on it to list what its pickles would import"
        )
    if _looks_like_safetensors(head, size):  # first: a header length of 640 starts b"\x80\x02"
        return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        if has_zip_directory(path, size):
            raise _two_formats(path, "a pickle", "a zip archive (its end holds a zip directory)")
        return "torch-legacy"  # the legacy reader also names bare pickles
    raise _not_a_checkpoint(path, head)


def _two_formats(path: Path, first: str, second: str) -> FormatError:
    return FormatError(
        f"{path}: an ambiguous file: it reads both as {first} and as {second}, and loaders disagree "
        "on which it is; refusing to read it"
    )


def looks_like_tar(head: bytes) -> bool:
    """Whether :mod:`tarfile` takes the first 512 bytes for a tar header (its checksum matches),
    as ``torch.load`` tries before reading a non-zip file as pickles.

    Example:
        >>> looks_like_tar(bytes(512)), looks_like_tar(b"\\x80\\x02K\\x01." + bytes(507))
        (False, False)
    """
    if len(head) < 512 or not head[:512].strip(b"\0"):
        return False
    field = head[148:156]
    if field[:1] in (b"\x80", b"\xff"):  # tarfile's base-256 numbers
        value = int.from_bytes(field[1:], "big")
        if field[:1] == b"\xff":
            value -= 256**7
    else:
        text = field.split(b"\0", 1)[0].strip()
        if not all(48 <= c <= 55 for c in text):
            return False
        value = int(text or b"0", 8)
    unsigned = 256 + sum(head[:148]) + sum(head[156:512])
    signed = 256 + sum(c - 256 if c > 127 else c for c in head[:148] + head[156:512])
    return value in (unsigned, signed)


def has_zip_directory(path: Path, size: int) -> bool:
    """Whether the end of ``path`` holds a zip directory that :mod:`zipfile` would open (an end
    record, and a central directory where it says, or none at all).

    Example:
        >>> has_zip_directory(Path("fixtures/vgg_1000.pth"), 1)
        False
    """
    tail_len = min(size, 22 + 0xFFFF)
    if tail_len < 22:
        return False
    with open(path, "rb") as fh:
        fh.seek(size - tail_len)
        tail = fh.read(tail_len)
        at = tail.rfind(EMPTY_ZIP_MAGIC)
        if at < 0 or len(tail) - at < 22:
            return False
        if at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":  # a zip64 locator
            return True
        cd_size = int.from_bytes(tail[at + 12 : at + 16], "little")
        start = size - tail_len + at - cd_size
        if cd_size == 0:
            return True
        if start < 0:
            return False
        fh.seek(start)
        return fh.read(4) == b"PK\x01\x02"


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    if head[:1] == b"\x80" and header_len + 8 > size:  # a pickle whose 9th byte happens to be "{"
        return False
    # JSON may start with whitespace, and the safetensors library accepts it (0.8 does)
    return head[8:].lstrip(b" \t\n\r")[:1] == b"{" and header_len > 0  # a length past the end: named


def _not_a_checkpoint(path: Path, head: bytes) -> FormatError:
    text = head.lstrip().lower()
    if head.startswith(b"version https://git-lfs"):
        return NotAStateDictError(
            f"{path}: a git-lfs pointer file, not the checkpoint itself; run `git lfs pull` "
            "(or download the file directly) to get the real weights"
        )
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return NotAStateDictError(
            f"{path}: an HTML page, not a checkpoint (a failed or login-protected download?); "
            "download the file again from its direct link"
        )
    if head.startswith(b"\x93NUMPY"):
        return NotAStateDictError(f"{path}: a NumPy .npy array, not a checkpoint; load it with numpy.load")
    if head.startswith(b"\x89HDF"):
        return NotAStateDictError(f"{path}: an HDF5 file (Keras .h5?), not a PyTorch checkpoint")
    if head.startswith(b"GGUF"):
        return NotAStateDictError(f"{path}: a GGUF file (llama.cpp), not a PyTorch checkpoint")
    if head.startswith(b"\x1f\x8b"):
        return NotAStateDictError(f"{path}: a gzip archive; decompress it first")
    if head[257:262] == b"ustar":
        return NotAStateDictError(f"{path}: a damaged tar archive (its first header's checksum is wrong)")
    if path.suffix.lower() == ".safetensors" and len(head) < 9:
        return FormatError(
            f"{path}: truncated: {len(head)} bytes, shorter than a safetensors file's 8-byte header length "
            "and header; the download or save did not finish"
        )
    return FormatError(f"{path}: not a checkpoint (unrecognised content); supported: {SUPPORTED}")


def _detect_zip(path: Path) -> str:
    from .zipio import check_names, open_checked, read_directory

    plain = read_directory(path)  # a plain archive: its names without zipfile's per-member cost
    if plain is not None:
        names = list(plain)
        check_names(path, names)
    else:  # zipfile (it pulls in shutil, bz2 and lzma: ~2 ms of start-up) reads the rest, or names the fault
        with open_checked(path) as zf:
            names = zf.namelist()
    fmt = classify_zip_names(path, names)
    archive_prefix(path, names)
    return fmt


def archive_prefix(path: Path, names: list[str]) -> str:
    """The folder of a torch zip's ``data.pkl`` (``"archive/"``), found the way torch finds it:
    the folder of the archive's first member. Refused when the archive holds another
    ``data.pkl`` a reader could take instead.

    Example:
        >>> archive_prefix(Path("m.pth"), ["m/data.pkl", "m/version", "m/data/0"])
        'm/'
    """
    found = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if not found:
        spelled = [n for n in names if n.lower().rsplit("/", 1)[-1] == "data.pkl"]
        raise FormatError(
            f"{path}: an ambiguous zip archive: its data.pkl is spelled {spelled[0][:80]!r}, which torch "
            "reads without regard to case and other readers do not; refusing to read it"
            if spelled
            else f"{path}: a zip archive without data.pkl: not a torch.save checkpoint (or a damaged one)"
        )
    if len(found) > 1:
        raise FormatError(
            f"{path}: an ambiguous zip archive: it holds {len(found)} data.pkl members "
            f"({', '.join(found[:3])}), of which torch and other readers could load different ones; "
            "refusing to read it"
        )
    prefix = found[0][: -len("data.pkl")]
    first = names[0]
    torch_prefix = first[: first.index("/") + 1] if "/" in first else ""
    if not torch_prefix:
        raise FormatError(
            f"{path}: a zip archive whose first member {first[:80]!r} is in no folder: torch.load refuses "
            "it (torch.save puts every member in one folder); refusing to read it"
        )
    if prefix != torch_prefix:
        raise FormatError(
            f"{path}: an ambiguous zip archive: its data.pkl is in {prefix or 'no folder'} but its first "
            f"member {first[:80]} names the folder torch.load reads ({torch_prefix or 'none'}); "
            "refusing to read it"
        )
    return prefix


def classify_zip_names(path: Path, names: list[str]) -> str:
    """Tell a torch.save archive from TorchScript, torch.export and other zips by member names."""
    if any(n.endswith("/constants.pkl") or n.startswith("constants.pkl") for n in names) and any(
        "/code/" in n or n.startswith("code/") for n in names
    ):
        raise NotAStateDictError(
            f"{path}: a TorchScript archive (torch.jit.save), not a state dict; load it with "
            "torch.jit.load and save model.state_dict() with torch.save"
        )
    if any(
        n.endswith("archive_format")
        or "serialized_exported_program" in n
        or ("/models/" in n and n.endswith(".json"))
        for n in names
    ):
        raise NotAStateDictError(
            f"{path}: a torch.export archive (.pt2), not a state dict; load it with torch.export.load "
            "and save exported.state_dict with torch.save"
        )
    if any(n.lower() == "data.pkl" or n.lower().endswith("/data.pkl") for n in names):
        return "torch-zip"
    if names and all(n.endswith(".npy") for n in names):
        raise NotAStateDictError(
            f"{path}: a NumPy .npz archive, not a PyTorch checkpoint; load it with numpy.load"
        )
    raise FormatError(
        f"{path}: a zip archive without data.pkl: not a torch.save checkpoint (or a damaged one)"
    )


def _detect_directory(path: Path) -> str:
    names = set(os.listdir(path))
    if ".metadata" in names:
        return "dcp"
    if any(n.endswith(".index.json") for n in names):
        return "sharded"
    for single in ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt"):
        if single in names:
            return "sharded"  # the sharded reader also opens a folder holding one weights file
    if is_adapter_folder(names, path):
        return "peft"
    raise folder_refusal(path, names)


# A PEFT adapter folder (read by formats/peft.py): its config, and the weights beside it.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MAX_ADAPTER_CONFIG_BYTES = 16 << 20  # a config is a few KiB; refuse to parse anything absurd


def is_adapter_folder(names: Iterable[str], folder: Path) -> bool:
    """Whether a folder holding ``names`` is a PEFT adapter: its ``adapter_config.json`` names a
    ``peft_type`` (or, to report a damaged config, sits beside an ``adapter_model`` file).

    Example:
        >>> is_adapter_folder(["config.json", "model.safetensors"], Path("."))
        False
    """
    names = set(names)
    if ADAPTER_CONFIG not in names:
        return False
    if any(n in names for n in ADAPTER_WEIGHTS):
        return True
    try:
        with open(folder / ADAPTER_CONFIG, "rb") as fh:
            return b'"peft_type"' in fh.read(MAX_ADAPTER_CONFIG_BYTES)
    except OSError:
        return False


# What a file inside a folder is named when it may be a checkpoint of its own.
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".safetensors")
# A subfolder holding one of these is itself a checkpoint folder (a Trainer's checkpoint-500/ ...).
FOLDER_MARKERS = (".metadata", "model.safetensors", "pytorch_model.bin", "adapter_config.json")


def folder_refusal(path: Path, names: set[str] | None = None, limit: int = 5) -> InputError:
    """The one-line refusal for a folder no reader opens whole: the checkpoints inside it, in
    natural order, and how to pick one; or, when it holds none, what was looked for.

    Example:
        >>> folder_refusal(Path("runs"), set()).message[:39]
        'runs: a folder without a checkpoint (no'
    """
    from ..core.grouping import natural_sorted

    names = set(os.listdir(path)) if names is None else names
    found = natural_sorted(n for n in names if _may_be_checkpoint(path, n))
    if not found:
        return InputError(
            f"{path}: a folder without a checkpoint (no *.index.json, model.safetensors, pytorch_model.bin, "
            "adapter_config.json or .metadata); give a file inside it"
        )
    if len(found) == 1:
        return InputError(
            f"{path}: a folder, not a checkpoint; it holds one candidate: pass its path, {path / found[0]}"
        )
    shown = ", ".join(found[:limit]) + (f" and {len(found) - limit} more" if len(found) > limit else "")
    return InputError(
        f"{path}: a folder holding {len(found)} checkpoint candidates ({shown}), not one checkpoint; "
        f"pass the path of the one you mean, e.g. {path / found[0]}"
    )


def _may_be_checkpoint(folder: Path, name: str) -> bool:
    full = folder / name
    if name.lower().endswith(CHECKPOINT_SUFFIXES):
        return full.is_file()
    if name.startswith(".") or not full.is_dir():
        return False
    try:
        inner = os.listdir(full)
    except OSError:
        return False
    return any(n in FOLDER_MARKERS or n.endswith(".index.json") for n in inner)
