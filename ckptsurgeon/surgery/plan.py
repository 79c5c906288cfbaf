"""Surgery as pure transforms: steps on names produce a :class:`Plan`, shown before it is applied.

A plan lists every tensor of a state dict once: renamed (old -> new), unchanged, dropped
with a reason, or transformed (the entry carries a :class:`~ckptsurgeon.surgery.transforms.Transform`
whose declared outputs replace it: a ``--dtype`` cast, an average, a split). Nothing is read or
written while planning; ``plan.apply`` returns renamed records that still point at the source's
bytes, and for a transformed entry records whose data is computed when it is read.

Steps (applied to each name in order; the first step that drops a name ends it):
:func:`strip_prefix`, :func:`add_prefix`, :func:`replace`, :func:`drop`, :func:`keep`,
:func:`drop_names`. ``ckpt`` renders plans (ckptsurgeon.surgery.planreport.render_plan).
:func:`head_plan` drops the classifier head that :func:`ckptsurgeon.diffing.heads.find_head` finds.

Inverses: a plan that drops nothing is a bijection from its input names onto its
output names (two names that would collide are refused when the plan is made), so
:meth:`Plan.inverse` exists and ``plan.then(plan.inverse())`` is the identity on exactly
those input names. A plan that drops or transforms anything has no inverse. The inverse is of the plan
(concrete names), not of its steps: ``strip_prefix("module.")`` over a dict where some
keys lack the prefix inverts exactly, while a later ``add_prefix("module.")`` would not.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from ..core.record import TensorRecord
from ..diffing.heads import find_head
from ..errors import SurgeryError
from .transforms import Transform, cast_transform, castable

# The reason of a tensor a transform reads and does not write on: its value lives on in the outputs.
CONSUMED = "input of "


# -- steps ------------------------------------------------------------------------------------
def _changed(old: str, new: str | None) -> bool:
    return new != old


@dataclass(frozen=True)
class Step:
    """One transform of a name: ``apply`` returns the new name, or ``None`` to drop it.

    ``matched(old, new)`` says whether the step did something to a name; a step that does
    nothing to any name is refused as a likely typo (``add_prefix`` never is).
    """

    description: str
    transform: Callable[[str], str | None] = field(repr=False)
    why: Callable[[str], str] = field(repr=False, default=lambda _name: "")
    matched: Callable[[str, str | None], bool] = field(repr=False, default=_changed)
    required: tuple[str, ...] = ()  # names that must exist (drop_names)

    def apply(self, name: str) -> str | None:
        return self.transform(name)

    def reason(self, name: str) -> str:
        """Why ``name`` was dropped by this step."""
        return self.why(name) or self.description


def _dotted(prefix: str) -> str:
    if not prefix:
        raise SurgeryError("an empty prefix: name the prefix, e.g. --strip-prefix module.")
    return prefix if prefix.endswith(".") else prefix + "."


def strip_prefix(prefix: str) -> Step:
    """Remove ``prefix`` (a trailing ``.`` is added if missing) from every name that starts with it.

    Example:
        >>> make_plan(["module.fc.weight"], [strip_prefix("module")]).mapping
        {'module.fc.weight': 'fc.weight'}
    """
    p = _dotted(prefix)
    return Step(f"strip prefix {p!r}", lambda n: n[len(p) :] if n.startswith(p) and len(n) > len(p) else n)


def add_prefix(prefix: str) -> Step:
    """Put ``prefix`` (a trailing ``.`` is added if missing) in front of every name.

    Example:
        >>> make_plan(["fc.weight"], [add_prefix("module.")]).mapping
        {'fc.weight': 'module.fc.weight'}
    """
    p = _dotted(prefix)
    return Step(f"add prefix {p!r}", lambda n: p + n, matched=lambda _o, _n: True)


def replace(pattern: str, repl: str) -> Step:
    """Substitute the regular expression ``pattern`` with ``repl`` (``re.sub`` syntax) in every name.

    Example:
        >>> make_plan(["encoder.l1.w"], [replace(r"^encoder\\.", "backbone.")]).mapping
        {'encoder.l1.w': 'backbone.l1.w'}
    """
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise SurgeryError(f"--replace {pattern!r}: not a valid regular expression ({exc})") from None

    def sub(name: str) -> str:
        try:
            return regex.sub(repl, name)
        except (re.error, IndexError) as exc:
            raise SurgeryError(f"--replace {pattern!r} {repl!r}: bad replacement ({exc})") from None

    return Step(f"replace {pattern!r} with {repl!r}", sub)


def drop(*patterns: str) -> Step:
    """Drop every name matching one of the glob ``patterns`` (``*`` also matches dots).

    Example:
        >>> make_plan(["fc.weight", "conv.weight"], [drop("fc.*")]).dropped_names
        ['fc.weight']
    """

    def hit(name: str) -> str | None:
        return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)

    return Step(
        "drop " + ", ".join(repr(p) for p in patterns),
        lambda n: None if hit(n) else n,
        why=lambda n: f"--drop {hit(n)}",
    )


def keep(*patterns: str) -> Step:
    """Keep only names matching one of the glob ``patterns`` (extract a sub-module: ``backbone.*``).

    Example:
        >>> make_plan(["backbone.w", "head.w"], [keep("backbone.*")]).dropped_names
        ['head.w']
    """
    return Step(
        "keep only " + ", ".join(repr(p) for p in patterns),
        lambda n: n if any(fnmatch.fnmatchcase(n, p) for p in patterns) else None,
        why=lambda _n: "not matched by --keep " + " ".join(patterns),
        matched=lambda _old, new: new is not None,  # a keep that keeps nothing is the mistake to catch
    )


def drop_names(reasons: Mapping[str, str]) -> Step:
    """Drop exactly the named tensors, each with its reason (they must all exist).

    Example:
        >>> make_plan(["fc.weight", "x"], [drop_names({"fc.weight": "head"})]).entries[0].reason
        'head'
    """
    table = dict(reasons)
    return Step(
        f"drop {len(table)} named tensor(s)",
        lambda n: None if n in table else n,
        why=lambda n: table[n],
        required=tuple(table),
    )


# -- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One tensor in a plan: ``new`` is ``None`` when it is dropped (``reason`` says why).

    An entry with a ``transform`` is replaced by the transform's outputs (``new`` is the first
    one's name); ``old`` is one of its inputs. ``dtype`` and ``shape`` are the source tensor's.
    """

    old: str
    new: str | None
    reason: str = ""
    dtype: str = ""
    shape: tuple[int, ...] | None = None
    transform: Transform | None = None

    @property
    def dropped(self) -> bool:
        return self.new is None

    @property
    def renamed(self) -> bool:
        """True when the name changes (a transformed entry counts as transformed, not renamed)."""
        return self.new is not None and self.new != self.old and self.transform is None

    @property
    def outputs(self) -> tuple[str, ...]:
        """The names this entry writes: none (dropped), its new name, or its transform's outputs."""
        if self.transform is not None:
            return self.transform.output_names
        return () if self.new is None else (self.new,)


