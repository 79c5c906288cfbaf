"""Mapping files: ordered renames, drops and tensor transforms between two implementations.

A :class:`Mapping` is a value: its rules, read from a TOML file (:func:`load_mapping`,
:func:`parse_mapping`), written back (:meth:`Mapping.to_toml`) and turned around
(:meth:`Mapping.reversed`). Applying it (:meth:`Mapping.plan`, :meth:`Mapping.apply`) is in
:mod:`ckptsurgeon.surgery.mappingplan`.
docs/mapping.md states the schema.

Why TOML: a mapping is reviewed and kept in version control, so comments matter (JSON has none);
TOML has no indentation to get wrong and no implicit typing (YAML reads ``no`` as false and ``1e3``
as a float; a regex or a name never changes type in TOML); Python 3.11+ reads it with the standard
library (``tomllib``; ``tomli`` on 3.10, the same parser). The schema is fixed and small, so writing
is a short emitter here, checked by a round trip through ``tomllib`` in the tests.

Templates (``from``/``to``/``pattern``): a tensor name with placeholders. ``{n}`` (any identifier)
matches one or more digits, ``{x:part}`` one dotted component (no dot), ``{*rest}`` any non-empty
text, dots included. A template rename is reversed by swapping ``from`` and ``to``; a regex rename
(``regex``/``replace``) only when a ``reverse_regex``/``reverse_replace`` pair is given.

Example:
    >>> m = parse_mapping('version = 1\\n[[rename]]\\nfrom = "enc.{n}.w"\\nto = "blocks.{n}.w"\\n')
    >>> m.renames[0].target, m.reversed().renames[0].target
    ('blocks.{n}.w', 'enc.{n}.w')
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CkptError

if TYPE_CHECKING:  # pragma: no cover
    from .mappingplan import MappingMatch
    from .plan import Plan

SCHEMA_VERSION = 1
STATUSES = ("certain", "ambiguous")
OPS = ("split", "concat", "transpose", "permute", "reshape", "rotary_permute")
ROTARY_DIRECTIONS = ("meta_to_hf", "hf_to_meta")
ORDERS = ("renames-first", "transforms-first")
MAX_MAPPING_BYTES = 16 * 1024 * 1024  # a mapping is text a person reviews; refuse anything larger
_PLACEHOLDER = re.compile(r"\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(?::([a-z]+))?\}")
_KINDS = {"": r"[0-9]+", "part": r"[^.]+", "*": r".+"}


class MappingError(CkptError):
    """A mapping file that cannot be read, or a rule that cannot be applied or reversed."""


# -- templates --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """A tensor name with placeholders: ``{n}`` digits, ``{x:part}`` one component, ``{*rest}`` any.

    Example:
        >>> t = Template("layers.{n}.{*rest}")
        >>> t.match("layers.3.attn.w"), t.fill({"n": "3", "rest": "attn.w"})
        ({'n': '3', 'rest': 'attn.w'}, 'layers.3.attn.w')
    """

    text: str
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    placeholders: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        regex, names = _compile_template(self.text)
        object.__setattr__(self, "regex", regex)
        object.__setattr__(self, "placeholders", names)

    def match(self, name: str) -> dict[str, str] | None:
        """The placeholder values when ``name`` fits the whole template, else None."""
        found = self.regex.fullmatch(name)
        return None if found is None else dict(found.groupdict())

    def fill(self, values: dict[str, str]) -> str:
        """The template with its placeholders replaced by ``values``."""
        return _PLACEHOLDER.sub(lambda m: values[m.group(2)], self.text)


# {*name} placeholders a template may hold: matching costs grow as a name's length to this power.
MAX_TAILS = 2


def _compile_template(text: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    if not isinstance(text, str) or not text:
        raise MappingError(f"template {text!r}: give a non-empty tensor name with placeholders")
    parts: list[str] = []
    names: list[str] = []
    at = 0
    for m in _PLACEHOLDER.finditer(text):
        if names and m.start() == at:  # which characters go to which: a guess, and backtracking
            raise MappingError(
                f"template {text!r}: two placeholders side by side; put a literal such as '.' between them"
            )
        parts.append(_literal(text, text[at : m.start()]))
        star, name, kind = m.group(1), m.group(2), m.group(3) or ""
        if star and kind:
            raise MappingError(f"template {text!r}: {m.group(0)} cannot be both {{*name}} and :{kind}")
        if (star or kind) not in _KINDS:
            raise MappingError(f"template {text!r}: unknown placeholder kind {kind!r} (use :part)")
        if name in names:
            raise MappingError(f"template {text!r}: placeholder {{{name}}} appears twice")
        names.append(name)
        parts.append(f"(?P<{name}>{_KINDS[star or kind]})")
        at = m.end()
    parts.append(_literal(text, text[at:]))
    if sum(1 for m in _PLACEHOLDER.finditer(text) if m.group(1)) > MAX_TAILS:
        # each {*name} more multiplies the backtracking over a (possibly hostile) name's dots
        raise MappingError(f"template {text!r}: at most {MAX_TAILS} {{*name}} placeholders")
    return re.compile("".join(parts)), tuple(names)


def _literal(template: str, text: str) -> str:
    if "{" in text or "}" in text:
        raise MappingError(
            f"template {template!r}: a brace that is not a placeholder ({{n}}, {{x:part}} or {{*rest}})"
        )
    return re.escape(text)


# -- rules ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rename:
    """A rename: template ``source`` -> ``target`` or, with ``regex``, ``re.sub(source, target)``.

    A regex rename reverses only with ``reverse_regex`` and ``reverse_replace``.

    Example:
        >>> Rename("module.{*rest}", "{*rest}").reversed().source
        '{*rest}'
    """

    source: str
    target: str
    regex: bool = False
    reverse_regex: str | None = None
    reverse_replace: str | None = None
    note: str = ""
    status: str = "certain"

    def __post_init__(self) -> None:
        _check_status(self.status, self.label)
        if self.regex:
            _compile_regex(self.source, self.label)
            if (self.reverse_regex is None) != (self.reverse_replace is None):
                raise MappingError(f"{self.label}: give both reverse_regex and reverse_replace, or neither")
            if self.reverse_regex is not None:
                _compile_regex(self.reverse_regex, self.label)
            return
        if self.reverse_regex is not None or self.reverse_replace is not None:
            raise MappingError(f"{self.label}: reverse_regex/reverse_replace belong to a regex rename")
        _same_placeholders(self.label, [Template(self.source)], [Template(self.target)])

    @property
    def label(self) -> str:
        """How messages name this rule."""
        if self.regex:
            return f"rename regex {self.source!r} -> {self.target!r}"
        return f"rename {self.source!r} -> {self.target!r}"

    def reversed(self) -> Rename:
        """The rename that undoes this one (a regex one needs its reverse pair)."""
        if not self.regex:
            return replace(self, source=self.target, target=self.source)
        if self.reverse_regex is None or self.reverse_replace is None:
            raise MappingError(
                f"{self.label}: not reversible; add reverse_regex and reverse_replace to the rule"
            )
        return replace(
            self,
            source=self.reverse_regex,
            target=self.reverse_replace,
            reverse_regex=self.source,
            reverse_replace=self.target,
        )


@dataclass(frozen=True)
class Drop:
    """Drop every tensor whose name fits template ``pattern`` (a regex with ``regex=True``).

    Example:
        >>> Drop("heads.{*rest}", "classifier head").label
        "drop 'heads.{*rest}'"
    """

    pattern: str
    reason: str = ""
    regex: bool = False
    note: str = ""
    status: str = "certain"

    def __post_init__(self) -> None:
        _check_status(self.status, self.label)
        if self.regex:
            _compile_regex(self.pattern, self.label)
        else:
            Template(self.pattern)

    @property
    def label(self) -> str:
        return f"drop {'regex ' if self.regex else ''}{self.pattern!r}"


@dataclass(frozen=True)
class TensorTransform:
    """A value-changing rule: ``op`` from the ``sources`` templates to the ``targets`` templates.

    ``split``: one source -> several targets along ``dim`` (``sizes``, or equal parts);
    ``concat``: several sources -> one target along ``dim`` (its inverse: parts of ``sizes``, or
    equal parts); ``transpose``: swap the
    two ``dims``; ``permute``: reorder by ``dims``; ``reshape``: to ``shape`` (``0`` keeps that
    dimension, ``-1`` is inferred), reversed with ``reverse_shape``; ``rotary_permute``: the q/k
    row order between Meta and Hugging Face Llama layouts (``n_heads``, ``direction``).

    Example:
        >>> t = TensorTransform("split", ("{*p}.qkv.weight",), ("{*p}.q.weight", "{*p}.k.weight"))
        >>> t.reversed().op, t.reversed().sources
        ('concat', ('{*p}.q.weight', '{*p}.k.weight'))
    """

    op: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    dim: int = 0
    dims: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()
    shape: tuple[int, ...] = ()
    reverse_shape: tuple[int, ...] | None = None
    n_heads: int = 0
    direction: str = ""
    note: str = ""
    status: str = "certain"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise MappingError(f"transform op {self.op!r}: unknown; use one of {', '.join(OPS)}")
        _check_status(self.status, self.label)
        sources = [Template(s) for s in self.sources]
        targets = [Template(t) for t in self.targets]
        _check_arity(self)
        _check_op_fields(self)
        _same_placeholders(self.label, sources, targets)

    @property
    def label(self) -> str:
        return f"transform {self.op} {_names(self.sources)} -> {_names(self.targets)}"

    def reversed(self) -> TensorTransform:
        """The transform that undoes this one (a reshape needs ``reverse_shape``)."""
        changes: dict[str, Any] = {"sources": self.targets, "targets": self.sources}
        if self.op in ("split", "concat"):
            changes["op"] = "concat" if self.op == "split" else "split"
        elif self.op == "permute":
            changes["dims"] = tuple(sorted(range(len(self.dims)), key=lambda i: self.dims[i]))
        elif self.op == "reshape":
            if self.reverse_shape is None:
                raise MappingError(f"{self.label}: not reversible; add reverse_shape to the rule")
            changes |= {"shape": self.reverse_shape, "reverse_shape": self.shape}
        elif self.op == "rotary_permute":
            changes["direction"] = ROTARY_DIRECTIONS[1 - ROTARY_DIRECTIONS.index(self.direction)]
        return replace(self, **changes)  # a transpose is its own inverse


def _names(templates: Sequence[str]) -> str:
    return repr(templates[0]) if len(templates) == 1 else "[" + ", ".join(map(repr, templates)) + "]"


def _check_arity(rule: TensorTransform) -> None:
    many_in, many_out = rule.op == "concat", rule.op == "split"
    if (len(rule.sources) >= 2) != many_in or (len(rule.sources) == 0):
        need = "a list of two or more names" if many_in else "one name"
        raise MappingError(f"{rule.label}: 'from' must be {need}")
    if (len(rule.targets) >= 2) != many_out or (len(rule.targets) == 0):
        need = "a list of two or more names" if many_out else "one name"
        raise MappingError(f"{rule.label}: 'to' must be {need}")
    for key, names in (("from", rule.sources), ("to", rule.targets)):
        twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
        if twice is not None:  # a concat of a tensor with itself has no reverse
            raise MappingError(f"{rule.label}: {twice!r} appears twice in '{key}'")
    parts = max(len(rule.sources), len(rule.targets))
    if rule.sizes and (len(rule.sizes) != parts or any(s <= 0 for s in rule.sizes)):
        raise MappingError(f"{rule.label}: 'sizes' must be {parts} positive integers, one per part")


def _check_op_fields(rule: TensorTransform) -> None:
    if rule.op == "transpose" and len(rule.dims) != 2:
        raise MappingError(f"{rule.label}: 'dims' must be the two dimensions to swap, e.g. [0, 1]")
    if rule.op == "permute" and sorted(rule.dims) != list(range(len(rule.dims))):
        raise MappingError(f"{rule.label}: 'dims' must be a permutation of 0..n-1, e.g. [0, 2, 3, 1]")
    if rule.op == "reshape":
        for shape in (rule.shape, rule.reverse_shape or ()):
            if sum(1 for s in shape if s == -1) > 1 or any(s < -1 for s in shape):
                raise MappingError(f"{rule.label}: a shape holds sizes >= 0 and at most one -1")
        if not rule.shape and rule.reverse_shape is None:
            raise MappingError(f"{rule.label}: give 'shape', e.g. [0, -1] for a 1x1 conv as a linear")
    if rule.op == "rotary_permute":
        if rule.n_heads <= 0:
            raise MappingError(f"{rule.label}: 'n_heads' must be a positive integer")
        if rule.direction not in ROTARY_DIRECTIONS:
            raise MappingError(f"{rule.label}: 'direction' must be one of {', '.join(ROTARY_DIRECTIONS)}")


def _same_placeholders(label: str, sources: Sequence[Template], targets: Sequence[Template]) -> None:
    """Every template of a rule uses the same placeholders, so values carry over both ways."""
    wanted = _spelled(sources[0])  # names and kinds: {x:part} against {x} (digits) would not reverse
    for template in [*sources, *targets]:
        if _spelled(template) != wanted:
            raise MappingError(
                f"{label}: {template.text!r} uses placeholders {_spelled(template)}, "
                f"{sources[0].text!r} uses {wanted}; every template of a rule needs the same ones"
            )


def _spelled(template: Template) -> list[str]:
    return sorted(m.group(0) for m in _PLACEHOLDER.finditer(template.text))


def _check_status(status: str, label: str) -> None:
    if status not in STATUSES:
        raise MappingError(f"{label}: status {status!r}: use 'certain' or 'ambiguous'")


def _compile_regex(pattern: str, label: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:  # a{4294967296}; parentheses nested deep
        raise MappingError(f"{label}: not a valid regular expression ({exc})") from None


Rule = Rename | Drop | TensorTransform


# -- the mapping ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mapping:
    """The rules of one mapping file. Applied in this order: drops (on the source's names), then
    renames (each in file order, on the name the previous one left), then transforms (on the
    renamed names); with ``transforms_first`` (``order = "transforms-first"``, what
    :meth:`reversed` makes) the transforms come before the renames, which then rename their outputs.

    Example:
        >>> m = Mapping(renames=(Rename("module.{*rest}", "{*rest}"),))
        >>> parse_mapping(m.to_toml()) == m
        True
    """

    renames: tuple[Rename, ...] = ()
    drops: tuple[Drop, ...] = ()
    transforms: tuple[TensorTransform, ...] = ()
    version: int = SCHEMA_VERSION
    transforms_first: bool = False  # ``order = "transforms-first"``: what reversed() makes

    @property
    def rules(self) -> tuple[Rule, ...]:
        """Every rule, in the order they apply."""
        return (*self.drops, *self.renames, *self.transforms)

    @property
    def ambiguous(self) -> tuple[Rule, ...]:
        """The rules marked ``status = "ambiguous"`` (applying them needs a decision)."""
        return tuple(rule for rule in self.rules if rule.status == "ambiguous")

    def reversed(self) -> Mapping:
        """The mapping that converts back: transforms undone first, then renames in reverse order
        (the order flips: ``transforms_first``).

        A drop, a regex rename without a reverse pair, or a reshape without ``reverse_shape`` is
        refused by name.
        """
        if self.drops:
            raise MappingError(
                f"{self.drops[0].label}: a drop cannot be reversed; remove it to use --reverse"
            )
        renames = tuple(rule.reversed() for rule in reversed(self.renames))
        transforms = tuple(rule.reversed() for rule in reversed(self.transforms))
        return Mapping(
            renames=renames,
            transforms=transforms,
            version=self.version,
            transforms_first=not self.transforms_first,
        )

    def match(self, tensors: Any, *, allow_ambiguous: bool = False) -> MappingMatch:
        """This mapping over ``tensors`` (a Checkpoint, a Source, or name -> TensorRecord): the plan
        and what each rule touched (:class:`~ckptsurgeon.surgery.mappingplan.MappingMatch`)."""
        from .mappingplan import match_mapping

        return match_mapping(self, _records(tensors), allow_ambiguous=allow_ambiguous)

    def plan(self, tensors: Any, *, allow_ambiguous: bool = False) -> Plan:
        """The surgery :class:`~ckptsurgeon.surgery.plan.Plan` this mapping makes for ``tensors``.

        Example:
            >>> from ..core.record import TensorRecord
            >>> recs = {"qkv": TensorRecord("qkv", "float32", (6, 2))}
            >>> m = Mapping(transforms=(TensorTransform("split", ("qkv",), ("q", "k", "v")),))
            >>> m.plan(recs).output_names
            ['q', 'k', 'v']
        """
        return self.match(tensors, allow_ambiguous=allow_ambiguous).plan

    def apply(self, state_dict: Any, *, allow_ambiguous: bool = False) -> dict[str, Any]:
        """A new state dict of tensors: ``state_dict`` (name -> tensor) through this mapping.

        Example:
            >>> import torch
            >>> m = Mapping(renames=(Rename("module.{*rest}", "{*rest}"),))
            >>> list(m.apply({"module.fc.weight": torch.ones(2)}))
            ['fc.weight']
        """
        from .mappingplan import apply_mapping

        return apply_mapping(self, state_dict, allow_ambiguous=allow_ambiguous)

    def to_toml(self) -> str:
        """This mapping as a TOML document that :func:`parse_mapping` reads back equal."""
        lines = ["# ckpt mapping file (docs/mapping.md)", f"version = {self.version}"]
        if self.transforms_first:
            lines.append(f"order = {_string(ORDERS[1])}")
        for rule in self.drops:
            lines += ["", "[[drop]]", *_fields(_drop_fields(rule))]
        for rename in self.renames:
            lines += ["", "[[rename]]", *_fields(_rename_fields(rename))]
        for transform in self.transforms:
            lines += ["", "[[transform]]", *_fields(_transform_fields(transform))]
        return "\n".join(lines) + "\n"


# -- writing: a small TOML emitter for this fixed schema ------------------------------------
def _rename_fields(rule: Rename) -> dict[str, object]:
    if rule.regex:
        fields: dict[str, object] = {"regex": rule.source, "replace": rule.target}
        if rule.reverse_regex is not None:
            fields |= {"reverse_regex": rule.reverse_regex, "reverse_replace": rule.reverse_replace}
    else:
        fields = {"from": rule.source, "to": rule.target}
    return fields | _common_fields(rule)


def _drop_fields(rule: Drop) -> dict[str, object]:
    fields: dict[str, object] = {"regex" if rule.regex else "pattern": rule.pattern}
    if rule.reason:
        fields["reason"] = rule.reason
    return fields | _common_fields(rule)


def _transform_fields(rule: TensorTransform) -> dict[str, object]:
    fields: dict[str, object] = {
        "op": rule.op,
        "from": rule.sources[0] if len(rule.sources) == 1 else list(rule.sources),
        "to": rule.targets[0] if len(rule.targets) == 1 else list(rule.targets),
    }
    optional: dict[str, object] = {
        "dim": rule.dim if rule.op in ("split", "concat") else None,
        "dims": list(rule.dims) or None,
        "sizes": list(rule.sizes) or None,
        "shape": list(rule.shape) if rule.op == "reshape" else None,
        "reverse_shape": None if rule.reverse_shape is None else list(rule.reverse_shape),
        "n_heads": rule.n_heads or None,
        "direction": rule.direction or None,
    }
    fields |= {key: value for key, value in optional.items() if value is not None}
    return fields | _common_fields(rule)


def _common_fields(rule: Rule) -> dict[str, object]:
    fields: dict[str, object] = {"status": rule.status}
    if rule.note:
        fields["note"] = rule.note
    return fields


def _fields(fields: dict[str, object]) -> list[str]:
    return [f"{key} = {_value(value)}" for key, value in fields.items()]


def _value(value: object) -> str:
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")  # pragma: no cover - the schema has no other type


def _string(text: str) -> str:
    """A TOML basic string: backslash, quote and control characters escaped."""
    out = []
    for char in text:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _records(tensors: Any) -> Any:
    """name -> TensorRecord from a Checkpoint, a Source, or such a dict itself."""
    if hasattr(tensors, "weights") and callable(tensors.weights):  # a Checkpoint
        return tensors.weights().tensors
    if hasattr(tensors, "tensors") and not isinstance(tensors, dict):  # a Source or a candidate
        return tensors.tensors
    return tensors


# -- reading ----------------------------------------------------------------------------------
def load_mapping(path: str | os.PathLike[str]) -> Mapping:
    """Read the mapping file at ``path`` (TOML; docs/mapping.md).

    Example:
        >>> import tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "m.toml")
        >>> _ = open(f, "w").write('version = 1\\n[[drop]]\\npattern = "fc.{*rest}"\\nreason = "head"\\n')
        >>> load_mapping(f).drops[0].reason
        'head'
    """
    where = Path(path)
    try:
        with where.open("rb") as handle:
            data = handle.read(MAX_MAPPING_BYTES + 1)
    except OSError as exc:
        raise MappingError(f"{path}: cannot read the mapping file ({exc.strerror or exc})") from None
    if len(data) > MAX_MAPPING_BYTES:
        raise MappingError(f"{path}: larger than {MAX_MAPPING_BYTES >> 20} MiB; not a mapping file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MappingError(f"{path}: not UTF-8 text; a mapping file is TOML") from None
    try:
        return parse_mapping(text)
    except MappingError as exc:
        raise MappingError(f"{path}: {exc.message}") from None


def parse_mapping(text: str) -> Mapping:
    """The mapping in the TOML document ``text``.

    Example:
        >>> parse_mapping('version = 1\\n').rules
        ()
    """
    document = _parse_toml(text)
    _only_keys(document, "the file", ("version", "order", "rename", "drop", "transform"))
    order = document.get("order", ORDERS[0])
    if order not in ORDERS:
        raise MappingError(f"order = {order!r}: use {ORDERS[0]!r} (the default) or {ORDERS[1]!r}")
    version = document.get("version")
    if version is None:
        raise MappingError(f"no version: start the file with 'version = {SCHEMA_VERSION}'")
    if type(version) is not int or version != SCHEMA_VERSION:  # true and 1.0 equal 1 in Python
        raise MappingError(
            f"version = {version!r}: this ckpt reads mapping files of version {SCHEMA_VERSION}"
        )
    return Mapping(
        renames=tuple(_rename(t, i) for i, t in enumerate(_tables(document, "rename"))),
        drops=tuple(_drop(t, i) for i, t in enumerate(_tables(document, "drop"))),
        transforms=tuple(_transform(t, i) for i, t in enumerate(_tables(document, "transform"))),
        transforms_first=order == ORDERS[1],
    )


def _parse_toml(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(f"not valid TOML ({exc})") from None
    except RecursionError:
        raise MappingError("not valid TOML (nested too deeply)") from None


def _tables(document: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    tables = document.get(kind, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise MappingError(f"{kind!r}: write each rule as a [[{kind}]] table")
    return tables


_COMMON = ("note", "status")
_RENAME_KEYS = ("from", "to", "regex", "replace", "reverse_regex", "reverse_replace", *_COMMON)
_DROP_KEYS = ("pattern", "regex", "reason", *_COMMON)
_TRANSFORM_KEYS = (
    "op", "from", "to", "dim", "dims", "sizes", "shape", "reverse_shape", "n_heads", "direction", *_COMMON,
)  # fmt: skip


def _rename(table: dict[str, Any], index: int) -> Rename:
    where = f"[[rename]] #{index + 1}"
    _only_keys(table, where, _RENAME_KEYS)
    note, status = _common(table, where)
    if "regex" in table:
        if "from" in table or "to" in table:
            raise MappingError(f"{where}: give either from/to (templates) or regex/replace, not both")
        return Rename(
            _text(table, "regex", where),
            _text(table, "replace", where, empty=True),
            regex=True,
            reverse_regex=_optional_text(table, "reverse_regex", where),
            reverse_replace=_optional_text(table, "reverse_replace", where, empty=True),
            note=note,
            status=status,
        )
    return Rename(_text(table, "from", where), _text(table, "to", where), note=note, status=status)


def _drop(table: dict[str, Any], index: int) -> Drop:
    where = f"[[drop]] #{index + 1}"
    _only_keys(table, where, _DROP_KEYS)
    if ("pattern" in table) == ("regex" in table):
        raise MappingError(f"{where}: give 'pattern' (a template) or 'regex', one of them")
    reason = _text(table, "reason", where, empty=True) if "reason" in table else ""
    note, status = _common(table, where)
    if "regex" in table:
        return Drop(_text(table, "regex", where), reason, regex=True, note=note, status=status)
    return Drop(_text(table, "pattern", where), reason, note=note, status=status)


def _transform(table: dict[str, Any], index: int) -> TensorTransform:
    where = f"[[transform]] #{index + 1}"
    _only_keys(table, where, _TRANSFORM_KEYS)
    reverse_shape = _ints(table, "reverse_shape", where) if "reverse_shape" in table else None
    note, status = _common(table, where)
    return TensorTransform(
        _text(table, "op", where),
        _text_list(table, "from", where),
        _text_list(table, "to", where),
        dim=_int(table, "dim", where, 0),
        dims=_ints(table, "dims", where),
        sizes=_ints(table, "sizes", where),
        shape=_ints(table, "shape", where),
        reverse_shape=reverse_shape,
        n_heads=_int(table, "n_heads", where, 0),
        direction=_text(table, "direction", where) if "direction" in table else "",
        note=note,
        status=status,
    )


def _common(table: dict[str, Any], where: str) -> tuple[str, str]:
    note = _text(table, "note", where, empty=True) if "note" in table else ""
    status = _text(table, "status", where) if "status" in table else "certain"
    return note, status


def _only_keys(table: dict[str, Any], where: str, allowed: Sequence[str]) -> None:
    unknown = next((key for key in table if key not in allowed), None)
    if unknown is not None:
        raise MappingError(f"{where}: unknown key {unknown!r}; allowed: {', '.join(allowed)}")


def _text(table: dict[str, Any], key: str, where: str, *, empty: bool = False) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not (value or empty):
        raise MappingError(f"{where}: {key!r} must be a {'' if empty else 'non-empty '}string")
    return value


def _optional_text(table: dict[str, Any], key: str, where: str, *, empty: bool = False) -> str | None:
    return _text(table, key, where, empty=empty) if key in table else None


def _text_list(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise MappingError(f"{where}: {key!r} must be a name or a list of names")
    return tuple(value)


def _int(table: dict[str, Any], key: str, where: str, default: int) -> int:
    value = table.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or abs(value) > 1 << 62:
        raise MappingError(f"{where}: {key!r} must be an integer")
    return value


def _ints(table: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and abs(v) <= 1 << 62 for v in value
    ):
        raise MappingError(f"{where}: {key!r} must be a list of integers")
    return tuple(value)
