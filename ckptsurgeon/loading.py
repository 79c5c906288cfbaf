"""Adapting a checkpoint to a target: the plan ``ckpt adapt`` writes, and ``load_into`` for live models.

Both apply ``diff``'s diagnosis: the key transform that loads the most tensors (prefix
alignment, a suffix mapping when prefixes are not enough), every tensor whose shape does
not fit the target left out (the head), and nothing the target has no place for. The
:class:`LoadReport` says exactly what loads, what the target keeps as initialised
(missing), and what was left out of the file, and why.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .compare import ShapeMismatch, compare
from .errors import LoadError
from .grouping import collapse
from .record import TensorRecord
from .report import dump_json, format_shape, render_table
from .surgery import Plan, plan_from_mapping

if TYPE_CHECKING:  # pragma: no cover
    from .diagnosis import Diagnosis, KeyTransform
    from .formats import ReadOptions
    from .match import DiffResult
    from .target import Target

DEFAULT_MIN_COVERAGE = 50.0  # percent of the model's tensors that must load, or load_into refuses


@dataclass(frozen=True)
class LoadReport:
    """What loads into a target: ``loaded`` and ``missing`` are target names, ``skipped`` the
    file's tensors whose shape does not fit, ``unused`` the file's keys with no place in the target.

    Example:
        >>> r = LoadReport("a.pth", "model", ("fc.weight",), ("fc.bias",), (), (), "none")
        >>> r.headline
        '1 of 2 target tensors load (50.0%)'
    """

    source: str
    target: str
    loaded: tuple[str, ...]
    missing: tuple[str, ...]
    skipped: tuple[ShapeMismatch, ...]
    unused: tuple[str, ...]
    transform: str  # e.g. "strip prefix 'module.'", or "none"
    renamed: int = 0
    tied: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.loaded) + len(self.missing)

    @property
    def coverage(self) -> float:
        """Percent of target tensors that load (100 for an empty target)."""
        return 100.0 if self.total == 0 else 100.0 * len(self.loaded) / self.total

    @property
    def ok(self) -> bool:
        """True when every target tensor loads."""
        return not self.missing

    @property
    def headline(self) -> str:
        from .match import percent

        loaded = len(self.loaded)
        noun = "target tensor loads" if self.total == 1 else "target tensors load"
        return f"{loaded} of {self.total} {noun} ({percent(loaded, self.total)})"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "partial",
            "source": self.source,
            "target": self.target,
            "transform": self.transform,
            "summary": {
                "loaded": len(self.loaded),
                "missing": len(self.missing),
                "skipped": len(self.skipped),
                "unused": len(self.unused),
                "target_tensors": self.total,
                "coverage_percent": round(self.coverage, 2),
            },
            "loaded": list(self.loaded),
            "missing": list(self.missing),
            "skipped": [m.to_dict() | {"source_name": m.file_name} for m in self.skipped],
            "unused": list(self.unused),
            "tied": dict(self.tied),
        }

    def render(self, fmt: str = "table", verbose: bool = False) -> str:
        """The headline, the key transform, and every missing / left-out tensor (grouped unless verbose)."""
        if fmt == "json":
            return dump_json(self.to_json())
        lines = [
            f"{self.headline} with load_state_dict(strict=False); nothing unexpected.",
            f"Key transform: {self.transform}.",
        ]
        rows = [
            [label, "missing", "keeps the target's own initialisation"]
            for label in _labels(self.missing, verbose)
        ]
        rows += [
            [
                m.file_name,
                "left out",
                f"shape {format_shape(m.source_shape)} does not fit {format_shape(m.target_shape)}",
            ]
            for m in self.skipped
        ]
        rows += [[label, "left out", "no place in the target"] for label in _labels(self.unused, verbose)]
        table = render_table(["tensor", "status", "detail"], rows, fmt)
        return "\n".join(lines) + ("\n\n" + table if table else "")


def _labels(names: tuple[str, ...], verbose: bool) -> list[str]:
    if verbose:
        return list(names)
    return [g.label for g in collapse(list(names), merge_leaves=True)]


# -- the plan ---------------------------------------------------------------------------------
def adapt_plan(tensors: Mapping[str, TensorRecord], diagnosis: Diagnosis) -> Plan:
    """The plan that applies a diagnosis: rename what fits, drop misfits and what has no place.

    Example:
        >>> from .diagnosis import diagnose
        >>> src = {"fc.weight": TensorRecord("fc.weight", "float32", (6, 4)),
        ...        "conv.weight": TensorRecord("conv.weight", "float32", (4, 3))}
        >>> d = diagnose(src, {"module.fc.weight": (2, 4), "module.conv.weight": (4, 3)})
        >>> adapt_plan(src, d).mapping
        {'fc.weight': None, 'conv.weight': 'module.conv.weight'}
    """
    misfits = {m.file_name: m for m in diagnosis.after.shape_mismatched}
    drops: dict[str, str] = {}
    for name in tensors:
        if name in diagnosis.mapping:
            continue
        m = misfits.get(name)
        if m is not None:
            drops[name] = f"shape does not fit the target's {m.name} {format_shape(m.target_shape)}"
        else:
            drops[name] = "no place in the target"
    steps = [f"key transform: {describe_transform(diagnosis.transform)}"]
    if diagnosis.proposed_mapping:
        steps.append(f"{len(diagnosis.proposed_mapping)} key(s) matched by dotted suffix")
    if drops:
        steps.append(f"drop {len(drops)} tensor(s) that do not fit the target")
    return plan_from_mapping(tensors, diagnosis.mapping, drops, steps)


def describe_transform(transform: KeyTransform) -> str:
    """``strip prefix 'module.'``, ``add prefix 'model.'``, both, or ``none``.

    Example:
        >>> from .diagnosis import KeyTransform
        >>> describe_transform(KeyTransform(strip="module.")), describe_transform(KeyTransform())
        ("strip prefix 'module.'", 'none')
    """
    parts = []
    if transform.strip:
        parts.append(f"strip prefix {transform.strip!r}")
    if transform.add:
        parts.append(f"add prefix {transform.add!r}")
    return ", then ".join(parts) or "none"


def fit_report(
    output: Mapping[str, TensorRecord], target: Target, plan: Plan, source: str, diagnosis: Diagnosis
) -> LoadReport:
    """What ``output`` (the planned tensors) loads into ``target``, and what the plan left out.

    Example:
        >>> fit_report(plan.apply(src.tensors), target, plan, "a.pth", diagnosis).headline   # doctest: +SKIP
        '36 of 38 target tensors load (94.7%)'
    """
    comparison = compare(output, target.tensors, target.tied)
    dropped = set(plan.dropped_names)
    skipped = tuple(m for m in diagnosis.after.shape_mismatched if m.file_name in dropped)
    misfit = {m.file_name for m in skipped}
    return LoadReport(
        source=source,
        target=target.description,
        loaded=comparison.matched,
        missing=comparison.missing + tuple(m.name for m in comparison.shape_mismatched),
        skipped=skipped,
        unused=tuple(n for n in plan.dropped_names if n not in misfit) + comparison.unexpected,
        transform=describe_transform(diagnosis.transform),
        renamed=len(plan.renamed),
        tied=comparison.tied,
    )


def coverage_alarm(
    report: LoadReport, min_coverage: float = 0.0, hint: str = "", dry_run: bool = False
) -> str | None:
    """The one-line refusal when nothing, or less than ``min_coverage`` percent, of the target loads.

    ``hint`` (why nothing loads: the diff's explanation) ends the line when nothing loads.

    Example:
        >>> r = LoadReport("a.pth", "model", (), ("fc.weight",), (), ("x",), "none")
        >>> coverage_alarm(r)
        'a.pth: nothing would load into model after adaptation (0 of 1 target tensor); nothing was written.'
    """
    loaded = len(report.loaded)
    if report.total == 0 or (loaded and report.coverage >= min_coverage):
        return None
    if loaded:
        from .match import percent

        what = (
            f"only {loaded} of {_counted(report.total, 'target tensor')} would load into {report.target} "
            f"after adaptation ({percent(loaded, report.total)}), below --min-coverage {min_coverage:g}%"
        )
        hint = "--dry-run lists what is missing; a lower --min-coverage accepts it"
    else:
        what = (
            f"nothing would load into {report.target} after adaptation "
            f"(0 of {_counted(report.total, 'target tensor')})"
        )
    outcome = "writing it would be refused" if dry_run else "nothing was written"
    return f"{report.source}: {what}; {outcome}. {hint}".strip()


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# -- load_into ----------------------------------------------------------------------------------
def load_into(
    model: Any,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    *,
    key: str | None = None,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
    strict_shapes: bool = False,
    read_options: ReadOptions | None = None,
) -> LoadReport:
    """Load what fits of a checkpoint into a live ``nn.Module`` and return what happened.

    The diagnosis of ``ckpt diff`` is applied: keys are aligned (``module.``, ``_orig_mod.``,
    ``model.`` ... stripped or added as the model needs), tensors whose shape does not fit
    (the classifier head) are skipped (``strict_shapes=True`` raises instead), and every
    fitting tensor is materialised one at a time and copied into the model's parameter or
    buffer (the same effect as ``load_state_dict(strict=False)`` with only those tensors).
    Raises :class:`~ckptsurgeon.errors.LoadError`, before anything is copied, when less
    than ``min_coverage`` percent of the model's tensors would load: the silent zero-load
    cannot happen.

    Example:
        >>> model = torchvision.models.resnet50(num_classes=2)          # doctest: +SKIP
        >>> report = ckptsurgeon.load_into(model, "resnet50_dp.pth")    # doctest: +SKIP
        >>> report.headline, report.missing                             # doctest: +SKIP
        ('318 of 320 target tensors load (99.3%)', ('fc.weight', 'fc.bias'))
    """
    from .match import diff
    from .target import target_from_module

    label, records = _source_records(path_or_state_dict, key, read_options)
    target = target_from_module(model, type(model).__name__, "module")
    result = diff(records, target, source_label=label)
    plan = adapt_plan(records, result.diagnosis)
    output = plan.apply(records)
    report = fit_report(output, target, plan, label, result.diagnosis)
    _check(report, result, min_coverage, strict_shapes)
    _copy_into(model, output, report.loaded)
    return report


def _source_records(
    source: str | os.PathLike[str] | Mapping[str, Any], key: str | None, read_options: ReadOptions | None
) -> tuple[str, dict[str, TensorRecord]]:
    if isinstance(source, str | os.PathLike):
        from .formats import open_checkpoint

        return str(source), dict(open_checkpoint(Path(source), read_options).weights(key).tensors)
    if isinstance(source, Mapping):
        from .checkpoint import resolve_key
        from .match import as_records

        node = resolve_key(source, key) if key else source
        if not isinstance(node, Mapping):
            raise LoadError(f"state dict: no entry {key!r} holding tensors")
        return "state dict", as_records(node)
    raise LoadError(f"load_into: cannot read a {type(source).__name__}; pass a path or a state dict")


def _check(report: LoadReport, result: DiffResult, min_coverage: float, strict_shapes: bool) -> None:
    if strict_shapes and report.skipped:
        first = report.skipped[0]
        raise LoadError(
            f"{report.source}: {len(report.skipped)} tensor(s) do not fit the model's shapes (e.g. "
            f"{first.file_name} {format_shape(first.source_shape)} vs {format_shape(first.target_shape)}); "
            "pass strict_shapes=False to skip them"
        )
    if report.total and (not report.loaded or report.coverage < min_coverage):
        hint = result.explanation.message
        raise LoadError(
            f"{report.source}: only {report.headline} into {report.target}, below min_coverage="
            f"{min_coverage:g}%; nothing was loaded. {hint}"
        )


def _copy_into(model: Any, tensors: Mapping[str, TensorRecord], names: tuple[str, ...]) -> None:
    import torch

    state = model.state_dict(keep_vars=True)
    on_meta = next((n for n in names if state[n].device.type == "meta"), None)
    if on_meta is not None:
        raise LoadError(f"{on_meta}: the model is on the meta device; call model.to_empty(device=...) first")
    with torch.no_grad():
        for name in names:
            state[name].copy_(tensors[name].to_torch())
