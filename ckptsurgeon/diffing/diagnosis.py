"""Why a checkpoint does not load into a target, and what makes it load.

The search tries every pair (strip a leading prefix of the file's keys, add a leading prefix
of the target's keys), with candidates found in the data (not only a list of known wrappers),
and keeps the one that loads the most tensors by name *and* shape. Only wrapper prefixes count
(see :func:`is_wrapper_prefix`): a "prefix" that is one layer's own name is a guessed rename,
not a wrapper. On top of that: the head (shape-mismatched output layer: a class count change,
not a bug), the filter idiom users write, a suffix-matching proposal when prefixes are not
enough (a guess: shown, never applied), and the exact fix commands.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..core.prefixes import shared_prefix, wrapper_prefix
from ..core.record import TensorRecord
from .compare import Comparison, FilterIdiom, ShapeMismatch, compare, filter_idiom
from .heads import HEAD_ROLE_NAMES, MISMATCH_HEAD_NAMES, VOCABULARY_NAMES

Shapes = Mapping[str, tuple[int, ...]]

_CANDIDATE_DEPTH = 3
_CANDIDATE_LIMIT = 10
# A partial prefix (not on every key of its side) must be on at least this share of the keys,
# and on at least two of them, to count as a wrapper.
MIN_PREFIX_SHARE = 0.1
MIN_PREFIX_KEYS = 2
# What a module is for, by its name: a suffix match never pairs modules of different roles
# (a pooler is not a classifier, a body layer is not a head).
_ROLE_WORDS = {"pooler": "pooler", **dict.fromkeys(sorted(HEAD_ROLE_NAMES), "head")}


@dataclass(frozen=True)
class KeyTransform:
    """Rename keys: remove ``strip`` where a key starts with it, then put ``add`` in front.

    This is what ``ckpt adapt`` applies; ``ckpt rename --strip-prefix S --add-prefix A`` does the same.
    :func:`best_transform` only ever returns wrapper prefixes (:func:`is_wrapper_prefix`).

    Example:
        >>> t = KeyTransform(strip="_orig_mod.module.", add="")
        >>> t.rename("_orig_mod.module.fc.weight")
        'fc.weight'
        >>> KeyTransform(add="module.").rename("fc.weight")
        'module.fc.weight'
    """

    strip: str = ""
    add: str = ""

    @property
    def is_identity(self) -> bool:
        return not self.strip and not self.add

    @property
    def complexity(self) -> int:
        return self.strip.count(".") + self.add.count(".")

    def rename(self, name: str) -> str:
        if self.strip and name.startswith(self.strip):
            name = name[len(self.strip) :]
        return self.add + name

    def to_dict(self) -> dict[str, str]:
        return {"strip": self.strip, "add": self.add}


@dataclass(frozen=True)
class Head:
    """Shape-mismatched output layer(s) whose leading dimension is a class count: every module
    whose output dimension is that count (a distillation or auxiliary classifier is a head too)."""

    modules: tuple[str, ...]
    tensors: tuple[ShapeMismatch, ...]
    source_classes: int
    target_classes: int

    def to_dict(self) -> dict[str, object]:
        return {
            "modules": list(self.modules),
            "tensors": [t.to_dict() | {"source_name": t.file_name} for t in self.tensors],
            "source_classes": self.source_classes,
            "target_classes": self.target_classes,
        }


@dataclass(frozen=True)
class Vocabulary:
    """Shape-mismatched embedding tables and LM heads whose rows are the vocabulary (tokens), and
    every other tensor with one dimension of that size (an MLM head's bias, ``final_logits_bias``).

    ``tied_aliases``: (target name the file leaves out, the vocabulary tensor it is tied to).

    Example:
        >>> v = find_vocabulary((ShapeMismatch("wte.weight", (99, 8), (100, 8)),))
        >>> v.modules, v.source_tokens, v.target_tokens
        (('wte',), 99, 100)
    """

    modules: tuple[str, ...]
    tensors: tuple[ShapeMismatch, ...]
    source_tokens: int
    target_tokens: int
    tied_aliases: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "modules": list(self.modules),
            "tensors": [t.to_dict() | {"source_name": t.file_name} for t in self.tensors],
            "source_tokens": self.source_tokens,
            "target_tokens": self.target_tokens,
            "tied_aliases": [{"name": alias, "tied_to": held} for alias, held in self.tied_aliases],
        }


@dataclass(frozen=True)
class ShapeFix:
    """A shape-mismatched tensor whose learned values ``ckpt adapt`` keeps by a transform (as timm's
    ``checkpoint_filter_fn``): a position table on another grid (``kind`` ``pos_embed``), a relative
    position bias table for another window (``rel_pos_bias``), or the first conv with another number
    of input channels (``input_conv``). ``words`` says it; ``option`` turns it off.

    Example:
        >>> f = find_shape_fixes((ShapeMismatch("pos_embed", (1, 197, 8), (1, 577, 8)),), ["pos_embed"])[0]
        >>> f.words, f.option
        ('pos_embed: a 14x14 grid + 1 token -> 24x24 + 1', '--no-resample-pos-embed')
    """

    kind: str
    mismatch: ShapeMismatch
    words: str

    @property
    def option(self) -> str:
        """The ``ckpt adapt`` flag that leaves it out instead."""
        return "--no-adapt-input-conv" if self.kind == "input_conv" else "--no-resample-pos-embed"

    @property
    def keyword(self) -> str:
        """The Python keyword (``ckptsurgeon.adapt``, ``load_into``) that leaves it out instead."""
        return "adapt_input_conv=False" if self.kind == "input_conv" else "resample_pos_embed=False"

    def to_dict(self) -> dict[str, object]:
        return (
            {"kind": self.kind, "words": self.words, "option": self.option}
            | self.mismatch.to_dict()
            | {"source_name": self.mismatch.file_name}
        )


def find_shape_fixes(
    mismatches: tuple[ShapeMismatch, ...],
    target_names: list[str],
    target_shapes: Shapes | None = None,
) -> tuple[ShapeFix, ...]:
    """The mismatched tensors whose values a transform keeps, from names and shapes alone.

    A table named like a position embedding (``pos_embed``, ``position_embedding`` ...) whose token
    counts are square grids after the same 0, 1 or 2 prefix tokens; a ``relative_position_bias_table``
    of ``(2W-1)**2`` rows on both sides; the target's first conv weight (its first 4-D tensor)
    when only dimension 1 differs, from 3 input channels (or 3*k to 1).

    Example:
        >>> m = (ShapeMismatch("conv1.weight", (8, 3, 7, 7), (8, 1, 7, 7)),
        ...      ShapeMismatch("layer1.conv.weight", (8, 3, 3, 3), (8, 1, 3, 3)))
        >>> [f.words for f in find_shape_fixes(m, ["conv1.weight", "layer1.conv.weight"])]
        ['conv1.weight: 3 input channels -> 1']
    """
    from ..surgery.resample import channel_change, grid_change, named_pos_embed, named_rel_pos, rel_window

    shapes = target_shapes or {}
    first_conv = next((n for n in target_names if len(shapes.get(n, ())) == 4), None)
    if not shapes:  # only the mismatched shapes are known
        ranked = {m.name: m.target_shape for m in mismatches}
        first_conv = next((n for n in target_names if len(ranked.get(n, ())) == 4), None)
    fixes = []
    for m in mismatches:
        if named_rel_pos(m.name):
            windows = rel_window(m.source_shape, m.target_shape)
            if windows is not None:
                old, new = windows
                words = f"{m.file_name}: a relative position bias table, window {old}x{old} -> {new}x{new}"
                fixes.append(ShapeFix("rel_pos_bias", m, words))
        elif named_pos_embed(m.name):
            grid = grid_change(m.source_shape, m.target_shape)
            if grid is not None:
                fixes.append(ShapeFix("pos_embed", m, grid.words(m.file_name)))
        elif m.name == first_conv:
            channels = channel_change(m.source_shape, m.target_shape)
            if channels is not None:
                words = f"{m.file_name}: {channels[0]} input channels -> {channels[1]}"
                fixes.append(ShapeFix("input_conv", m, words))
    return tuple(fixes)


@dataclass(frozen=True)
class Diagnosis:
    """The best key transform, what it loads, the head, the filter idiom, proposals and fixes.

    ``mapping``: every key of the file that loads after ``transform`` -> its name in the target
    (what ``ckpt adapt`` applies). ``proposed_mapping`` (a guess by dotted suffix) is *not* in it:
    it is shown with the command that applies it, for review. ``drop``: keys of the file whose
    shape does not fit (the head). ``extra``: keys of the file with no place in the target after
    the transform (the keys of the proposal included).

    Example:
        >>> d = diagnose({"w": (2,)}, {"w": (2,)})
        >>> d.transform.is_identity, d.loads_after, d.total
        (True, 1, 1)
    """

    transform: KeyTransform
    as_saved: Comparison
    after: Comparison
    head: Head | None
    filter_as_saved: FilterIdiom
    filter_after: FilterIdiom
    proposed_mapping: tuple[tuple[str, str], ...] = ()
    ambiguous: tuple[str, ...] = ()
    mapping: dict[str, str] = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    vocabulary: Vocabulary | None = None
    shape_fixes: tuple[ShapeFix, ...] = ()

    @property
    def total(self) -> int:
        return self.after.total

    @property
    def loads_after(self) -> int:
        return self.after.loadable

    @property
    def improves(self) -> bool:
        """True when the transform loads more than the file as saved."""
        return not self.transform.is_identity and self.after.loadable > self.as_saved.loadable


def diagnose(
    source: Shapes | Mapping[str, TensorRecord],
    target: Shapes | Mapping[str, TensorRecord],
    tied: Mapping[str, str] | None = None,
    as_saved: Comparison | None = None,
) -> Diagnosis:
    """Search the key transform that loads the most tensors and explain the rest.

    Example:
        >>> d = diagnose({"conv.weight": (3,), "fc.weight": (6, 4), "fc.bias": (6,)},
        ...              {"module.conv.weight": (3,), "module.fc.weight": (2, 4), "module.fc.bias": (2,)})
        >>> d.transform.add, [t.name for t in d.head.tensors]
        ('module.', ['module.fc.weight', 'module.fc.bias'])
    """
    src = _records(source)
    tgt = _records(target)
    tied = tied or {}
    as_saved = as_saved or compare(src, tgt, tied)
    transform = best_transform(_shapes(src), _shapes(tgt))
    renamed, origin = apply_transform(src, transform)
    after = compare(renamed, tgt, tied, origin)
    proposal, ambiguous = suffix_proposal(after, renamed, tgt, origin)
    shape_fixes = find_shape_fixes(after.shape_mismatched, list(tgt), {n: r.shape for n, r in tgt.items()})
    fixed = {f.mismatch.name for f in shape_fixes}
    unfixed = tuple(m for m in after.shape_mismatched if m.name not in fixed)
    vocabulary = find_vocabulary(unfixed, tied, after.missing)
    in_vocabulary = {m.name for m in vocabulary.tensors} if vocabulary else set()
    head = mismatched_head(tuple(m for m in unfixed if m.name not in in_vocabulary), list(tgt))
    mapping = {
        origin[name]: name for name in renamed if name in tgt and renamed[name].shape == tgt[name].shape
    }
    return Diagnosis(
        transform=transform,
        as_saved=as_saved,
        after=after,
        head=head,
        filter_as_saved=filter_idiom(src, tgt),
        filter_after=filter_idiom(renamed, tgt),
        proposed_mapping=tuple(proposal.items()),
        ambiguous=ambiguous,
        mapping=mapping,
        drop=tuple(m.file_name for m in after.shape_mismatched),
        extra=tuple(origin[name] for name in after.unexpected),
        vocabulary=vocabulary,
        shape_fixes=shape_fixes,
    )


def _records(data: Shapes | Mapping[str, TensorRecord]) -> dict[str, TensorRecord]:
    out: dict[str, TensorRecord] = {}
    for name, value in data.items():
        out[name] = value if isinstance(value, TensorRecord) else TensorRecord(name, "float32", tuple(value))
    return out


def _shapes(records: Mapping[str, TensorRecord]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(rec.shape) for name, rec in records.items()}


def apply_transform(
    records: Mapping[str, TensorRecord], transform: KeyTransform
) -> tuple[dict[str, TensorRecord], dict[str, str]]:
    """Rename ``records``; a key that would collide with an earlier one keeps its own name.

    Returns the renamed records and new name -> key in the file.

    Example:
        >>> renamed, origin = apply_transform({"module.w": TensorRecord("module.w", "float32", ())},
        ...                                   KeyTransform(strip="module."))
        >>> list(renamed), origin
        (['w'], {'w': 'module.w'})
    """
    renamed: dict[str, TensorRecord] = {}
    origin: dict[str, str] = {}
    for name, rec in records.items():
        new = transform.rename(name)
        if new in renamed:
            new = name
        renamed[new] = rec
        origin[new] = name
    return renamed, origin


# -- the prefix search ----------------------------------------------------------------------------
def candidate_prefixes(names: list[str]) -> list[str]:
    """Leading dotted prefixes worth trying, found in the data: the most common ones up to three
    components deep, the stack of known wrappers shared by all keys, and the shared prefix.

    Example:
        >>> candidate_prefixes(["_orig_mod.module.fc.w", "_orig_mod.module.conv.w"])[:3]
        ['_orig_mod.', '_orig_mod.module.', '_orig_mod.module.conv.']
    """
    counts: Counter[str] = Counter()
    for name in names:
        parts = name.split(".")
        for depth in range(1, min(_CANDIDATE_DEPTH, len(parts) - 1) + 1):
            counts[".".join(parts[:depth]) + "."] += 1
    ranked = sorted(counts, key=lambda p: (-counts[p], p.count("."), p))[:_CANDIDATE_LIMIT]
    common = shared_prefix(names)
    extra = [wrapper_prefix(names), common]
    parts = common.split(".")[:-1]
    extra += [".".join(parts[:i]) + "." for i in range(1, len(parts))]
    return sorted({p for p in [*ranked, *extra] if p}, key=lambda p: (p.count("."), -counts.get(p, 0), p))


def is_wrapper_prefix(prefix: str, names: list[str]) -> bool:
    """True when ``prefix`` may be stripped from (or added to) the keys ``names`` as a wrapper.

    The rule, from the data alone: a prefix every key shares is a wrapper (``module.``,
    ``model.``, a backbone saved on its own). A prefix only some keys share must be shared by at
    least :data:`MIN_PREFIX_SHARE` of them (and at least :data:`MIN_PREFIX_KEYS`), and must name
    a module that holds other modules: at least one key must keep a dotted remainder, not only
    a leaf. So ``backbone.`` (most keys, ``backbone.layer1.conv.weight``) is a prefix, while
    ``norm.`` (``norm.weight``: one layer's own name) or ``classifier.`` in a 200-key model is
    not: renaming those is a guess about one layer, which ``adapt`` never applies.

    Example:
        >>> names = ["backbone.layer1.conv.w", "backbone.layer2.conv.w", "norm.weight", "head.fc.w"]
        >>> is_wrapper_prefix("backbone.", names), is_wrapper_prefix("norm.", names)
        (True, False)
        >>> is_wrapper_prefix("module.", ["module.weight", "module.bias"])
        True
    """
    remainders = [name[len(prefix) :] for name in names if name.startswith(prefix)]
    if not remainders:
        return False
    if len(remainders) == len(names):
        return True
    if len(remainders) < max(MIN_PREFIX_KEYS, MIN_PREFIX_SHARE * len(names)):
        return False
    return any("." in rest for rest in remainders)


def best_transform(source: Shapes, target: Shapes) -> KeyTransform:
    """The (strip, add) pair that loads the most tensors by name and shape (the identity unless
    another loads more); among equals, the one matching more names, then the simplest.

    Only wrapper prefixes are tried on each side (:func:`is_wrapper_prefix`).

    Example:
        >>> best_transform({"model.fc.w": (2,)}, {"module.fc.w": (2,)})
        KeyTransform(strip='model.', add='module.')
        >>> llama = {"norm.weight": (4,), "embed.weight": (9, 4), "layers.0.q.weight": (4, 4)}
        >>> bert = {"bert.embeddings.LayerNorm.weight": (4,), "bert.embeddings.word.weight": (9, 4),
        ...         "bert.encoder.layer.0.query.weight": (4, 4), "classifier.weight": (2, 4)}
        >>> best_transform(llama, bert)  # not strip 'norm.', add 'bert.embeddings.LayerNorm.'
        KeyTransform(strip='', add='')
    """
    src_names = list(source)
    tgt_names = list(target)
    strips = ["", *(p for p in candidate_prefixes(src_names) if is_wrapper_prefix(p, src_names))]
    adds = ["", *(p for p in candidate_prefixes(tgt_names) if is_wrapper_prefix(p, tgt_names))]
    by_add = {add: {t[len(add) :]: shape for t, shape in target.items() if t.startswith(add)} for add in adds}
    best = KeyTransform()
    best_score = _score(source, by_add[""])
    identity_loads = best_score[0]
    pairs = sorted(((s, a) for s in strips for a in adds), key=lambda p: -len(by_add[p[1]]))
    for strip, add in pairs:
        if min(len(source), len(by_add[add])) < best_score[0]:
            break  # no later pair can load more
        if not strip and not add:
            continue
        mapped = {(n[len(strip) :] if strip and n.startswith(strip) else n): s for n, s in source.items()}
        score = _score(mapped, by_add[add])
        candidate = KeyTransform(strip, add)
        if (score[0], score[1], -candidate.complexity) > (best_score[0], best_score[1], -best.complexity):
            best, best_score = candidate, score
    return best if best_score[0] > identity_loads else KeyTransform()


def _score(source: Shapes, target: Shapes) -> tuple[int, int]:
    """(tensors that load by name and shape, names that match)."""
    loads = names = 0
    small, large = (source, target) if len(source) <= len(target) else (target, source)
    for name, shape in small.items():
        other = large.get(name)
        if other is not None:
            names += 1
            loads += tuple(other) == tuple(shape)
    return loads, names


# -- the head -------------------------------------------------------------------------------------
def output_layer(target_names: list[str]) -> str:
    """The module of the last ``*.weight`` in the target's order (the output layer, usually).

    Example:
        >>> output_layer(["features.0.weight", "classifier.6.weight", "classifier.6.bias"])
        'classifier.6'
    """
    for name in reversed(target_names):
        if name.endswith(".weight"):
            return name.rpartition(".")[0]
    return ""


def is_head_module(module: str, output: str) -> bool:
    """The output layer, or a module named like a head (``fc``, ``classifier.6``, ``lm_head`` ...)."""
    if module == output:
        return True
    parts = [p for p in module.split(".") if not p.isdigit()]
    return bool(parts) and parts[-1] in MISMATCH_HEAD_NAMES


def mismatched_head(mismatches: tuple[ShapeMismatch, ...], target_names: list[str]) -> Head | None:
    """Every shape-mismatched module whose output (leading) dimension is the class count.

    The class count comes from the output layer or a module named like a head (``fc``,
    ``classifier``, ``head`` ...) that differs only in its leading dimension; then every mismatched
    tensor that differs only there, by the same counts, is a head too: levit's ``head_dist``,
    googlenet's ``aux1.fc2`` and ``aux2.fc2``, volo's ``aux_head``.

    Example:
        >>> m = (ShapeMismatch("fc.weight", (6, 32), (2, 32)), ShapeMismatch("fc.bias", (6,), (2,)),
        ...      ShapeMismatch("aux.fc2.weight", (6, 16), (2, 16)))
        >>> head = mismatched_head(m, ["conv.weight", "aux.fc2.weight", "fc.weight", "fc.bias"])
        >>> head.modules, head.target_classes
        (('fc', 'aux.fc2'), 2)
    """
    output = output_layer(target_names)
    outputs = [m for m in mismatches if _leading_only(m)]
    anchors = [m for m in outputs if is_head_module(_module(m.name), output)]
    classes = {_leading(m) for m in anchors}
    if len(classes) > 1:
        classes = {_leading(m) for m in anchors if _module(m.name) == output}
    if len(classes) != 1:
        return None
    (source_classes, target_classes) = pair = classes.pop()
    chosen = [m for m in outputs if _leading(m) == pair]
    modules = tuple(dict.fromkeys(_module(m.name) for m in chosen))
    return Head(modules, tuple(chosen), source_classes, target_classes)


def find_vocabulary(
    mismatches: tuple[ShapeMismatch, ...],
    tied: Mapping[str, str] | None = None,
    missing: tuple[str, ...] = (),
) -> Vocabulary | None:
    """Embedding tables and LM heads of another vocabulary size, with every tensor sized by it.

    Anchors are mismatched tensors of a module named like one (``lm_head``, ``embed_tokens``,
    ``wte``, ``word_embeddings`` ...: :data:`~ckptsurgeon.diffing.heads.VOCABULARY_NAMES`), or
    tied to one, that differ only in their leading dimension; then every mismatched tensor that
    differs in one dimension only, by the same sizes, joins them (``cls.predictions.bias``,
    ``final_logits_bias``). ``missing`` names that
    are tied to one of them are reported as ``tied_aliases``.

    Example:
        >>> m = (ShapeMismatch("wte.weight", (99, 8), (100, 8)),
        ...      ShapeMismatch("wpe.weight", (16, 8), (32, 8)))
        >>> v = find_vocabulary(m, {"lm_head.weight": "wte.weight"}, ("lm_head.weight",))
        >>> [t.name for t in v.tensors], v.tied_aliases
        (['wte.weight'], (('lm_head.weight', 'wte.weight'),))
    """
    groups = _tied_groups(tied or {})
    anchors = [
        m
        for m in mismatches
        if _leading_only(m) and any(_vocabulary_named(n) for n in groups.get(m.name, (m.name,)))
    ]
    if not anchors:
        return None
    pair = Counter(_leading(m) for m in anchors).most_common(1)[0][0]
    chosen = [m for m in mismatches if _one_dim_change(m) == pair]
    names = {m.name for m in chosen}
    aliases = tuple(
        (alias, held)
        for alias in missing
        for held in groups.get(alias, ())
        if held in names and held != alias
    )
    modules = tuple(dict.fromkeys(_module(m.name) for m in chosen))
    return Vocabulary(modules, tuple(chosen), pair[0], pair[1], tuple(dict(aliases).items()))


def _module(name: str) -> str:
    return name.rpartition(".")[0]


def _leading_only(m: ShapeMismatch) -> bool:
    """Same rank, only the leading (output) dimension differs."""
    return len(m.source_shape) == len(m.target_shape) >= 1 and m.source_shape[1:] == m.target_shape[1:]


def _leading(m: ShapeMismatch) -> tuple[int, int]:
    return m.source_shape[0], m.target_shape[0]


def _one_dim_change(m: ShapeMismatch) -> tuple[int, int] | None:
    """(size in the file, size in the target) of the one dimension that differs, else None."""
    if len(m.source_shape) != len(m.target_shape):
        return None
    changes = [(a, b) for a, b in zip(m.source_shape, m.target_shape, strict=True) if a != b]
    return changes[0] if len(changes) == 1 else None


def _vocabulary_named(name: str) -> bool:
    parts = [p for p in _module(name).split(".") if not p.isdigit()]
    return bool(parts) and parts[-1] in VOCABULARY_NAMES


def _tied_groups(tied: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """Each tied name -> every name of its group (itself included)."""
    members: dict[str, list[str]] = {}
    for alias, canonical in tied.items():
        members.setdefault(canonical, [canonical]).append(alias)
    return {name: tuple(group) for group in members.values() for name in group}


# -- the suffix proposal ------------------------------------------------------
def suffix_proposal(
    after: Comparison,
    renamed: Mapping[str, TensorRecord],
    target: Mapping[str, TensorRecord],
    origin: Mapping[str, str],
) -> tuple[dict[str, str], tuple[str, ...]]:
    """Pair still-missing target keys with still-unexpected file keys by the longest common dotted
    suffix (at least the last two components) and equal shape; ambiguous pairs are refused, and
    so are pairs of modules whose names give them different roles (``_ROLE_WORDS``: a
    ``pooler`` is not a ``classifier``, a body layer is not a head). A guess to review: the
    result is shown with the command that applies it, never applied by ``adapt``.

    Returns (key in the file -> target name, target names left out as ambiguous).

    Example:
        >>> src = {"enc.conv1.w": TensorRecord("a", "float32", (2,))}
        >>> tgt = {"body.conv1.w": TensorRecord("b", "float32", (2,))}
        >>> suffix_proposal(compare(src, tgt), src, tgt, {"enc.conv1.w": "enc.conv1.w"})
        ({'enc.conv1.w': 'body.conv1.w'}, ())
    """
    buckets: dict[str, list[str]] = {}
    for name in after.unexpected:
        buckets.setdefault(_tail(name), []).append(name)
    best_for: dict[str, str] = {}
    ambiguous: list[str] = []
    for tname in after.missing:
        scored = [
            (_common_suffix(tname, sname), sname)
            for sname in buckets.get(_tail(tname), [])
            if tuple(renamed[sname].shape) == tuple(target[tname].shape)
            and _names_a_module(tname, sname)
            and _same_role(tname, sname)
        ]
        if not scored:
            continue
        top = max(score for score, _ in scored)
        winners = [sname for score, sname in scored if score == top]
        if len(winners) > 1:
            ambiguous.append(tname)
        else:
            best_for[tname] = winners[0]
    claims = Counter(best_for.values())
    proposal = {origin[s]: t for t, s in best_for.items() if claims[s] == 1}
    ambiguous += [t for t, s in best_for.items() if claims[s] > 1]
    return proposal, tuple(ambiguous)


def _same_role(a: str, b: str) -> bool:
    """True when the modules of ``a`` and ``b`` have the same role by name (pooler, head, or
    neither).

    Example:
        >>> _same_role("classifier.dense.weight", "pooler.dense.weight")
        False
        >>> _same_role("heads.head.weight", "head.weight"), _same_role("body.s1.conv.w", "enc.s1.conv.w")
        (True, True)
    """
    return _role(a.split(".")[:-1]) == _role(b.split(".")[:-1])


def _role(parts: list[str]) -> str:
    roles = {_ROLE_WORDS[p] for p in parts if p in _ROLE_WORDS}
    return "pooler" if "pooler" in roles else roles.pop() if roles else ""


def _tail(name: str) -> str:
    return ".".join(name.split(".")[-2:])


def _names_a_module(a: str, b: str) -> bool:
    """The shared suffix must name a module, not only an index: ``conv1.weight`` counts,
    ``1.weight`` (``features.1`` vs ``downsample.1``) does not."""
    n = _common_suffix(a, b)
    if n < 2:
        return False
    shared = a.split(".")[-n:][:-1]
    return any(not part.isdigit() for part in shared)


def _common_suffix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(reversed(a.split(".")), reversed(b.split(".")), strict=False):
        if x != y:
            break
        n += 1
    return n
