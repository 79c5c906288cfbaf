"""Build a diff target from a call expression, safely: parsed with :mod:`ast`, never ``eval``.

``torchvision.models.resnet50(num_classes=2)``, ``timm.create_model('legacy_xception', num_classes=2)``,
``path/to/models.py:build(num_classes=2)`` and nested calls (``torch.nn.DataParallel(...)``) are
built under ``torch.device("meta")``: no memory for weights, and no download (network use fails
fast). Arguments are Python literals or further calls. A model whose code reads tensor values while
it builds (``torch.arange(...).tolist()``, as torchvision's regnet does) cannot be built on the meta
device: it is built on the CPU instead, weights uninitialised, up to :data:`CPU_BUILD_LIMIT` bytes of
tensors, and the target's ``notes`` say so.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import re
import socket
import sys
from pathlib import Path
from typing import Any

from ..errors import CkptError, TargetError

OPTIONAL_PACKAGES = {"torchvision": "torchvision", "timm": "timm", "transformers": "transformers"}
# Modules whose callables run commands or touch files, never a model factory: refused outright.
REFUSED_MODULES = frozenset(
    [
        "os",
        "sys",
        "subprocess",
        "shutil",
        "builtins",
        "importlib",
        "socket",
        "pathlib",
        "io",
        "pickle",
        "ctypes",
        "runpy",
        "code",
        "pty",
        "signal",
        "multiprocessing",
        "urllib",
        "http",
        "requests",
        "tempfile",
        "glob",
    ]
)
_FILE_CALLEE = re.compile(r"(?P<path>[^\s(),=:'\"]+\.py):(?P<func>[A-Za-z_][\w.]*)\s*(?=\()")


def build_module(spec: str) -> tuple[Any, tuple[str, ...]]:
    """Parse ``spec`` with :mod:`ast` and build the model on the meta device (on the CPU, with a
    note saying so, when its code reads tensor values): ``(module, notes)``.
    :func:`~ckptsurgeon.diffing.target.resolve_target` describes it as a target.

    Example:
        >>> model, notes = build_module("torch.nn.Linear(4, 2)")        # doctest: +SKIP
        >>> model.weight.device, notes                                  # doctest: +SKIP
        (device(type='meta'), ())
    """
    source, files = _replace_file_callees(spec)
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError:
        raise TargetError(
            f"{spec!r}: not a path and not a call expression (e.g. 'models.py:build(num_classes=2)')"
        ) from None
    if not isinstance(tree.body, ast.Call):
        raise TargetError(
            f"{spec!r}: a target expression must be a call, e.g. 'torchvision.models.resnet18()'"
        )
    import torch

    builder = _Builder(spec, files)
    notes: tuple[str, ...] = ()
    try:
        model = _build(builder, tree.body, on_meta=True)
    except _ReadsValues as meta_failure:
        model, note = _build_on_cpu(builder, tree.body, meta_failure.reason)
        notes = (note,)
    if not isinstance(model, torch.nn.Module):
        raise TargetError(f"{spec}: the call returned a {type(model).__name__}, not a torch.nn.Module")
    return model, notes


# Above this many bytes of tensors, a target that cannot be built on the meta device is not built
# on the CPU either (its weights are not initialised, so most pages stay untouched, but still).
CPU_BUILD_LIMIT = 4 * 2**30
# What torch says when code reads the values of a meta tensor (.tolist(), .item(), int(t) ...) or
# mixes it with a tensor it made on the CPU: a CPU build can do both.
_META_VALUE_ERRORS = (
    "meta tensor",
    "meta device",
    "'Meta' backend",
    "device meta",
    "meta and cpu",
    "cpu and meta",
)


class _ReadsValues(Exception):
    """The meta build failed because the code reads tensor values; ``reason`` is torch's message."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _OverBudget(Exception):
    """A CPU build asked for more than :data:`CPU_BUILD_LIMIT` bytes of tensors."""


