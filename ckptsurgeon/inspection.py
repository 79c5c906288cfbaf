"""``inspect``: what a checkpoint holds, from records alone (no tensor data is read)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .core.checkpoint import AveragedCopy, Checkpoint, StateDictCandidate, TopLevelEntry, unique_nbytes
from .core.grouping import collapse, natural_sorted
from .core.prefixes import common_prefix, wrapper_prefix
from .core.record import TensorRecord
from .core.report import dump_json, format_shape, human_bytes, human_count, render_fields, render_table
from .fileio.remote import Mirror, mirror_of
from .formats import ReadOptions, open_checkpoint

# Buffers that are state, not learned parameters.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

# Up to this many tensors the table shows one row each; above it, repeated layers are collapsed.
GROUP_ABOVE = 40

FORMAT_NAMES = {
    "torch-zip": "torch.save zip archive",
    "torch-legacy": "torch.save legacy (pre-1.6) file",
    "pickle": "plain pickle",
    "safetensors": "safetensors",
    "sharded": "sharded checkpoint",
    "dcp": "torch.distributed.checkpoint folder",
    "peft": "PEFT adapter folder",
}


@dataclass
class InspectReport:
    """What ``ckpt inspect`` shows, as data. Render with :meth:`render` or :meth:`to_json`.

    Example:
        >>> report = inspect("fixtures/vgg_1000.pth")        # doctest: +SKIP
        >>> report.tensor_count, report.wrapper_prefix        # doctest: +SKIP
        (38, '')
    """

    path: Path | str  # a str: a remote checkpoint's URL
    format: str
    file_size: int
    files: list[Path | str]
    weights: StateDictCandidate
    weights_chosen_by: str  # "default" or "--key"
    candidates: list[StateDictCandidate]
    entries: list[TopLevelEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    sha256: str | None = None
    averaged: list[AveragedCopy] = field(default_factory=list)
    remote: Mirror | None = None  # a remote checkpoint: its URL and what was fetched

    # -- derived facts ----------------------------------------------------------------------
    @property
    def tensors(self) -> list[TensorRecord]:
        return [self.weights.tensors[n] for n in self.weights.tensors]

    @property
    def tensor_count(self) -> int:
        return len(self.weights.tensors)

    @property
    def element_count(self) -> int:
        """Elements of every distinct tensor (a tied alias of another tensor counts once)."""
        return sum(r.numel for r in _distinct(self.tensors))

    @property
    def parameter_count(self) -> int:
        """Elements of every distinct tensor except BatchNorm running statistics."""
        return sum(r.numel for r in _distinct(self.tensors) if not r.name.endswith(BUFFER_SUFFIXES))

    @property
    def tensor_bytes(self) -> int:
        return self.weights.nbytes

    @property
    def dtypes(self) -> dict[str, tuple[int, int]]:
        """dtype -> (tensor count, bytes of data), largest first; shared storage counted once,
        so the bytes add up to ``tensor_bytes``."""
        by_dtype: dict[str, list[TensorRecord]] = {}
        for rec in self.tensors:
            by_dtype.setdefault(rec.dtype, []).append(rec)
        totals = {k: (len(v), unique_nbytes(v)) for k, v in by_dtype.items()}
        return dict(sorted(totals.items(), key=lambda kv: (-kv[1][1], kv[0])))

    @property
    def wrapper_prefix(self) -> str:
        return wrapper_prefix(self.weights.tensors)

    @property
    def shared_prefix(self) -> str:
        """The dotted prefix every key shares, wrapper or not (``net.``, ``base_model.model.``)."""
        return common_prefix(self.weights.tensors)

    @property
    def adapter(self) -> dict[str, Any] | None:
        """A PEFT adapter's recorded config fields (rank, alpha, targets, base model ...), else None."""
        if self.format != "peft":
            return None
        from .formats.peft import adapter_config

        return adapter_config(self.metadata)

    @property
    def devices(self) -> list[str]:
        found = {r.storage.location for r in self.tensors if r.storage is not None}
        return sorted(found)

    # -- rendering --------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The documented JSON shape (see README, "inspect --format json")."""
        return {
            "path": os.fspath(self.path),
            "format": self.format,
            "file_size": self.file_size,
            "files": [os.fspath(f) for f in self.files],
            "weights_key": self.weights.key,
            "summary": {
                "tensor_count": self.tensor_count,
                "parameter_count": self.parameter_count,
                "element_count": self.element_count,
                "tensor_bytes": self.tensor_bytes,
                "dtypes": {k: {"count": c, "bytes": b} for k, (c, b) in self.dtypes.items()},
                "wrapper_prefix": self.wrapper_prefix,
                "shared_prefix": self.shared_prefix,
                "devices": self.devices,
            },
            "averaged": [
                {"key": a.key, "saved_by": a.saved_by, "training_key": a.training_key} for a in self.averaged
            ],
            "adapter": self.adapter,
            "entries": [
                {
                    "key": e.key,
                    "kind": e.kind,
                    "tensor_count": e.tensor_count,
                    "bytes": e.nbytes,
                    "summary": e.summary,
                }
                for e in self.entries
            ],
            "candidates": [
                {"key": c.key, "tensor_count": c.count, "bytes": c.nbytes} for c in self.candidates
            ],
            "tensors": [
                {"name": r.name, "dtype": r.dtype, "shape": list(r.shape), "nbytes": r.nbytes}
                for r in self.tensors
            ],
            "metadata": self.metadata,
            "notes": self.notes,
            **({"sha256": self.sha256} if self.sha256 else {}),
            **({"remote": self.remote.to_json()} if self.remote is not None else {}),
        }

    def render(self, fmt: str = "table", show_all: bool = False) -> str:
        """The summary, the top-level entries, then the tensor table (grouped unless ``show_all``)."""
        if fmt == "json":
            return dump_json(self.to_json())
        sections = [render_fields(self._summary_fields(), fmt)]
        if self.entries:
            sections.append(
                render_table(("entry", "kind", "tensors", "size", "value"), self._entry_rows(), fmt)
            )
        sections.append(render_table(("name", "dtype", "shape", "size"), self._tensor_rows(show_all), fmt))
        if self.notes:
            sections.append("\n".join(f"note: {n}" for n in self.notes))
        return "\n\n".join(s for s in sections if s)

    def _summary_fields(self) -> list[tuple[str, str]]:
        fields = [
            ("file", os.fspath(self.path)),
            (
                "format",
                FORMAT_NAMES.get(self.format, self.format)
                + (f", {len(self.files)} files" if len(self.files) > 1 else ""),
            ),
            ("file size", human_bytes(self.file_size)),
        ]
        if self.weights.key or len(self.candidates) > 1:
            fields.append(("weights", self._weights_line()))
        fields += [
            ("tensors", human_count(self.tensor_count)),
            ("parameters", self._parameter_line()),
            ("tensor data", human_bytes(self.tensor_bytes)),
            ("dtypes", ", ".join(f"{k} {human_bytes(b)} ({c})" for k, (c, b) in self.dtypes.items()) or "-"),
        ]
        fields.append(("prefix", self._prefix_line()))
        fields += [("averaged", copy.describe()) for copy in self.averaged]
        if self.adapter is not None:
            from .formats.peft import summary_fields

            fields += summary_fields(self.adapter)
        if self.devices and self.devices != ["cpu"]:
            fields.append(("saved on", ", ".join(self.devices) + "  (opens on CPU)"))
        if self.metadata and self.format in ("safetensors", "sharded"):
            shown = ", ".join(f"{k}={v}" for k, v in list(self.metadata.items())[:4])
            fields.append(("metadata", shown[:100]))
        if self.sha256:
            fields.append(("sha256", self.sha256))
        if self.remote is not None:
            fields.append(("fetched", self.remote.describe()))
        return fields

    def _prefix_line(self) -> str:
        wrapper, shared = self.wrapper_prefix, self.shared_prefix
        if wrapper and len(shared) > len(wrapper):
            return f"{wrapper}  (every key starts with it; all keys share {shared})"
        if wrapper:
            return f"{wrapper}  (every key starts with it)"
        if shared:
            return f"{shared}  (shared by all keys; not a known wrapper)"
        return "none"

    def _weights_line(self) -> str:
        where = repr(self.weights.key) if self.weights.key else "the top level"
        how = "chosen by default" if self.weights_chosen_by == "default" else "chosen with --key"
        others = [c.key or "(top level)" for c in self.candidates if c.key != self.weights.key]
        text = f"{where} ({how})"
        if others:
            labels = [g.label for g in collapse(others, natural=False)]
            shown = ", ".join(labels[:4]) + (f" +{len(labels) - 4} more" if len(labels) > 4 else "")
            text += f"; other tensor dicts: {shown}"
        return text

    def _parameter_line(self) -> str:
        params, elements = self.parameter_count, self.element_count
        if params == elements:
            return human_count(params)
        return f"{human_count(params)}  ({human_count(elements)} with BatchNorm running statistics)"

    def _entry_rows(self) -> list[tuple[str, str, str, str, str]]:
        rows = []
        for e in self.entries:
            count = str(e.tensor_count) if e.tensor_count else "-"
            size = human_bytes(e.nbytes) if e.tensor_count else "-"
            value = "" if e.kind in ("weights", "optimizer", "tensors") else e.summary
            rows.append((e.key, e.kind, count, size, value))
        return rows

    def _tensor_rows(self, show_all: bool) -> list[tuple[str, str, str, str]]:
        by_name = self.weights.tensors
        if show_all or len(by_name) <= GROUP_ABOVE:
            return [(n, r.dtype, format_shape(r.shape), human_bytes(r.nbytes)) for n, r in by_name.items()]
        rows = []
        # torch state dicts are in module order; safetensors headers are sorted by name
        natural = self.format in ("safetensors", "sharded")
        groups = collapse(
            list(by_name), attribute=lambda n: (by_name[n].dtype, by_name[n].shape), natural=natural
        )
        for group in groups:
            rec = by_name[group.members[0]]
            count = len(group.members)
            size = human_bytes(rec.nbytes) if count == 1 else f"{count} × {human_bytes(rec.nbytes)}"
            rows.append((group.label, rec.dtype, format_shape(rec.shape), size))
        return rows


