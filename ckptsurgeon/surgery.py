"""Surgery as pure transforms: steps on names produce a :class:`Plan`, shown before it is applied.

A plan lists every tensor of a state dict once: renamed (old -> new), unchanged, or
dropped with a reason. Nothing is read or written while planning; ``plan.apply``
returns renamed records that still point at the source's bytes.

Steps (applied to each name in order; the first step that drops a name ends it):
:func:`strip_prefix`, :func:`add_prefix`, :func:`replace`, :func:`drop`, :func:`keep`,
:func:`drop_names`. :func:`render_plan` shows a plan as a table, markdown or JSON.

Inverses: a plan that drops nothing is a bijection from its input names onto its
output names (two names that would collide are refused when the plan is made), so
:meth:`Plan.inverse` exists and ``plan.then(plan.inverse())`` is the identity on exactly
those input names. A plan that drops anything has no inverse. The inverse is of the plan
(concrete names), not of its steps: ``strip_prefix("module.")`` over a dict where some
keys lack the prefix inverts exactly, while a later ``add_prefix("module.")`` would not.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import SurgeryError
from .grouping import collapse
from .record import TensorRecord

# Module names that usually hold the classifier / output head.
HEAD_NAMES = ("fc", "classifier", "head", "heads", "last_linear", "lm_head", "logits", "classif")


# -- steps ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One transform of a name: return the new name, or ``None`` to drop it (see subclasses)."""

    def apply(self, name: str) -> str | None:  # pragma: no cover - overridden
        raise SurgeryError(f"{type(self).__name__}: not a usable surgery step")

    def describe(self) -> str:  # pragma: no cover - overridden
        return type(self).__name__

    def reason(self, name: str) -> str:
        """Why ``name`` was dropped by this step."""
        return self.describe()

    def touches(self, name: str) -> bool:
        """True when the step changes or drops ``name`` (used to refuse steps that match nothing)."""
        return self.apply(name) != name


@dataclass(frozen=True)
class _StripPrefix(Step):
    prefix: str

    def apply(self, name: str) -> str | None:
        if name.startswith(self.prefix) and len(name) > len(self.prefix):
            return name[len(self.prefix) :]
        return name

    def describe(self) -> str:
        return f"strip prefix {self.prefix!r}"


@dataclass(frozen=True)
class _AddPrefix(Step):
    prefix: str

    def apply(self, name: str) -> str | None:
        return self.prefix + name

    def describe(self) -> str:
        return f"add prefix {self.prefix!r}"


@dataclass(frozen=True)
class _Replace(Step):
    pattern: str
    repl: str
    regex: re.Pattern[str] = field(compare=False, repr=False, default=None)  # type: ignore[assignment]

    def apply(self, name: str) -> str | None:
        try:
            return self.regex.sub(self.repl, name)
        except (re.error, IndexError) as exc:
            raise SurgeryError(f"--replace {self.pattern!r} {self.repl!r}: bad replacement ({exc})") from None

    def describe(self) -> str:
        return f"replace {self.pattern!r} with {self.repl!r}"


@dataclass(frozen=True)
class _Drop(Step):
    patterns: tuple[str, ...]

    def apply(self, name: str) -> str | None:
        return None if any(fnmatch.fnmatchcase(name, p) for p in self.patterns) else name

    def describe(self) -> str:
        return "drop " + ", ".join(repr(p) for p in self.patterns)

    def reason(self, name: str) -> str:
        hit = next(p for p in self.patterns if fnmatch.fnmatchcase(name, p))
        return f"--drop {hit}"


@dataclass(frozen=True)
class _Keep(Step):
    patterns: tuple[str, ...]

    def apply(self, name: str) -> str | None:
        return name if any(fnmatch.fnmatchcase(name, p) for p in self.patterns) else None

    def describe(self) -> str:
        return "keep only " + ", ".join(repr(p) for p in self.patterns)

    def reason(self, name: str) -> str:
        return "not matched by --keep " + " ".join(self.patterns)

    def touches(self, name: str) -> bool:
        return self.apply(name) is not None  # a keep that keeps nothing is the mistake to catch


