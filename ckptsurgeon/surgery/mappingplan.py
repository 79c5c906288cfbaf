"""A :class:`~ckptsurgeon.surgery.mapping.Mapping` applied to tensors: the plan it makes, and what it did.

:func:`match_mapping` runs the rules over a state dict's records (nothing is read): drops on the
source's names, renames in file order, then each transform on the renamed names, built as a
:class:`~ckptsurgeon.surgery.transforms.Transform` whose outputs (name, dtype, shape) are declared
from the inputs' before any data is read. The result holds the :class:`~ckptsurgeon.surgery.plan.Plan`
and the report: how many tensors each rule touched, the rules that matched nothing, and the source
tensors no rule touched.

Example:
    >>> from .mapping import Mapping, Rename
    >>> recs = {"module.fc.w": TensorRecord("module.fc.w", "float32", (2,))}
    >>> match_mapping(Mapping(renames=(Rename("module.{*rest}", "{*rest}"),)), recs).plan.mapping
    {'module.fc.w': 'fc.w'}
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping as Names
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.record import TensorRecord
from .mapping import Drop, Mapping, MappingError, Rename, Rule, Template, TensorTransform
from .plan import Entry, Plan, plan_from_mapping
from .transforms import Output, Transform

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class MappingMatch:
    """A mapping matched against one state dict: the plan, and per rule how many tensors it touched.

    Example:
        >>> from .mapping import Mapping, Drop
        >>> recs = {"a": TensorRecord("a", "float32", (1,))}
        >>> match_mapping(Mapping(drops=(Drop("b"), Drop("a"))), recs).unmatched_rules
        ("drop 'b'",)
    """

    plan: Plan
    counts: tuple[tuple[str, int], ...]  # (rule label, tensors it touched), in the order rules apply
    untouched: tuple[str, ...]  # source names no rule renamed, dropped or transformed

    @property
    def unmatched_rules(self) -> tuple[str, ...]:
        return tuple(label for label, count in self.counts if count == 0)

    def notes(self) -> list[str]:
        """One line per rule that matched nothing, and one for the tensors no rule touched."""
        notes = [f"mapping rule {label} matched no tensor" for label in self.unmatched_rules]
        if self.untouched:
            shown = ", ".join(repr(n) for n in self.untouched[:8])
            more = f" and {len(self.untouched) - 8} more" if len(self.untouched) > 8 else ""
            notes.append(
                f"{len(self.untouched)} tensor(s) no mapping rule touched, kept as they are: {shown}{more}"
            )
        return notes

    def to_json(self) -> dict[str, Any]:
        """``rules`` (label and tensors touched), ``unmatched_rules``, ``untouched``."""
        return {
            "rules": [{"rule": label, "tensors": count} for label, count in self.counts],
            "unmatched_rules": list(self.unmatched_rules),
            "untouched": list(self.untouched),
        }


def match_mapping(
    mapping: Mapping, records: Names[str, TensorRecord], *, allow_ambiguous: bool = False
) -> MappingMatch:
    """The plan ``mapping`` makes for ``records`` (nothing read), with what each rule touched.

    A rule marked ambiguous is refused unless ``allow_ambiguous``; a mapping none of whose rules
    matches anything is refused (the wrong file, or the wrong direction).
    """
    if not allow_ambiguous and mapping.ambiguous:
        label = mapping.ambiguous[0].label
        raise MappingError(
            f'{label}: marked status = "ambiguous"; review it and set status = "certain" '
            "(or pass --allow-ambiguous)"
        )
    counts: dict[int, int] = {id(rule): 0 for rule in mapping.rules}  # by rule, not label: two may look alike
    drops = _dropped(mapping.drops, records, counts)
    kept = [n for n in records if n not in drops]
    if mapping.transforms_first:
        plan = _transformed(
            plan_from_mapping(records, {}, drops), mapping, records, {n: n for n in kept}, counts
        )
        names = plan.output_names
        after = _renamed(mapping.renames, names, counts)
        plan = plan.then(Plan(tuple(Entry(n, after[n]) for n in names)))
    else:
        renames = _renamed(mapping.renames, kept, counts)
        changed = {old: new for old, new in renames.items() if new != old}
        plan = _transformed(plan_from_mapping(records, changed, drops), mapping, records, renames, counts)
    if mapping.rules and records and not any(counts.values()):
        sample = ", ".join(repr(n) for n in list(records)[:3])
        raise MappingError(
            f"no rule of the mapping matches any tensor (names look like {sample}); wrong file or direction?"
        )
    untouched = tuple(e.old for e in plan.entries if e.transform is None and e.new == e.old)
    used = sum(1 for count in counts.values() if count)
    step = f"mapping file: {used} of {len(counts)} rule(s) matched"
    labelled = tuple((rule.label, counts[id(rule)]) for rule in mapping.rules)
    return MappingMatch(Plan(plan.entries, (step,)), labelled, untouched)


# -- drops and renames --------------------------------------------------------------------------
def _dropped(rules: tuple[Drop, ...], names: Names[str, Any], counts: dict[int, int]) -> dict[str, str]:
    matchers = [(rule, _drop_matcher(rule)) for rule in rules]
    drops: dict[str, str] = {}
    for name in names:
        for rule, hits in matchers:
            if hits(name):
                counts[id(rule)] += 1
                drops[name] = rule.reason or f"mapping {rule.label}"
                break
    return drops


def _drop_matcher(rule: Drop) -> Any:
    if rule.regex:
        regex = re.compile(rule.pattern)
        return lambda name: regex.search(name) is not None
    template = Template(rule.pattern)
    return lambda name: template.match(name) is not None


def _renamed(rules: tuple[Rename, ...], names: list[str], counts: dict[int, int]) -> dict[str, str]:
    """Source name -> its name after every rename; two sources on one name are refused."""
    appliers = [(rule, _rename_function(rule)) for rule in rules]
    out: dict[str, str] = {}
    owner: dict[str, str] = {}
    for name in names:
        current = name
        for rule, apply in appliers:
            new = apply(current)
            if new is None:
                continue
            counts[id(rule)] += 1
            if not new:
                raise MappingError(f"{rule.label}: {current!r} would get an empty name")
            current = new
        other = owner.setdefault(current, name)
        if other != name:
            raise MappingError(
                f"the mapping renames both {other!r} and {name!r} to {current!r}; fix the rules"
            )
        out[name] = current
    return out


def _rename_function(rule: Rename) -> Any:
    """name -> new name, or None when ``rule`` does not match it."""
    if rule.regex:
        pattern = re.compile(rule.source)

        def sub(name: str) -> str | None:
            if pattern.search(name) is None:
                return None
            try:
                return pattern.sub(rule.target, name)
            except (re.error, IndexError) as exc:
                raise MappingError(f"{rule.label}: bad replacement ({exc})") from None

        return sub
    source, target = Template(rule.source), Template(rule.target)

    def fill(name: str) -> str | None:
        values = source.match(name)
        return None if values is None else target.fill(values)

    return fill


# -- transforms ---------------------------------------------------------------------------------
def _transformed(
    plan: Plan,
    mapping: Mapping,
    records: Names[str, TensorRecord],
    renames: dict[str, str],
    counts: dict[int, int],
) -> Plan:
    """``plan`` with every transform rule applied, in order (``renames``: source name -> its name now)."""
    transformed: set[str] = set()
    for rule in mapping.transforms:
        plan = _with_transforms(plan, rule, records, renames, counts, transformed)
    return plan


def _with_transforms(
    plan: Plan,
    rule: TensorTransform,
    records: Names[str, TensorRecord],
    renames: dict[str, str],
    counts: dict[int, int],
    transformed: set[str],
) -> Plan:
    """``plan`` with ``rule`` applied wherever its first ``from`` template matches a renamed name."""
    by_new = {new: old for old, new in renames.items()}
    first, others = Template(rule.sources[0]), [Template(s) for s in rule.sources[1:]]
    targets = [Template(t) for t in rule.targets]
    for new_name, old_name in by_new.items():
        values = first.match(new_name)
        if values is None:
            continue
        inputs = [old_name]
        for template in others:
            wanted = template.fill(values)
            if wanted not in by_new:
                raise MappingError(f"{rule.label}: {new_name!r} matched, but its input {wanted!r} is missing")
            inputs.append(by_new[wanted])
        busy = next((n for n in inputs if n in transformed), None)
        if busy is not None:
            raise MappingError(f"{rule.label}: {renames[busy]!r} is already an input of another transform")
        outputs = [t.fill(values) for t in targets]
        transform = build_transform(rule, [records[n] for n in inputs], [renames[n] for n in inputs], outputs)
        plan = plan.with_transform(transform)
        transformed.update(inputs)
        counts[id(rule)] += 1
    return plan


def build_transform(
    rule: TensorTransform, inputs: list[TensorRecord], names: list[str], outputs: list[str]
) -> Transform:
    """The :class:`Transform` of ``rule`` over source records ``inputs`` (called ``names`` after the
    renames) writing ``outputs``; shapes that do not fit are refused naming the tensor and the rule.

    Example:
        >>> from .mapping import TensorTransform
        >>> rule = TensorTransform("transpose", ("w",), ("wt",), dims=(0, 1))
        >>> build_transform(rule, [TensorRecord("w", "float32", (2, 3))], ["w"], ["wt"]).outputs
        (Output(name='wt', dtype='float32', shape=(3, 2)),)
    """
    where = f"{rule.label}: {names[0]!r}"
    first = inputs[0]
    shape = tuple(first.shape)
    source_names = tuple(rec.name for rec in inputs)
    if rule.op == "split":
        sizes, dim = _split_sizes(rule, shape, len(outputs), where)
        described = f"split along dimension {dim} into {list(sizes)}"
        declared = tuple(
            Output(o, first.dtype, _with_dim(shape, dim, s)) for o, s in zip(outputs, sizes, strict=True)
        )
        return Transform(described, source_names, declared, _split_compute(sizes, dim))
    if rule.op == "concat":
        out_shape, dim = _concat_shape(rule, inputs, names, where)
        described = f"concat of {len(inputs)} along dimension {dim}"
        return Transform(
            described, source_names, (Output(outputs[0], first.dtype, out_shape),), _concat_compute(dim)
        )
    out_shape, compute = _one_to_one(rule, shape, where)
    return Transform(
        _described(rule, out_shape), source_names, (Output(outputs[0], first.dtype, out_shape),), compute
    )


def _described(rule: TensorTransform, out_shape: tuple[int, ...]) -> str:
    if rule.op in ("transpose", "permute"):
        return f"{rule.op} {list(rule.dims)}"
    if rule.op == "reshape":
        return f"reshape to {list(out_shape)}"
    return f"rotary permute {rule.direction.replace('_', ' ')} ({rule.n_heads} heads)"


def _with_dim(shape: tuple[int, ...], dim: int, size: int) -> tuple[int, ...]:
    return (*shape[:dim], size, *shape[dim + 1 :])


def _dim(dim: int, ndim: int, where: str) -> int:
    if not -ndim <= dim < ndim:
        raise MappingError(f"{where} has {ndim} dimension(s), no dimension {dim}")
    return dim % ndim


def _split_sizes(
    rule: TensorTransform, shape: tuple[int, ...], parts: int, where: str
) -> tuple[tuple[int, ...], int]:
    dim = _dim(rule.dim, len(shape), f"{where} {list(shape)}")
    total = shape[dim]
    if rule.sizes:
        if sum(rule.sizes) != total:
            raise MappingError(
                f"{where} has {total} along dimension {dim}; "
                f"the sizes {list(rule.sizes)} add up to {sum(rule.sizes)}"
            )
        return rule.sizes, dim
    if total % parts:
        raise MappingError(
            f"{where} has {total} along dimension {dim}, not divisible into {parts} equal parts; give sizes"
        )
    return (total // parts,) * parts, dim


def _concat_shape(
    rule: TensorTransform, inputs: list[TensorRecord], names: list[str], where: str
) -> tuple[tuple[int, ...], int]:
    first = inputs[0]
    shape = tuple(first.shape)
    dim = _dim(rule.dim, len(shape), f"{where} {list(shape)}")
    for rec, name in zip(inputs[1:], names[1:], strict=True):
        other = tuple(rec.shape)
        if (
            rec.dtype != first.dtype
            or len(other) != len(shape)
            or _with_dim(other, dim, 0) != _with_dim(shape, dim, 0)
        ):
            raise MappingError(
                f"{rule.label}: {name!r} is {rec.dtype}{list(other)}, "
                f"{names[0]!r} is {first.dtype}{list(shape)}; "
                f"they cannot be concatenated along dimension {dim}"
            )
    sizes = tuple(rec.shape[dim] for rec in inputs)
    if not rule.sizes and len(set(sizes)) > 1:
        raise MappingError(
            f"{where}: the inputs have sizes {list(sizes)} along dimension {dim}; a concat without "
            f"sizes joins equal parts (so that its reverse splits them back): add sizes = {list(sizes)}"
        )
    if rule.sizes and rule.sizes != sizes:
        raise MappingError(
            f"{where}: the inputs have sizes {list(sizes)} along dimension {dim}, "
            f"the rule says {list(rule.sizes)}"
        )
    return _with_dim(shape, dim, sum(sizes)), dim


def _split_compute(sizes: tuple[int, ...], dim: int) -> Any:
    def compute(inputs: tuple[TensorRecord, ...], index: int) -> torch.Tensor:
        import torch

        return torch.split(inputs[0].to_torch(), list(sizes), dim=dim)[index]

    return compute


def _concat_compute(dim: int) -> Any:
    def compute(inputs: tuple[TensorRecord, ...], _index: int) -> torch.Tensor:
        import torch

        return torch.cat([rec.to_torch() for rec in inputs], dim=dim)

    return compute


def _one_to_one(rule: TensorTransform, shape: tuple[int, ...], where: str) -> tuple[tuple[int, ...], Any]:
    """The output shape and compute of a transpose, permute, reshape or rotary_permute."""
    where = f"{where} {list(shape)}"
    if rule.op == "transpose":
        a, b = (_dim(d, len(shape), where) for d in rule.dims)
        out = list(shape)
        out[a], out[b] = out[b], out[a]
        return tuple(out), lambda inputs, _i: inputs[0].to_torch().transpose(a, b)
    if rule.op == "permute":
        if len(rule.dims) != len(shape):
            raise MappingError(
                f"{where} has {len(shape)} dimension(s); permute dims {list(rule.dims)} has {len(rule.dims)}"
            )
        dims = rule.dims
        return tuple(shape[d] for d in dims), lambda inputs, _i: inputs[0].to_torch().permute(*dims)
    if rule.op == "reshape":
        new = _resolved_shape(rule.shape, shape, where)
        return new, lambda inputs, _i: inputs[0].to_torch().reshape(new)
    return shape, _rotary(rule, shape, where)


def _resolved_shape(wanted: tuple[int, ...], shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """``wanted`` with each ``0`` the input's size there and ``-1`` inferred; the sizes must agree."""
    if any(s == 0 and i >= len(shape) for i, s in enumerate(wanted)):
        raise MappingError(f"{where}: reshape {list(wanted)} keeps (0) a dimension the tensor does not have")
    sizes = [shape[i] if s == 0 else s for i, s in enumerate(wanted)]
    numel = math.prod(shape)
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known == 0 or numel % known:
            raise MappingError(f"{where}: cannot be reshaped to {list(wanted)}")
        sizes[sizes.index(-1)] = numel // known
    if math.prod(sizes) != numel:
        raise MappingError(f"{where}: {numel} elements cannot be reshaped to {sizes}")
    count = 1
    for size in sizes:  # as torch counts elements: left to right in int64 ([2**62, 2**62, 0] overflows)
        count *= size
        if count >= 1 << 63:
            raise MappingError(f"{where}: reshape to {sizes}: the element count overflows int64")
    return tuple(sizes)


