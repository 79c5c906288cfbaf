"""Adapting a checkpoint to a target: the plan ``ckpt adapt`` writes, and ``load_into`` for live models.

Both run one sequence, :func:`checked_adaptation` (over :func:`plan_adaptation`): ``diff``'s
diagnosis, the key transform it can justify from the data (wrapper prefixes, see
:func:`ckptsurgeon.diffing.diagnosis.is_wrapper_prefix`), every tensor whose shape does not fit
the target left out (the head), nothing the target has no place for, and one coverage decision
(:mod:`ckptsurgeon.core.coverage`: below the minimum, nothing is written or copied). A rename
guessed from dotted suffixes is never applied: it is
reported with the command that applies it. The :class:`LoadReport` says exactly what loads,
what the target keeps as initialised (missing), and what was left out of the file, and why.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..core.coverage import DEFAULT_MIN_COVERAGE, coverage_percent, enough
from ..core.grouping import collapse
from ..core.record import TensorRecord
from ..core.report import counted, dump_json, format_shape, render_table
from ..diffing.compare import ShapeMismatch, compare
from ..errors import LoadError
from .plan import Plan, plan_from_mapping
from .transforms import Transform

if TYPE_CHECKING:  # pragma: no cover
    from ..diffing.diagnosis import Diagnosis, KeyTransform, ShapeFix
    from ..diffing.result import DiffResult
    from ..diffing.target import Target
    from ..formats import ReadOptions
    from .resize import Resizing

__all__ = ["Adaptation", "LoadReport", "checked_adaptation", "load_into", "plan_adaptation"]


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
    # (target name, key in the file, what the transform did): loaded, its values kept by a transform
    transformed: tuple[tuple[str, str, str], ...] = ()

    @property
    def total(self) -> int:
        return len(self.loaded) + len(self.missing)

    @property
    def coverage(self) -> float:
        """Percent of target tensors that load (100 for an empty target)."""
        return coverage_percent(len(self.loaded), self.total)

    @property
    def ok(self) -> bool:
        """True when every target tensor loads."""
        return not self.missing

    @property
    def headline(self) -> str:
        from ..core.report import percent

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
            "transformed": [
                {"name": name, "source_name": old, "transform": what} for name, old, what in self.transformed
            ],
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
        rows += [[name, "loaded, transformed", what] for name, _old, what in self.transformed]
        table = render_table(["tensor", "status", "detail"], rows, fmt)
        return "\n".join(lines) + ("\n\n" + table if table else "")


def _labels(names: tuple[str, ...], verbose: bool) -> list[str]:
    if verbose:
        return list(names)
    return [g.label for g in collapse(list(names), merge_leaves=True)]


# -- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reshaping:
    """Which shape-changing transforms an adaptation applies, as one value through ``adapt``,
    ``load_into`` and their planning: position tables resampled and the input conv adapted (on by
    default, as timm does), and ``resizing`` (a vocabulary or chosen classes, only when asked).

    Example:
        >>> Reshaping.asked(resize_vocab=True, new_rows="zeros").resizing
        Resizing(new_rows='zeros', keep_classes=None)
    """

    resample_pos_embed: bool = True
    adapt_input_conv: bool = True
    resizing: Resizing | None = None

    @classmethod
    def asked(
        cls,
        *,
        resize_vocab: bool = False,
        new_rows: str = "mean",
        keep_classes: str | Sequence[int] | None = None,
        resample_pos_embed: bool = True,
        adapt_input_conv: bool = True,
    ) -> Reshaping:
        """The choices ``adapt``'s and ``load_into``'s keyword arguments make (checked here)."""
        from .resize import resizing

        return cls(resample_pos_embed, adapt_input_conv, resizing(resize_vocab, new_rows, keep_classes))


def adapt_plan(
    tensors: Mapping[str, TensorRecord],
    diagnosis: Diagnosis,
    reshaping: Reshaping = Reshaping(),
) -> Plan:
    """The plan that applies a diagnosis: rename what fits, drop misfits and what has no place.

    A misfit whose learned values a transform keeps (:class:`~ckptsurgeon.diffing.diagnosis.ShapeFix`:
    a position table on another grid, a relative position bias table for another window,
    ``resample_pos_embed``; the first conv with other input channels, ``adapt_input_conv``) is
    transformed to the target's shape instead of dropped, as timm's ``checkpoint_filter_fn`` does.

    Example:
        >>> from ..diffing.diagnosis import diagnose
        >>> src = {"fc.weight": TensorRecord("fc.weight", "float32", (6, 4)),
        ...        "conv.weight": TensorRecord("conv.weight", "float32", (4, 3))}
        >>> d = diagnose(src, {"module.fc.weight": (2, 4), "module.conv.weight": (4, 3)})
        >>> adapt_plan(src, d).mapping
        {'fc.weight': None, 'conv.weight': 'module.conv.weight'}
    """
    misfits = {m.file_name: m for m in diagnosis.after.shape_mismatched}
    fixes = applied_fixes(
        diagnosis,
        resample_pos_embed=reshaping.resample_pos_embed,
        adapt_input_conv=reshaping.adapt_input_conv,
    )
    fixed = {f.mismatch.file_name: f.mismatch.name for f in fixes}
    drops: dict[str, str] = {}
    for name in tensors:
        if name in diagnosis.mapping or name in fixed:
            continue
        m = misfits.get(name)
        if m is not None:
            drops[name] = f"shape does not fit the target's {m.name} {format_shape(m.target_shape)}"
        else:
            drops[name] = "no place in the target"
    steps = [f"key transform: {describe_transform(diagnosis.transform)}"]
    misfit_count = sum(1 for name in drops if name in misfits)
    if misfit_count:
        steps.append(f"drop {misfit_count} tensor(s) whose shape does not fit the target")
    if len(drops) > misfit_count:
        steps.append(f"drop {len(drops) - misfit_count} tensor(s) with no place in the target")
    plan = plan_from_mapping(tensors, {**diagnosis.mapping, **fixed}, drops, steps)
    for fix in fixes:
        plan = plan.with_transform(shape_fix_transform(tensors, fix))
    return plan


def applied_fixes(
    diagnosis: Diagnosis, *, resample_pos_embed: bool = True, adapt_input_conv: bool = True
) -> tuple[ShapeFix, ...]:
    """The diagnosis's shape fixes the options leave on (position tables, the input conv)."""
    on = {"pos_embed": resample_pos_embed, "rel_pos_bias": resample_pos_embed, "input_conv": adapt_input_conv}
    return tuple(f for f in diagnosis.shape_fixes if on[f.kind])


