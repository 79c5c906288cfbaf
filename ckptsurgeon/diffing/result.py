"""``diff()``: will this checkpoint load into that model, how much of it, and what fixes it.

Example:
    >>> import ckptsurgeon
    >>> result = ckptsurgeon.diff("fixtures/vgg_1000.pth",
    ...     "torch.nn.DataParallel(fixtures/models.py:vgg_like(num_classes=2))")   # doctest: +SKIP
    >>> result.headline                                                         # doctest: +SKIP
    '0 of 38 target tensors would load (0%)'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.coverage import coverage_percent, enough, threshold
from ..core.grouping import natural_key, natural_sorted
from ..core.record import TensorRecord
from ..core.report import dump_json, percent
from ..errors import LoadError
from .compare import Comparison, DtypeDifference, ShapeMismatch, compare
from .diagnosis import Diagnosis, diagnose
from .explain import Explanation, explain
from .render import DiffHeader, render_text
from .target import Target, resolve_target, target_from_module, target_from_records

if TYPE_CHECKING:  # pragma: no cover
    from ..core.checkpoint import Checkpoint
    from ..formats import ReadOptions

__all__ = ["DiffResult", "SourceRecords", "diff", "source_records"]


@dataclass(frozen=True)
class DiffResult:
    """The answer: PyTorch's four lists for the file as saved, and the diagnosis.

    ``ok`` is True when the file loads with strict loading as is (a tied alias the file
    stores once is not missing, but strict loading raises on it: ``comparison.status`` is then
    ``"tied"``). ``coverage`` is the percentage of target tensors that load.
    ``min_coverage`` is the bar the caller set (``--min-coverage``; ``None``: strict loading
    decides :meth:`passes`, and the alarm uses the default of :mod:`ckptsurgeon.core.coverage`).

    Example:
        >>> r = diff({"w": TensorRecord("w", "float32", (2,))}, {"w": TensorRecord("w", "float32", (2,))})
        >>> r.ok, r.headline
        (True, '1 of 1 target tensors would load (100%)')
    """

    source: str
    target: str
    target_kind: str
    source_key: str | None
    source_count: int
    comparison: Comparison
    diagnosis: Diagnosis
    explanation: Explanation
    target_notes: tuple[str, ...] = ()
    min_coverage: float | None = None
    remote: dict[str, Any] | None = None  # a remote source: its URL, bytes read, requests

    # -- PyTorch's lists, as saved ------------------------------------------------------------------
    @property
    def matched(self) -> tuple[str, ...]:
        return self.comparison.matched

    @property
    def missing(self) -> tuple[str, ...]:
        return self.comparison.missing

    @property
    def unexpected(self) -> tuple[str, ...]:
        return self.comparison.unexpected

    @property
    def shape_mismatched(self) -> tuple[ShapeMismatch, ...]:
        return self.comparison.shape_mismatched

    @property
    def dtype_differences(self) -> tuple[DtypeDifference, ...]:
        return self.comparison.dtype_differences

    @property
    def tied(self) -> dict[str, str]:
        return self.comparison.tied

    # -- verdict ---------------------------------------------------------------------------------
    @property
    def ok(self) -> bool:
        return self.comparison.ok

    @property
    def loadable(self) -> int:
        return self.comparison.loadable

    @property
    def total(self) -> int:
        return self.comparison.total

    @property
    def coverage(self) -> float:
        """Percent of target tensors that load as saved (100 for an empty target)."""
        return coverage_percent(self.loadable, self.total)

    @property
    def coverage_low(self) -> bool:
        """True when less than the bar (``min_coverage``, or the default 50%) loads as saved,
        or nothing does: the report's alarm is raised exactly then."""
        return not enough(self.loadable, self.total, threshold(self.min_coverage))

    @property
    def headline(self) -> str:
        share = percent(self.loadable, self.total)
        return f"{self.loadable} of {self.total} target tensors would load ({share})"

    def passes(self, min_coverage: float | None = None) -> bool:
        """What ``ckpt diff`` exits 0 on: without a bar (``min_coverage`` here or on the result),
        ``ok``; with one, at least that percent of target tensors load as saved, and something
        does (:func:`ckptsurgeon.core.coverage.enough`, the rule ``adapt`` and ``load_into`` use).

        Example:
            >>> r = diff({"a": TensorRecord("a", "float32", (2,))},
            ...          {"a": TensorRecord("a", "float32", (2,)), "b": TensorRecord("b", "float32", (2,))})
            >>> r.passes(), r.passes(50), r.passes(51), r.coverage_low
            (False, True, False, False)
        """
        bar = self.min_coverage if min_coverage is None else min_coverage
        if bar is None:
            return self.ok
        return enough(self.loadable, self.total, bar)

    def render(self, fmt: str = "table", verbose: bool = False) -> str:
        """The report as ``ckpt diff`` prints it: ``table``, ``markdown`` or ``json``."""
        if fmt == "json":
            return dump_json(self.to_json())
        header = DiffHeader(
            self.source,
            self.source_key,
            self.source_count,
            self.target,
            self.target_kind,
            self.target_notes,
            self.headline,
        )
        text = render_text(header, self.comparison, self.diagnosis, self.explanation, fmt, verbose)
        if self.remote is not None:
            text += f"remote: {self.remote['url']}: fetched {self.remote['fetched']}\n"
        return text

    def to_json(self) -> dict[str, Any]:
        """The documented JSON object (README, "The JSON shape of ckpt diff")."""
        d, e = self.diagnosis, self.explanation
        mismatched = sorted(self.shape_mismatched, key=lambda m: natural_key(m.name))
        return {
            "status": self.comparison.status,
            "passes": self.passes(),
            "min_coverage": threshold(self.min_coverage),
            "headline": self.headline,
            "source": {"path": self.source, "key": self.source_key, "tensors": self.source_count},
            **({"remote": self.remote} if self.remote is not None else {}),
            "target": {
                "spec": self.target,
                "kind": self.target_kind,
                "notes": list(self.target_notes),
                "tensors": len(self.matched)
                + len(self.missing)
                + len(self.shape_mismatched)
                + len(self.tied),
            },
            "summary": self.summary(),
            "matched": natural_sorted(self.matched),
            "missing": natural_sorted(self.missing),
            "unexpected": natural_sorted(self.unexpected),
            "shape_mismatched": [m.to_dict() for m in mismatched],
            "dtype_differences": [
                x.to_dict() for x in sorted(self.dtype_differences, key=lambda x: natural_key(x.name))
            ],
            "tied": [{"name": alias, "tied_to": held} for alias, held in self.tied.items()],
            "diagnosis": {
                "message": e.message,
                "alarm": e.alarm,
                "transform": None if d.transform.is_identity else d.transform.to_dict(),
                "loads_after_transform": d.loads_after,
                "after_transform": d.after.counts(),
                "head": d.head.to_dict() if d.head else None,
                "vocabulary": d.vocabulary.to_dict() if d.vocabulary else None,
                "shape_fixes": [f.to_dict() for f in d.shape_fixes],
                "filter_idiom": {
                    "message": e.filter_idiom,
                    "as_saved": d.filter_as_saved.to_dict(),
                    "after_transform": d.filter_after.to_dict(),
                },
                "proposed_mapping": [{"source": s, "target": t} for s, t in d.proposed_mapping],
                "ambiguous": list(d.ambiguous),
                "drop": list(d.drop),
                "extra": list(d.extra),
                "fix_commands": list(e.fix_commands),
                "proposal_commands": list(e.proposal_commands),
            },
        }

    def summary(self) -> dict[str, Any]:
        """Counts, as in the JSON ``summary``."""
        return {
            "source_tensors": self.source_count,
            "target_tensors": self.total,
            **self.comparison.counts(),
            "coverage_percent": round(self.coverage, 2),
        }


