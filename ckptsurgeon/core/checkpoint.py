"""An opened checkpoint: the object tree as saved, with lazy records in place of tensors.

A training checkpoint nests its weights beside optimizer state, epochs and
hyper-parameters. :class:`Checkpoint` finds every tensor-bearing dict in the tree,
chooses the weights the way a user expects (and says which), and sizes each
top-level entry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KeySelectionError
from .bounds import bounded_repr
from .record import TensorRecord
from .walk import named_records

# Entries that usually hold the model's weights, most likely first.
WEIGHT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_state",
    "weights",
    "params",
    "state_dict_ema",
    "model_ema",
    "ema",
    "ema_state_dict",
)
# Path components that mark optimizer or other training state, never the default weights.
TRAINING_STATE_MARKERS = ("optim", "scheduler", "lr_sched", "scaler", "loops", "callbacks")
# Words (between dots and underscores) that name a moving average of the weights.
AVERAGE_WORDS = ("ema", "swa")
# Lightning's WeightAveraging callback saves the averaged weights as ``state_dict`` and moves the
# training weights to ``current_model_state`` (the averager's own counters go to ``averaging_state``).
LIGHTNING_CURRENT = "current_model_state"


@dataclass(frozen=True)
class StateDictCandidate:
    """A tensor-bearing dict found in the tree, and where it is."""

    key: str  # dotted path from the root, "" for the root itself
    tensors: dict[str, TensorRecord]

    @property
    def count(self) -> int:
        return len(self.tensors)

    @property
    def nbytes(self) -> int:
        return unique_nbytes(self.tensors.values())

    @property
    def is_training_state(self) -> bool:
        parts = [p.lower() for p in self.key.split(".")]
        return any(marker in p for p in parts for marker in TRAINING_STATE_MARKERS)


@dataclass(frozen=True)
class AveragedCopy:
    """An entry holding a moving average (EMA, SWA) of the weights, who saved it that way, and
    (when the file says) the entry holding the training weights before averaging."""

    key: str
    saved_by: str
    training_key: str | None = None

    def describe(self) -> str:
        """One line for ``inspect``, with the ``--key`` that selects each copy.

        Example:
            >>> AveragedCopy("state_dict_ema", "an EMA copy").describe()
            "'state_dict_ema' is an EMA copy: --key state_dict_ema"
        """
        from .report import shell_quote

        text = f"{self.key!r} is {self.saved_by}: --key {shell_quote(self.key)}"
        if self.training_key is not None:
            text += (
                f"; the training weights are {self.training_key!r}: --key {shell_quote(self.training_key)}"
            )
        return text


@dataclass(frozen=True)
class TopLevelEntry:
    """One top-level entry of a nested checkpoint, with what it holds."""

    key: str
    kind: str  # "weights", "optimizer", "tensors", "value"
    tensor_count: int
    nbytes: int
    summary: str  # a short repr for plain values ("1", "{'lr': 0.1}")


@dataclass
class Checkpoint:
    """What a reader returns: the tree, the files behind it, and what the reader noticed.

    Example:
        >>> ckpt = Checkpoint(path=Path("m.pth"), format="torch-zip",
        ...                   tree={"fc.weight": TensorRecord("", "float32", (2, 3))})
        >>> list(ckpt.weights().tensors)
        ['fc.weight']
    """

    path: Path
    format: str
    tree: Any
    files: tuple[Path, ...] = ()
    file_size: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    globals_used: tuple[str, ...] = ()
    # (the tree they were found in, the candidates): found once, not once per question (inspect
    # asks five times, and a header of a million entries took 4 s each time)
    _found: tuple[Any, list[StateDictCandidate]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    # -- the weights ------------------------------------------------------------------------
    def candidates(self) -> list[StateDictCandidate]:
        """Every tensor-bearing dict in the tree (outermost ones; their nested dicts are flattened)."""
        if self._found is None or self._found[0] is not self.tree:
            self._found = (self.tree, list(_find_candidates(self.tree, "")))
        return list(self._found[1])

    def weights(self, key: str | None = None) -> StateDictCandidate:
        """The chosen state dict: ``key`` if given (dotted path), else the most likely one."""
        if key is not None:
            return self._select(key)
        candidates = self.candidates()
        if not candidates:
            raise KeySelectionError(f"{self.path}: holds no tensors")
        return choose_weights(candidates)

    def _select(self, key: str) -> StateDictCandidate:
        node = resolve_key(self.tree, key)
        if node is _MISSING:
            candidates = self.candidates()
            if [c.key for c in candidates] == [""]:
                raise KeySelectionError(
                    f"{self.path}: no entry {key!r}; the file itself is the state dict, leave out --key"
                )
            shown = [repr(c.key) for c in candidates[:6]]
            if len(candidates) > 6:
                shown.append(f"and {len(candidates) - 6} more")
            available = ", ".join(shown) or "none"
            raise KeySelectionError(f"{self.path}: no entry {key!r}; entries that hold tensors: {available}")
        if isinstance(node, TensorRecord):
            return StateDictCandidate(key, {key.rsplit(".", 1)[-1]: node.renamed(key.rsplit(".", 1)[-1])})
        tensors = dict(named_records(node)) if isinstance(node, Mapping | list | tuple) else {}
        if not tensors:
            raise KeySelectionError(f"{self.path}: entry {key!r} holds no tensors")
        return StateDictCandidate(key, tensors)

    def averaged_copies(self) -> list[AveragedCopy]:
        """The entries that hold averaged weights: Lightning's WeightAveraging ``state_dict`` (beside
        ``current_model_state``), and any tensor dict named for an EMA or SWA (timm's ``state_dict_ema``).

        Example:
            >>> rec = TensorRecord("", "float32", (2,))
            >>> tree = {"state_dict": {"w": rec}, "state_dict_ema": {"w": rec}, "epoch": 3}
            >>> ckpt = Checkpoint(Path("t.pth"), "torch-zip", tree)
            >>> [c.key for c in ckpt.averaged_copies()]
            ['state_dict_ema']
        """
        keys = [c.key for c in self.candidates()]
        found: list[AveragedCopy] = []
        if "state_dict" in keys and LIGHTNING_CURRENT in keys:
            found.append(
                AveragedCopy(
                    "state_dict",
                    "the averaged copy (Lightning's WeightAveraging, EMA or SWA)",
                    LIGHTNING_CURRENT,
                )
            )
        for key in keys:
            words = {w for part in key.lower().split(".") for w in part.replace("-", "_").split("_")}
            if words & set(AVERAGE_WORDS) and key not in (f.key for f in found):
                found.append(AveragedCopy(key, _averaged_by(key)))
        return found

    # -- everything else --------------------------------------------------------------------
    def top_level(self, weights_key: str | None = None) -> list[TopLevelEntry]:
        """Each top-level entry with its tensor count and bytes (empty when the root is the state dict)."""
        if not isinstance(self.tree, Mapping) or (weights_key == "" and _is_state_dict(self.tree)):
            return []
        chosen_root = (weights_key or "").split(".", 1)[0]
        entries = []
        for raw_key, value in self.tree.items():
            key = str(raw_key)
            if weights_key == "" and isinstance(value, TensorRecord):
                continue  # one of the weights themselves, listed in the tensor table
            records = [r for _, r in named_records(value)]
            if key == chosen_root:
                kind = "weights"
            elif any(m in key.lower() for m in ("optim",)):
                kind = "optimizer"
            elif records:
                kind = "tensors"
            else:
                kind = "value"
            entries.append(TopLevelEntry(key, kind, len(records), unique_nbytes(records), short_repr(value)))
        return entries


def _averaged_by(key: str) -> str:
    if key == "state_dict_ema":
        return "the EMA copy (timm's CheckpointSaver; timm's load_checkpoint picks it by default)"
    kind = "SWA" if "swa" in key.lower() else "EMA"
    return f"the {kind} copy"


def choose_weights(candidates: list[StateDictCandidate]) -> StateDictCandidate:
    """Pick the weights the way a user expects: the root if it is a state dict, then a known
    key (``state_dict``, ``model`` ...), then the largest dict that is not optimizer state."""
    root = next((c for c in candidates if c.key == ""), None)
    known = next((c for name in WEIGHT_KEYS for c in candidates if c.key == name), None)
    if root is not None and (known is None or root.count > known.count):
        return root
    if known is not None:
        return known
    for name in WEIGHT_KEYS:
        for cand in candidates:
            if cand.key.rsplit(".", 1)[-1] == name and not cand.is_training_state:
                return cand
    plain = [c for c in candidates if not c.is_training_state] or candidates
    return max(plain, key=lambda c: (c.nbytes, c.count))


def unique_nbytes(records: Any) -> int:
    """Bytes of tensor data, counting a storage shared by several tensors once."""
    total = 0
    seen: set[int] = set()
    for rec in records:
        storage = rec.storage
        if storage is None:
            total += rec.nbytes
        elif id(storage) not in seen:
            seen.add(id(storage))
            total += storage.nbytes
    return total


_MISSING = object()


def resolve_key(tree: Any, key: str) -> Any:
    """Walk a dotted path through dicts and lists; a dict key may itself contain dots."""
    if key == "":
        return tree
    parts = key.split(".")
    node = tree
    i = 0
    while i < len(parts):
        found = False
        for j in range(len(parts), i, -1):  # longest key first: "model.ema" before "model"
            part = ".".join(parts[i:j])
            child = _child(node, part)
            if child is not _MISSING:
                node, i, found = child, j, True
                break
        if not found:
            return _MISSING
    return node


def _child(node: Any, part: str) -> Any:
    if isinstance(node, Mapping):
        if part in node:
            return node[part]
        for k in node:
            if str(k) == part:
                return node[k]
        return _MISSING
    if isinstance(node, list | tuple) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return _MISSING


def _is_state_dict(node: Any) -> bool:
    """A dict with string keys holding tensors directly; other values may only be None
    (some modules store None for absent buffers) or nested dicts of the same kind."""
    if not isinstance(node, Mapping) or not node:
        return False
    has_tensor = False
    for k, v in node.items():
        if not isinstance(k, str):
            return False
        if isinstance(v, TensorRecord):
            has_tensor = True
        elif v is not None and not _is_state_dict(v):
            return False
    return has_tensor


def _find_candidates(node: Any, path: str) -> Iterator[StateDictCandidate]:
    if _is_state_dict(node):
        yield StateDictCandidate(path, dict(named_records(node)))
        return
    if isinstance(node, Mapping):
        # a state dict saved beside plain values ({"fc.weight": t, "epoch": 3}): its tensors count
        direct = {
            k: v.renamed(k) for k, v in node.items() if isinstance(k, str) and isinstance(v, TensorRecord)
        }
        if direct:
            yield StateDictCandidate(path, direct)
        children = ((str(k), v) for k, v in node.items() if not isinstance(v, TensorRecord))
    elif isinstance(node, list | tuple):
        children = ((str(i), v) for i, v in enumerate(node))
    else:
        return
    for k, v in children:
        yield from _find_candidates(v, f"{path}.{k}" if path else k)


def short_repr(value: Any, limit: int = 60) -> str:
    """A one-line description of a plain value, records shown as ``<tensor>``."""
    if isinstance(value, TensorRecord):
        return f"tensor {value.dtype}{list(value.shape)}"
    if isinstance(value, Mapping):
        text = f"dict of {len(value)}"
    elif isinstance(value, list | tuple):
        text = f"{type(value).__name__} of {len(value)}"
    elif isinstance(value, int) and value.bit_length() > 256:  # repr of a huge int: slow, or refused
        text = f"int of {value.bit_length():,} bits"
    else:  # built piece by piece and cut: a 2**40-path tuple costs nothing
        text = bounded_repr(value, 4 * limit)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