def shape_fix_transform(tensors: Mapping[str, TensorRecord], fix: ShapeFix) -> Transform:
    """The transform (:mod:`ckptsurgeon.surgery.resample`) that gives ``fix``'s tensor the target's
    shape, written under the target's name."""
    from . import resample

    m = fix.mismatch
    if fix.kind == "pos_embed":
        return resample.resample_pos_embed(tensors, m.file_name, m.target_shape, m.name)
    if fix.kind == "rel_pos_bias":
        return resample.resize_rel_pos_bias(tensors, m.file_name, m.target_shape, m.name)
    return resample.adapt_input_conv(tensors, m.file_name, m.target_shape[1], m.name)


def describe_transform(transform: KeyTransform) -> str:
    """``strip prefix 'module.'``, ``add prefix 'model.'``, both, or ``none``.

    Example:
        >>> from ..diffing.diagnosis import KeyTransform
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
        transformed=tuple(
            (out, e.old, e.transform.description)
            for e in plan.transformed
            if e.transform
            for out in e.outputs
        ),
    )


@dataclass(frozen=True)
class Adaptation:
    """One adaptation planned, not yet applied: the diff, the plan, the planned tensors, what they
    load (``report``) and the coverage decision against ``min_coverage``.

    ``proposal`` (keys paired by dotted suffix only) is left out of the plan: ``proposal_commands``
    apply it after review.

    Example:
        >>> a = plan_adaptation(source.tensors, target, "a.pth")                 # doctest: +SKIP
        >>> a.accepted, a.report.headline                                        # doctest: +SKIP
        (True, '120 of 122 target tensors load (98.3%)')
    """

    diff: DiffResult
    plan: Plan
    output: dict[str, TensorRecord]
    report: LoadReport
    min_coverage: float

    @property
    def accepted(self) -> bool:
        """True when enough of the target loads (:func:`ckptsurgeon.core.coverage.enough`)."""
        return enough(len(self.report.loaded), self.report.total, self.min_coverage)

    @property
    def proposal(self) -> tuple[tuple[str, str], ...]:
        """(key in the file, target name) pairs found by dotted suffix only: a guess, not applied."""
        return self.diff.diagnosis.proposed_mapping

    @property
    def proposal_commands(self) -> tuple[str, ...]:
        """The commands that apply :attr:`proposal` (``ckpt rename --replace ...``, then ``adapt``)."""
        return self.diff.explanation.proposal_commands

    def refusal(self, outcome: str, option: str = "--min-coverage ") -> str | None:
        """The one-line refusal when too little loads (``None`` when accepted).

        ``outcome`` ends the first clause ("nothing was written"); ``option`` names the knob
        that moves the bar (``--min-coverage `` on the command line, ``min_coverage=`` in Python).
        """
        if self.accepted:
            return None
        from ..core.report import percent

        report, loaded = self.report, len(self.report.loaded)
        if loaded:
            what = (
                f"only {loaded} of {counted(report.total, 'target tensor')} would load into {report.target} "
                f"after adaptation ({percent(loaded, report.total)}), below {option}{self.min_coverage:g}%"
            )
            lister = "--dry-run" if option.startswith("--") else "ckptsurgeon.diff(source, model)"
            hint = (
                f"Is it a checkpoint of this architecture? {lister} lists what is missing; "
                f"a lower {option.strip().rstrip('=')} accepts it"
            )
        else:
            what = (
                f"nothing would load into {report.target} after adaptation "
                f"(0 of {counted(report.total, 'target tensor')})"
            )
            hint = self.diff.explanation.message  # why nothing loads, the proposal included
        if loaded and self.proposal:
            hint += (
                f" {len(self.proposal)} more key(s) pair only by their dotted suffix (a guess, not applied): "
                "ckpt diff shows them and the rename that applies them."
            )
        return f"{report.source}: {what}; {outcome}. {hint}".strip()


def plan_adaptation(
    records: Mapping[str, TensorRecord],
    target: Target,
    source: str,
    *,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
    key: str | None = None,
    target_spec: str | None = None,
    reshaping: Reshaping = Reshaping(),
) -> Adaptation:
    """Plan the adaptation of ``records`` to ``target`` and decide on coverage: what ``ckpt adapt``
    writes and ``load_into`` copies, decided in one place.

    ``source`` labels the file in messages; ``key`` and ``target_spec`` go into the suggested
    commands. ``reshaping`` (:class:`Reshaping`) says which misfits a transform keeps instead of
    dropping them: a position table on another grid and the first conv with other input channels
    (by default), a resized vocabulary or chosen classes of the head (only when asked).

    Example:
        >>> from ..diffing.target import target_from_records
        >>> src = {"module.w": TensorRecord("module.w", "float32", (2,)),
        ...        "module.fc.w": TensorRecord("module.fc.w", "float32", (6, 2))}
        >>> tgt = {"w": src["module.w"], "fc.w": TensorRecord("fc.w", "float32", (2, 2))}
        >>> a = plan_adaptation(src, target_from_records(tgt, "model", "mapping"), "a.pth")
        >>> a.plan.mapping, a.accepted, a.report.headline
        ({'module.w': 'w', 'module.fc.w': None}, True, '1 of 2 target tensors load (50.0%)')
    """
    from ..diffing.result import diff

    # ``records`` are the chosen entry already; diff finds them again under ``key`` (which it also
    # puts in the commands it suggests)
    chosen = {key: records} if key else records
    result = diff(
        chosen, target, key=key, source_label=source, target_label=target_spec, min_coverage=min_coverage
    )
    plan = adapt_plan(records, result.diagnosis, reshaping)
    if reshaping.resizing is not None:
        plan = reshaping.resizing.apply(plan, records, result.diagnosis, target.tied)
    output = plan.apply(records)
    report = fit_report(output, target, plan, source, result.diagnosis)
    return Adaptation(result, plan, output, report, min_coverage)


def checked_adaptation(
    records: Mapping[str, TensorRecord],
    target: Target,
    source: str,
    *,
    outcome: str,
    option: str = "--min-coverage ",
    refuse: bool = True,
    strict_shapes: bool = False,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
    key: str | None = None,
    target_spec: str | None = None,
    reshaping: Reshaping = Reshaping(),
) -> tuple[Adaptation, str | None]:
    """The adapt sequence ``ckpt adapt`` and ``load_into`` both run: :func:`plan_adaptation`, the
    shape check (``strict_shapes``: a misfit raises), and the one coverage decision, whose
    refusal (:meth:`Adaptation.refusal`, worded with ``outcome`` and ``option``) is raised as a
    :class:`~ckptsurgeon.errors.LoadError`, or with ``refuse=False`` (a dry run) returned.

    Example:
        >>> from ..diffing.target import target_from_records
        >>> src = {"w": TensorRecord("w", "float32", (2,))}
        >>> tgt = target_from_records({"v": TensorRecord("v", "float32", (2,))}, "model", "mapping")
        >>> a, alarm = checked_adaptation(src, tgt, "a.pth", outcome="nothing was written", refuse=False)
        >>> a.accepted, alarm.startswith("a.pth: nothing would load into model")
        (False, True)
    """
    adaptation = plan_adaptation(
        records,
        target,
        source,
        min_coverage=min_coverage,
        key=key,
        target_spec=target_spec,
        reshaping=reshaping,
    )
    _check_shapes(adaptation.report, strict_shapes)
    alarm = adaptation.refusal(outcome, option)
    if alarm is not None and refuse:
        raise LoadError(alarm)
    return adaptation, alarm


# -- load_into ----------------------------------------------------------------------------------
def load_into(
    model: Any,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any],
    *,
    key: str | None = None,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
    strict_shapes: bool = False,
    read_options: ReadOptions | None = None,
    resize_vocab: bool = False,
    new_rows: str = "mean",
    keep_classes: str | Sequence[int] | None = None,
    resample_pos_embed: bool = True,
    adapt_input_conv: bool = True,
) -> LoadReport:
    """Load what fits of a checkpoint into a live ``nn.Module`` and return what happened.

    The same plan as ``ckpt adapt`` (:func:`plan_adaptation`): keys are aligned (wrapper
    prefixes such as ``module.``, ``_orig_mod.``, ``model.`` stripped or added as the model
    needs), tensors whose shape does not fit (the classifier head) are skipped
    (``strict_shapes=True`` raises instead), renames guessed from dotted suffixes are not
    applied, and every fitting tensor is materialised one at a time and copied into the model's
    parameter or buffer (the same effect as ``load_state_dict(strict=False)`` with only those
    tensors). Raises :class:`~ckptsurgeon.errors.LoadError`, before anything is copied, when
    nothing, or less than ``min_coverage`` percent (default 50, the rule of
    :mod:`ckptsurgeon.core.coverage`) of the model's tensors would load: the silent zero-load
    cannot happen. As timm's ``checkpoint_filter_fn``, a position embedding on another grid (and a
    relative position bias table for another window) is resampled and the first conv adapted to the
    model's input channels; ``resample_pos_embed=False`` / ``adapt_input_conv=False`` leave them out
    instead (the report's ``transformed`` lists what was).

    Only when asked: ``resize_vocab=True`` resizes embeddings and LM heads of another vocabulary
    size (trained rows kept, new rows from their mean, or zeros with ``new_rows="zeros"``:
    :mod:`ckptsurgeon.surgery.resize`), and ``keep_classes=[3, 17, 42]`` (or ``"3,17,42"``,
    ``"@classes.txt"``) keeps those rows of a larger classifier head, in that order.

    Example:
        >>> model = torchvision.models.resnet50(num_classes=2)          # doctest: +SKIP
        >>> report = ckptsurgeon.load_into(model, "resnet50_dp.pth")    # doctest: +SKIP
        >>> report.headline, report.missing                             # doctest: +SKIP
        ('318 of 320 target tensors load (99.3%)', ('fc.weight', 'fc.bias'))
    """
    from ..diffing.result import source_records
    from ..diffing.target import target_from_module

    reshaping = Reshaping.asked(
        resize_vocab=resize_vocab,
        new_rows=new_rows,
        keep_classes=keep_classes,
        resample_pos_embed=resample_pos_embed,
        adapt_input_conv=adapt_input_conv,
    )
    found = source_records(path_or_state_dict, key, read_options, mapping_label="state dict")
    if found is None:
        kind = type(path_or_state_dict).__name__
        raise LoadError(f"load_into: cannot read a {kind}; pass a path or a state dict")
    target = target_from_module(model, type(model).__name__, "module")
    adaptation, _ = checked_adaptation(
        found.records,
        target,
        found.label,
        outcome="nothing was loaded",
        option="min_coverage=",
        strict_shapes=strict_shapes,
        min_coverage=min_coverage,
        reshaping=reshaping,
    )
    _copy_into(model, adaptation.output, adaptation.report.loaded)
    return adaptation.report


def _check_shapes(report: LoadReport, strict_shapes: bool) -> None:
    if strict_shapes and report.skipped:
        first = report.skipped[0]
        raise LoadError(
            f"{report.source}: {len(report.skipped)} tensor(s) do not fit the model's shapes (e.g. "
            f"{first.file_name} {format_shape(first.source_shape)} vs {format_shape(first.target_shape)}); "
            "pass strict_shapes=False to skip them"
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
