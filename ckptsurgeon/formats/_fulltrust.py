"""Full pickle trust: ``torch.load(weights_only=False)``, only behind ``--unsafe-trust-pickle``.

The zip and legacy readers hand a file here when ``ReadOptions(unsafe=True)``; the live
objects torch builds are turned back into :class:`TensorRecord`s so the rest of
ckptsurgeon sees the same tree as from the restricted readers.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.record import TensorRecord
from ..errors import FormatError

if TYPE_CHECKING:  # pragma: no cover
    from ..core.checkpoint import Checkpoint


def read_unsafe(path: Path, fmt: str) -> Checkpoint:
    """``torch.load(weights_only=False)``: runs the file's code. Only behind --unsafe-trust-pickle."""
    import torch

    from ..core.checkpoint import Checkpoint

    try:
        if fmt == "pickle":
            import pickle

            with open(path, "rb") as fh:
                obj = pickle.load(fh)
        else:
            obj = torch.load(path, weights_only=False, map_location="cpu", mmap=fmt == "torch-zip")
    except Exception as exc:  # whatever the file's own code raises
        detail = " ".join(str(exc).split())[:160]
        hint = ""
        if isinstance(exc, ModuleNotFoundError | AttributeError):
            hint = "; the classes it pickles must be importable: run from their project or set PYTHONPATH"
        raise FormatError(f"{path}: torch.load failed ({exc.__class__.__name__}: {detail}){hint}") from None
    notes = ["opened with --unsafe-trust-pickle (full pickle trust)"]
    if isinstance(obj, torch.nn.Module):
        notes.append(f"a whole pickled {type(obj).__name__} model; showing its state_dict()")
        obj = obj.state_dict()
    return Checkpoint(
        path=path,
        format=fmt,
        tree=_live_to_records(obj, ""),
        files=(path,),
        file_size=os.path.getsize(path),
        notes=notes,
    )


def _live_to_records(node: Any, name: str) -> Any:
    import torch

    if isinstance(node, torch.Tensor):
        return TensorRecord.from_torch(name, node)
    if isinstance(node, dict):
        out = type(node)() if type(node) in (dict, OrderedDict) else {}
        for k, v in node.items():
            out[k] = _live_to_records(v, f"{name}.{k}" if name else str(k))
        return out
    if isinstance(node, list | tuple) and type(node) in (list, tuple):
        return type(node)(_live_to_records(v, f"{name}.{i}" if name else str(i)) for i, v in enumerate(node))
    return node
