"""The pickle allowlist: which globals a checkpoint may name, and what each one becomes.

Three kinds of global:

* ``tensor`` -- what ``torch.load(weights_only=True)`` accepts to rebuild tensors: the
  ``torch._utils._rebuild_*`` functions, storage classes, dtypes, ``torch.Size`` ...
* ``data`` -- containers torch also accepts (``collections.OrderedDict``, ``builtins.set``
  ...) and a short list of classes that only hold data, which real training checkpoints
  carry: ``argparse.Namespace`` (torchvision's reference scripts and timm save ``args``),
  numpy scalars and dtypes, ``pathlib`` paths. They are rebuilt without numpy, and
  ``--allow-global mylib.Cls`` adds a class that is kept as an opaque :class:`Reduced`
  placeholder (never imported).
* ``unsafe`` -- everything else: ``builtins.exec``, ``os.system``, ``subprocess.*``, any
  model or user class. Importing or calling them can run code, so the readers refuse.

The placeholder classes (:class:`Reduced`, :class:`PathValue`, the numpy values) live in
:mod:`ckptsurgeon.pickling.placeholders`. Nothing here imports torch or numpy.
"""

from __future__ import annotations

import argparse
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..core.bounds import bounded_repr, check_key, check_keys
from ..errors import UnsafeCheckpointError
from .pickles import BlockedGlobal, PickleError
from .placeholders import NumpyDType, PathValue, Reduced, numpy_scalar

TENSOR, DATA, UNSAFE = "tensor", "data", "unsafe"