def inspect(
    path: str | os.PathLike[str] | Checkpoint,
    *,
    key: str | None = None,
    options: ReadOptions | None = None,
    with_hash: bool = False,
) -> InspectReport:
    """Describe a checkpoint: format, sizes, counts, where the weights are, what else it holds.

    Reads headers and pickles only, never tensor data (``with_hash`` reads the file to hash it).

    Example:
        >>> report = inspect("fixtures/real/lightning_tinynet.ckpt")   # doctest: +SKIP
        >>> report.weights.key, report.wrapper_prefix                   # doctest: +SKIP
        ('state_dict', 'model.')
    """
    if not isinstance(path, Checkpoint):
        options = replace(options or ReadOptions(), headers_only=not with_hash)
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path, options)
    weights = ckpt.weights(key)
    candidates = ckpt.candidates()
    sha256 = _sha256_files(ckpt.files or (ckpt.path,), options) if with_hash else None
    mirror = mirror_of(ckpt.path)
    shown: Callable[[Path], Path | str] = (lambda p: p) if mirror is None else mirror.display
    return InspectReport(
        path=shown(ckpt.path),
        format=ckpt.format,
        file_size=ckpt.file_size,
        files=[shown(f) for f in ckpt.files] or [shown(ckpt.path)],
        weights=weights,
        weights_chosen_by="--key" if key is not None else "default",
        candidates=candidates,
        entries=ckpt.top_level(weights.key),
        metadata=dict(ckpt.metadata),
        notes=list(ckpt.notes),
        averaged=ckpt.averaged_copies(),
        sha256=sha256,
        remote=mirror,
    )


def _distinct(records: Sequence[TensorRecord]) -> list[TensorRecord]:
    """The records minus tied aliases (the same storage, offset, shape and stride as one before)."""
    seen: set[tuple[object, ...]] = set()
    out = []
    for rec in records:
        if rec.storage is not None:
            key = (id(rec.storage), rec.storage_offset, rec.shape, rec.stride)
            if key in seen:
                continue
            seen.add(key)
        out.append(rec)
    return out


def _sha256_files(files: Sequence[Path], options: ReadOptions | None = None) -> str:
    """SHA-256 of a file (or of the concatenation of shard files, in name order), with a bar on
    stderr as ``options.progress`` says (default: on a TTY, for big files)."""
    import hashlib  # only for --hash: its OpenSSL module costs ~5 ms of start-up

    from .fileio.progress import progress_bar

    names = natural_sorted(os.fspath(f) for f in files)
    total = sum(os.path.getsize(name) for name in names)
    digest = hashlib.sha256()
    label = f"hashing {Path(names[0]).name if len(names) == 1 else Path(names[0]).parent.name}"
    with progress_bar(total, options.progress if options else None, label) as bar:
        for file in names:
            with open(file, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
    return digest.hexdigest()
