"""The globals one pickle would import, listed opcode by opcode without executing anything.

:func:`scan_globals` walks a pickle with :func:`pickletools.genops`: nothing is built,
imported or called. ``STACK_GLOBAL`` names are recovered from the strings pushed (or
fetched from the memo) just before it; persistent ids are counted by kind, and a few
telling strings (``_modules``, ``_parameters``) are kept to recognise a pickled model.
``ckpt scan`` (:mod:`ckptsurgeon.pickling.scan`) classifies what it finds; the restricted readers use
it to list every blocked global in one refusal.
"""

from __future__ import annotations

import io
import pickletools
from dataclasses import dataclass, field
from typing import IO, Any

from .pickles import PickleError, PickleTruncated, fix_name


@dataclass
class PickleGlobals:
    """What one pickle names: its globals (``module.name``, in first-use order) and persistent ids."""

    globals: list[str] = field(default_factory=list)
    persistent_kinds: list[str] = field(default_factory=list)
    strings: set[str] = field(default_factory=set)  # telling strings seen ("_modules" ...)
    end: int = 0
    protocol: int = 0


_TELLING = frozenset({"_modules", "_parameters", "_buffers"})
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
)
_MARK_CLOSERS = frozenset(
    {"TUPLE", "LIST", "DICT", "SETITEMS", "APPENDS", "FROZENSET", "ADDITEMS", "POP_MARK", "OBJ"}
)
_PENDING = object()


def scan_globals(source: bytes | memoryview | IO[bytes], start: int = 0) -> PickleGlobals:
    """List every global one pickle would import, executing nothing (``pickletools.genops``).

    ``source`` is the bytes, or an open file (read only up to the pickle's STOP).
    ``STACK_GLOBAL`` names are recovered from the strings pushed (or fetched from the memo)
    just before it. Raises :class:`PickleError` on a malformed pickle.

    Example:
        >>> scan_globals(b"\\x80\\x02cos\\nsystem\\n.").globals
        ['os.system']
    """
    state = _ScanState()
    stream = io.BytesIO(source) if isinstance(source, bytes | bytearray | memoryview) else source
    stream.seek(start)
    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            state.step(opcode.name, arg)
    except Exception as exc:  # genops raises ValueError/EOFError/... on damaged input
        detail = " ".join(str(exc).split())[:120] or exc.__class__.__name__
        if isinstance(exc, EOFError) or detail.startswith(("not enough data", "pickle exhausted")):
            raise PickleTruncated(f"the pickle is truncated ({detail})") from None
        raise PickleError(f"malformed pickle ({detail})") from None
    state.found.end = stream.tell()
    return state.found


class _ScanState:
    """Just enough of the stack to name STACK_GLOBAL imports and persistent id kinds."""

    def __init__(self) -> None:
        self.found = PickleGlobals()
        self.memo: dict[int, Any] = {}
        self.recent: list[Any] = []  # values pushed, as far as a scan can know them (None = unknown)
        self.mark_heads: list[Any] = []  # first string after each open MARK
        self.last_head: Any = None
        self.seen: set[str] = set()  # the globals found, for a constant-time "already listed?"

    def step(self, name: str, arg: Any) -> None:
        recent = self.recent
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            self._add(*fix_name(module, attr))
            recent.append(None)
        elif name == "STACK_GLOBAL":
            pushed_name = recent.pop() if recent else None
            pushed_module = recent.pop() if recent else None
            if isinstance(pushed_module, str) and isinstance(pushed_name, str):
                self._add(*fix_name(pushed_module, pushed_name))
            else:
                self._add("<computed>", "<a global whose name is built at load time>")
            recent.append(None)
        elif name in _STRING_OPS:
            self._push_string(arg)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            self.memo[int(arg)] = recent[-1] if recent else None
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = recent[-1] if recent else None
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            value = self.memo.get(int(arg))
            if isinstance(value, str):
                self._push_string(value)
            else:
                recent.append(value)
        elif name == "MARK":
            self.mark_heads.append(_PENDING)
        elif name in _MARK_CLOSERS:
            self.last_head = self.mark_heads.pop() if self.mark_heads else None
            recent.append(None)
        elif name in ("BINPERSID", "PERSID"):
            kind = arg if name == "PERSID" else self.last_head
            self.found.persistent_kinds.append(kind if isinstance(kind, str) else "<unknown>")
            recent.append(None)
        elif name == "PROTO":
            self.found.protocol = int(arg)
        elif name in ("EXT1", "EXT2", "EXT4"):
            self._add("copyreg", f"<extension code {arg}>")
        elif name not in ("FRAME", "STOP"):
            recent.append(None)
        if len(recent) > 64:
            del recent[:32]

    def _push_string(self, value: Any) -> None:
        self.recent.append(value)
        if value in _TELLING:
            self.found.strings.add(value)
        if self.mark_heads and self.mark_heads[-1] is _PENDING:
            self.mark_heads[-1] = value

    def _add(self, module: str, name: str) -> None:
        full = f"{module}.{name}"
        if full not in self.seen:
            self.seen.add(full)
            self.found.globals.append(full)