def _build(builder: _Builder, call: ast.Call, *, on_meta: bool, budget: Any = None) -> Any:
    """Run the call offline: on the meta device, or (``on_meta=False``) on the CPU within ``budget``,
    with weight init skipped either way; a failure becomes a one-line :class:`TargetError`."""
    import torch

    spec = builder.spec
    guard = _NetworkGuard()
    device = torch.device("meta") if on_meta else contextlib.nullcontext()
    try:
        with guard, device, _skip_init(meta_only=on_meta), budget or contextlib.nullcontext():
            return builder.call(call)
    except (CkptError, _OverBudget):
        raise
    except Exception as exc:
        if guard.attempted:
            raise TargetError(
                f"{spec}: building the target tried to reach the network ({guard.attempted}); targets are "
                "built offline, without weights: drop pretrained/weights arguments or use a local checkpoint"
            ) from None
        text = " ".join(str(exc).split())[:300]
        if on_meta and any(marker in text for marker in _META_VALUE_ERRORS):
            raise _ReadsValues(text) from None
        raise TargetError(f"{spec}: building the target failed: {exc.__class__.__name__}: {text}") from None


def _build_on_cpu(builder: _Builder, call: ast.Call, reason: str) -> tuple[Any, str]:
    """Build on the CPU a target whose code reads tensor values; the note says so, and what it took."""
    from ..core.report import human_bytes

    budget = _AllocationBudget(CPU_BUILD_LIMIT)
    why = f"{builder.spec}: cannot be built on the meta device (its code reads tensor values: {reason})"
    try:
        model = _build(builder, call, on_meta=False, budget=budget)
    except _OverBudget:
        raise TargetError(
            f"{why}, and building it on the CPU would take over {human_bytes(CPU_BUILD_LIMIT)}; diff against "
            "a checkpoint of it instead: torch.save(model.state_dict(), 'target.pth') where it builds, "
            "then pass target.pth as TARGET"
        ) from None
    nbytes = _tensor_bytes(model)
    return model, (
        f"{why}; it was built on the CPU instead (weights left uninitialised), which took "
        f"{human_bytes(nbytes)} for its parameters and buffers"
    )