@dataclass(frozen=True)
class Plan:
    """Every tensor of a state dict, renamed, unchanged or dropped; made before anything is written.

    Example:
        >>> plan = make_plan(["module.fc.weight", "module.fc.bias"], [strip_prefix("module.")])
        >>> plan.apply({"module.fc.weight": TensorRecord("module.fc.weight", "float32", (2, 3)),
        ...             "module.fc.bias": TensorRecord("module.fc.bias", "float32", (2,))}).keys()
        dict_keys(['fc.weight', 'fc.bias'])
    """

    entries: tuple[Entry, ...]
    steps: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        transformed = False
        for entry in self.entries:
            if entry.new is None:
                continue
            transformed = transformed or entry.transform is not None
            for new in entry.outputs:
                other = seen.get(new)
                if other is not None:
                    raise SurgeryError(
                        f"name collision: {other!r} and {entry.old!r} would both become {new!r}; "
                        "change the rename (or --drop one of them)"
                    )
                seen[new] = entry.old
        if transformed:
            _check_transforms(self.entries)

    # -- views ----------------------------------------------------------------------------------
    @property
    def mapping(self) -> dict[str, str | None]:
        """Old name -> new name (``None`` for dropped), in source order."""
        return {e.old: e.new for e in self.entries}

    @property
    def renamed(self) -> list[Entry]:
        return [e for e in self.entries if e.renamed]

    @property
    def unchanged(self) -> list[Entry]:
        return [e for e in self.entries if e.new == e.old and e.transform is None]

    @property
    def transformed(self) -> list[Entry]:
        """The entries that carry a transform (a cast, an average, a split ...)."""
        return [e for e in self.entries if e.transform is not None]

    @property
    def dropped(self) -> list[Entry]:
        return [e for e in self.entries if e.dropped]

    @property
    def dropped_names(self) -> list[str]:
        return [e.old for e in self.entries if e.dropped]

    @property
    def output_names(self) -> list[str]:
        return [name for e in self.entries for name in e.outputs]

    @property
    def is_identity(self) -> bool:
        """True when no name changes and nothing is dropped (values may still be transformed)."""
        return all(e.new == e.old for e in self.entries)

    # -- use --------------------------------------------------------------------------------------
    def apply(self, tensors: Mapping[str, TensorRecord]) -> dict[str, TensorRecord]:
        """Renamed records for the kept tensors (no data read). ``tensors`` must be the planned dict."""
        by_old = self.mapping
        if len(tensors) != len(by_old) or any(name not in by_old for name in tensors):
            extra = next((n for n in tensors if n not in by_old), None)
            missing = next((n for n in by_old if n not in tensors), None)
            which = f"{extra!r} is not in the plan" if extra is not None else f"{missing!r} is missing"
            raise SurgeryError(f"the plan was made for other tensors: {which}; make the plan from this dict")
        transforms = {e.old: e.transform for e in self.entries if e.transform is not None}
        shared: dict[object, object] = {}  # what transforms share within this dict (cast storages)
        out: dict[str, TensorRecord] = {}
        for name, rec in tensors.items():
            new = by_old[name]
            if new is None:
                continue
            transform = transforms.get(name) if transforms else None
            if transform is None:
                out[new] = rec if rec.name == new else rec.renamed(new)
                continue
            inputs = tuple(tensors[n] for n in transform.inputs)
            for made in transform.records(inputs, shared):
                out[made.name] = made
        return out

    def with_transform(self, transform: Transform, *, keep_inputs: bool = False) -> Plan:
        """This plan with ``transform`` in place of the entry of its first input.

        Inputs are named as in the planned dict (the source's names). The other inputs are dropped
        (``reason``: the transform) unless ``keep_inputs``; an input already transformed, or a
        first input already dropped, is refused.

        Example:
            >>> recs = {"qkv": TensorRecord("qkv", "float32", (6, 2))}
            >>> from .transforms import split
            >>> make_plan(recs, []).with_transform(split(recs, "qkv", ["q", "k", "v"])).output_names
            ['q', 'k', 'v']
        """
        by_old = {e.old: e for e in self.entries}
        for name in transform.inputs:
            entry = by_old.get(name)
            if entry is None:
                raise SurgeryError(f"{transform.description}: no tensor {name!r} in the plan")
            if entry.transform is not None:
                raise SurgeryError(
                    f"{transform.description}: {name!r} is already transformed "
                    f"({entry.transform.description})"
                )
        first = by_old[transform.inputs[0]]
        if first.new is None:
            raise SurgeryError(
                f"{transform.description}: {first.old!r} is dropped by the plan ({first.reason})"
            )
        consumed = set() if keep_inputs else set(transform.inputs[1:])
        entries = []
        for e in self.entries:
            if e is first:
                e = Entry(e.old, transform.outputs[0].name, "", e.dtype, e.shape, transform)
            elif e.old in consumed and e.new is not None:
                e = Entry(e.old, None, f"{CONSUMED}{transform.description}", e.dtype, e.shape)
            entries.append(e)
        return Plan(tuple(entries), (*self.steps, transform.description))

    def with_cast(self, tensors: Mapping[str, TensorRecord], dtype: str) -> Plan:
        """This plan with every kept floating tensor cast to ``dtype`` (``--dtype``), as it is written.

        A transformed entry's floating outputs are cast after it; a cast already there is
        replaced by one from the source. Integer, bool and complex tensors are unchanged.
        ``tensors`` is the planned dict (the source dtypes). The same plan with the same dtype
        comes back unchanged.

        Example:
            >>> recs = {"w": TensorRecord("w", "float32", (2,)), "n": TensorRecord("n", "int64", ())}
            >>> plan = make_plan(recs, []).with_cast(recs, "bf16")
            >>> [e.transform and e.transform.description for e in plan.entries]
            ['cast float32 -> bfloat16', None]
        """
        from .casting import cast_dtype

        target = cast_dtype(dtype)
        entries = []
        changed = False
        for e in self.entries:
            transform = e.transform
            if e.new is None:
                pass
            elif transform is not None:
                transform = transform.cast_to(target)
            elif castable(_planned(tensors, e.old).dtype, target):
                rec = tensors[e.old]
                transform = cast_transform(e.old, e.new, rec.dtype, tuple(rec.shape), target)
            if transform is not e.transform:
                changed = True
                e = Entry(
                    e.old,
                    e.new if transform is None else transform.outputs[0].name,
                    e.reason,
                    e.dtype,
                    e.shape,
                    transform,
                )
            entries.append(e)
        if not changed:
            return self
        step = f"cast floating tensors to {target}"
        return Plan(tuple(entries), self.steps if step in self.steps else (*self.steps, step))

    def then(self, other: Plan) -> Plan:
        """This plan followed by ``other`` (made for this plan's output names) as one plan.

        Example:
            >>> a = make_plan(["module.fc.w"], [strip_prefix("module.")])
            >>> b = make_plan(a.output_names, [add_prefix("model.")])
            >>> a.then(b).mapping
            {'module.fc.w': 'model.fc.w'}
        """
        later = {e.old: e for e in other.entries}
        if set(later) != set(self.output_names):
            raise SurgeryError(
                "cannot compose: the second plan was not made for the first plan's output names"
            )
        if other.transformed:
            raise SurgeryError(
                "cannot compose: the second plan transforms values; transform in the first plan"
            )
        entries = []
        for e in self.entries:
            if e.new is None:
                entries.append(e)
            elif e.transform is not None:
                entries.append(_renamed_outputs(e, later))
            else:
                nxt = later[e.new]
                entries.append(Entry(e.old, nxt.new, nxt.reason, e.dtype, e.shape))
        return Plan(tuple(entries), self.steps + other.steps)

    def inverse(self) -> Plan:
        """The plan that undoes this one; only for a plan that drops nothing (see the module doc).

        Example:
            >>> make_plan(["module.fc.w"], [strip_prefix("module.")]).inverse().mapping
            {'fc.w': 'module.fc.w'}
        """
        if self.dropped:
            raise SurgeryError(
                f"the plan drops {len(self.dropped)} tensor(s) (e.g. {self.dropped[0].old!r}); "
                "only a plan that drops nothing can be inverted"
            )
        for entry in self.transformed:
            if entry.transform is not None:
                raise SurgeryError(
                    f"the plan transforms {entry.old!r} ({entry.transform.description}); "
                    "only a plan that renames can be inverted"
                )
        entries = tuple(Entry(e.new, e.old, "", e.dtype, e.shape) for e in self.entries if e.new is not None)
        return Plan(entries, (f"inverse of: {'; '.join(self.steps) or 'identity'}",))