@dataclass(frozen=True)
class _DropNames(Step):
    reasons: tuple[tuple[str, str], ...]

    def apply(self, name: str) -> str | None:
        return None if name in dict(self.reasons) else name

    def describe(self) -> str:
        return f"drop {len(self.reasons)} named tensor(s)"

    def reason(self, name: str) -> str:
        return dict(self.reasons)[name]


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
    return _StripPrefix(_dotted(prefix))


def add_prefix(prefix: str) -> Step:
    """Put ``prefix`` (a trailing ``.`` is added if missing) in front of every name.

    Example:
        >>> make_plan(["fc.weight"], [add_prefix("module.")]).mapping
        {'fc.weight': 'module.fc.weight'}
    """
    return _AddPrefix(_dotted(prefix))


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
    return _Replace(pattern, repl, regex)


def drop(*patterns: str) -> Step:
    """Drop every name matching one of the glob ``patterns`` (``*`` also matches dots).

    Example:
        >>> make_plan(["fc.weight", "conv.weight"], [drop("fc.*")]).dropped_names
        ['fc.weight']
    """
    return _Drop(tuple(patterns))


def keep(*patterns: str) -> Step:
    """Keep only names matching one of the glob ``patterns`` (extract a sub-module: ``backbone.*``).

    Example:
        >>> make_plan(["backbone.w", "head.w"], [keep("backbone.*")]).dropped_names
        ['head.w']
    """
    return _Keep(tuple(patterns))


def drop_names(reasons: Mapping[str, str]) -> Step:
    """Drop exactly the named tensors, each with its reason (they must all exist).

    Example:
        >>> make_plan(["fc.weight", "x"], [drop_names({"fc.weight": "head"})]).entries[0].reason
        'head'
    """
    return _DropNames(tuple(reasons.items()))


# -- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One tensor in a plan: ``new`` is ``None`` when it is dropped (``reason`` says why)."""

    old: str
    new: str | None
    reason: str = ""
    dtype: str = ""
    shape: tuple[int, ...] | None = None

    @property
    def dropped(self) -> bool:
        return self.new is None

    @property
    def renamed(self) -> bool:
        return self.new is not None and self.new != self.old


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
        for entry in self.entries:
            if entry.new is None:
                continue
            other = seen.get(entry.new)
            if other is not None:
                raise SurgeryError(
                    f"name collision: {other!r} and {entry.old!r} would both become {entry.new!r}; "
                    "change the rename (or --drop one of them)"
                )
            seen[entry.new] = entry.old

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
        return [e for e in self.entries if e.new == e.old]

    @property
    def dropped(self) -> list[Entry]:
        return [e for e in self.entries if e.dropped]

    @property
    def dropped_names(self) -> list[str]:
        return [e.old for e in self.entries if e.dropped]

    @property
    def output_names(self) -> list[str]:
        return [e.new for e in self.entries if e.new is not None]

    @property
    def is_identity(self) -> bool:
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
        out: dict[str, TensorRecord] = {}
        for name, rec in tensors.items():
            new = by_old[name]
            if new is not None:
                out[new] = rec if rec.name == new else rec.renamed(new)
        return out

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
        entries = []
        for e in self.entries:
            if e.new is None:
                entries.append(e)
                continue
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
        entries = tuple(Entry(e.new, e.old, "", e.dtype, e.shape) for e in self.entries)  # type: ignore[arg-type]
        return Plan(entries, (f"inverse of: {'; '.join(self.steps) or 'identity'}",))


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
        current: str | None = name
        reason = ""
        for i, step in enumerate(steps):
            touched[i] = touched[i] or step.touches(current)
            result = step.apply(current)
            if result is None:
                reason = step.reason(current)
                current = None
                break
            if not result:
                raise SurgeryError(f"{name!r}: {step.describe()} leaves an empty name")
            current = result
        entries.append(_entry(name, current, reason, rec))
    _refuse_idle_steps(steps, touched, records)
    return Plan(tuple(entries), tuple(s.describe() for s in steps))


def _entry(old: str, new: str | None, reason: str, rec: TensorRecord | None) -> Entry:
    if rec is None:
        return Entry(old, new, reason)
    return Entry(old, new, reason, rec.dtype, tuple(rec.shape))


