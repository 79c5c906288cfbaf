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
    "Checkpoint": "ckptsurgeon.core.checkpoint",
    "TensorRecord": "ckptsurgeon.core.record",
    "Storage": "ckptsurgeon.core.record",
    "inspect": "ckptsurgeon.inspection",
    "InspectReport": "ckptsurgeon.inspection",
    "CkptError": "ckptsurgeon.errors",
    "diff": "ckptsurgeon.diffing.result",
    "DiffResult": "ckptsurgeon.diffing.result",
    "compare_values": "ckptsurgeon.diffing.values",
    "ValueDiff": "ckptsurgeon.diffing.values",
    "propose_mapping": "ckptsurgeon.diffing.proposal",
    "Proposal": "ckptsurgeon.diffing.proposal",
    "load_into": "ckptsurgeon.surgery.adapting",
    "scan": "ckptsurgeon.pickling.scan",
    "ScanResult": "ckptsurgeon.pickling.scan",
    "LoadError": "ckptsurgeon.errors",
    "FormatError": "ckptsurgeon.errors",
    "UnsafeCheckpointError": "ckptsurgeon.errors",
    "TargetError": "ckptsurgeon.errors",
    "OutputError": "ckptsurgeon.errors",
    "resolve_target": "ckptsurgeon.diffing.target",
    "convert": "ckptsurgeon.surgery.operations",
    "rename": "ckptsurgeon.surgery.operations",
    "strip_head": "ckptsurgeon.surgery.operations",
    "adapt": "ckptsurgeon.surgery.operations",
    "average": "ckptsurgeon.surgery.averaging",
    "AverageResult": "ckptsurgeon.surgery.results",
    "merge_lora": "ckptsurgeon.surgery.lora",
    "SurgeryResult": "ckptsurgeon.surgery.results",
    "AdaptResult": "ckptsurgeon.surgery.results",
    "WriteResult": "ckptsurgeon.surgery.pipeline",
    "LoadReport": "ckptsurgeon.surgery.adapting",
    "SurgeryError": "ckptsurgeon.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptsurgeon' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