def _tensor_bytes(model: Any) -> int:
    """Bytes of a module's parameters and buffers (shared storages once)."""
    state = model.state_dict(keep_vars=True) if hasattr(model, "state_dict") else {}
    storages: dict[int, int] = {}
    for tensor in state.values():
        storage = tensor.untyped_storage()
        storages[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(storages.values())


class _AllocationBudget:
    """While active, tensor factories (``empty``, ``zeros`` ...) are charged their bytes before they
    allocate; past ``limit`` they raise :class:`_OverBudget` instead."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._mode: Any = None

    def charge(self, nbytes: int) -> None:
        self.used += nbytes
        if self.used > self.limit:
            raise _OverBudget(self.used)

    def __enter__(self) -> _AllocationBudget:
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        factories = {aten.empty, aten.empty_strided, aten.zeros, aten.ones, aten.full, aten.rand, aten.randn}
        budget = self

        class Budget(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                kwargs = kwargs or {}
                if func.overloadpacket in factories and args and isinstance(args[0], list | tuple):
                    dtype = kwargs.get("dtype") or torch.get_default_dtype()
                    numel = 1
                    for size in args[0]:
                        numel *= int(size)
                    budget.charge(numel * dtype.itemsize)
                return func(*args, **kwargs)

        self._mode = Budget()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


# In-place ops that only change values (and every torch.nn.init function): on a meta tensor they
# compute nothing, but torch runs some through Python references that import torch._dynamo on
# first use (about 1 s).
_VALUE_ONLY_INIT_OPS = (
    "normal_",
    "erfinv_",
    "clamp_",
    "clamp_min_",
    "clamp_max_",
    "exponential_",
    "log_normal_",
    "cauchy_",
    "geometric_",
    "random_",
)


def _skip_init(meta_only: bool = True) -> Any:
    """A torch function mode in which weight-init ops on meta tensors (on any tensor, with
    ``meta_only=False``: a CPU build needs shapes, not values) return at once.

    Example:
        >>> with torch.device("meta"), _skip_init():          # doctest: +SKIP
        ...     torch.nn.Embedding(10, 4).weight.shape
        torch.Size([10, 4])
    """
    import torch
    from torch.overrides import TorchFunctionMode

    init = torch.nn.init
    skipped = {getattr(torch.Tensor, name) for name in _VALUE_ONLY_INIT_OPS}
    skipped |= {getattr(init, n) for n in dir(init) if n.endswith("_") and not n.startswith("_")}

    class SkipMetaInit(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            first = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes keywords
            if func in skipped and (getattr(first, "is_meta", False) or not meta_only):
                return first
            return func(*args, **kwargs)

    return SkipMetaInit()


def _replace_file_callees(spec: str) -> tuple[str, dict[str, Path]]:
    """``a/models.py:build(`` -> ``__ckpt_file0__.build(`` so that :mod:`ast` can parse it."""
    files: dict[str, Path] = {}

    def substitute(match: re.Match[str]) -> str:
        alias = f"__ckpt_file{len(files)}__"
        files[alias] = Path(match.group("path")).expanduser()
        return f"{alias}.{match.group('func')}"

    return _FILE_CALLEE.sub(substitute, spec), files


class _Builder:
    """Evaluates the restricted expression: calls of dotted names, literal arguments, nested calls."""

    def __init__(self, spec: str, files: dict[str, Path]) -> None:
        self.spec = spec
        self.files = files
        self.loaded: dict[str, Any] = {}

    def call(self, node: ast.Call) -> Any:
        name = _dotted_name(node.func, self.spec)
        args = [self.value(arg) for arg in node.args]
        kwargs: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                raise TargetError(f"{self.spec}: `**` arguments are not supported; write keyword=value")
            kwargs[keyword.arg] = self.value(keyword.value)
        _refuse_weights(self.spec, self.display(name), kwargs)
        return self.resolve(name)(*args, **kwargs)

    def value(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Starred):
            raise TargetError(f"{self.spec}: `*` arguments are not supported")
        if isinstance(node, ast.Call):
            return self.call(node)
        try:
            return ast.literal_eval(node)
        except ValueError:
            raise TargetError(
                f"{self.spec}: the argument `{ast.unparse(node)}` is neither a Python literal nor a call"
            ) from None

    def resolve(self, dotted: str) -> Any:
        first, *rest = dotted.split(".")
        if first in self.files:
            return _getattr_chain(self._load_file(first), rest, self.display(dotted), self.spec)
        return import_dotted(dotted, self.spec)

    def display(self, dotted: str) -> str:
        """A callee as the user wrote it: ``__ckpt_file0__.build`` -> ``models.py:build``."""
        first, _, rest = dotted.partition(".")
        return f"{self.files[first]}:{rest}" if first in self.files else dotted

    def _load_file(self, alias: str) -> Any:
        if alias not in self.loaded:
            self.loaded[alias] = load_python_file(self.files[alias], self.spec)
        return self.loaded[alias]


def _dotted_name(node: ast.expr, spec: str) -> str:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise TargetError(
            f"{spec}: only calls of dotted names are allowed (e.g. torchvision.models.resnet18)"
        )
    parts.append(node.id)
    return ".".join(reversed(parts))


def _refuse_weights(spec: str, name: str, kwargs: dict[str, Any]) -> None:
    if kwargs.get("pretrained") or kwargs.get("weights") is not None or kwargs.get("pretrained_backbone"):
        raise TargetError(
            f"{spec}: {name} is asked for pretrained weights; a target needs only the architecture: "
            "drop pretrained=/weights= (the checkpoint you diff provides the weights)"
        )
    if name.rsplit(".", 1)[-1] == "from_pretrained" and "Config" not in name:
        raise TargetError(
            f"{spec}: from_pretrained loads weights; diff against the model folder itself, or build it with "
            "from_config(...)"
        )


def import_dotted(dotted: str, spec: str) -> Any:
    """Import the longest importable module prefix of ``dotted`` and fetch the rest as attributes.

    Example:
        >>> import_dotted("json.dumps", "json.dumps()").__name__
        'dumps'
        >>> import_dotted("os.system", "os.system('x')")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ckptsurgeon.errors.TargetError: os.system('x'): os.system is not a model factory; ...
    """
    parts = dotted.split(".")
    if parts[0] in REFUSED_MODULES:
        raise TargetError(f"{spec}: {dotted} is not a model factory; a target calls model-building code only")
    if len(parts) == 1:
        raise TargetError(
            f"{spec}: `{dotted}` needs its module: write pkg.module.{dotted} or file.py:{dotted}"
        )
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == parts[0]:
                local = Path(f"{parts[0]}.py")
                if local.is_file():
                    raise TargetError(
                        f"{spec}: {parts[0]} is not importable; for the file {local} write "
                        f"{local}:{'.'.join(parts[1:])}(...)"
                    ) from None
                package = OPTIONAL_PACKAGES.get(parts[0], parts[0])
                raise TargetError(
                    f"{spec}: install {package} to use this target (`pip install {package}`)"
                ) from None
            if exc.name is not None and not module_name.startswith(exc.name):
                raise TargetError(
                    f"{spec}: importing {module_name} failed: no module named {exc.name!r}"
                ) from None
            continue
        except Exception as exc:
            raise TargetError(
                f"{spec}: importing {module_name} failed: {exc.__class__.__name__}: {exc}"
            ) from None
        return _getattr_chain(module, parts[cut:], dotted, spec)
    raise TargetError(f"{spec}: cannot import {dotted}")


def _getattr_chain(obj: Any, names: list[str], dotted: str, spec: str) -> Any:
    for name in names:
        if not hasattr(obj, name):
            raise TargetError(f"{spec}: {dotted} does not exist (no attribute {name!r})")
        obj = getattr(obj, name)
    if not callable(obj):
        raise TargetError(f"{spec}: {dotted} is not callable")
    return obj


def load_python_file(path: Path, spec: str) -> Any:
    """Load the user's own ``models.py`` as a module (it runs that file, which the user named).

    Example:
        >>> load_python_file(Path("fixtures/models.py"), "x").vgg_like     # doctest: +SKIP
        <function vgg_like at ...>
    """
    problem = stat_error(path)
    if problem is None and not path.is_file():
        problem = "not a file"
    if problem is not None:
        raise TargetError(f"{spec}: {path}: no such Python file ({problem})")
    module_name = f"ckpt_target_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise TargetError(f"{spec}: {path}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    sys.path.insert(0, str(path.resolve().parent))  # its sibling imports work as when run there
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise TargetError(f"{spec}: running {path} failed: {exc.__class__.__name__}: {exc}") from None
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(path.resolve().parent))
    return module


class _NetworkGuard:
    """While active, any attempt to resolve or connect to a host fails at once (and is remembered)."""

    def __init__(self) -> None:
        self.attempted: str = ""
        self._saved: list[tuple[Any, str, Any]] = []

    def _refuse(self, what: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            host = next((a for a in args if isinstance(a, str | tuple)), "")
            self.attempted = self.attempted or f"{what} {host}".strip()
            raise OSError(f"ckpt: network access is disabled while building a target ({what})")

        return refuse

    def __enter__(self) -> _NetworkGuard:
        for owner, attr in (
            (socket, "getaddrinfo"),
            (socket, "create_connection"),
            (socket.socket, "connect"),
        ):
            self._saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, self._refuse(attr))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)
        self._saved.clear()


def stat_error(path: Path) -> str | None:
    """None when ``path`` exists, else why not ("no such file or folder", "File name too long" ...):
    a call expression longer than a file name may be must not crash the test for a path.

    Example:
        >>> stat_error(Path(".")), stat_error(Path("no/such")), stat_error(Path("a" * 300))
        (None, 'no such file or folder', 'File name too long')
        >>> stat_error(Path("a\\0b"))
        'not a valid path'
    """
    try:
        path.stat()
    except FileNotFoundError:
        return "no such file or folder"
    except OSError as exc:
        return exc.strerror or exc.__class__.__name__
    except ValueError:  # an embedded NUL byte
        return "not a valid path"
    return None
