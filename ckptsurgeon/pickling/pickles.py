"""A restricted pickle interpreter that never imports or calls anything by itself.

:class:`Unpickler` walks the opcodes of a pickle (protocols 0-5) with a plain
value stack. Everything that could run code in :mod:`pickle` -- looking up a
global, calling it (``REDUCE``/``NEWOBJ``), ``BUILD``, persistent ids -- is
handed to a *resolver* object, which decides what the global means (see
:mod:`ckptsurgeon.pickling.safety` and :mod:`ckptsurgeon.formats.torchzip`). A resolver
that only knows data-only names can never execute the file's code.

:func:`~ckptsurgeon.pickling.globalscan.scan_globals` lists the globals a pickle names without
building anything; :class:`~ckptsurgeon.pickling.emitter.Emitter` writes pickles.
"""

from __future__ import annotations

import _compat_pickle
import struct
from typing import Any, Protocol

from ..core.bounds import BoundError, check_depth, check_keys

_unpack_from = struct.unpack_from
_u32 = struct.Struct("<I").unpack_from  # compiled once: the loop's most frequent argument


class PickleError(Exception):
    """The pickle is malformed (truncated, bad opcode, stack underflow ...); the message is one line."""


class PickleUnsupported(PickleError):
    """A well-formed pickle holding something ckptsurgeon does not read (sparse tensors ...)."""


class PickleTruncated(PickleError):
    """The data ends before the pickle's STOP opcode (a reader may retry with more bytes)."""


_TRUNCATED = "the pickle is truncated (it ends before its STOP opcode)"


class BlockedGlobal(Exception):
    """A resolver refuses a global; the reader then lists every blocked global at once."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Resolver(Protocol):
    """What a pickle's imports and calls mean (the only place meaning is given to them)."""

    def find_global(self, module: str, name: str) -> Any: ...
    def persistent_load(self, pid: Any) -> Any: ...
    def call(self, func: Any, args: tuple) -> Any: ...
    def new(self, cls: Any, args: tuple, kwargs: dict) -> Any: ...
    def build(self, inst: Any, state: Any) -> None: ...


