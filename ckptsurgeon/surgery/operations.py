"""The write commands as library calls: one call per job, for a training script or a notebook.

Each function opens ``src`` (any checkpoint ``open_checkpoint`` reads; ``key`` picks a
nested entry), makes a :class:`~ckptsurgeon.surgery.plan.Plan`, and writes it through
:func:`~ckptsurgeon.surgery.pipeline.write_checkpoint` (atomic, reopened and compared bit for bit
unless ``verify=False``), or only returns the plan with ``dry_run=True``. Results render
as ``ckpt`` prints them (``.render(fmt)``, ``.to_json()``). Expected failures raise
:class:`~ckptsurgeon.errors.CkptError` subclasses; nothing is written then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..core.coverage import DEFAULT_MIN_COVERAGE
from ..core.report import counted, format_shape
from ..core.source import Source, open_source
from ..core.trees import has_unread_values, optimizer_entries
from ..errors import OutputError, SurgeryError
from ..formats import ReadOptions
from .adapting import LoadReport
from .mapping import Mapping
from .pipeline import WriteOptions, listing, output_kind, write_checkpoint
from .plan import Entry, Plan, Step, drop_names, head_plan, make_plan
from .plan import add_prefix as _add_prefix
from .plan import drop as _drop
from .plan import keep as _keep
from .plan import replace as _replace
from .plan import strip_prefix as _strip_prefix
from .results import AdaptResult, SurgeryResult
from .transforms import only_outputs

PathLike = str | os.PathLike[str]
Names = str | Sequence[str]


def convert(
    src: PathLike,
    output: PathLike | None = None,
    *,
    key: str | None = None,
    to: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
    weights_only: bool = False,
    force: bool = False,
    verify: bool = True,
    dry_run: bool = False,
    read_options: ReadOptions | None = None,
    progress: bool | None = None,
    jobs: int | None = None,
) -> SurgeryResult:
    """Convert ``src`` to ``.pth`` or ``.safetensors`` (by ``output``'s suffix, or ``to``), cast, or shard.

    ``dtype`` casts floating tensors (``"bf16"``, ``"fp16"``, ``"fp32"``); ``max_shard_size``
    (bytes or ``"5GB"``) writes a folder of shards in Hugging Face's layout; a ``.pth`` output
    keeps every other entry of a training checkpoint unless ``weights_only``. ``force``
    overwrites an existing output; ``progress`` shows a bar on stderr (default: on a TTY, for
    big files); ``jobs`` shards are written at once (default: one per CPU; the bytes are a serial
    write's).

    Example:
        >>> r = ckptsurgeon.convert("resnet.pth", "/tmp/r.safetensors", force=True)  # doctest: +SKIP
        >>> r.written.summary()                                                     # doctest: +SKIP
        'wrote /tmp/r.safetensors (safetensors, 122 tensors, 189.6 KiB), verified bit for bit'
    """
    options = write_options(output, to, dtype, max_shard_size, weights_only, force, verify, progress, jobs)
    return _surgery(src, key, read_options, options, dry_run, lambda s: make_plan(s.tensors, []), dtype=dtype)


def rename(
    src: PathLike,
    output: PathLike | None = None,
    *,
    strip_prefix: Names = (),
    add_prefix: Names = (),
    replace: Sequence[tuple[str, str]] = (),
    drop: Names = (),
    keep: Names = (),
    mapping: PathLike | Mapping | None = None,
    reverse: bool = False,
    allow_ambiguous: bool = False,
    key: str | None = None,
    to: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
    weights_only: bool = False,
    force: bool = False,
    verify: bool = True,
    dry_run: bool = False,
    read_options: ReadOptions | None = None,
    progress: bool | None = None,
    jobs: int | None = None,
) -> SurgeryResult:
    """Rename, drop or extract tensors (in :func:`rename_steps` order), then write like :func:`convert`.

    ``drop``/``keep`` are globs on the file's own names (``keep="backbone.*"`` extracts a
    sub-module); ``replace`` is ``(regex, repl)`` pairs applied in order. A step that matches
    nothing, or two names that would collide, raises :class:`~ckptsurgeon.errors.SurgeryError`.

    ``mapping`` (a mapping file's path, or a :class:`~ckptsurgeon.surgery.mapping.Mapping`) is
    applied first (``reverse=True``: converted back), then the other steps on its output names;
    ``result.mapping`` lists its rules, the ones that matched nothing and the tensors none touched.
    A rule marked ambiguous is refused unless ``allow_ambiguous``.

    Example:
        >>> import ckptsurgeon
        >>> r = ckptsurgeon.rename("fixtures/resnet_dp_6.pth", strip_prefix="module.", dry_run=True)
        >>> r.plan.mapping["module.fc.weight"]
        'fc.weight'
    """
    steps = rename_steps(_names(strip_prefix), _names(add_prefix), tuple(replace), _names(drop), _names(keep))
    rules = None if mapping is None else mapping_rules(mapping, reverse)
    if reverse and rules is None:
        raise SurgeryError("--reverse applies a mapping file backwards: give it with --map")
    if not steps and rules is None:
        raise SurgeryError(
            "nothing to do: give --map, --strip-prefix, --add-prefix, --replace, --drop or --keep"
        )
    options = write_options(output, to, dtype, max_shard_size, weights_only, force, verify, progress, jobs)
    notes: list[str] = []
    report: dict[str, Any] = {}

    def make(source: Source) -> Plan:
        if rules is None:
            return make_plan(source.tensors, steps)
        matched = rules.match(source.tensors, allow_ambiguous=allow_ambiguous)
        notes.extend(matched.notes())
        report.update(matched.to_json())
        if not steps:
            return matched.plan
        return matched.plan.then(make_plan(matched.plan.output_names, steps))

    result = _surgery(src, key, read_options, options, dry_run, make, notes, dtype=dtype)
    return result if rules is None else dataclasses.replace(result, mapping=report)


def mapping_rules(mapping: PathLike | Mapping, reverse: bool = False) -> Mapping:
    """The :class:`~ckptsurgeon.surgery.mapping.Mapping` to apply: read from a path, reversed if asked.

    Example:
        >>> from .mapping import Rename
        >>> mapping_rules(Mapping(renames=(Rename("a.{n}", "b.{n}"),)), reverse=True).renames[0].source
        'b.{n}'
    """
    from .mapping import load_mapping

    rules = mapping if isinstance(mapping, Mapping) else load_mapping(mapping)
    return rules.reversed() if reverse else rules


def strip_head(
    src: PathLike,
    output: PathLike | None = None,
    *,
    target: str | None = None,
    target_key: str | None = None,
    head: str | None = None,
    key: str | None = None,
    to: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
    weights_only: bool = False,
    force: bool = False,
    verify: bool = True,
    dry_run: bool = False,
    read_options: ReadOptions | None = None,
    progress: bool | None = None,
    jobs: int | None = None,
) -> SurgeryResult:
    """Drop the classifier head (found by structure, or named by ``head``), or with ``target``
    exactly the tensors whose shapes do not fit it; every dropped tensor is in ``result.plan``.

    ``target`` is what :func:`ckptsurgeon.diff` accepts (``target_key`` picks the entry of a
    nested target checkpoint). Names are never changed.

    Example:
        >>> import ckptsurgeon
        >>> r = ckptsurgeon.strip_head("fixtures/vgg_1000.pth", dry_run=True)
        >>> r.plan.dropped_names
        ['classifier.6.weight', 'classifier.6.bias']
    """
    if target is not None and head is not None:
        raise SurgeryError("give --target or --head, not both")
    options = write_options(output, to, dtype, max_shard_size, weights_only, force, verify, progress, jobs)
    notes: list[str] = []

    def make(source: Source) -> Plan:
        if target is None:
            return head_plan(source.tensors, head)
        plan = target_misfit_plan(source, target, _target_options(read_options), target_key)
        if not plan.dropped:
            notes.append("every tensor fits the target; nothing to drop")
        return plan

    return _surgery(src, key, read_options, options, dry_run, make, notes, dtype=dtype)


def adapt(
    src: PathLike,
    target: str,
    output: PathLike | None = None,
    *,
    key: str | None = None,
    target_key: str | None = None,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
    to: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
    weights_only: bool = False,
    force: bool = False,
    verify: bool = True,
    dry_run: bool = False,
    read_options: ReadOptions | None = None,
    progress: bool | None = None,
    jobs: int | None = None,
    resize_vocab: bool = False,
    new_rows: str = "mean",
    keep_classes: str | Sequence[int] | None = None,
    resample_pos_embed: bool = True,
    adapt_input_conv: bool = True,
    mapping: PathLike | Mapping | None = None,
    reverse: bool = False,
    allow_ambiguous: bool = False,
) -> AdaptResult:
    """Make ``src`` load into ``target``: align wrapper prefixes, drop the head and what has no place.

    ``target`` is what :func:`ckptsurgeon.diff` accepts: a checkpoint (``target_key`` picks its
    entry), an inspect JSON, or an architecture such as ``"models.py:build(num_classes=2)"``.
    ``result.report`` says what the output loads with ``load_state_dict(strict=False)``.
    Only what the data justifies is applied (the plan's steps list each): a wrapper prefix
    (:func:`ckptsurgeon.diffing.diagnosis.is_wrapper_prefix`) and the drops. Keys paired only by their
    dotted suffix are a guess: ``result.proposal`` holds them and ``result.proposal_commands``
    the commands that apply them, after review. As timm's ``checkpoint_filter_fn``, a position
    embedding on another grid is resampled and the first conv adapted to the target's input
    channels (each a transform the plan lists); ``resample_pos_embed=False`` /
    ``adapt_input_conv=False`` drop them instead. Raises :class:`~ckptsurgeon.errors.LoadError`,
    before writing, when nothing, or less than ``min_coverage`` percent (default 50, the rule of
    :mod:`ckptsurgeon.core.coverage`) of the target's tensors, would load; a dry run returns the
    result with ``alarm`` set instead.

    Only when asked (:mod:`ckptsurgeon.surgery.resize`): ``resize_vocab=True`` resizes the
    embeddings and LM heads of another vocabulary size (trained rows kept bit for bit, new rows
    from their mean, or zeros with ``new_rows="zeros"``; a tied head follows its embedding), and
    ``keep_classes`` (``[3, 17, 42]``, ``"3,17,42"`` or ``"@classes.txt"``) keeps those rows of a
    larger classifier head, in that order. Each transformed tensor is in ``result.plan`` and
    ``result.report.transformed``, and loads.

    ``mapping`` (a mapping file or a :class:`~ckptsurgeon.surgery.mapping.Mapping`; ``reverse``,
    ``allow_ambiguous`` as in :func:`rename`) is applied first; the checks above then run on its
    output, and the notes name the target tensors left unfilled and the source tensors unused.

    Example:
        >>> import ckptsurgeon
        >>> r = ckptsurgeon.adapt("fixtures/resnet_dp_6.pth",
        ...                       "fixtures/models.py:resnet_like(num_classes=2)", dry_run=True)
        >>> r.report.headline, r.report.missing
        ('120 of 122 target tensors load (98.3%)', ('fc.weight', 'fc.bias'))
    """
    from ..diffing.target import resolve_target
    from .adapting import Reshaping, checked_adaptation

    reshaping = Reshaping.asked(
        resize_vocab=resize_vocab,
        new_rows=new_rows,
        keep_classes=keep_classes,
        resample_pos_embed=resample_pos_embed,
        adapt_input_conv=adapt_input_conv,
    )
    rules = None if mapping is None else mapping_rules(mapping, reverse)
    if reverse and rules is None:
        raise SurgeryError("--reverse applies a mapping file backwards: give it with --map")
    options = write_options(output, to, dtype, max_shard_size, weights_only, force, verify, progress, jobs)
    _need_output(options, dry_run)
    resolved = resolve_target(target, _target_options(read_options), target_key)
    label = os.fspath(src)
    notes: list[str] = []
    with gc_paused():
        source = open_source(src, key, read_options)
        matched = None if rules is None else rules.match(source.tensors, allow_ambiguous=allow_ambiguous)
        adaptation, alarm = checked_adaptation(
            source.tensors if matched is None else matched.plan.apply(source.tensors),
            resolved,
            label,
            outcome="writing it would be refused" if dry_run else "nothing was written",
            refuse=not dry_run,
            min_coverage=min_coverage,
            key=key,
            target_spec=target,
            reshaping=reshaping,
        )
        plan = adaptation.plan if matched is None else mapped_then(matched.plan, adaptation.plan)
        plan = plan if dtype is None else plan.with_cast(source.tensors, dtype)
        if matched is not None:
            notes += [*matched.notes(), *unfilled_notes(adaptation.report)]
        notes += optimizer_notes(source, plan, options)
        # options is None only on a dry run (_need_output refused anything else)
        written = None if dry_run or options is None else write_checkpoint(source, plan, options)
    return AdaptResult(
        source=label,
        weights_key=source.weights.key,
        plan=plan,
        written=written,
        notes=tuple(notes),
        report=adaptation.report,
        min_coverage=min_coverage,
        alarm=alarm,
        proposal=adaptation.proposal,
        proposal_commands=adaptation.proposal_commands,
        mapping=None if matched is None else matched.to_json(),
    )


def mapped_then(mapped: Plan, adapted: Plan) -> Plan:
    """A mapping's plan followed by adapt's plan (made for the mapping's output) as one plan.

    A transform output that adapt drops (no place in the target) is not computed; a transform
    whose outputs are all dropped is dropped with adapt's reason.

    Example:
        >>> a = make_plan(["module.w"], [_strip_prefix("module.")])
        >>> mapped_then(a, make_plan(a.output_names, [])).mapping
        {'module.w': 'w'}
    """
    if adapted.transformed:
        raise SurgeryError(
            f"adapt would transform {adapted.transformed[0].old!r} after the mapping; "
            "write the mapped file with `ckpt rename --map` first, then adapt it"
        )
    later = {e.old: e for e in adapted.entries}
    trimmed = Plan(tuple(_kept_outputs(e, later) for e in mapped.entries), mapped.steps)
    outputs = set(trimmed.output_names)
    return trimmed.then(Plan(tuple(e for e in adapted.entries if e.old in outputs), adapted.steps))


def _kept_outputs(entry: Entry, later: dict[str, Entry]) -> Entry:
    """``entry`` with its transform's outputs that ``later`` drops left out (all: dropped)."""
    transform = entry.transform
    if transform is None:
        return entry
    kept = [i for i, name in enumerate(transform.output_names) if later[name].new is not None]
    if len(kept) == len(transform.outputs):
        return entry
    if not kept:
        return Entry(entry.old, None, later[transform.output_names[0]].reason, entry.dtype, entry.shape)
    chosen = only_outputs(transform, kept)
    return Entry(entry.old, chosen.outputs[0].name, "", entry.dtype, entry.shape, chosen)


def unfilled_notes(report: LoadReport) -> list[str]:
    """Notes naming the target tensors a mapped file leaves unfilled and the source tensors unused.

    Example:
        >>> unfilled_notes(LoadReport("a", "m", ("w",), ("b",), (), ("x",), "none"))
        ["1 target tensor(s) left unfilled: 'b'", "1 source tensor(s) unused: 'x'"]
    """
    notes = []
    for what, names in (
        ("target tensor(s) left unfilled", report.missing),
        ("source tensor(s) unused", report.unused),
    ):
        if names:
            shown = ", ".join(repr(n) for n in names[:8]) + (
                f" and {len(names) - 8} more" if len(names) > 8 else ""
            )
            notes.append(f"{len(names)} {what}: {shown}")
    return notes


# -- the pieces -------------------------------------------------------------------------------
def write_options(
    output: PathLike | None,
    to: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
    weights_only: bool = False,
    force: bool = False,
    verify: bool = True,
    progress: bool | None = None,
    jobs: int | None = None,
) -> WriteOptions | None:
    """:class:`~ckptsurgeon.surgery.pipeline.WriteOptions` for ``output`` (``None`` without one: a dry run).

    The output's format is checked here, before anything is opened.

    Example:
        >>> write_options("shards", max_shard_size="2KB").max_shard_size
        2000
    """
    if output is None:
        return None
    shard_bytes = None
    if max_shard_size is not None:
        from ..formats.shardwriter import parse_size

        shard_bytes = parse_size(max_shard_size)
    if jobs is not None and jobs < 1:
        raise OutputError(f"--jobs {jobs}: give at least one job")
    options = WriteOptions(Path(output), to, dtype, shard_bytes, weights_only, force, verify, progress, jobs)
    output_kind(options)
    return options


def rename_steps(
    strip: Sequence[str] = (),
    add: Sequence[str] = (),
    replacements: Sequence[tuple[str, str]] = (),
    drops: Sequence[str] = (),
    keeps: Sequence[str] = (),
) -> list[Step]:
    """The steps in the order ``ckpt rename`` applies them: drop, keep (on the file's names),
    then strip prefixes, replacements (in order), add prefixes.

    Example:
        >>> [s.description for s in rename_steps(strip=("module.",), drops=("fc.*",))]
        ["drop 'fc.*'", "strip prefix 'module.'"]
    """
    steps: list[Step] = []
    if drops:
        steps.append(_drop(*drops))
    if keeps:
        steps.append(_keep(*keeps))
    steps += [_strip_prefix(p) for p in strip]
    steps += [_replace(pattern, repl) for pattern, repl in replacements]
    steps += [_add_prefix(p) for p in add]
    return steps


def target_misfit_plan(
    source: Source, target: str, read_options: ReadOptions | None = None, target_key: str | None = None
) -> Plan:
    """A plan dropping exactly the tensors whose shapes do not fit ``target`` (names unchanged).

    Names are matched after the key transform ``ckpt diff`` finds (``module.`` ...), so a
    DataParallel file is compared with a plain model correctly; the names themselves stay.

    Example:
        >>> plan = target_misfit_plan(open_source("fixtures/resnet_dp_6.pth"),
        ...                           "fixtures/models.py:resnet_like(num_classes=2)")
        >>> plan.dropped_names
        ['module.fc.weight', 'module.fc.bias']
    """
    from ..diffing.result import diff

    result = diff(source.tensors, target, read_options=read_options, target_key=target_key)
    reasons = {
        m.file_name: f"shape does not fit the target's {m.name} {format_shape(m.target_shape)}"
        for m in result.diagnosis.after.shape_mismatched
    }
    plan = make_plan(source.tensors, [drop_names(reasons)] if reasons else [])
    return Plan(plan.entries, (f"drop what does not fit {result.target}",))


def optimizer_notes(source: Source, plan: Plan, options: WriteOptions | None) -> list[str]:
    """A note when tensors were dropped and the output keeps the checkpoint's optimizer state.

    Example:
        >>> optimizer_notes(open_source("fixtures/resnet_dp_6.pth"), plan, None)   # doctest: +SKIP
        []
    """
    if not plan.dropped:
        return []
    if options is not None and (options.weights_only or not output_kind(options).holds_tree):
        return []
    entries = optimizer_entries(source)
    if not entries or has_unread_values(source):
        return []
    names = listing([repr(e) for e in entries])
    return [
        f"the output keeps {names}: optimizer state that describes the old parameters "
        f"({counted(len(plan.dropped), 'tensor')} dropped), so resuming training from it would fail; "
        "--weights-only leaves it out"
    ]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Hold off Python's cyclic garbage collector while a command builds its records.

    A checkpoint of 20,000 tensors makes a few hundred thousand long-lived objects (records,
    dicts, tuples); the collector would traverse them again and again as they are made, which
    cost ~20 % of the command. The objects are freed by reference counting as usual; cycles
    wait until the block ends.

    Example:
        >>> with gc_paused():
        ...     pass
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _surgery(
    src: PathLike,
    key: str | None,
    read_options: ReadOptions | None,
    options: WriteOptions | None,
    dry_run: bool,
    make: Callable[[Source], Plan],
    notes: list[str] | None = None,
    dtype: str | None = None,
) -> SurgeryResult:
    """Open, plan (with ``dtype``'s cast, so a dry run shows it), and write unless ``dry_run``:
    the flow of convert, rename and strip_head."""
    _need_output(options, dry_run)
    notes = notes if notes is not None else []
    with gc_paused():
        source = open_source(src, key, read_options)
        plan = make(source)
        if dtype is not None:
            plan = plan.with_cast(source.tensors, dtype)
        notes += optimizer_notes(source, plan, options)
        # options is None only on a dry run (_need_output refused anything else)
        written = None if dry_run or options is None else write_checkpoint(source, plan, options)
    return SurgeryResult(
        source=os.fspath(src), weights_key=source.weights.key, plan=plan, written=written, notes=tuple(notes)
    )


def _need_output(options: WriteOptions | None, dry_run: bool) -> None:
    if options is None and not dry_run:
        raise OutputError("no output: name it with -o OUT (or pass --dry-run to see the plan)")


def _target_options(read_options: ReadOptions | None) -> ReadOptions:
    """How to read a target checkpoint: the source's allowed globals, never full trust."""
    return ReadOptions(allow_globals=read_options.allow_globals if read_options else frozenset())


def _names(value: Names) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)
