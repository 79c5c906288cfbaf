"""Placeholders: data-only objects from a pickle, rebuilt without importing their modules.

:class:`Reduced` keeps an object as the recipe that rebuilds it (``--allow-global``
classes, ``torch.device``, layouts) and re-pickles exactly; ``pathlib`` paths become
:class:`PathValue`; numpy dtypes and scalars are decoded with :mod:`struct` into
:class:`NumpyDType` and Python numbers that re-pickle as numpy scalars.
:class:`~ckptsurgeon.pickling.safety.DataResolver` builds them. Nothing here imports numpy or torch.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from ..core.bounds import bounded_repr
from .pickles import PickleError


@dataclass(eq=False)
class Reduced:
    """An object kept as the recipe that rebuilds it: ``module.name(*args)`` plus state.

    Used for ``--allow-global`` classes, ``torch.device``, layouts; re-pickled exactly.

    Example:
        >>> Reduced("torch", "device", ("cuda", 0))
        torch.device('cuda', 0)
    """

    module: str
    name: str
    args: tuple = ()
    newobj: bool = False
    state: Any = None
    listitems: list[Any] = field(default_factory=list)
    dictitems: list[tuple[Any, Any]] = field(default_factory=list)

    def __repr__(self) -> str:
        return bounded_repr(self, 200)

    def __bounded_repr__(self, render: Any, add: Any) -> None:
        """``module.name(arg, ...)``, each argument rendered within the caller's budget."""
        add(f"{self.module}.{self.name}(")
        for i, arg in enumerate(self.args):
            if i:
                add(", ")
            render(arg)
        add(")")

    def __bounded_children__(self) -> list[Any]:
        return [*self.args, self.state, *self.listitems, *(part for pair in self.dictitems for part in pair)]

    def _ckpt_build(self, state: Any) -> None:
        self.state = state

    def __ckpt_reduce__(self) -> tuple[str, str, tuple, dict[str, Any]]:
        extra = {
            "newobj": self.newobj,
            "state": self.state,
            "listitems": self.listitems or None,
            "dictitems": self.dictitems or None,
        }
        return self.module, self.name, self.args, extra


class PathValue(Reduced):
    """A pickled ``pathlib`` path, usable as a path (``str()``, ``os.fspath``)."""

    def __str__(self) -> str:
        parts = [str(p) for p in self.args]
        if not parts:
            return "."
        sep = "\\" if "Windows" in self.name else "/"
        head, rest = parts[0], parts[1:]
        return head + (sep if head and not head.endswith(sep) and rest else "") + sep.join(rest)

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"{self.name}({str(self)!r})"

    def __bounded_repr__(self, render: Any, add: Any) -> None:
        add(f"{self.name}(")
        render(str(self))
        add(")")


class NumpyDType(Reduced):
    """``numpy.dtype('f8', False, True)`` with its pickled state (byte order ...)."""

    @property
    def typestr(self) -> str:
        return self.args[0] if self.args and type(self.args[0]) is str else ""

    @property
    def byteorder(self) -> str:
        order = self.state[1] if isinstance(self.state, tuple) and len(self.state) > 1 else "<"
        return ">" if order == ">" else "<"

    def __repr__(self) -> str:
        return f"numpy.dtype({bounded_repr(self.typestr, 40)})"

    def __bounded_repr__(self, render: Any, add: Any) -> None:
        add(repr(self))


class _NumpyValue:
    """Mixin for numpy scalars rebuilt as Python numbers that re-pickle as numpy scalars."""

    np_dtype: NumpyDType
    raw: bytes
    scalar_module: str

    def __ckpt_reduce__(self) -> tuple[str, str, tuple, dict[str, Any]]:
        return self.scalar_module, "scalar", (self.np_dtype, self.raw), {}


class NumpyInt(_NumpyValue, int):
    """A numpy integer scalar, as a Python ``int``."""


class NumpyFloat(_NumpyValue, float):
    """A numpy floating scalar, as a Python ``float``."""


class NumpyComplex(_NumpyValue, complex):
    """A numpy complex scalar, as a Python ``complex``."""


class NumpyBool(_NumpyValue, int):
    """A numpy bool scalar (an ``int`` 0/1 that prints as True/False)."""

    def __repr__(self) -> str:
        return repr(bool(self))


class NumpyScalar(Reduced):
    """A numpy scalar of another kind (strings, datetimes ...), kept as dtype + raw bytes."""


_NUMPY_STRUCT = {
    "f2": "e",
    "f4": "f",
    "f8": "d",
    "i1": "b",
    "i2": "h",
    "i4": "i",
    "i8": "q",
    "u1": "B",
    "u2": "H",
    "u4": "I",
    "u8": "Q",
    "b1": "?",
    "c8": "ff",
    "c16": "dd",
}


def numpy_scalar(module: str, dtype: Any, raw: Any) -> Any:
    """Decode ``numpy.core.multiarray.scalar(dtype, raw)`` with :mod:`struct`, no numpy.

    Example:
        >>> d = NumpyDType("numpy", "dtype", ("f8", False, True))
        >>> numpy_scalar("numpy.core.multiarray", d, struct.pack("<d", 1.5))
        1.5
    """
    if not isinstance(dtype, NumpyDType) or not isinstance(raw, bytes | str):
        raise PickleError("malformed pickle (a numpy scalar without a dtype and bytes)")
    raw = raw.encode("latin-1") if isinstance(raw, str) else raw
    code = _NUMPY_STRUCT.get(dtype.typestr)
    if code is None or struct.calcsize(code) != len(raw):
        return NumpyScalar(module, "scalar", (dtype, raw))
    values = struct.unpack(dtype.byteorder + code, raw)
    kind = dtype.typestr[0]
    cls: type = {"f": NumpyFloat, "c": NumpyComplex, "b": NumpyBool}.get(kind, NumpyInt)
    value = cls(complex(*values)) if kind == "c" else cls(values[0])
    value.np_dtype, value.raw, value.scalar_module = dtype, raw, module
    return value