def _refuse_idle_steps(steps: Sequence[Step], touched: list[bool], records: Mapping[str, object]) -> None:
    for step, hit in zip(steps, touched, strict=True):
        if hit or not records or isinstance(step, _AddPrefix):
            continue
        if isinstance(step, _DropNames):
            absent = [n for n, _ in step.reasons if n not in records]
            raise SurgeryError(f"cannot drop {absent[0]!r}: no such tensor")
        sample = ", ".join(repr(n) for n in list(records)[:3])
        raise SurgeryError(
            f"{step.describe()}: matches no tensor (names look like {sample}); check the pattern"
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


# -- the classifier head ----------------------------------------------------------------------
def find_head(tensors: Mapping[str, TensorRecord], head: str | None = None) -> tuple[list[str], str]:
    """Names of the classifier head's tensors and how they were found.

    With ``head`` (a module name such as ``fc`` or ``classifier.6``, or a glob), the tensors of
    that module. Without it, the last module (in file order) that has a weight of two or more
    dimensions and is named like a head (``fc``, ``classifier``, ``head``, ``last_linear``,
    ``lm_head`` ...); failing that, the last module of the file if it is a linear layer whose
    bias matches its output size. Refuses (SurgeryError) rather than guess further.

    Example:
        >>> recs = {n: TensorRecord(n, "float32", s) for n, s in
        ...         [("classifier.0.weight", (8, 4)), ("classifier.6.weight", (10, 8)), ("classifier.6.bias", (10,))]}
        >>> find_head(recs)
        (['classifier.6.weight', 'classifier.6.bias'], "the last layer named like a head: 'classifier.6'")
    """
    if head is not None:
        return _named_head(tensors, head), f"named with --head {head}"
    modules = _modules(tensors)
    named = [m for m in modules if _is_layer(tensors, modules[m]) and _head_named(m)]
    if named:
        return modules[named[-1]], f"the last layer named like a head: {named[-1]!r}"
    if modules:
        last = list(modules)[-1]
        if _is_linear(tensors, modules[last]):
            return modules[last], f"the last layer of the file: {last!r}"
    raise SurgeryError(
        "no classifier head found (no fc/classifier/head/last_linear/lm_head layer, and the last layer "
        "is not linear); name it with --head NAME or give --target"
    )


def _named_head(tensors: Mapping[str, TensorRecord], head: str) -> list[str]:
    module = head.removesuffix(".")
    hits = [n for n in tensors if n.rpartition(".")[0] == module or n == module]
    if not hits and any(c in head for c in "*?["):
        hits = [n for n in tensors if fnmatch.fnmatchcase(n, head)]
    if not hits:
        layers = [m for m, names in _modules(tensors).items() if _is_layer(tensors, names)]
        tail = ", ".join(repr(m) for m in layers[-3:]) or "none"
        raise SurgeryError(f"--head {head}: no such layer; the last layers are {tail}")
    return hits


def _modules(tensors: Mapping[str, TensorRecord]) -> dict[str, list[str]]:
    modules: dict[str, list[str]] = {}
    for name in tensors:
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    return modules


def _head_named(module: str) -> bool:
    return any(part in HEAD_NAMES for part in module.split("."))


def _weight(tensors: Mapping[str, TensorRecord], names: list[str]) -> TensorRecord | None:
    return next((tensors[n] for n in names if n.rpartition(".")[2] == "weight"), None)


def _is_layer(tensors: Mapping[str, TensorRecord], names: list[str]) -> bool:
    weight = _weight(tensors, names)
    return weight is not None and len(weight.shape) >= 2


def _is_linear(tensors: Mapping[str, TensorRecord], names: list[str]) -> bool:
    weight = _weight(tensors, names)
    if weight is None or len(weight.shape) != 2:
        return False
    bias = next((tensors[n] for n in names if n.rpartition(".")[2] == "bias"), None)
    return bias is None or tuple(bias.shape) == (weight.shape[0],)


def head_plan(tensors: Mapping[str, TensorRecord], head: str | None = None) -> Plan:
    """A plan that drops the classifier head (see :func:`find_head`), each drop with its reason.

    Example:
        >>> recs = {"conv.weight": TensorRecord("conv.weight", "float32", (4, 3, 3, 3)),
        ...         "fc.weight": TensorRecord("fc.weight", "float32", (10, 4))}
        >>> head_plan(recs).dropped_names
        ['fc.weight']
    """
    names, how = find_head(tensors, head)
    reasons = {n: f"classifier head ({how})" for n in names}
    plan = make_plan(tensors, [drop_names(reasons)])
    return Plan(plan.entries, (f"drop the classifier head: {how}",))


# -- rendering --------------------------------------------------------------------------------
def plan_json(plan: Plan) -> dict[str, object]:
    """The plan as a JSON-ready dict: summary, steps, renamed, dropped (every one) and unchanged."""
    return {
        "summary": {
            "tensors": len(plan.entries),
            "renamed": len(plan.renamed),
            "unchanged": len(plan.unchanged),
            "dropped": len(plan.dropped),
        },
        "steps": list(plan.steps),
        "renamed": [{"from": e.old, "to": e.new} for e in plan.renamed],
        "dropped": [
            {"name": e.old, "dtype": e.dtype, "shape": _shape_json(e.shape), "reason": e.reason}
            for e in plan.dropped
        ],
        "unchanged": [e.old for e in plan.unchanged],
    }


def render_plan(plan: Plan, fmt: str = "table", verbose: bool = False) -> str:
    """Render a plan: a headline, the renames (grouped), every dropped tensor with shape and reason.

    Example:
        >>> print(render_plan(make_plan(["module.fc.w"], [strip_prefix("module.")])))
        Plan: 1 tensor: 1 renamed, 0 unchanged, 0 dropped (strip prefix 'module.')
        <BLANKLINE>
        renamed      to
        -----------  ----
        module.fc.w  fc.w
    """
    if fmt == "json":
        return json.dumps(plan_json(plan), indent=2)
    from tabulate import tabulate

    tablefmt = "github" if fmt == "markdown" else "simple"
    parts = [plan_headline(plan)]
    renamed = _rename_rows(plan, verbose)
    if renamed:
        parts.append(tabulate(renamed, headers=["renamed", "to"], tablefmt=tablefmt, disable_numparse=True))
    dropped = _drop_rows(plan, verbose)
    if dropped:
        headers = ["dropped", "dtype", "shape", "reason"]
        parts.append(tabulate(dropped, headers=headers, tablefmt=tablefmt, disable_numparse=True))
    return "\n\n".join(parts)


def plan_headline(plan: Plan) -> str:
    """One line: how many tensors, renamed, unchanged, dropped, and the steps."""
    n = len(plan.entries)
    steps = f" ({'; '.join(plan.steps)})" if plan.steps else ""
    return (
        f"Plan: {n} tensor{'s' if n != 1 else ''}: {len(plan.renamed)} renamed, "
        f"{len(plan.unchanged)} unchanged, {len(plan.dropped)} dropped{steps}"
    )


def _rename_rows(plan: Plan, verbose: bool) -> list[list[str]]:
    new_of = {e.old: e.new or "" for e in plan.renamed}
    if verbose:
        return [[old, new] for old, new in new_of.items()]
    rows = []
    for group in collapse(list(new_of), attribute=lambda o: _skeleton(new_of[o]), merge_leaves=True):
        targets = collapse([new_of[m] for m in group.members], merge_leaves=True)
        if len(targets) == 1:
            rows.append([group.label, targets[0].label])
        else:
            rows.extend([m, new_of[m]] for m in group.members)
    return rows


def _drop_rows(plan: Plan, verbose: bool) -> list[list[str]]:
    by_name = {e.old: e for e in plan.dropped}
    if verbose:
        return [[e.old, e.dtype, _shape_text(e.shape), e.reason] for e in by_name.values()]
    rows = []
    for group in collapse(
        list(by_name), attribute=lambda n: (by_name[n].dtype, by_name[n].shape, by_name[n].reason)
    ):
        e = by_name[group.members[0]]
        rows.append([group.label, e.dtype, _shape_text(e.shape), e.reason])
    return rows


def _skeleton(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def _shape_json(shape: tuple[int, ...] | None) -> list[int] | None:
    return None if shape is None else list(shape)