_DTYPE_NAMES = (
    "float64 float32 float16 bfloat16 complex32 complex64 complex128 uint8 uint16 uint32 uint64 "
    "int8 int16 int32 int64 bool qint8 quint8 qint32 quint4x2 quint2x4 float8_e5m2 float8_e4m3fn "
    "float8_e5m2fnuz float8_e4m3fnuz float8_e8m0fnu float4_e2m1fn_x2 bits8 bits16 bits1x8 bits2x4 bits4x2 "
    + " ".join(f"uint{i} int{i}" for i in range(1, 8))
).split()
_STORAGE_STEMS = "BFloat16 Bool Byte Char ComplexDouble ComplexFloat Double Float Half Int Long Short"
_QSTORAGE_STEMS = "QInt32 QInt8 QUInt2x4 QUInt4x2 QUInt8"
_TENSOR_STEMS = "BFloat16 Bool Byte Char Double Float Half Int Long Short"
_REBUILDERS = (
    "tensor tensor_v2 tensor_v3 parameter parameter_with_state qtensor sparse_tensor nested_tensor "
    "meta_tensor_no_storage wrapper_subclass device_tensor_from_numpy device_tensor_from_cpu_tensor"
)
_QSCHEMES = "per_tensor_affine per_tensor_symmetric per_channel_affine per_channel_symmetric "
_QSCHEMES += "per_channel_affine_float_qparams"
REBUILD_FUNCTIONS = frozenset(f"torch._utils._rebuild_{n}" for n in _REBUILDERS.split()) | {
    "torch._tensor._rebuild_from_type_v2"
}
DTYPE_GLOBALS = frozenset(f"torch.{n}" for n in _DTYPE_NAMES)
STORAGE_GLOBALS = frozenset(
    [f"torch.{s}Storage" for s in f"{_STORAGE_STEMS} {_QSTORAGE_STEMS}".split()]
    + [f"torch.cuda.{s}Storage" for s in _STORAGE_STEMS.split()]
    + ["torch.storage.TypedStorage", "torch.storage.UntypedStorage"]
)
TENSOR_CLASS_GLOBALS = frozenset(
    [f"torch.{p}{s}Tensor" for p in ("", "cuda.") for s in _TENSOR_STEMS.split()]
    + [f"torch.{p}sparse.{s}Tensor" for p in ("", "cuda.") for s in _TENSOR_STEMS.split() if s != "Bool"]
)
QSCHEME_GLOBALS = frozenset(f"torch.{q}" for q in _QSCHEMES.split())
_TORCH_TYPES = (
    "torch.Size torch.Tensor torch.nn.parameter.Parameter torch.device torch.serialization._get_layout"
)
TORCH_DATA_GLOBALS = frozenset(_TORCH_TYPES.split()) | QSCHEME_GLOBALS
# What torch's weights_only accepts besides tensors: plain containers.
_CONTAINERS = "OrderedDict Counter set frozenset bytearray complex encode"
CONTAINER_GLOBALS = frozenset(
    ("collections." if n[0].isupper() else "_codecs." if n == "encode" else "builtins.") + n
    for n in _CONTAINERS.split()
)
# ckptsurgeon's own data-only additions (documented in the README's Security section).
PATH_CLASSES = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
DATA_ONLY_GLOBALS = frozenset(
    {"argparse.Namespace", "numpy.dtype", "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}
    | {f"pathlib.{c}" for c in PATH_CLASSES}
)
# torch.distributed.checkpoint's .metadata file (which torch reads with plain pickle): dataclasses.
_DCP = (
    "Metadata TensorStorageMetadata BytesStorageMetadata TensorProperties ChunkStorageMetadata MetadataIndex "
    "StorageMeta _MEM_FORMAT_ENCODING"
)
DCP_METADATA_GLOBALS = frozenset(f"torch.distributed.checkpoint.metadata.{n}" for n in _DCP.split()) | {
    "torch.distributed.checkpoint.filesystem._StorageInfo"
}
_CODECS = frozenset({"latin1", "latin-1", "iso-8859-1", "utf-8", "utf8", "ascii"})


# Why a global that only --allow-global accepts counts as data (ckptsurgeon never calls it).
ALLOWED_WHY = "declared data-only with --allow-global (kept as a placeholder)"


@dataclass(frozen=True)
class GlobalVerdict:
    """One global a pickle names, its kind (tensor / data / unsafe) and why.

    Example:
        >>> classify("os.system").kind
        'unsafe'
    """

    name: str
    kind: str
    why: str


def classify(name: str, allow_globals: Iterable[str] = ()) -> GlobalVerdict:
    """Say whether a global (``module.name``) is tensor machinery, data, or able to run code.

    Example:
        >>> classify("torch._utils._rebuild_tensor_v2").kind
        'tensor'
        >>> classify("argparse.Namespace").why
        'a data-only class on the ckptsurgeon allowlist'
    """
    if name in REBUILD_FUNCTIONS:
        return GlobalVerdict(name, TENSOR, "rebuilds a tensor from its stored bytes")
    if name in STORAGE_GLOBALS:
        return GlobalVerdict(name, TENSOR, "a tensor storage type")
    if name in DTYPE_GLOBALS:
        return GlobalVerdict(name, TENSOR, "a tensor dtype")
    if name in TENSOR_CLASS_GLOBALS or name in TORCH_DATA_GLOBALS:
        return GlobalVerdict(name, TENSOR, "a torch type that weights_only accepts")
    if name in CONTAINER_GLOBALS:
        return GlobalVerdict(name, DATA, "a container type that weights_only accepts")
    if name in DATA_ONLY_GLOBALS or is_numpy_dtype_class(name):
        return GlobalVerdict(name, DATA, "a data-only class on the ckptsurgeon allowlist")
    if name in DCP_METADATA_GLOBALS:
        return GlobalVerdict(name, DATA, "torch.distributed.checkpoint metadata (a data class)")
    if name in set(allow_globals):
        return GlobalVerdict(name, DATA, ALLOWED_WHY)
    return GlobalVerdict(name, UNSAFE, _unsafe_reason(name))


def is_numpy_dtype_class(name: str) -> bool:
    """``numpy.dtypes.Float64DType`` and friends (numpy 2 pickles dtype classes by name)."""
    module, _, attr = name.rpartition(".")
    return module == "numpy.dtypes" and attr.endswith("DType") and attr.isidentifier()


def is_model_class(name: str) -> bool:
    """A global that means the file is a whole pickled ``nn.Module``.

    A class from ``__main__`` alone does not: it is as often a config dataclass saved beside
    a state dict; a user model is recognised by the ``_modules``/``_parameters`` it pickles.
    """
    return name.startswith(("torch.nn.modules.", "torch.nn.parallel.", "torch.jit."))


def is_pickled_model(names: Iterable[str], persistent_kinds: Iterable[str], strings: Iterable[str]) -> bool:
    """Whether a pickle holds a whole ``nn.Module``, from what a scan of it found.

    A model class among ``names``, a ``module`` persistent id, or the ``_modules`` and
    ``_parameters`` attribute names among the ``strings`` it pushes.

    Example:
        >>> is_pickled_model(["collections.OrderedDict"], ["storage"], {"_modules", "_parameters"})
        True
    """
    return (
        any(is_model_class(n) for n in names)
        or "module" in persistent_kinds
        or {"_modules", "_parameters"} <= set(strings)
    )


def _unsafe_reason(name: str) -> str:
    module = name.split(".", 1)[0]
    if module in ("os", "posix", "nt", "subprocess", "pty", "shutil"):
        return "runs commands or touches files: can run code"
    if module in ("builtins", "__builtin__", "operator", "functools", "importlib", "runpy", "code", "types"):
        return "a Python builtin or callable: can run code"
    if name.startswith(("torch.nn.modules.", "torch.nn.parallel.")):
        return "a model class: building it runs its code"
    if name.startswith("<computed>") or name.startswith("copyreg.<"):
        return "an import whose name is only known at load time: can run code"
    return "a class or function not on the allowlist: can run code"


# A refusal names this many blocked globals, then how many more (the exception keeps them all).
MAX_NAMED = 20


def refusal(path: Any, blocked: list[str], *, model: bool = False) -> UnsafeCheckpointError:
    """The one-line error for a pickle that names ``blocked`` globals.

    Example:
        >>> refusal("x.pth", ["builtins.exec", "os.system"]).message.split(";")[0]
        'x.pth: refusing to load: the pickle imports builtins.exec, os.system, which can run code'
    """
    shown = blocked[:MAX_NAMED]
    names = ", ".join(shown) + (
        f" and {len(blocked) - len(shown):,} more" if len(blocked) > len(shown) else ""
    )
    if model:
        return UnsafeCheckpointError(
            f"{path}: this file is a whole pickled model object, not a state dict (it imports {names}); "
            "load it with torch.load(weights_only=False) only if you trust it, then save model.state_dict()",
            blocked,
        )
    return UnsafeCheckpointError(
        f"{path}: refusing to load: the pickle imports {names}, which can run code; if a class only holds "
        "data, pass --allow-global MODULE.NAME; if you made this file yourself, pass --unsafe-trust-pickle "
        "(this runs its code)",
        blocked,
    )


# -- resolving data-only globals ------------------------------------------------------------
@dataclass(eq=False)
class GlobalRef:
    """A global's value as it sits on the unpickler stack: what calling/instantiating it makes."""

    module: str
    name: str
    call: Callable[[tuple], Any] | None = None
    new: Callable[[tuple, dict], Any] | None = None
    extra: Any = None  # e.g. the dtype of a storage class

    @property
    def full(self) -> str:
        return f"{self.module}.{self.name}"

    def __repr__(self) -> str:
        return self.full

    def __bounded_repr__(self, render: Callable[[Any], None], add: Callable[[str], None]) -> None:
        add(self.full)

    def __ckpt_reduce__(self) -> tuple[str, str, tuple, dict[str, Any]]:
        raise TypeError(f"{self.full} is a class or function, not data")


class DataResolver:
    """Gives meaning to the data-only globals; readers subclass it to add tensor machinery.

    Every global looked up is remembered in ``used``; anything unknown raises
    :class:`BlockedGlobal` (the reader then lists all blocked globals in one message).
    """

    def __init__(self, allow_globals: Iterable[str] = ()) -> None:
        self.allow_globals = frozenset(allow_globals)
        self.used: set[str] = set()
        self.table: dict[str, GlobalRef] = {}
        for ref in _data_globals():
            self.table[ref.full] = ref

    def find_global(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        self.used.add(full)
        ref = self.table.get(full)
        if ref is not None:
            return ref
        if is_numpy_dtype_class(full):
            return GlobalRef(module, name, call=partial(_reduced_call, module, name))
        if full in self.allow_globals:
            return GlobalRef(
                module,
                name,
                call=partial(_reduced_call, module, name),
                new=partial(_reduced_new, module, name),
            )
        raise BlockedGlobal(full)

    def accepts(self, full: str) -> bool:
        """Whether ``find_global`` gives this global a meaning (everything else is refused)."""
        return full in self.table or is_numpy_dtype_class(full) or full in self.allow_globals

    def persistent_load(self, pid: Any) -> Any:
        raise PickleError("the pickle refers to external objects (persistent ids) it does not carry")

    def call(self, func: Any, args: tuple) -> Any:
        if isinstance(func, GlobalRef) and func.call is not None:
            return func.call(args)
        raise PickleError(
            f"malformed pickle (a call to {bounded_repr(func, 80)}, which cannot be called here)"
        )

    def new(self, cls: Any, args: tuple, kwargs: dict) -> Any:
        if isinstance(cls, GlobalRef) and cls.new is not None:
            return cls.new(args, kwargs)
        raise PickleError(
            f"malformed pickle (an instance of {bounded_repr(cls, 80)}, which cannot be built here)"
        )

    def build(self, inst: Any, state: Any) -> None:
        if isinstance(inst, GlobalRef):  # pickle would set attributes of the class (or function) itself
            raise PickleError(
                f"malformed pickle (BUILD or SETSTATE on the class or function {inst.full} itself, "
                "not on an instance)"
            )
        if hasattr(inst, "_ckpt_build"):
            inst._ckpt_build(state)
            return
        if type(inst) in (OrderedDict, Counter, argparse.Namespace):
            if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
                if not all(isinstance(part, dict | None) for part in state):
                    raise PickleError(
                        f"malformed pickle (BUILD of a {type(inst).__name__} with a non-dict state)"
                    )
                state = {**(state[0] or {}), **(state[1] or {})}
            if not isinstance(state, dict):
                raise PickleError(
                    f"malformed pickle (BUILD of a {type(inst).__name__} with a non-dict state)"
                )
            inst.__dict__.update(_attributes(inst, state))
            return
        raise PickleError(f"malformed pickle (BUILD on a {type(inst).__name__}, which holds no state)")

    def setitems(self, target: Any, items: list[Any]) -> None:
        if not isinstance(target, Reduced):
            raise PickleError(f"malformed pickle (SETITEMS on a {type(target).__name__})")
        target.dictitems.extend(zip(items[::2], items[1::2], strict=True))

    def extend(self, target: Any, items: list[Any]) -> None:
        if not isinstance(target, Reduced):
            raise PickleError(f"malformed pickle (APPENDS on a {type(target).__name__})")
        target.listitems.extend(items)


def _attributes(inst: Any, state: dict[Any, Any]) -> dict[str, Any]:
    """BUILD's attributes for ``inst``: names only, none that shadows what its class defines
    (``items`` on an OrderedDict would break every walk over it)."""
    for name in state:
        if type(name) is not str:
            raise PickleError(
                f"malformed pickle (an attribute name {bounded_repr(name, 40)} that is not a string)"
            )
        if hasattr(type(inst), name):
            raise PickleError(
                f"malformed pickle (BUILD sets {bounded_repr(name, 40)} on a {type(inst).__name__}, "
                "which would hide its own attribute of that name)"
            )
    return state


def _keyed(args: tuple) -> tuple:
    """The arguments of ``OrderedDict(...)``/``Counter(...)``/``set(...)``: keys checked before
    anything hashes them (:func:`ckptsurgeon.core.bounds.check_key`)."""
    _iterable_args(args)
    if args and type(args[0]) in (list, tuple):
        check_keys(args[0])
    return args


def _pairs(args: tuple) -> tuple:
    """``OrderedDict(pairs)``: each pair a 2-tuple whose key is checked before it is hashed."""
    _iterable_args(args)
    if args and type(args[0]) in (list, tuple):
        for pair in args[0]:
            if type(pair) not in (list, tuple) or len(pair) != 2:
                raise PickleError("malformed pickle (an OrderedDict built from something that is not pairs)")
            check_key(pair[0])
    return args


def _data_globals() -> list[GlobalRef]:
    refs = [
        GlobalRef(
            "collections",
            "OrderedDict",
            call=lambda a: OrderedDict(*_pairs(a)),
            new=lambda a, kw: OrderedDict(),
        ),
        GlobalRef("collections", "Counter", call=lambda a: Counter(*_keyed(a)), new=lambda a, kw: Counter()),
        GlobalRef("builtins", "set", call=lambda a: set(*_keyed(a))),
        GlobalRef("builtins", "frozenset", call=lambda a: frozenset(*_keyed(a))),
        GlobalRef("builtins", "bytearray", call=_bytearray),
        GlobalRef("builtins", "complex", call=_complex),
        GlobalRef("_codecs", "encode", call=_encode),
        GlobalRef(
            "argparse",
            "Namespace",
            call=lambda a: argparse.Namespace(),
            new=lambda a, kw: argparse.Namespace(),
        ),
        GlobalRef("numpy", "dtype", call=lambda a: NumpyDType("numpy", "dtype", a)),
        GlobalRef("torch", "Size", call=lambda a: tuple(*_iterable_args(a))),
        GlobalRef("torch", "device", call=lambda a: Reduced("torch", "device", _device_args(a))),
        GlobalRef(
            "torch.serialization",
            "_get_layout",
            call=lambda a: Reduced("torch.serialization", "_get_layout", a),
        ),
    ]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        refs.append(GlobalRef(module, "scalar", call=partial(_numpy_scalar_call, module)))
    for cls in PATH_CLASSES:
        refs.append(GlobalRef("pathlib", cls, call=partial(_path_call, cls), new=partial(_path_new, cls)))
    return refs


def _reduced_call(module: str, name: str, args: tuple) -> Reduced:
    """``module.name(*args)`` kept as data (a :class:`GlobalRef`'s ``call``, bound with ``partial``)."""
    return Reduced(module, name, args)


def _reduced_new(module: str, name: str, args: tuple, kwargs: dict) -> Reduced:
    """``module.name.__new__(*args)`` kept as data (a :class:`GlobalRef`'s ``new``)."""
    return Reduced(module, name, args, newobj=True)


def _numpy_scalar_call(module: str, args: tuple) -> Any:
    return numpy_scalar(module, *args)


def _path_call(cls: str, args: tuple) -> PathValue:
    return PathValue("pathlib", cls, _path_parts(args))


def _path_new(cls: str, args: tuple, kwargs: dict) -> PathValue:
    return PathValue("pathlib", cls, _path_parts(args), newobj=True)


def _iterable_args(args: tuple) -> tuple:
    if len(args) > 1 or (args and not isinstance(args[0], list | tuple | set | frozenset | dict | str)):
        raise PickleError("malformed pickle (a set/Size built from something that is not a sequence)")
    return args


def _device_args(args: tuple) -> tuple:
    """``torch.device(type)``, ``(type, index)`` or ``(index)``, as torch takes them."""
    small = [type(a) is int and -(1 << 63) <= a < 1 << 63 for a in args]
    if (len(args) == 1 and (type(args[0]) is str or small[0])) or (
        len(args) == 2 and type(args[0]) is str and (small[1] or args[1] is None)
    ):
        return args
    raise PickleError(f"malformed pickle (a torch.device of {bounded_repr(args, 60)})")


def _bytearray(args: tuple) -> bytearray:
    if len(args) == 1 and isinstance(args[0], bytes | bytearray):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in _CODECS:
        return bytearray(args[0], args[1])
    if not args:
        return bytearray()
    raise PickleError("malformed pickle (a bytearray built from something that is not bytes)")


def _complex(args: tuple) -> complex:
    if len(args) <= 2 and all(isinstance(a, int | float) for a in args):
        return complex(*args)
    raise PickleError("malformed pickle (a complex number built from something that is not numbers)")


def _encode(args: tuple) -> bytes:
    if len(args) == 2 and isinstance(args[0], str) and str(args[1]).lower() in _CODECS:
        return args[0].encode(args[1])
    if len(args) == 1 and isinstance(args[0], str):
        return args[0].encode("utf-8")
    raise PickleError("malformed pickle (_codecs.encode with arguments other than a string and a text codec)")


def _path_parts(args: tuple) -> tuple:
    if not all(isinstance(a, str) for a in args):
        raise PickleError("malformed pickle (a path built from something that is not strings)")
    return args
