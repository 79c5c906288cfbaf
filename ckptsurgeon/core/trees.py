"""The checkpoint tree around the weights, rebuilt with new weights.

A ``.pth`` rewrite keeps everything a training checkpoint holds besides the weights
(epoch, optimizer, hyper-parameters) and the nesting exactly as it was; only the chosen
weights entry is replaced. The walk over a tree is :mod:`ckptsurgeon.core.walk`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .checkpoint import resolve_key
from .record import TensorRecord
from .walk import leaves

if TYPE_CHECKING:  # pragma: no cover
    from ..surgery.plan import Plan
    from .source import Source


def rebuilt_tree(source: Source, tensors: dict[str, TensorRecord], plan: Plan | None = None) -> Any:
    """The checkpoint's tree with ``tensors`` in place of the chosen weights entry (all else kept).

    The weights keep their container type and torch's ``_metadata`` (module versions), with
    module names renamed as ``plan`` renames the tensors.

    Example:
        >>> rebuilt_tree(src, {"fc.weight": rec})                      # doctest: +SKIP
        {'epoch': 3, 'state_dict': {'fc.weight': ...}, 'optimizer': {...}}
    """
    key = source.weights.key
    node = resolve_key(source.checkpoint.tree, key)
    weights = weights_node(node, tensors, plan)
    if key == "":
        return weights
    return _substitute(source.checkpoint.tree, node, weights)


def weights_node(original: Any, tensors: dict[str, TensorRecord], plan: Plan | None) -> Any:
    """``tensors`` in the container type of ``original``, with its ``_metadata`` renamed by ``plan``.

    Example:
        >>> weights_node({}, {"w": TensorRecord("w", "float32", (1,))}, None)["w"].shape
        (1,)
    """
    metadata = getattr(original, "_metadata", None)
    # a dict, or a copy of original's dict subclass (an OrderedDict), which can carry attributes
    node: Any = _copy_dict(original, dict(tensors)) if isinstance(original, dict) else dict(tensors)
    if isinstance(metadata, dict) and hasattr(node, "__dict__"):
        node._metadata = type(metadata)(_renamed_modules(metadata, plan))
    return node


def weights_payload(
    source: Source, tensors: dict[str, TensorRecord], plan: Plan | None, holds_tree: bool
) -> Any:
    """What a weights-only output holds: the bare records (safetensors), or the weights entry's
    container with its ``_metadata`` when the format ``holds_tree`` (``.pth``).

    Example:
        >>> weights_payload(src, src.tensors, None, holds_tree=False) is src.tensors   # doctest: +SKIP
        True
    """
    if not holds_tree:
        return tensors
    return weights_node(resolve_key(source.checkpoint.tree, source.weights.key), tensors, plan)


def _renamed_modules(metadata: dict[str, Any], plan: Plan | None) -> dict[str, Any]:
    """Module names (``_metadata`` keys) renamed the way the plan renames their tensors."""
    if plan is None or plan.is_identity:
        return dict(metadata)
    modules: dict[str, str] = {}
    for e in plan.entries:
        if e.new is None:
            continue
        old, new = e.old.split(".")[:-1], e.new.split(".")[:-1]
        while True:
            modules.setdefault(".".join(old), ".".join(new))
            if not old or not new or old[-1] != new[-1]:
                break
            old, new = old[:-1], new[:-1]
    out: dict[str, Any] = {}
    for name, value in metadata.items():
        if name in modules and modules[name] not in out:
            out[modules[name]] = value
    return out


def _substitute(node: Any, old: Any, new: Any) -> Any:
    if node is old:
        return new
    if isinstance(node, dict):
        return _copy_dict(node, {k: _substitute(v, old, new) for k, v in node.items()})
    if isinstance(node, list):
        return [_substitute(v, old, new) for v in node]
    if type(node) is tuple:
        return tuple(_substitute(v, old, new) for v in node)
    return node


def _copy_dict(original: dict[Any, Any], items: dict[Any, Any]) -> dict[Any, Any]:
    if type(original) is dict:
        return items
    try:
        copy = type(original)(items)
        copy.__dict__.update(getattr(original, "__dict__", {}))
        return copy
    except TypeError:
        return items


# -- what else the checkpoint holds -----------------------------------------------------------
def dropped_entries(source: Source) -> list[str]:
    """Top-level entries besides the weights (what a weights-only output leaves out).

    Example:
        >>> dropped_entries(open_source("fixtures/real/lightning_tinynet.ckpt"))[:2]  # doctest: +SKIP
        ['epoch', 'global_step']
    """
    if source.weights.key == "":
        return []
    return [e.key for e in source.checkpoint.top_level(source.weights.key) if e.kind != "weights"]


def optimizer_entries(source: Source) -> list[str]:
    """Top-level entries holding optimizer state (``optimizer``, ``optimizer_states`` ...).

    Example:
        >>> optimizer_entries(open_source("fixtures/real/lightning_tinynet.ckpt"))  # doctest: +SKIP
        ['optimizer_states']
    """
    if source.weights.key == "":
        return []
    return [e.key for e in source.checkpoint.top_level(source.weights.key) if e.kind == "optimizer"]


def has_unread_values(source: Source) -> bool:
    """True when the tree holds placeholders for values the reader did not load (DCP bytes entries).

    Example:
        >>> has_unread_values(open_source("fixtures/resnet_dp_6.pth"))    # doctest: +SKIP
        False
    """
    if source.checkpoint.format != "dcp":
        return False
    from ..formats.dcp import NotLoaded

    return any(isinstance(leaf, NotLoaded) for _path, leaf in leaves(source.checkpoint.tree))
