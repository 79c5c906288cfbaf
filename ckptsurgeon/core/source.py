"""A checkpoint opened for surgery: the file, the weights chosen in it, and how it was read."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..formats import ReadOptions, open_checkpoint
from .checkpoint import Checkpoint, StateDictCandidate
from .record import TensorRecord


@dataclass(frozen=True)
class Source:
    """An opened checkpoint, the weights chosen in it, and how it was read (``read_options``:
    the globals it was allowed, which verification of an output then allows too)."""

    checkpoint: Checkpoint
    weights: StateDictCandidate
    read_options: ReadOptions = field(default_factory=ReadOptions)

    @property
    def verify_options(self) -> ReadOptions:
        """How to reopen an output to verify it: the source's ``--allow-global`` classes (the
        output holds them as they were read), never full trust.

        Example:
            >>> read = ReadOptions(allow_globals=frozenset({"mylib.Config"}), unsafe=True)
            >>> checking = Source(None, None, read).verify_options
            >>> checking.allow_globals, checking.unsafe
            (frozenset({'mylib.Config'}), False)
        """
        return ReadOptions(allow_globals=self.read_options.allow_globals)

    @property
    def tensors(self) -> dict[str, TensorRecord]:
        return self.weights.tensors


def open_source(
    path: str | os.PathLike[str], key: str | None = None, read_options: ReadOptions | None = None
) -> Source:
    """Open any checkpoint and choose its weights (``key``: a dotted entry, else the default).

    Example:
        >>> src = open_source("fixtures/resnet_dp_6.pth")
        >>> src.weights.key, len(src.tensors)
        ('', 122)
    """
    ckpt = open_checkpoint(path, read_options)
    return Source(ckpt, ckpt.weights(key), read_options or ReadOptions())
