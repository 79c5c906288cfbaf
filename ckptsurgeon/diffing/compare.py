"""Compare a state dict with a target by name and shape, in PyTorch's own four lists.

``matched`` (same name, same shape), ``missing`` (in the target, not in the file),
``unexpected`` (in the file, not in the target), ``shape_mismatched`` (same name, other
shape); dtype differences are information only (``load_state_dict`` casts). A tied alias
the file stores once (``lm_head.weight`` is ``transformer.wte.weight``) is not missing, but
listed in ``tied``: loading with ``strict=True`` still raises on it (status ``"tied"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..core.record import TensorRecord


@dataclass(frozen=True)
class ShapeMismatch:
    """A tensor present on both sides under one name, with different shapes.

    ``source_name`` is the key in the file (it differs from ``name`` after a key transform).

    Example:
        >>> ShapeMismatch("fc.weight", (6, 32), (2, 32)).to_dict()["target_shape"]
        [2, 32]
    """

    name: str
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    source_name: str = ""

    @property
    def file_name(self) -> str:
        return self.source_name or self.name

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "source_shape": list(self.source_shape),
            "target_shape": list(self.target_shape),
        }


@dataclass(frozen=True)
class DtypeDifference:
    """A matched tensor stored in another dtype than the target's (``load_state_dict`` casts it)."""

    name: str
    source_dtype: str
    target_dtype: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "source_dtype": self.source_dtype, "target_dtype": self.target_dtype}


@dataclass(frozen=True)
class Comparison:
    """The four lists for one naming of the source (as saved, or after a key transform).

    ``tied``: target alias -> the tied name the file does hold, for aliases the file omits.

    Example:
        >>> t = {"w": TensorRecord("w", "float32", (2,))}
        >>> compare(t, t).ok, compare({}, t).missing
        (True, ('w',))
    """

    matched: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    shape_mismatched: tuple[ShapeMismatch, ...]
    dtype_differences: tuple[DtypeDifference, ...] = ()
    tied: dict[str, str] = field(default_factory=dict)

    @property
    def loadable(self) -> int:
        """Target tensors that load by name and shape."""
        return len(self.matched)

    @property
    def total(self) -> int:
        """Target tensors the file must provide (tied aliases it satisfies are not counted)."""
        return len(self.matched) + len(self.missing) + len(self.shape_mismatched)

    @property
    def ok(self) -> bool:
        """Loads with ``load_state_dict(strict=True)`` as is: nothing missing, unexpected, or of
        another shape, and no tied alias left out (strict loading lists those as missing keys)."""
        return self.complete and not self.tied

    @property
    def complete(self) -> bool:
        """Every target tensor gets its value: nothing missing, unexpected, or of another shape, but
        tied aliases may be left out (loading the tensor they share fills them)."""
        return not (self.missing or self.unexpected or self.shape_mismatched)

    @property
    def status(self) -> str:
        """``"ok"`` (loads strictly as is), ``"tied"`` (loads once tied aliases are filled by the
        tensor they share: ``strict=False``, or Hugging Face's loader, which re-ties) or ``"mismatch"``.

        Example:
            >>> w = {"w": TensorRecord("w", "float32", (2,))}
            >>> v = {"v": TensorRecord("v", "float32", (2,))}
            >>> compare(w, w).status, compare(w, w | v, {"v": "w"}).status, compare({}, w).status
            ('ok', 'tied', 'mismatch')
        """
        if self.ok:
            return "ok"
        return "tied" if self.complete else "mismatch"

    def counts(self) -> dict[str, int]:
        return {
            "matched": len(self.matched),
            "missing": len(self.missing),
            "unexpected": len(self.unexpected),
            "shape_mismatched": len(self.shape_mismatched),
            "tied": len(self.tied),
            "dtype_differences": len(self.dtype_differences),
        }


@dataclass(frozen=True)
class FilterIdiom:
    """What ``{k: v for k, v in sd.items() if k in model_sd}`` keeps, and how many of those misfit."""

    kept: int
    wrong_shape: int
    source_total: int

    @property
    def fits(self) -> int:
        return self.kept - self.wrong_shape

    def to_dict(self) -> dict[str, int]:
        return {"kept": self.kept, "wrong_shape": self.wrong_shape, "source_total": self.source_total}


def compare(
    source: Mapping[str, TensorRecord],
    target: Mapping[str, TensorRecord],
    tied: Mapping[str, str] | None = None,
    origin: Mapping[str, str] | None = None,
) -> Comparison:
    """Compare ``source`` (names as they would be loaded) with ``target`` (name -> record).

    ``tied`` maps target aliases to their canonical name; ``origin`` maps a source name back to
    its key in the file (for reporting shape mismatches after a rename).

    Example:
        >>> src = {"fc.weight": TensorRecord("fc.weight", "float32", (6, 4))}
        >>> tgt = {"fc.weight": TensorRecord("fc.weight", "float32", (2, 4))}
        >>> compare(src, tgt).shape_mismatched[0].target_shape
        (2, 4)
    """
    origin = origin or {}
    matched: list[str] = []
    missing: list[str] = []
    mismatched: list[ShapeMismatch] = []
    dtypes: list[DtypeDifference] = []
    for name, trec in target.items():
        srec = source.get(name)
        if srec is None:
            missing.append(name)
        elif tuple(srec.shape) != tuple(trec.shape):
            mismatched.append(
                ShapeMismatch(name, tuple(srec.shape), tuple(trec.shape), origin.get(name, name))
            )
        else:
            matched.append(name)
            if srec.dtype != trec.dtype:
                dtypes.append(DtypeDifference(name, srec.dtype, trec.dtype))
    unexpected = [name for name in source if name not in target]
    satisfied = _satisfied_aliases(set(matched), set(missing), tied or {})
    missing = [name for name in missing if name not in satisfied]
    return Comparison(
        tuple(matched), tuple(missing), tuple(unexpected), tuple(mismatched), tuple(dtypes), satisfied
    )


def _satisfied_aliases(matched: set[str], missing: set[str], tied: Mapping[str, str]) -> dict[str, str]:
    """Missing members of a tied group whose other member the file holds: name -> held name."""
    groups: dict[str, list[str]] = {}
    for alias, canonical in tied.items():
        groups.setdefault(canonical, [canonical]).append(alias)
    satisfied: dict[str, str] = {}
    for members in groups.values():
        held = next((m for m in members if m in matched), None)
        if held is None:
            continue
        for member in members:
            if member in missing:
                satisfied[member] = held
    return satisfied


def filter_idiom(source: Mapping[str, TensorRecord], target: Mapping[str, TensorRecord]) -> FilterIdiom:
    """Count what ``{k: v for k, v in sd.items() if k in model_sd}`` keeps, and its misfits.

    Example:
        >>> r = lambda *s: TensorRecord("x", "float32", s)
        >>> filter_idiom({"a": r(2), "b": r(3)}, {"a": r(2), "b": r(4)})
        FilterIdiom(kept=2, wrong_shape=1, source_total=2)
    """
    kept = [name for name in source if name in target]
    wrong = sum(1 for name in kept if tuple(source[name].shape) != tuple(target[name].shape))
    return FilterIdiom(len(kept), wrong, len(source))
