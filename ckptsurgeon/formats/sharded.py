"""Sharded checkpoints: ``*.index.json`` + shards, and model folders.

The index is Hugging Face's: ``{"metadata": {"total_size": ...}, "weight_map": {name: shard}}``.
Reading validates it (shards stay inside the folder, every shard exists, index and shards
agree) and opens each shard with its own reader; the result is one flat state dict of
records pointing into the shards. Nothing is merged in memory.

The sharded writer (``write``, ``plan_shards``, ``parse_size``) is
:mod:`ckptsurgeon.formats.shardwriter`, which reading never imports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ..core.checkpoint import Checkpoint
from ..core.record import TensorRecord
from ..errors import FormatError, InputError, KeySelectionError
from . import ReadOptions, folder_refusal, open_checkpoint
from .safetensors import DuplicateKeyError, no_duplicate_keys, parse_aliases

FORMAT = "sharded"
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")


# -- reading -------------------------------------------------------------------------------
def read(path: Path, options: ReadOptions | None = None) -> Checkpoint:
    """Open a ``*.index.json`` (or a folder holding one, or a single weights file) lazily.

    Example:
        >>> ckpt = read(Path("llama/model.safetensors.index.json"))   # doctest: +SKIP
        >>> len(ckpt.files), ckpt.format                              # doctest: +SKIP
        (3, 'sharded')
    """
    path = Path(path)
    options = options or ReadOptions()
    if path.is_dir():
        index = find_index(path)
        if index is None:
            return _read_single(path, options)
        path = index
    return _read_index(path, options)


def find_index(folder: Path) -> Path | None:
    """The index file of a model folder (safetensors preferred), or None.

    Example:
        >>> find_index(Path("gpt2"))                                  # doctest: +SKIP
        PosixPath('gpt2/model.safetensors.index.json')
    """
    names = sorted(n for n in os.listdir(folder) if n.endswith(".index.json"))
    for preferred in (*INDEX_NAMES, *(n for n in names if n.endswith(".safetensors.index.json")), *names):
        if preferred in names and (folder / preferred).is_file():
            return folder / preferred
    return None


def _read_single(folder: Path, options: ReadOptions) -> Checkpoint:
    for name in SINGLE_FILES:
        candidate = folder / name
        if candidate.is_file():
            ckpt = open_checkpoint(candidate, options)
            ckpt.notes.insert(0, f"{folder}: a model folder; opened {name}")
            return ckpt
    raise folder_refusal(folder)


def _read_index(index: Path, options: ReadOptions) -> Checkpoint:
    raw = load_index(index)
    weight_map: dict[str, str] = raw["weight_map"]
    by_file = group_by_shard_file(index, weight_map)
    groups = {shard: names for shard, (_, names) in by_file.items()}
    shard_paths = {shard: path for shard, (path, _) in by_file.items()}
    _check_shards_exist(index, shard_paths, groups)
    mapped: dict[str, TensorRecord] = {}
    tied: dict[str, TensorRecord] = {}
    ignored: list[str] = []
    for shard, names in groups.items():
        found = _shard_records(index, shard, shard_paths[shard], names, weight_map, options)
        mapped.update(found[0])
        tied.update(found[1])
        ignored.extend(found[2])
    files = tuple(shard_paths.values())
    return Checkpoint(
        path=index,
        format=FORMAT,
        tree={name: mapped[name] for name in weight_map} | tied,
        files=files,
        file_size=sum(p.stat().st_size for p in files),
        metadata=_string_metadata(raw.get("metadata")),
        notes=_notes(index, files, tied, ignored) + _unlisted_note(index, files),
    )


def _unlisted_note(index: Path, files: tuple[Path, ...]) -> list[str]:
    """A note when the index's folder holds more files like its shards than the index lists: a
    tensor there is not read (what from_pretrained does too), and may be one the index forgot."""
    suffixes = {p.suffix for p in files}
    listed = {p.name for p in files}
    try:
        names = sorted(n for n in os.listdir(index.parent) if Path(n).suffix in suffixes and n not in listed)
    except OSError:
        return []
    if not names:
        return []
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return [f"the folder also holds {shown}, which {index.name} does not list (not read)"]


def _shard_records(
    index: Path, shard: str, path: Path, names: list[str], weight_map: Mapping[str, str], options: ReadOptions
) -> tuple[dict[str, TensorRecord], dict[str, TensorRecord], list[str]]:
    """One shard's records: (mapped by the index, tied names restored, others ignored)."""
    records, aliases = _open_shard(path, options)
    _check_shard_holds(index, shard, names, records)
    mapped = {name: records[name].renamed(name) for name in names}
    extra = {name: rec for name, rec in records.items() if name not in mapped}
    tied = {
        name: rec.renamed(name) for name, rec in extra.items() if name in aliases and name not in weight_map
    }
    ignored = [f"{name} ({shard})" for name in extra if name not in tied]
    return mapped, tied, ignored


def load_index(index: Path) -> dict[str, Any]:
    """Parse and validate an index file: a JSON object whose ``weight_map`` maps names to shard files.

    Example:
        >>> load_index(Path("model.safetensors.index.json"))["weight_map"]["wte.weight"]  # doctest: +SKIP
        'model-00001-of-00002.safetensors'
    """
    try:
        text = index.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{index}: not a sharded-checkpoint index (not UTF-8 text)") from None
    except OSError as exc:
        raise InputError(f"{index}: cannot be read ({exc.strerror or exc})") from None
    try:
        raw = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except DuplicateKeyError as exc:
        raise FormatError(f"{index}: {exc.key!r} appears twice in the index; fetch the index again") from None
    except json.JSONDecodeError as exc:
        raise FormatError(
            f"{index}: not valid JSON ({exc.msg} at line {exc.lineno}); fetch the index again"
        ) from None
    except ValueError as exc:  # a number too long to convert
        raise FormatError(f"{index}: not valid JSON ({exc}); fetch the index again") from None
    except RecursionError:
        raise FormatError(f"{index}: not valid JSON (nested too deeply)") from None
    if not isinstance(raw, dict) or "weight_map" not in raw:
        raise FormatError(
            f'{index}: not a sharded-checkpoint index (a JSON object with a "weight_map" is expected)'
        )
    weight_map = raw["weight_map"]
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FormatError(f"{index}: weight_map must map tensor names to shard file names (strings)")
    if "metadata" in raw and raw["metadata"] is not None and not isinstance(raw["metadata"], dict):
        raise FormatError(f"{index}: metadata must be a JSON object")
    return raw