def _rotary(rule: TensorTransform, shape: tuple[int, ...], where: str) -> Any:
    """Hugging Face's Llama conversion ``permute`` (Meta's interleaved rotary pairs -> two halves
    per head), or its inverse, on the rows of a q/k weight (or bias)."""
    heads = rule.n_heads
    if not shape or shape[0] % (2 * heads):
        raise MappingError(f"{where}: {shape[0] if shape else 0} rows are not n_heads={heads} heads of pairs")
    half = shape[0] // heads // 2
    rest = shape[1:]
    split = (heads, half, 2) if rule.direction == "meta_to_hf" else (heads, 2, half)

    def compute(inputs: tuple[TensorRecord, ...], _index: int) -> torch.Tensor:
        return inputs[0].to_torch().reshape(*split, *rest).transpose(1, 2).reshape(shape)

    return compute


def apply_mapping(
    mapping: Mapping, state_dict: Names[str, Any], *, allow_ambiguous: bool = False
) -> dict[str, torch.Tensor]:
    """A new state dict: ``state_dict``'s tensors through ``mapping`` (in memory; inputs unchanged).

    Example:
        >>> import torch
        >>> from .mapping import Mapping, TensorTransform
        >>> m = Mapping(transforms=(TensorTransform("transpose", ("w",), ("w",), dims=(0, 1)),))
        >>> apply_mapping(m, {"w": torch.zeros(2, 3)})["w"].shape
        torch.Size([3, 2])
    """
    records = {name: TensorRecord.from_torch(name, tensor) for name, tensor in state_dict.items()}
    planned = match_mapping(mapping, records, allow_ambiguous=allow_ambiguous).plan.apply(records)
    return {name: rec.to_torch().clone() for name, rec in planned.items()}


__all__ = ["MappingMatch", "Rule", "apply_mapping", "build_transform", "match_mapping"]