def _planned(tensors: Mapping[str, TensorRecord], name: str) -> TensorRecord:
    rec = tensors.get(name)
    if rec is None:
        raise SurgeryError(
            f"the plan was made for other tensors: {name!r} is missing; make the plan from this dict"
        )
    return rec


def _check_transforms(entries: Sequence[Entry]) -> None:
    """Every transformed entry stands for one of its transform's inputs, and every input is a
    tensor of the plan."""
    olds = {e.old for e in entries}
    for e in entries:
        transform = e.transform
        if transform is None:
            continue
        if e.old not in transform.inputs or e.new != transform.outputs[0].name:
            raise SurgeryError(f"{e.old!r}: its entry does not match its transform ({transform.description})")
        missing = next((n for n in transform.inputs if n not in olds), None)
        if missing is not None:
            raise SurgeryError(f"{transform.description}: no tensor {missing!r} in the plan")


def _renamed_outputs(entry: Entry, later: Mapping[str, Entry]) -> Entry:
    """A transformed entry with its outputs renamed as ``later`` renames them (none dropped)."""
    transform = cast(Transform, entry.transform)
    names: dict[str, str] = {}
    for name in transform.output_names:
        nxt = later[name]
        if nxt.new is None:
            raise SurgeryError(
                f"cannot compose: the second plan drops {name!r}, an output of {transform.description}"
            )
        names[name] = nxt.new
    renamed = transform.renamed(names)
    return Entry(entry.old, renamed.outputs[0].name, "", entry.dtype, entry.shape, renamed)