def headers_only(options: ReadOptions | None) -> ReadOptions:
    """``options`` for a read of records only (a remote checkpoint is fetched as headers only)."""
    from dataclasses import replace

    from ..formats import ReadOptions

    return replace(options or ReadOptions(), headers_only=True)


def diff(
    source: str | Path | Checkpoint | Mapping[str, Any] | Any,
    target: str | Target | Mapping[str, Any] | Any,
    *,
    key: str | None = None,
    read_options: ReadOptions | None = None,
    source_label: str | None = None,
    target_key: str | None = None,
    target_label: str | None = None,
    min_coverage: float | None = None,
) -> DiffResult:
    """Compare ``source`` with ``target`` by name and shape, and diagnose the difference.

    ``source``: a path (any checkpoint ``open_checkpoint`` reads; ``key`` picks a nested entry),
    a :class:`Checkpoint`, a state dict (records or tensors), or an ``nn.Module``.
    ``target``: a spec string (a path, inspect JSON, or an architecture call expression),
    a :class:`Target`, an ``nn.Module``, or a mapping; ``target_key`` picks the entry of a
    nested target checkpoint. ``source_label`` / ``target_label`` name them in the suggested
    commands. ``min_coverage`` (percent) is the bar for :meth:`DiffResult.passes` and the alarm
    (``None``: strict loading passes, the alarm uses the default of :mod:`ckptsurgeon.core.coverage`).

    Example:
        >>> r = diff("fixtures/resnet_dp_6.pth", "fixtures/models.py:resnet_like(2)")  # doctest: +SKIP
        >>> r.diagnosis.transform.strip, r.diagnosis.loads_after                      # doctest: +SKIP
        ('module.', 120)
    """
    found = source_records(source, key, read_options)
    if found is None:
        raise TypeError(f"diff: cannot read a source of type {type(source).__name__}")
    label, chosen_key, records, opened = found.label, found.key, found.records, found.opened
    resolved = _target(target, read_options, target_key)
    comparison = compare(records, resolved.tensors, resolved.tied)
    diagnosis = diagnose(records, resolved.tensors, resolved.tied, comparison)
    source_label = source_label or label
    target_spec = target if isinstance(target, str) else target_label
    explanation = explain(diagnosis, source_label, target_spec, key, threshold(min_coverage))
    if opened is not None and opened.format == "peft" and not comparison.ok:  # an adapter, not a checkpoint
        from .adapters import adapter_explanation

        explanation = adapter_explanation(
            explanation, opened, records, resolved.tensors, comparison.loadable, comparison.total
        )
    return DiffResult(
        source=source_label,
        target=resolved.description,
        target_kind=resolved.kind,
        source_key=chosen_key,
        source_count=len(records),
        comparison=comparison,
        diagnosis=diagnosis,
        explanation=explanation,
        target_notes=resolved.notes,
        min_coverage=min_coverage,
        remote=_remote_traffic(opened),
    )


