"""What a checkpoint is diffed against: another checkpoint, an inspect JSON, or an architecture.

An architecture is a call expression such as ``torchvision.models.resnet50(num_classes=2)`` or
``path/to/models.py:build(num_classes=2)``; :mod:`ckptsurgeon.diffing.architecture` parses and builds it
on the meta device. This module holds the :class:`Target` every diff compares with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.record import TensorRecord
from ..errors import TargetError
from .architecture import build_module, stat_error

if TYPE_CHECKING:  # pragma: no cover
    from ..formats import ReadOptions


@dataclass(frozen=True)
class Target:
    """The tensors a source must fit, with what is known about the model behind them.

    ``tied``: alias -> canonical name for tensors that are one parameter (``lm_head.weight``
    is ``transformer.wte.weight``). ``buffers``: names that are buffers, not parameters.
    ``modules``: module name -> class name, in definition order (architectures only).
    ``notes``: what the report should say about how the target was made (a CPU build).

    Example:
        >>> t = Target({"fc.weight": TensorRecord("fc.weight", "float32", (2, 4))}, "fc only")
        >>> t.shapes()
        {'fc.weight': (2, 4)}
    """

    tensors: dict[str, TensorRecord]
    description: str
    kind: str = "checkpoint"  # "checkpoint" | "architecture" | "inspect-json" | "mapping"
    tied: dict[str, str] = field(default_factory=dict)
    buffers: frozenset[str] = frozenset()
    modules: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape for every target tensor."""
        return {name: rec.shape for name, rec in self.tensors.items()}


def resolve_target(spec: str, read_options: ReadOptions | None = None, key: str | None = None) -> Target:
    """Turn a TARGET argument into a :class:`Target`.

    A spec is an existing path (any checkpoint, or JSON printed by ``ckpt inspect --format json``)
    or an architecture call expression. ``key`` picks the entry of a nested target checkpoint
    (by default chosen as ``inspect`` chooses it).

    Example:
        >>> t = resolve_target("fixtures/models.py:vgg_like(num_classes=2)")   # doctest: +SKIP
        >>> t.tensors["classifier.6.weight"].shape                             # doctest: +SKIP
        (2, 64)
    """
    spec = spec.strip()
    if not spec:
        raise TargetError(
            "the target is empty; name a checkpoint or a call such as 'models.py:build(num_classes=2)'"
        )
    from ..fileio.remote import is_remote

    if is_remote(spec) and "(" not in spec:
        return _from_checkpoint(spec, read_options, key)
    path = Path(spec)
    if "(" not in spec or stat_error(path) is None:
        return _from_path(path, read_options, key)
    if key is not None:
        raise TargetError(f"{spec}: --target-key applies to a target checkpoint, not to an architecture")
    model, notes = build_module(spec)
    return replace(target_from_module(model, spec, "architecture"), notes=notes)


def target_from_module(model: Any, description: str = "model", kind: str = "architecture") -> Target:
    """A :class:`Target` for a live (or meta) ``nn.Module``: its state dict, tied names, buffers, modules.

    Example:
        >>> import torch                                               # doctest: +SKIP
        >>> target_from_module(torch.nn.Linear(4, 2)).shapes()          # doctest: +SKIP
        {'weight': (2, 4), 'bias': (2,)}
    """
    state = model.state_dict(keep_vars=True)
    tensors: dict[str, TensorRecord] = {}
    tied: dict[str, str] = {}
    first_name: dict[int, str] = {}
    param_ids = {id(p) for p in model.parameters()}
    for name, tensor in state.items():
        record = replace(TensorRecord.from_torch(name, tensor), is_parameter=id(tensor) in param_ids)
        tensors[name] = record
        canonical = first_name.setdefault(id(tensor), name)
        if canonical != name:
            tied[name] = canonical
    buffers = frozenset(name for name, rec in tensors.items() if not rec.is_parameter)
    modules = {name: type(module).__name__ for name, module in model.named_modules()}
    return Target(tensors, description, kind, tied, buffers, modules)


def target_from_records(tensors: Mapping[str, TensorRecord], description: str, kind: str) -> Target:
    """A :class:`Target` for records: tensors viewing the same bytes are recorded as tied.

    Example:
        >>> target_from_records({"a": TensorRecord("a", "float32", (1,))}, "x", "mapping").tied
        {}
    """
    tied: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...] | None], str] = {}
    for name, rec in tensors.items():
        if rec.storage is None:
            continue
        view = (id(rec.storage), rec.storage_offset, rec.shape, rec.stride)
        canonical = seen.setdefault(view, name)
        if canonical != name:
            tied[name] = canonical
    return Target(dict(tensors), description, kind, tied)


# -- checkpoints and inspect JSON -----------------------------------------------------------------
def _from_path(path: Path, read_options: ReadOptions | None, key: str | None = None) -> Target:
    problem = stat_error(path)
    if problem is not None:
        raise TargetError(
            f"{path}: {problem}, and not a call expression such as "
            "'torchvision.models.resnet50(num_classes=2)' or 'models.py:build(num_classes=2)'"
        )
    if path.suffix == ".json" and not path.name.endswith(".index.json") and path.is_file():
        document = _read_json(path)
        if isinstance(document, dict) and "tensors" in document:
            return _from_inspect_json(path, document)
        raise TargetError(
            f"{path}: a JSON target must be what `ckpt inspect --format json` prints "
            "(an object with a 'tensors' list); this file is not"
        )
    return _from_checkpoint(path, read_options, key)


def _from_checkpoint(path: Path | str, read_options: ReadOptions | None, key: str | None) -> Target:
    """A checkpoint target (local or remote), its records read from headers only."""
    from ..formats import ReadOptions, open_checkpoint

    only_headers = replace(read_options or ReadOptions(), headers_only=True)
    candidate = open_checkpoint(path, only_headers).weights(key)
    where = f" [{candidate.key}]" if candidate.key else ""
    return target_from_records(candidate.tensors, f"{path}{where}", "checkpoint")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _from_inspect_json(path: Path, document: dict[str, Any]) -> Target:
    tensors: dict[str, TensorRecord] = {}
    entries = document["tensors"]
    if not isinstance(entries, list):
        raise TargetError(
            f"{path}: 'tensors' is not a list; give JSON printed by `ckpt inspect --format json`"
        )
    for index, entry in enumerate(entries):
        try:
            name, dtype = str(entry["name"]), str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise TargetError(
                f"{path}: tensors[{index}] lacks a name, dtype or shape; give JSON printed by "
                "`ckpt inspect --format json`"
            ) from None
        tensors[name] = TensorRecord(name, dtype, shape)
    return Target(tensors, str(path), "inspect-json")