def fix_name(module: str, name: str) -> tuple[str, str]:
    """Map Python 2 names (``__builtin__.eval``) to Python 3 ones, as pickle does.

    Example:
        >>> fix_name("__builtin__", "set")
        ('builtins', 'set')
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _long(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True)


# BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8, BINSTRING, SHORT_BINSTRING
_BYTES_OPS = frozenset({0x42, 0x43, 0x8E, 0x96, 0x54, 0x55})
# Protocol 0 text arguments: INT LONG FLOAT STRING UNICODE GET PUT PERSID
_TEXT_OPS = frozenset({0x49, 0x4C, 0x46, 0x53, 0x56, 0x67, 0x70, 0x50})


class Unpickler:
    """Interpret one pickle in ``data`` starting at ``start``; ``load()`` returns the object.

    After ``load()``, ``self.pos`` is the offset just past the STOP opcode.

    Example:
        >>> Unpickler(b"\\x80\\x02K\\x07.", resolver=None).load()
        7
    """

    def __init__(self, data: bytes | bytearray | memoryview, resolver: Resolver, *, start: int = 0) -> None:
        self.data = data
        self.resolver = resolver
        self.pos = start
        self.memo: dict[int, Any] = {}

    def load(self) -> Any:
        """The object, once its containers are known to nest at most ``bounds.MAX_DEPTH`` deep."""
        try:
            result = self._run()
            check_depth(result)
            return result
        except PickleError:
            raise
        except BlockedGlobal:
            raise
        except BoundError as exc:
            raise PickleError(f"the pickle holds {exc}") from None
        except (IndexError, struct.error) as exc:
            if self.pos >= len(self.data) or isinstance(exc, struct.error):
                raise PickleTruncated(_TRUNCATED) from None
            raise PickleError(f"malformed pickle (stack underflow near byte {self.pos})") from None
        except KeyError as exc:
            raise PickleError(f"malformed pickle (memo entry {exc} is used before it is set)") from None
        except UnicodeDecodeError:
            raise PickleError(
                f"malformed pickle (a string near byte {self.pos} is not valid UTF-8)"
            ) from None
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            detail = " ".join(str(exc).split())[:120]
            raise PickleError(
                f"malformed pickle near byte {self.pos} ({exc.__class__.__name__}: {detail})"
            ) from None
        except RecursionError:
            raise PickleError("malformed pickle (nested too deeply)") from None

    # The loop is one long if-chain on ints, most frequent opcodes first: a 20,000-tensor
    # state dict is about 620,000 opcodes (torch.save's: 160,000 LONG_BINPUTs, 100,000 each of
    # BININT1 and BINGET). ``here`` is the offset just past the current opcode; it becomes
    # ``self.pos`` (what error messages name) only when something raises, not once per opcode.
    def _run(self) -> Any:
        data = self.data
        end = len(data)
        memo = self.memo
        res = self.resolver
        stack: list[Any] = []
        metastack: list[list[Any]] = []
        append = stack.append
        pos = here = self.pos
        try:
            while True:
                if pos >= end:
                    self.pos = here = pos
                    raise PickleTruncated(_TRUNCATED)
                op = data[pos]
                pos += 1
                here = pos
                if op == 0x72:  # LONG_BINPUT: torch's most frequent opcode
                    memo[_u32(data, pos)[0]] = stack[-1]
                    pos += 4
                elif op == 0x4B:  # BININT1
                    append(data[pos])
                    pos += 1
                elif op == 0x68:  # BINGET
                    append(memo[data[pos]])
                    pos += 1
                elif op == 0x28:  # MARK
                    metastack.append(stack)
                    stack = []
                    append = stack.append
                elif op == 0x58:  # BINUNICODE
                    n = _u32(data, pos)[0]
                    pos += 4
                    chunk = data[pos : pos + n]
                    if len(chunk) != n:
                        raise PickleTruncated(_STRING_TRUNCATED)
                    append(str(chunk, "utf-8", "surrogatepass"))
                    pos += n
                elif op == 0x74:  # TUPLE
                    items = stack
                    stack = metastack.pop()
                    append = stack.append
                    append(tuple(items))
                elif op == 0x52:  # REDUCE
                    args = stack.pop()
                    stack[-1] = res.call(stack[-1], args if type(args) is tuple else _as_tuple(args))
                elif op == 0x51:  # BINPERSID
                    stack[-1] = res.persistent_load(stack[-1])
                elif op == 0x86:  # TUPLE2
                    stack[-2:] = [(stack[-2], stack[-1])]
                elif op == 0x89:
                    append(False)
                elif op == 0x29:  # EMPTY_TUPLE
                    append(())
                elif op == 0x85:  # TUPLE1
                    stack[-1] = (stack[-1],)
                elif op == 0x71:  # BINPUT
                    memo[data[pos]] = stack[-1]
                    pos += 1
                elif op == 0x8C or op == 0x8D:  # SHORT_BINUNICODE, BINUNICODE8
                    n, pos = _length(data, pos, op)
                    append(str(_take(data, pos, n), "utf-8", "surrogatepass"))
                    pos += n
                elif op == 0x87:  # TUPLE3
                    stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
                elif op == 0x88:
                    append(True)
                elif op == 0x4E:
                    append(None)
                elif op == 0x6A:  # LONG_BINGET
                    append(memo[_u32(data, pos)[0]])
                    pos += 4
                elif op == 0x94:  # MEMOIZE
                    memo[len(memo)] = stack[-1]
                elif op == 0x4D:  # BININT2
                    append(_unpack_from("<H", data, pos)[0])
                    pos += 2
                elif op == 0x4A:  # BININT
                    append(_unpack_from("<i", data, pos)[0])
                    pos += 4
                elif op == 0x47:  # BINFLOAT
                    append(_unpack_from(">d", data, pos)[0])
                    pos += 8
                elif op == 0x7D:
                    append({})
                elif op == 0x5D:
                    append([])
                elif op == 0x75 or op == 0x73:  # SETITEMS, SETITEM
                    if op == 0x75:
                        items = stack
                        stack = metastack.pop()
                        append = stack.append
                        if len(items) % 2:
                            raise ValueError("odd number of items for SETITEMS")
                    else:
                        items = stack[-2:]
                        if len(items) != 2:
                            raise IndexError("SETITEM")
                        del stack[-2:]
                    _setitems(stack[-1], items, res)
                elif op == 0x65 or op == 0x61:  # APPENDS, APPEND
                    if op == 0x65:
                        items = stack
                        stack = metastack.pop()
                        append = stack.append
                    else:
                        items = [stack.pop()]
                    _extend(stack[-1], items, res)
                elif op == 0x63 or op == 0x93 or op == 0x69:  # GLOBAL, STACK_GLOBAL, INST
                    if op == 0x93:
                        name = stack.pop()
                        module = stack.pop()
                        if type(module) is not str or type(name) is not str:
                            raise PickleError("malformed pickle (STACK_GLOBAL needs two strings)")
                    else:
                        module, pos = _line(data, pos)
                        name, pos = _line(data, pos)
                    here = pos
                    found = res.find_global(*fix_name(module, name))
                    if op == 0x69:  # INST: instantiate with the marked items
                        items = stack
                        stack = metastack.pop()
                        append = stack.append
                        append(res.new(found, tuple(items), {}))
                    else:
                        append(found)
                elif op == 0x81:  # NEWOBJ
                    args = stack.pop()
                    stack[-1] = res.new(stack[-1], _as_tuple(args), {})
                elif op == 0x92:  # NEWOBJ_EX
                    kwargs = stack.pop()
                    args = stack.pop()
                    if type(kwargs) is not dict:  # dict(pairs) would hash untrusted keys
                        raise PickleError("malformed pickle (NEWOBJ_EX keyword arguments are not a dict)")
                    stack[-1] = res.new(stack[-1], _as_tuple(args), dict(kwargs))
                elif op == 0x6F:  # OBJ
                    items = stack
                    stack = metastack.pop()
                    append = stack.append
                    append(res.new(items[0], tuple(items[1:]), {}))
                elif op == 0x62:  # BUILD
                    state = stack.pop()
                    res.build(stack[-1], state)
                elif op == 0x2E:  # STOP
                    self.pos = pos
                    if len(stack) != 1 or metastack:
                        raise PickleError("malformed pickle (STOP with a stack that is not one object)")
                    return stack[0]
                elif op == 0x80:  # PROTO
                    if data[pos] > 5:
                        raise PickleError(f"unsupported pickle protocol {data[pos]}")
                    pos += 1
                elif op == 0x95:  # FRAME: a length hint only
                    pos += 8
                else:
                    pos = self._rare(op, pos, stack, metastack)
                    stack = self._stack
                    append = stack.append
        except BaseException:
            self.pos = here
            raise

    def _rare(self, op: int, pos: int, stack: list[Any], metastack: list[list[Any]]) -> int:
        """Opcodes torch never writes: protocol 0/1 text forms, bytes, sets, stack tricks."""
        data = self.data
        self._stack = stack
        push = stack.append
        if op in _BYTES_OPS:
            n, pos = _length(data, pos, op)
            raw = bytes(_take(data, pos, n))
            push(bytearray(raw) if op == 0x96 else _py2_str(raw) if op in (0x54, 0x55) else raw)
            return pos + n
        if op == 0x8A or op == 0x8B:  # LONG1, LONG4
            n, pos = _length(data, pos, op)
            push(_long(_take(data, pos, n)))
            return pos + n
        if op in _TEXT_OPS:
            line, pos = _line(data, pos, raw=op == 0x56)
            self._text_op(op, line, stack)
            return pos
        if op == 0x8F:
            push(set())
        elif op == 0x90:  # ADDITEMS
            items = self._pop_mark(metastack)
            target = self._stack[-1]
            if type(target) is not set:
                raise PickleError("malformed pickle (ADDITEMS on something that is not a set)")
            target.update(_flat_keys(items))
        elif op == 0x91:  # FROZENSET
            push_to = self._pop_mark(metastack)
            self._stack.append(frozenset(_flat_keys(push_to)))
        elif op == 0x64 or op == 0x6C:  # DICT, LIST
            items = self._pop_mark(metastack)
            if op == 0x6C:
                self._stack.append(list(items))
            else:
                if len(items) % 2:
                    raise ValueError("odd number of items for DICT")
                self._stack.append(dict(zip(_flat_keys(items[::2]), items[1::2], strict=True)))
        elif op == 0x30:  # POP
            if stack:
                stack.pop()
            else:
                self._pop_mark(metastack)
        elif op == 0x31:  # POP_MARK
            self._pop_mark(metastack)
        elif op == 0x32:  # DUP
            push(stack[-1])
        elif op in (0x82, 0x83, 0x84):  # EXT1, EXT2, EXT4: the copyreg extension registry
            size = {0x82: 1, 0x83: 2, 0x84: 4}[op]
            code = int.from_bytes(_take(data, pos, size), "little")
            raise BlockedGlobal(f"copyreg extension code {code}")
        elif op in (0x97, 0x98):
            raise PickleError("the pickle uses out-of-band buffers (protocol 5), which a file cannot carry")
        else:
            raise PickleError(f"malformed pickle (unknown opcode 0x{op:02x} at byte {pos - 1})")
        return pos

    def _pop_mark(self, metastack: list[list[Any]]) -> list[Any]:
        items = self._stack
        self._stack = metastack.pop()
        return items

    def _text_op(self, op: int, line: str, stack: list[Any]) -> None:
        if op == 0x49:  # INT (also the protocol 0 booleans)
            stack.append((line == "01") if line in ("00", "01") else int(line))
        elif op == 0x4C:
            stack.append(int(line.rstrip("L")))
        elif op == 0x46:
            stack.append(float(line))
        elif op == 0x53:
            stack.append(_unquote(line))
        elif op == 0x56:
            stack.append(line)
        elif op == 0x67:
            stack.append(self.memo[int(line)])
        elif op == 0x70:
            self.memo[int(line)] = stack[-1]
        else:  # PERSID
            stack.append(self.resolver.persistent_load(line))


def _length(data: Any, pos: int, op: int) -> tuple[int, int]:
    """Read the length prefix of a string/bytes/long opcode; return (length, new pos)."""
    if op in (0x8C, 0x43, 0x55, 0x8A):
        return data[pos], pos + 1
    if op in (0x8D, 0x8E, 0x96):
        return _unpack_from("<Q", data, pos)[0], pos + 8
    n = _unpack_from("<I" if op != 0x8B and op != 0x54 else "<i", data, pos)[0]
    if n < 0:
        raise PickleError("malformed pickle (negative length)")
    return n, pos + 4


def _take(data: Any, pos: int, n: int) -> Any:
    chunk = data[pos : pos + n]
    if len(chunk) != n:
        raise PickleTruncated(_STRING_TRUNCATED)
    return chunk


_STRING_TRUNCATED = "the pickle is truncated (a string runs past its end)"


def _line(data: Any, pos: int, raw: bool = False) -> tuple[str, int]:
    end = data.find(b"\n", pos)
    if end < 0:
        raise PickleTruncated("the pickle is truncated (an opcode argument has no end of line)")
    text = bytes(data[pos:end])
    return (text.decode("raw_unicode_escape") if raw else text.decode("utf-8")), end + 1


def _py2_str(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _unquote(line: str) -> str:
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "'\"":
        return line[1:-1].encode("latin-1").decode("unicode_escape")
    raise ValueError("STRING argument is not quoted")


def _as_tuple(args: Any) -> tuple:
    if type(args) is not tuple:
        raise PickleError(f"malformed pickle (call arguments are a {type(args).__name__}, not a tuple)")
    return args


def _flat_keys(keys: Any) -> Any:
    """``keys`` (dict keys, set members), refused when hashing one could be unbounded work
    (:func:`ckptsurgeon.core.bounds.check_key`): a tuple nesting one tuple twice at each of 40 levels
    takes 2**40 steps to hash, a tuple nested a million deep overflows the C stack."""
    return check_keys(keys)


def _setitems(target: Any, items: list[Any], res: Any) -> None:
    if isinstance(target, dict):
        _flat_keys(items[::2])
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]
        return
    setitems = getattr(res, "setitems", None)
    if setitems is None:
        raise PickleError(f"malformed pickle (SETITEMS on a {type(target).__name__})")
    setitems(target, items)


def _extend(target: Any, items: list[Any], res: Any) -> None:
    if type(target) is list:
        target.extend(items)
        return
    extend = getattr(res, "extend", None)
    if extend is None:
        raise PickleError(f"malformed pickle (APPENDS on a {type(target).__name__})")
    extend(target, items)