def _remote_traffic(opened: Checkpoint | None) -> dict[str, Any] | None:
    """What was fetched of a remote source (None for a local one)."""
    from ..fileio.remote import mirror_of

    mirror = mirror_of(opened.path) if opened is not None else None
    if mirror is None:
        return None
    return {**mirror.to_json(), "fetched": mirror.describe()}


@dataclass(frozen=True)
class SourceRecords:
    """A source's weights as records: its label for messages, the entry chosen, the checkpoint
    opened (``None`` for a state dict or a model)."""

    label: str
    key: str | None
    records: dict[str, TensorRecord]
    opened: Checkpoint | None = None


def source_records(
    source: Any,
    key: str | None = None,
    read_options: ReadOptions | None = None,
    mapping_label: str = "SOURCE",
) -> SourceRecords | None:
    """The weights of a path (``key`` picks a nested entry), a :class:`Checkpoint`, a state dict
    (records or tensors; ``key`` picks a nested entry, labelled ``mapping_label``) or an
    ``nn.Module``; ``None`` for anything else. What ``diff`` and ``load_into`` read.

    Example:
        >>> found = source_records({"sd": {"w": TensorRecord("w", "float32", (2,))}}, "sd")
        >>> found.label, list(found.records)
        ('SOURCE', ['w'])
    """
    from ..core.checkpoint import Checkpoint, resolve_key

    if isinstance(source, str | os.PathLike):
        from ..formats import open_checkpoint

        opened = open_checkpoint(source, headers_only(read_options))
        candidate = opened.weights(key)
        return SourceRecords(os.fspath(source), candidate.key, dict(candidate.tensors), opened)
    if isinstance(source, Checkpoint):
        candidate = source.weights(key)
        return SourceRecords(str(source.path), candidate.key, dict(candidate.tensors), source)
    if _is_module(source):
        return SourceRecords(type(source).__name__, None, dict(target_from_module(source).tensors))
    if isinstance(source, Mapping):
        node = resolve_key(source, key) if key else source
        if not isinstance(node, Mapping):
            raise LoadError(f"{mapping_label}: no entry {key!r} holding tensors")
        return SourceRecords(mapping_label, None, as_records(node))
    return None


def target_of(target: Any, read_options: ReadOptions | None = None, key: str | None = None) -> Target:
    """The :class:`Target` of anything :func:`diff` accepts as a target.

    Example:
        >>> target_of({"w": TensorRecord("w", "float32", (2,))}).shapes()
        {'w': (2,)}
    """
    return _target(target, read_options, key)


def _target(target: Any, read_options: ReadOptions | None, key: str | None = None) -> Target:
    if isinstance(target, Target):
        return target
    if isinstance(target, str | Path):
        return resolve_target(str(target), read_options, key)
    if _is_module(target):
        return target_from_module(target, type(target).__name__, "module")
    if isinstance(target, Mapping):
        return target_from_records(as_records(target), "TARGET", "mapping")
    raise TypeError(f"diff: cannot use a target of type {type(target).__name__}")


def _is_module(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "named_modules", None))


def as_records(state: Mapping[str, Any]) -> dict[str, TensorRecord]:
    """Records for a state dict of records or tensors (tensors are not copied).

    Example:
        >>> as_records({"w": TensorRecord("w", "float32", (2,))})["w"].shape
        (2,)
    """
    out: dict[str, TensorRecord] = {}
    for name, value in state.items():
        if isinstance(value, TensorRecord):
            out[str(name)] = value.renamed(str(name)) if value.name != name else value
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            out[str(name)] = TensorRecord.from_torch(str(name), value)
        elif isinstance(value, Mapping):
            out.update({f"{name}.{k}": v for k, v in as_records(value).items()})
    return out
