"""What the write operations return: the plan, what was written, and for ``adapt`` what loads.

:class:`SurgeryResult` comes back from :func:`ckptsurgeon.convert`, :func:`~ckptsurgeon.rename`
and :func:`~ckptsurgeon.strip_head`; :class:`AdaptResult` adds the
:class:`~ckptsurgeon.surgery.adapting.LoadReport` from :func:`~ckptsurgeon.adapt`. Both render as
table, markdown or JSON, as ``ckpt`` prints them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.coverage import DEFAULT_MIN_COVERAGE
from ..core.report import dump_json
from .adapting import LoadReport
from .pipeline import WriteResult
from .plan import Plan
from .planreport import plan_json, render_plan


@dataclass(frozen=True, kw_only=True)
class SurgeryResult:
    """A plan and what it wrote: ``written`` is ``None`` for a dry run.

    ``notes`` are about the plan (made before writing); the writer's own notes (entries left
    out, tied names, oversized shards) are in ``written.notes``; :attr:`all_notes` has both.

    Example:
        >>> from .plan import make_plan
        >>> r = SurgeryResult(source="m.pth", weights_key="", plan=make_plan(["w"], []))
        >>> r.dry_run, r.to_json()["status"]
        (True, 'dry-run')
    """

    source: str
    weights_key: str
    plan: Plan
    written: WriteResult | None = None
    notes: tuple[str, ...] = ()
    mapping: dict[str, Any] | None = None  # with --map: the rules applied (MappingMatch.to_json)

    @property
    def dry_run(self) -> bool:
        """True when nothing was written."""
        return self.written is None

    @property
    def output(self) -> Path | None:
        """The file or folder written (``None`` for a dry run)."""
        return None if self.written is None else self.written.output

    @property
    def all_notes(self) -> list[str]:
        """The plan's notes, then the writer's."""
        return [*self.notes, *(self.written.notes if self.written is not None else ())]

    @property
    def status(self) -> str:
        """``ok`` (written) or ``dry-run``."""
        return "dry-run" if self.written is None else "ok"

    def _report(self) -> LoadReport | None:
        return None

    def _more(self, fmt: str) -> list[str]:
        """Further paragraphs before the last line (what was written, or ``Dry run: ...``)."""
        return []

    def to_json(self) -> dict[str, Any]:
        """``status``, ``source``, ``weights_key``, ``plan``, ``report`` (adapt), ``output``, ``notes``;
        with a mapping file, ``mapping`` (its rules, each with the tensors it touched)."""
        report = self._report()
        mapping = {"mapping": self.mapping} if self.mapping is not None else {}
        return mapping | {
            "status": self.status,
            "source": self.source,
            "weights_key": self.weights_key,
            "plan": plan_json(self.plan),
            "report": report.to_json() if report is not None else None,
            "output": self.written.to_json() if self.written is not None else None,
            "notes": list(self.notes),
        }

    def render(self, fmt: str = "table", verbose: bool = False) -> str:
        """The plan, the load report (adapt), then what was written or ``Dry run: ...``."""
        if fmt == "json":
            return dump_json(self.to_json())
        parts = [render_plan(self.plan, fmt, verbose)]
        report = self._report()
        if report is not None:
            parts.append(report.render(fmt, verbose))
        parts += self._more(fmt)
        parts.append("Dry run: nothing was written." if self.written is None else self.written.summary())
        return "\n\n".join(parts)


@dataclass(frozen=True, kw_only=True)
class AdaptResult(SurgeryResult):
    """:class:`SurgeryResult` plus what the output loads into the target.

    ``alarm`` is set when less than ``min_coverage`` percent of the target (or nothing) would
    load; only a dry run returns such a result, a write raises :class:`~ckptsurgeon.errors.LoadError`.
    ``proposal`` holds the keys paired with target keys by dotted suffix only: a guess, not
    applied (the plan drops them); ``proposal_commands`` apply it after review.

    Example:
        >>> r = ckptsurgeon.adapt("resnet_dp.pth", "models.py:resnet_like(2)", dry_run=True)  # doctest: +SKIP
        >>> r.report.headline                                                               # doctest: +SKIP
        '120 of 122 target tensors load (98.3%)'
    """

    report: LoadReport
    min_coverage: float = DEFAULT_MIN_COVERAGE
    alarm: str | None = None
    proposal: tuple[tuple[str, str], ...] = ()
    proposal_commands: tuple[str, ...] = ()

    @property
    def refused(self) -> bool:
        """True when writing this output would be refused (too little loads)."""
        return self.alarm is not None

    @property
    def status(self) -> str:
        """``ok``, ``dry-run``, or ``refused`` (a dry run below the minimum coverage)."""
        return "refused" if self.refused else super().status

    def _report(self) -> LoadReport | None:
        return self.report

    def to_json(self) -> dict[str, Any]:
        """:meth:`SurgeryResult.to_json` plus ``min_coverage``, ``alarm``, ``proposed_mapping``
        (``source`` -> ``target``, not applied) and ``proposal_commands``."""
        return super().to_json() | {
            "min_coverage": self.min_coverage,
            "alarm": self.alarm,
            "proposed_mapping": [{"source": s, "target": t} for s, t in self.proposal],
            "proposal_commands": list(self.proposal_commands),
        }

    def _more(self, fmt: str) -> list[str]:
        """The proposal that was not applied, if any."""
        return [self._proposal_text(fmt == "markdown")] if self.proposal else []

    def _proposal_text(self, md: bool) -> str:
        from ..core.grouping import natural_key
        from ..core.report import counted, printable, render_table

        n = len(self.proposal)
        lines = [
            f"Not applied: {counted(n, 'key')} of the file pair with target keys only by their "
            "dotted suffix and shape. That is a guess, left out above; review it, and if it is right:"
        ]
        pairs = sorted(self.proposal, key=lambda p: natural_key(p[1]))
        rows = [(printable(s), printable(t)) for s, t in pairs]
        lines.append(render_table(("file key (proposed)", "target key"), rows, "markdown" if md else "table"))
        commands = "\n".join(printable(c) if md else "  " + printable(c) for c in self.proposal_commands)
        lines.append(f"```sh\n{commands}\n```" if md else commands)
        return "\n\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class AverageResult(SurgeryResult):
    """What :func:`ckptsurgeon.average` planned and wrote: the inputs and their weights (summing to 1).

    Example:
        >>> r = ckptsurgeon.average(["a.pth", "b.pth"], dry_run=True)     # doctest: +SKIP
        >>> r.weights                                                   # doctest: +SKIP
        (0.5, 0.5)
    """

    inputs: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()

    @property
    def averaged(self) -> int:
        """Floating tensors averaged."""
        return len(self.plan.transformed)

    @property
    def taken(self) -> int:
        """Integer and bool tensors taken from the first input."""
        return len(self.plan.unchanged)

    def to_json(self) -> dict[str, Any]:
        """:meth:`SurgeryResult.to_json` plus ``inputs`` (``path``, ``weight``), ``averaged``, ``taken``."""
        inputs = [{"path": p, "weight": w} for p, w in zip(self.inputs, self.weights, strict=True)]
        return super().to_json() | {"inputs": inputs, "averaged": self.averaged, "taken": self.taken}

    def render(self, fmt: str = "table", verbose: bool = False) -> str:
        """The inputs with their weights, what was averaged and taken, then what was written."""
        if fmt == "json" or verbose:
            return super().render(fmt, verbose)
        from ..core.report import counted, printable, render_table

        rows = [[printable(p), f"{w:.4g}"] for p, w in zip(self.inputs, self.weights, strict=True)]
        equal = len(set(self.weights)) == 1
        how = "equal weights" if equal else "weights normalised to sum 1"
        n = len(self.inputs)
        lines = [
            f"Average of {n} checkpoints ({how}):",
            render_table(["input", "weight"], rows, fmt),
            f"{counted(self.averaged + self.taken, 'tensor')}: {self.averaged} floating averaged "
            f"(in float32, float64 for float64; written in their dtype), {self.taken} integer/bool "
            "taken from the first input",
        ]
        lines.append("Dry run: nothing was written." if self.written is None else self.written.summary())
        return "\n\n".join(lines)
