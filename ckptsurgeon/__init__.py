"""ckptsurgeon: inspect PyTorch checkpoints, diff them against a model, and fix them.

The public API is imported lazily, so ``import ckptsurgeon`` does not import torch.

Example:
    >>> import ckptsurgeon
    >>> ckpt = ckptsurgeon.open_checkpoint("fixtures/vgg_1000.pth")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "open_checkpoint": "ckptsurgeon.formats",
    "ReadOptions": "ckptsurgeon.formats",
    "Checkpoint": "ckptsurgeon.checkpoint",
    "TensorRecord": "ckptsurgeon.record",
    "Storage": "ckptsurgeon.record",
    "inspect": "ckptsurgeon.inspection",
    "InspectReport": "ckptsurgeon.inspection",
    "CkptError": "ckptsurgeon.errors",
    "diff": "ckptsurgeon.match",
    "DiffResult": "ckptsurgeon.match",
    "load_into": "ckptsurgeon.loading",
    "scan": "ckptsurgeon.scanning",
    "ScanResult": "ckptsurgeon.scanning",
    "LoadError": "ckptsurgeon.errors",
    "FormatError": "ckptsurgeon.errors",
    "UnsafeCheckpointError": "ckptsurgeon.errors",
    "TargetError": "ckptsurgeon.errors",
    "OutputError": "ckptsurgeon.errors",
    "resolve_target": "ckptsurgeon.target",
    "convert": "ckptsurgeon.api",
    "rename": "ckptsurgeon.api",
    "strip_head": "ckptsurgeon.api",
    "adapt": "ckptsurgeon.api",
    "SurgeryResult": "ckptsurgeon.results",
    "AdaptResult": "ckptsurgeon.results",
    "WriteResult": "ckptsurgeon.pipeline",
    "LoadReport": "ckptsurgeon.loading",
    "SurgeryError": "ckptsurgeon.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptsurgeon' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
