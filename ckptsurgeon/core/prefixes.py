"""Wrapper prefixes: the dotted components that DataParallel, torch.compile, Lightning,
FSDP and friends put in front of every key."""

from __future__ import annotations

from collections.abc import Iterable

# Components that wrappers add; found stacked in any order (``_orig_mod.module.``).
KNOWN_WRAPPERS = (
    "module",  # DataParallel / DistributedDataParallel
    "_orig_mod",  # torch.compile
    "model",  # Lightning, many trainers
    "_fsdp_wrapped_module",  # FSDP
    "_checkpoint_wrapped_module",  # activation checkpointing
    "_forward_module",  # Lightning Fabric
)


def shared_prefix(names: Iterable[str]) -> str:
    """The longest run of leading dotted components that every name shares (``""`` if none).

    A name is never consumed whole: at least one component stays.

    Example:
        >>> shared_prefix(["module.fc.weight", "module.fc.bias"])
        'module.fc.'
        >>> shared_prefix(["fc.weight", "conv.weight"])
        ''
    """
    common: list[str] | None = None
    for name in names:
        parts = name.split(".")[:-1]
        if common is None:
            common = parts
            continue
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
        if not common:
            return ""
    return ".".join(common) + "." if common else ""


def wrapper_prefix(names: Iterable[str]) -> str:
    """The stack of known wrapper components that every key starts with (``""`` if none).

    Example:
        >>> wrapper_prefix(["_orig_mod.module.fc.weight", "_orig_mod.module.conv.weight"])
        '_orig_mod.module.'
        >>> wrapper_prefix(["model.features.0.weight", "model.fc.bias"])
        'model.'
    """
    common = shared_prefix(names)
    stack = []
    for part in common.split(".")[:-1] if common else []:
        if part not in KNOWN_WRAPPERS:
            break
        stack.append(part)
    return "".join(p + "." for p in stack)


def common_prefix(names: Iterable[str]) -> str:
    """The dotted prefix every key shares, as far as it is a container of several modules: cut back
    until some key keeps a module name below it, so one module's own ``fc.weight``/``fc.bias`` show
    no prefix. ``""`` for fewer than two keys.

    Example:
        >>> common_prefix(["net.conv.weight", "net.fc.weight", "net.fc.bias"])
        'net.'
        >>> common_prefix(["base_model.model.h.0.q.lora_A.weight", "base_model.model.h.1.q.lora_A.weight"])
        'base_model.model.h.'
        >>> common_prefix(["fc.weight", "fc.bias"]), common_prefix(["net.fc.weight", "net.fc.bias"])
        ('', 'net.')
    """
    names = list(names)
    if len(names) < 2:
        return ""
    parts = shared_prefix(names).split(".")[:-1]
    while parts and all(name.count(".") <= len(parts) for name in names):
        parts.pop()  # every key is a leaf right below it: the prefix names one module, not a container
    return "".join(p + "." for p in parts)