def make_plan(tensors: Mapping[str, TensorRecord] | Iterable[str], steps: Sequence[Step]) -> Plan:
    """Run ``steps`` over every name and return the plan (nothing applied yet).

    A step that changes no name at all is refused: it is almost always a typo.

    Example:
        >>> plan = make_plan(["module.a.w", "module.fc.w"], [strip_prefix("module."), drop("fc.*")])
        >>> [(e.old, e.new, e.reason) for e in plan.entries]
        [('module.a.w', 'a.w', ''), ('module.fc.w', None, '--drop fc.*')]
    """
    records = tensors if isinstance(tensors, Mapping) else dict.fromkeys(tensors)
    touched = [False] * len(steps)
    entries = []
    for name, rec in records.items():
        current = name
        new_name: str | None = name  # None once a step drops it
        reason = ""
        for i, step in enumerate(steps):
            result = step.apply(current)
            touched[i] = touched[i] or step.matched(current, result)
            if result is None:
                reason = step.reason(current)
                new_name = None
                break
            if not result:
                raise SurgeryError(f"{name!r}: {step.description} leaves an empty name")
            current = new_name = result
        entries.append(_entry(name, new_name, reason, rec))
    _refuse_idle_steps(steps, touched, records)
    return Plan(tuple(entries), tuple(s.description for s in steps))