def shard_path(index: Path, shard: str) -> Path:
    """The path of ``shard`` beside ``index``; refuses names that lead outside the index's folder.

    Example:
        >>> shard_path(Path("m/model.safetensors.index.json"), "../../etc/passwd")
        Traceback (most recent call last):
        ...
        ckptsurgeon.errors.FormatError: m/model.safetensors.index.json: shard '../../etc/passwd' ...
    """
    folder = index.parent
    posix, windows = PurePosixPath(shard), PureWindowsPath(shard)
    if "\x00" in shard or posix.is_absolute() or windows.anchor or ".." in (*posix.parts, *windows.parts):
        raise _outside(index, shard, "it is not a plain file name inside the folder")
    if not shard or shard.endswith(("/", "\\")):
        raise FormatError(f"{index}: shard name {shard!r} is not a file name; fix the weight_map")
    full = folder / shard
    try:
        inside = full.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        raise FormatError(f"{index}: shard {shard!r} is a symbolic link loop; fix the folder") from None
    if not inside:
        raise _outside(index, shard, "a symbolic link leads outside the folder")
    return full


def group_by_shard_file(index: Path, weight_map: Mapping[str, str]) -> dict[str, tuple[Path, list[str]]]:
    """``{shard: (path, names)}``, one entry per shard *file*, under the first spelling of its name.

    Names are validated and resolved once per spelling, and spellings of one file (``a.safetensors``,
    ``./a.safetensors``, ``.//./a.safetensors``, a link to it inside the folder) share one entry, so
    each file's header is parsed once however many ways the index spells it.

    Example:
        >>> wm = {"a": "m.safetensors", "b": "./m.safetensors", "c": ".//./m.safetensors"}
        >>> group_by_shard_file(Path("f/model.safetensors.index.json"), wm)
        {'m.safetensors': (PosixPath('f/m.safetensors'), ['a', 'b', 'c'])}
    """
    real: dict[str, str] = {}  # spelling -> the real path of its file
    groups: dict[str, tuple[str, Path, list[str]]] = {}  # real path -> (first spelling, path, names)
    for name, shard in weight_map.items():
        key = real.get(shard)
        if key is None:
            path = shard_path(index, shard)
            key = real[shard] = os.path.realpath(path)
            groups.setdefault(key, (shard, path, []))
        groups[key][2].append(name)
    return {shard: (path, names) for shard, path, names in groups.values()}


def _outside(index: Path, shard: str, why: str) -> FormatError:
    return FormatError(
        f"{index}: shard {shard!r} points outside the index's folder ({why}); refusing to read it, "
        "fix the weight_map"
    )


def _check_shards_exist(index: Path, paths: Mapping[str, Path], groups: Mapping[str, list[str]]) -> None:
    # os.path.isfile, not Path.is_file: it is False (not an OSError) for a name that is too long
    missing = [shard for shard, path in paths.items() if not os.path.isfile(path)]
    if not missing:
        return
    shard = missing[0]
    more = f" (and {len(missing) - 1} more shard(s) are missing)" if len(missing) > 1 else ""
    what = "is not a file" if os.path.exists(paths[shard]) else "is missing"
    raise FormatError(
        f"{index}: shard {shard} {what}; it holds {len(groups[shard])} of the "
        f"{sum(map(len, groups.values()))} tensors{more}; download the missing shard(s) into {index.parent}"
    )


def _open_shard(path: Path, options: ReadOptions) -> tuple[dict[str, TensorRecord], dict[str, str]]:
    if path.name.endswith(".index.json"):
        raise FormatError(f"{path}: a shard cannot itself be an index file; fix the weight_map")
    ckpt = open_checkpoint(path, options)
    try:
        records = ckpt.weights("").tensors
    except KeySelectionError:  # a shard without tensors: the weight_map check names what is absent
        return {}, {}
    aliases = parse_aliases(path, ckpt.metadata)  # validated by the shard's reader
    return records, aliases


def _check_shard_holds(
    index: Path, shard: str, names: list[str], records: Mapping[str, TensorRecord]
) -> None:
    absent = [name for name in names if name not in records]
    if absent:
        raise FormatError(
            f"{index}: {absent[0]!r} is mapped to {shard}, which does not hold it ({len(absent)} of its "
            f"{len(names)} mapped tensors are absent); index and shards do not match, fetch both again"
        )


def _string_metadata(metadata: Any) -> dict[str, str]:
    if not isinstance(metadata, dict):
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}


def _notes(index: Path, files: tuple[Path, ...], tied: Mapping[str, Any], ignored: list[str]) -> list[str]:
    notes = [f"{len(files)} shard(s) listed in {index.name}"]
    if tied:
        notes.append(
            f"{len(tied)} tied tensor name(s) restored from shard metadata: {', '.join(sorted(tied))}"
        )
    if ignored:
        shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        notes.append(
            f"{len(ignored)} tensor(s) in the shards are not in the index's weight_map (ignored): {shown}"
        )
    return notes
