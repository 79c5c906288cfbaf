"""Finding the classifier head of a state dict: the tensors ``strip-head`` drops.

:func:`find_head` works on names and shapes alone (no tensor data): a module named with
``--head``, else the last layer named like a head (:data:`HEAD_NAMES`), else the last
layer of the file if it is a linear layer with a bias (never an embedding).
:func:`ckptsurgeon.surgery.plan.head_plan` turns its answer into a plan.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from ..core.record import TensorRecord
from ..errors import SurgeryError

# Every list of head and vocabulary names lives here; each use has its own strictness.
# Module names that hold the classifier / output head: strip-head drops one on its name alone,
# so only unambiguous names.
HEAD_NAMES = ("fc", "classifier", "head", "heads", "last_linear", "lm_head", "logits", "classif")
# Names of scoring layers: heads too, where shapes or roles already say so.
SCORE_NAMES = ("cls", "predictions", "score", "cls_score")
# A shape-mismatched module named so is a head (diff's diagnosis): broader than HEAD_NAMES, as a name
# there only supports what the shapes already show (``output``, ``out``, ``fc8`` name output layers);
# ``lm_head`` is vocabulary (:data:`VOCABULARY_NAMES`), not classes.
MISMATCH_HEAD_NAMES = frozenset(HEAD_NAMES) - {"lm_head"} | frozenset(SCORE_NAMES) | {"output", "out", "fc8"}
# Modules of the "head" role when keys are paired by suffix (never with a body layer): narrower than
# MISMATCH_HEAD_NAMES, since ``output``/``out`` also name body layers (BERT's ``attention.output.dense``).
HEAD_ROLE_NAMES = frozenset(HEAD_NAMES) | frozenset(SCORE_NAMES) | {"qa_outputs"}
# Words that make a head read as a classifier in diff's explanation (found inside a name's parts).
CLASSIFIER_WORDS = ("fc", "classifier", "head", "last_linear", "logits", "cls")
# Last name components of embedding tables and LM output layers: their rows are the vocabulary
# (tokens), not classes. A tensor tied to one of them is vocabulary too.
VOCABULARY_NAMES = frozenset(
    {
        "lm_head",
        "embed_tokens",
        "wte",
        "word_embeddings",
        "tok_embeddings",
        "embed_in",
        "embed_out",
        "token_embedding",
        "word_emb",
    }
)
# Module names of embedding tables (anything containing "embed" counts too): never a head by position.
EMBEDDING_NAMES = ("wte", "wpe", "tok_embeddings", "shared", "emb", "word_emb", "pos_emb")


def find_head(tensors: Mapping[str, TensorRecord], head: str | None = None) -> tuple[list[str], str]:
    """Names of the classifier head's tensors and how they were found.

    With ``head`` (a module name such as ``fc`` or ``classifier.6``, or a glob), the tensors of
    that module. Without it, the last module (in file order) that has a weight of two or more
    dimensions and is named like a head (``fc``, ``classifier``, ``head``, ``last_linear``,
    ``lm_head`` ...), with every other layer of its class count named like a second head
    (levit's ``head_dist``, volo's ``aux_head``, googlenet's ``aux1.fc2``: :data:`COMPANION_MARKS`);
    failing that, the last module of the file if it is a linear layer with a
    bias that matches its output size and is not named like an embedding (``wte``, ``embed_tokens``
    ...: a safetensors file sorts its names, so its last module may be a lookup table). Refuses
    (SurgeryError) rather than guess further.

    Example:
        >>> shapes = {"classifier.0.weight": (8, 4), "classifier.6.weight": (10, 8),
        ...           "classifier.6.bias": (10,)}
        >>> recs = {n: TensorRecord(n, "float32", s) for n, s in shapes.items()}
        >>> find_head(recs)
        (['classifier.6.weight', 'classifier.6.bias'], "the last layer named like a head: 'classifier.6'")
    """
    if head is not None:
        return _named_head(tensors, head), f"named with --head {head}"
    modules = _modules(tensors)
    named = [m for m in modules if _is_layer(tensors, modules[m]) and _head_named(m)]
    if named:
        main = named[-1]
        companions = _companion_heads(tensors, modules, main)
        how = f"the last layer named like a head: {main!r}"
        if companions:
            how += f", with the other heads of its class count: {', '.join(repr(m) for m in companions)}"
        names = [n for m in modules if m == main or m in companions for n in modules[m]]
        return names, how
    last = list(modules)[-1] if modules else None
    if last is not None and _is_linear(tensors, modules[last], need_bias=True) and not _embedding_named(last):
        return modules[last], f"the last layer of the file: {last!r}"
    what = "" if last is None else f" ({last!r})"
    raise SurgeryError(
        "no classifier head found: no fc/classifier/head/last_linear/lm_head layer, and the file's last "
        f"layer{what} is not a linear layer with a bias (an embedding never counts); "
        "name it with --head NAME or give --target"
    )


# Name parts of a second classifier beside the main one: levit's ``head_dist``, volo's
# ``aux_head``, googlenet's ``aux1.fc2``, deit's ``head_dist``.
COMPANION_MARKS = ("head", "aux", "dist")


def _companion_heads(
    tensors: Mapping[str, TensorRecord], modules: Mapping[str, list[str]], main: str
) -> list[str]:
    """Other layers whose output dimension is the main head's class count and whose name marks a
    head (``head_dist``, ``aux_head``, ``aux1.fc2``): a model with two classifiers has two heads."""
    weight = _weight(tensors, modules[main])
    if weight is None:
        return []
    classes = weight.shape[0]
    return [
        m
        for m, names in modules.items()
        if m != main
        and _is_layer(tensors, names)
        and getattr(_weight(tensors, names), "shape", (None,))[0] == classes
        and any(mark in part for part in m.lower().split(".") for mark in COMPANION_MARKS)
        and not _embedding_named(m)
    ]


def _named_head(tensors: Mapping[str, TensorRecord], head: str) -> list[str]:
    module = head.removesuffix(".")
    hits = [n for n in tensors if n.rpartition(".")[0] == module or n == module]
    if not hits and any(c in head for c in "*?["):
        hits = [n for n in tensors if fnmatch.fnmatchcase(n, head)]
    if not hits:
        layers = [m for m, names in _modules(tensors).items() if _is_layer(tensors, names)]
        tail = ", ".join(repr(m) for m in layers[-3:]) or "none"
        raise SurgeryError(f"--head {head}: no such layer; the last layers are {tail}")
    return hits


def _modules(tensors: Mapping[str, TensorRecord]) -> dict[str, list[str]]:
    modules: dict[str, list[str]] = {}
    for name in tensors:
        modules.setdefault(name.rpartition(".")[0], []).append(name)
    return modules


def _head_named(module: str) -> bool:
    return any(part in HEAD_NAMES for part in module.split("."))


def _weight(tensors: Mapping[str, TensorRecord], names: list[str]) -> TensorRecord | None:
    return next((tensors[n] for n in names if n.rpartition(".")[2] == "weight"), None)


def _is_layer(tensors: Mapping[str, TensorRecord], names: list[str]) -> bool:
    weight = _weight(tensors, names)
    return weight is not None and len(weight.shape) >= 2


def _is_linear(tensors: Mapping[str, TensorRecord], names: list[str], *, need_bias: bool = False) -> bool:
    weight = _weight(tensors, names)
    if weight is None or len(weight.shape) != 2:
        return False
    bias = next((tensors[n] for n in names if n.rpartition(".")[2] == "bias"), None)
    if bias is None:
        return not need_bias
    return tuple(bias.shape) == (weight.shape[0],)


def _embedding_named(module: str) -> bool:
    """``wte``, ``embed_tokens``, ``word_embeddings`` ...: a 2-D weight that is a lookup table, not a
    head (a safetensors file sorts its names, so the 'last' module may well be one)."""
    return any(part in EMBEDDING_NAMES or "embed" in part for part in module.lower().split("."))