def _entry(old: str, new: str | None, reason: str, rec: TensorRecord | None) -> Entry:
    if rec is None:
        return Entry(old, new, reason)
    return Entry(old, new, reason, rec.dtype, tuple(rec.shape))


def _refuse_idle_steps(steps: Sequence[Step], touched: list[bool], records: Mapping[str, object]) -> None:
    for step in steps:
        absent = [n for n in step.required if n not in records]
        if absent:
            raise SurgeryError(f"cannot drop {absent[0]!r}: no such tensor")
    for step, hit in zip(steps, touched, strict=True):
        if not hit and records:
            sample = ", ".join(repr(n) for n in list(records)[:3])
            raise SurgeryError(
                f"{step.description}: matches no tensor (names look like {sample}); check the pattern"
            )


def plan_from_mapping(
    tensors: Mapping[str, TensorRecord],
    renames: Mapping[str, str],
    drops: Mapping[str, str],
    steps: Sequence[str] = (),
) -> Plan:
    """A plan from explicit renames and drops (names in neither are unchanged).

    Example:
        >>> recs = {"a": TensorRecord("a", "float32", (1,)), "b": TensorRecord("b", "float32", (1,))}
        >>> plan_from_mapping(recs, {"a": "x.a"}, {"b": "head"}).mapping
        {'a': 'x.a', 'b': None}
    """
    entries = []
    for name, rec in tensors.items():
        if name in drops:
            entries.append(_entry(name, None, drops[name], rec))
        else:
            entries.append(_entry(name, renames.get(name, name), "", rec))
    return Plan(tuple(entries), tuple(steps))


# -- the classifier head (found by ckptsurgeon.diffing.heads) ----------------------------------------
def head_plan(tensors: Mapping[str, TensorRecord], head: str | None = None) -> Plan:
    """A plan that drops the classifier head (:func:`~ckptsurgeon.diffing.heads.find_head`), each
    drop with its reason.

    Example:
        >>> recs = {"conv.weight": TensorRecord("conv.weight", "float32", (4, 3, 3, 3)),
        ...         "fc.weight": TensorRecord("fc.weight", "float32", (10, 4))}
        >>> head_plan(recs).dropped_names
        ['fc.weight']
    """
    names, how = find_head(tensors, head)
    reasons = dict.fromkeys(names, "classifier head")
    plan = make_plan(tensors, [drop_names(reasons)])
    return Plan(plan.entries, (f"drop the classifier head: {how}",))
