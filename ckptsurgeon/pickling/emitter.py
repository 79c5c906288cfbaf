"""A protocol-2 pickle writer for plain data, whose output ``torch.load(weights_only=True)`` accepts.

The torch zip writer (:mod:`ckptsurgeon.formats._torchwriter`) emits a checkpoint's ``data.pkl``
with it; tensor records and placeholders are written by its hook.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class Emitter:
    """A protocol-2 pickle writer for plain data; anything else is handed to ``hook``.

    ``hook(emitter, obj)`` returns True when it wrote ``obj`` itself (tensor records,
    placeholders). Containers and records are memoised, so shared objects stay shared.

    Example:
        >>> import pickle
        >>> e = Emitter(); e.dump({"a": [1, 2.5, None, b"x"]})
        >>> pickle.loads(e.getvalue())
        {'a': [1, 2.5, None, b'x']}
    """

    def __init__(self, hook: Any = None) -> None:
        self.out = bytearray()
        # id(obj) -> (memo index, obj); objects memoised by value (globals, strings) are their own key
        self.memo: dict[Hashable, tuple[int, Any]] = {}
        self.hook = hook

    def getvalue(self) -> bytes:
        return bytes(self.out)

    def dump(self, obj: Any) -> None:
        self.out += b"\x80\x02"
        self.save(obj)
        self.out += b"."

    def save(self, obj: Any) -> None:
        out = self.out
        if obj is None:
            out += b"N"
        elif obj is True:
            out += b"\x88"
        elif obj is False:
            out += b"\x89"
        elif type(obj) is int:
            self.save_int(obj)
        elif type(obj) is float:
            out += b"G" + struct.pack(">d", obj)
        elif type(obj) is str:
            self.save_str(obj)
        elif self._get(obj) or (self.hook is not None and self.hook(self, obj)):
            return
        elif hasattr(obj, "__ckpt_reduce__"):
            module, name, args, kw = obj.__ckpt_reduce__()
            self.save_reduce(module, name, args, obj, **kw)
        elif type(obj).__module__ == "argparse" and type(obj).__name__ == "Namespace":
            self.save_reduce("argparse", "Namespace", (), obj, newobj=True, state=dict(vars(obj)))
        elif type(obj) is tuple:
            self.save_tuple(obj)
        elif type(obj) is list:
            out += b"]"
            self.put(obj)
            self._batch(obj, b"e", pairs=False)
        elif type(obj) is dict:
            out += b"}"
            self.put(obj)
            self._batch(list(obj.items()), b"u", pairs=True)
        elif type(obj) is OrderedDict:
            self.save_reduce(
                "collections", "OrderedDict", (), obj, dictitems=list(obj.items()), state=vars(obj) or None
            )
        elif type(obj) is bytes:
            self.save_reduce("_codecs", "encode", (obj.decode("latin-1"), "latin1"), obj)
        elif type(obj) is bytearray:
            self.save_reduce("builtins", "bytearray", (bytes(obj),), obj)
        elif type(obj) in (set, frozenset):
            self.save_reduce("builtins", type(obj).__name__, (list(obj),), obj)
        elif type(obj) is complex:
            self.save_reduce("builtins", "complex", (obj.real, obj.imag), obj)
        else:
            kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
            raise TypeError(f"cannot write a {kind} into a checkpoint")

    def save_int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + bytes((value,))
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            head = b"\x8a" + bytes((len(raw),)) if len(raw) < 256 else b"\x8b" + struct.pack("<i", len(raw))
            self.out += head + raw

    def save_str(self, value: str) -> None:
        raw = value.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(raw)) + raw

    def save_tuple(self, value: tuple) -> None:
        if not value:
            self.out += b")"
            return
        if len(value) <= 3:
            for item in value:
                self.save(item)
            self.out += bytes((0x84 + len(value),))
        else:
            self.out += b"("
            for item in value:
                self.save(item)
            self.out += b"t"
        self.put(value)

    def save_global(self, module: str, name: str) -> None:
        key = ("global", module, name)
        if self._get(key, by_value=True):
            return
        self.out += b"c" + module.encode("utf-8") + b"\n" + name.encode("utf-8") + b"\n"
        self.put(key, by_value=True)

    def global_ref(self, module: str, name: str) -> bytes | None:
        """The bytes that refer back to the global ``module.name`` (a memo get), once it is
        written; None before. Callers keep them to emit a global again without a lookup.

        Example:
            >>> e = Emitter(); e.save_global("collections", "OrderedDict")
            >>> e.global_ref("collections", "OrderedDict"), e.global_ref("torch", "float32")
            (b'h\\x00', None)
        """
        entry = self.memo.get(("global", module, name))
        if entry is None:
            return None
        index = entry[0]
        return b"h" + bytes((index,)) if index < 256 else b"j" + struct.pack("<I", index)

    def save_reduce(
        self,
        module: str,
        name: str,
        args: tuple,
        obj: Any,
        *,
        newobj: bool = False,
        state: Any = None,
        dictitems: list | None = None,
        listitems: list | None = None,
    ) -> None:
        """``module.name(*args)`` (or ``cls.__new__(cls, *args)``), then items and BUILD state."""
        self.save_global(module, name)
        self.save_tuple(tuple(args))
        self.out += b"\x81" if newobj else b"R"
        if obj is not None:
            self.put(obj)
        if listitems:
            self._batch(listitems, b"e", pairs=False)
        if dictitems:
            self._batch(dictitems, b"u", pairs=True)
        if state is not None:
            self.save(state)
            self.out += b"b"

    def _batch(self, items: list, op: bytes, *, pairs: bool) -> None:
        for start in range(0, len(items), 1000):
            self.out += b"("
            for item in items[start : start + 1000]:
                if pairs:
                    self.save(item[0])
                    self.save(item[1])
                else:
                    self.save(item)
            self.out += op

    def put(self, obj: Any, *, by_value: bool = False) -> None:
        key = obj if by_value else id(obj)
        index = len(self.memo)
        self.memo[key] = (index, obj)  # keep obj alive so its id is not reused
        self.out += b"q" + bytes((index,)) if index < 256 else b"r" + struct.pack("<I", index)

    def _get(self, obj: Any, *, by_value: bool = False) -> bool:
        entry = self.memo.get(obj if by_value else id(obj))
        if entry is None:
            return False
        index = entry[0]
        self.out += b"h" + bytes((index,)) if index < 256 else b"j" + struct.pack("<I", index)
        return True
