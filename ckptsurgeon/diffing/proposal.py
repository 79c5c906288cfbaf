"""A mapping proposed by structure: a source's tensors paired with a target's by order, shape and blocks.

Names differ between implementations of one network (torchvision's ``encoder.layers.encoder_layer_3``
is timm's ``blocks.3``), so suffixes pair little. Structure pairs more: both sides in module order,
with shapes; the repeated blocks of each side found (a numbered segment whose blocks hold the same
tensors) and aligned (equal block counts, equal parameters per block); then, inside a block and
outside, tensors paired when order and shape agree. A pair is ``certain`` only when nothing else
could take its place: its shape is unique on both sides, or same-shape tensors stand in the same
place between certain pairs (their "slot") in the same sequence; names that agree confirm a pair.
Anything else is ``ambiguous`` with the reason, and so is a pair whose names give it different roles
(a ``pooler`` is not a ``classifier``). Fused/split tensors (one ``[3d, d]`` against three ``[d, d]``),
transposed ones (GPT-2's Conv1D against ``nn.Linear``) and a 1x1 conv against a linear layer are
recognised from shapes and proposed as split/concat, transpose and reshape transforms.

The result generalises pairs inside blocks back into templates (``blocks.{n}.attn.qkv.weight``).
Nothing here reads tensor data or imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..core.report import printable
from .heads import HEAD_ROLE_NAMES

if TYPE_CHECKING:  # pragma: no cover
    from ..formats import ReadOptions
    from ..surgery.mapping import Mapping as MappingFile
    from ..surgery.mapping import TensorTransform

Shape = tuple[int, ...]
CERTAIN = "certain"
AMBIGUOUS = "ambiguous"
# A numbered segment starts a repeated block when its stem is empty (``blocks.3``) or ends so
# (``encoder_layer_3``, ``layer3``); ``norm1``/``fc2`` are two modules, not blocks.
_BLOCK_STEM = re.compile(r"^(?:|.*_|.*layer|.*block)$")
_NUMBERED = re.compile(r"^(.*?)(\d+)$")
_GENERIC_WORDS = frozenset({"proj", "linear", "dense", "weight", "bias", "layer", "module", "w", "self"})
_FUSED_PARTS = (2, 3, 4)
_ROTARY = (re.compile(r"(^|\.)w[qk]\.weight$"), re.compile(r"(^|\.)[qk]_proj\.weight$"))


@dataclass(frozen=True)
class ProposedRule:
    """One proposed step: ``sources`` become ``targets`` by ``op`` (names may hold ``{n}``, a block number).

    ``op``: ``rename`` (one to one), ``split`` (one source into several targets along ``dim``),
    ``concat`` (several sources into one target along ``dim``), ``transpose`` (2-D, dims swapped),
    ``reshape`` (to the target's shape). ``status``: ``certain`` or ``ambiguous``; ``reason`` says why.

    Example:
        >>> r = ProposedRule(("heads.head.weight",), ("head.weight",), "rename", CERTAIN, "unique shape")
        >>> r.expand(0)
        (('heads.head.weight',), ('head.weight',))
    """

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    op: str
    status: str
    reason: str
    dim: int | None = None
    blocks: tuple[tuple[int, int], ...] = ()
    target_shapes: tuple[Shape, ...] = ()
    source_shapes: tuple[Shape, ...] = ()

    def expand(self, index: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The concrete names of block pair ``index`` (of ``blocks``); outside blocks, the names."""
        if not self.blocks:
            return self.sources, self.targets
        src_n, tgt_n = self.blocks[index]
        return (
            tuple(s.replace("{n}", str(src_n)) for s in self.sources),
            tuple(t.replace("{n}", str(tgt_n)) for t in self.targets),
        )

    def concrete(self) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """Every concrete (sources, targets) this rule stands for."""
        return [self.expand(i) for i in range(max(1, len(self.blocks)))]


@dataclass(frozen=True)
class Proposal:
    """A proposed mapping from a source's tensors to a target's, with what it leaves out.

    Example:
        >>> p = propose({"a.w": (4, 2)}, {"b.w": (4, 2)})
        >>> [(r.sources, r.targets, r.status) for r in p.rules]
        [(('a.w',), ('b.w',), 'certain')]
        >>> p.covered, p.unfilled, p.unused
        (1, (), ())
    """

    rules: tuple[ProposedRule, ...]
    target_count: int
    unfilled: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def covered(self) -> int:
        """How many target tensors a rule fills."""
        return self.target_count - len(self.unfilled)

    @property
    def ambiguous(self) -> tuple[ProposedRule, ...]:
        """The rules a person must confirm."""
        return tuple(r for r in self.rules if r.status != CERTAIN)

    @property
    def complete(self) -> bool:
        """Every target tensor is filled, by certain rules only."""
        return not self.unfilled and not self.ambiguous

    def report(self, path: str | None = None, limit: int = 20) -> str:
        """What ``ckpt diff --propose-map`` prints: the summary, the rules to confirm, what is left out."""
        lines = [f"wrote {path}" if path else "proposal", self.summary(), *self.notes]
        for title, names in (
            ('to confirm (status = "ambiguous")', [f"{r.targets[0]}: {r.reason}" for r in self.ambiguous]),
            ("target tensors no rule fills", list(self.unfilled)),
            ("source tensors no rule uses", list(self.unused)),
        ):
            if names:
                lines.append(f"{title}:")
                lines += [f"  {n}" for n in names[:limit]]
                lines += [f"  ... and {len(names) - limit} more"] if len(names) > limit else []
        return "\n".join(printable(line) for line in lines) + "\n"  # a name cannot forge a line

    def summary(self) -> str:
        """One line: target tensors covered, rules to confirm, unfilled and unused tensors."""
        return (
            f"{self.covered}/{self.target_count} target tensors covered by {len(self.rules)} rules; "
            f"{len(self.ambiguous)} ambiguous (to confirm), {len(self.unfilled)} target tensors unfilled, "
            f"{len(self.unused)} source tensors unused"
        )


# -- one side's structure ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Group:
    """Repeated blocks: names ``{head}{n}.{rest}`` for each number, the same (rest, shape) list in each."""

    head: str
    numbers: tuple[int, ...]
    members: tuple[tuple[str, Shape], ...]
    first: int  # position of its first tensor in the side's order
    tensors: tuple[tuple[str, Shape, int], ...] = ()  # every tensor: name, shape, position

    def name(self, number: int | str, rest: str) -> str:
        return f"{self.head}{number}.{rest}"

    @property
    def numel(self) -> int:
        return sum(_numel(shape) for _, shape in self.members)


@dataclass(frozen=True)
class _Side:
    flat: tuple[tuple[str, Shape, int], ...]  # name, shape, position
    groups: tuple[_Group, ...]


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _numbered_splits(name: str) -> list[tuple[str, int, str]]:
    """Each way to read ``name`` as ``{head}{number}.{rest}`` at a block-like numbered segment."""
    parts = name.split(".")
    found = []
    for i, part in enumerate(parts[:-1]):
        match = _NUMBERED.match(part)
        if match and _BLOCK_STEM.match(match.group(1)):
            head = ".".join(parts[:i]) + "." + match.group(1) if i else match.group(1)
            found.append((head, int(match.group(2)), ".".join(parts[i + 1 :])))
    return found


def _structure(shapes: Mapping[str, Shape]) -> _Side:
    """Find the repeated blocks of one side (outermost first); everything else is flat."""
    order = {name: i for i, name in enumerate(shapes)}
    candidates: dict[str, dict[int, list[tuple[str, Shape]]]] = {}
    for name, shape in shapes.items():
        for head, number, rest in _numbered_splits(name):
            candidates.setdefault(head, {}).setdefault(number, []).append((rest, tuple(shape)))
    valid = {
        head: blocks
        for head, blocks in candidates.items()
        if len(blocks) >= 2 and len({tuple(members) for members in blocks.values()}) == 1
    }
    owner: dict[str, str] = {}
    for head in sorted(valid, key=len):
        for number, members in valid[head].items():
            for rest, _ in members:
                owner.setdefault(f"{head}{number}.{rest}", head)
    groups = []
    for head, blocks in valid.items():
        numbers = tuple(sorted(blocks))
        names = [f"{head}{n}.{rest}" for n in numbers for rest, _ in blocks[n]]
        if all(owner.get(n) == head for n in names):
            first = min(order[n] for n in names)
            tensors = tuple((n, tuple(shapes[n]), order[n]) for n in names)
            groups.append(_Group(head, numbers, tuple(blocks[numbers[0]]), first, tensors))
    grouped = {n for n, head in owner.items() if any(g.head == head for g in groups)}
    flat = tuple((n, tuple(s), order[n]) for n, s in shapes.items() if n not in grouped)
    return _Side(flat, tuple(sorted(groups, key=lambda g: g.first)))


def _align_groups(src: Sequence[_Group], tgt: Sequence[_Group]) -> list[tuple[_Group, _Group]]:
    """Pair block groups in order: equal block counts and equal parameters per block."""
    pairs, used = [], set()
    for s in src:
        for j, t in enumerate(tgt):
            if j not in used and len(s.numbers) == len(t.numbers) and s.numel == t.numel:
                pairs.append((s, t))
                used.add(j)
                break
    return pairs


# -- pairing one segment (a block, or everything outside blocks) ------------------------------------
@dataclass
class _Item:
    name: str
    shape: Shape
    pos: int
    paired: bool = False


@dataclass(frozen=True)
class _Pair:
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    op: str
    status: str
    reason: str
    dim: int | None = None
    target_shapes: tuple[Shape, ...] = ()
    source_shapes: tuple[Shape, ...] = ()


def _role(name: str) -> str:
    """What a tensor is for, by its name: pooler, head, class token, position table, or nothing."""
    parts = name.split(".")
    last = parts[-1].lower()
    if "pooler" in parts:
        return "pooler"
    if ("cls" in last or "class" in last) and "token" in last:
        return "class-token"
    if "pos" in last and ("emb" in last or "embed" in last):
        return "position"
    if any(p in HEAD_ROLE_NAMES for p in parts[:-1]):
        return "head"
    return ""


def _roles_conflict(a: str, b: str) -> bool:
    """Roles that never pair: a pooler with anything else, a class token or position table with
    anything else (``head`` against no role is fine: Meta's ``output`` is Hugging Face's ``lm_head``)."""
    ra, rb = _role(a), _role(b)
    strong = {"pooler", "class-token", "position"}
    return (ra != rb and bool({ra, rb} & strong)) or {ra, rb} == {"head", "pooler"}


def _words(name: str) -> set[str]:
    """The telling words of a name's module (``wq`` also reads as ``q``)."""
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 else parts[-1]
    words = {w for w in re.split(r"[_\d]+", module.lower()) if w and w not in _GENERIC_WORDS}
    words |= {w[1:] for w in words if len(w) in (2, 3) and w.startswith("w")}
    return words


def _names_agree(a: str, b: str) -> bool:
    return a.split(".")[-1] == b.split(".")[-1] and bool(_words(a) & _words(b))


def _pair_segment(src: list[_Item], tgt: list[_Item]) -> list[_Pair]:
    """Pair two segments' tensors: names, unique shapes, slots between certain pairs, fused tensors,
    transposed and reshaped ones, tensors beside a paired one in its module; the rest by order."""
    segment = _Segment(src, tgt)
    segment.run()
    return _square_transposes(_rotary_notes(segment.pairs))


class _Segment:
    """The pairing state of one segment: what is paired, the certain pairs (anchors), module pairs."""

    def __init__(self, src: list[_Item], tgt: list[_Item]) -> None:
        self.src, self.tgt = src, tgt
        self.pairs: list[_Pair] = []
        self.anchors: list[tuple[int, int]] = []
        self.modules: dict[str, tuple[str, str]] = {}  # source module -> (target module, status)
        self.s_names, self.t_names = {s.name for s in src}, {t.name for t in tgt}

    def run(self) -> None:
        self.exact_names()
        self.same_name_transforms()
        for _ in range(2):
            self.unique_shapes()
            self.companions()
            self.slots()
            self.companions()
            self.fused()
        self.shape_transforms()
        self.companions()
        self.by_class_order()

    def take(self, s: _Item, t: _Item, status: str, reason: str, op: str = "rename") -> None:
        """Record one pair; a role conflict, or names that pair otherwise, make it ambiguous."""
        s.paired = t.paired = True
        if _roles_conflict(s.name, t.name):
            status, reason = AMBIGUOUS, f"same shape but different roles ({_role(s.name)} vs {_role(t.name)})"
        elif status == CERTAIN and s.name != t.name and (s.name in self.t_names or t.name in self.s_names):
            status, reason = AMBIGUOUS, f"{reason}, but a name pairs otherwise on the other side"
        self.pairs.append(_Pair((s.name,), (t.name,), op, status, reason, None, (t.shape,), (s.shape,)))
        if status == CERTAIN:
            self.anchors.append((s.pos, t.pos))
        self.modules.setdefault(_module(s.name), (_module(t.name), status))

    def exact_names(self) -> None:
        by_name = {t.name: t for t in self.tgt}
        for s in self.src:
            t = by_name.get(s.name)
            if t is not None and t.shape == s.shape:
                self.take(s, t, CERTAIN, "same name and shape")

    def same_name_transforms(self) -> None:
        """A name on both sides whose shape is transposed, or differs by 1-sized dimensions."""
        by_name = {t.name: t for t in _free(self.tgt)}
        for s in _free(self.src):
            t = by_name.get(s.name)
            if t is None:
                continue
            if _transposed(s.shape) == t.shape:
                self.take(s, t, CERTAIN, f"same name; {_fmt(s.shape)} -> {_fmt(t.shape)}", "transpose")
            elif _squeezed(s.shape) == _squeezed(t.shape) and s.shape != t.shape:
                self.take(s, t, CERTAIN, f"same name; {_fmt(s.shape)} -> {_fmt(t.shape)}", "reshape")

    def unique_shapes(self) -> None:
        t_classes = _classes(self.tgt, _same)
        for shape, members in _classes(self.src, _same).items():
            others = t_classes.get(shape, [])
            if len(members) == 1 and len(others) == 1:
                self.take(members[0], others[0], CERTAIN, f"the only {_fmt(shape)} on both sides")

    def companions(self) -> None:
        """A tensor beside a paired one (same module, same last name component, same shape) pairs alike."""
        by_name = {t.name: t for t in _free(self.tgt)}
        for s in _free(self.src):
            module = _module(s.name)
            if module not in self.modules:
                continue
            t_module, status = self.modules[module]
            t = by_name.get(f"{t_module}.{_leaf(s.name)}" if t_module else _leaf(s.name))
            if t is not None and not t.paired and t.shape == s.shape:
                self.take(
                    s, t, status, f"beside its module's other tensors ({module or '<root>'} -> {t_module})"
                )

    def slots(self) -> None:
        """Same-shape tensors that stand after the same certain pair, as many on each side."""
        s_anchor, t_anchor = [a for a, _ in self.anchors], [b for _, b in self.anchors]
        s_slots, t_slots = _by_slot(self.src, s_anchor), _by_slot(self.tgt, t_anchor)
        s_sig, t_sig = _slot_signatures(self.src, s_anchor), _slot_signatures(self.tgt, t_anchor)
        for key, members in s_slots.items():
            others = t_slots.get(key, [])
            if len(members) != len(others) or any(i.paired for i in members + others):
                continue
            same_sequence = s_sig.get(key[1]) == t_sig.get(key[1])
            for s, t in _within_slot(members, others):
                if len(members) == 1:
                    self.take(s, t, CERTAIN, f"the only {_fmt(s.shape)} in its place between certain pairs")
                elif same_sequence or _names_agree(s.name, t.name):
                    why = "same place in the same sequence" if same_sequence else "order and names agree"
                    self.take(s, t, CERTAIN, f"{len(members)} tensors of {_fmt(s.shape)} here; {why}")

    def fused(self) -> None:
        self._fused(self.src, self.tgt, "split")
        self._fused(self.tgt, self.src, "concat")

    def _fused(self, one_side: list[_Item], many_side: list[_Item], op: str) -> None:
        """One tensor on ``one_side`` that is k equal tensors of ``many_side`` stacked on dim 0."""
        for whole in _free(one_side):
            runs = _runs(_free(many_side), whole)
            if not runs:
                continue
            named = [run for run in runs if _qkv_named(run)]
            if len(runs) > 1 and not named:
                continue  # several unnamed ways to cut it: a guess, not a proposal
            run = (named or runs)[0]
            certain = len(named) == 1 and not _roles_conflict(whole.name, run[0].name)
            reason = f"{_fmt(whole.shape)} is {len(run)} x {_fmt(run[0].shape)} on dim 0"
            if certain:
                reason += ", parts named " + "/".join(_qkv_letter(p.name) for p in run)
            else:
                reason += "; the parts' order is assumed (their names do not say q/k/v)"
            whole.paired = True
            for part in run:
                part.paired = True
            status = CERTAIN if certain else AMBIGUOUS
            parts = tuple(p.name for p in run)
            if op == "split":
                self.pairs.append(
                    _Pair(
                        (whole.name,),
                        parts,
                        op,
                        status,
                        reason,
                        0,
                        tuple(p.shape for p in run),
                        (whole.shape,),
                    )
                )
            else:
                shapes = tuple(p.shape for p in run)
                self.pairs.append(_Pair(parts, (whole.name,), op, status, reason, 0, (whole.shape,), shapes))

    def shape_transforms(self) -> None:
        """Transposed 2-D weights and shapes equal but for 1-sized dimensions (a 1x1 conv, a linear)."""
        passes = (
            ("transpose", _transposed, _same),
            ("reshape", _squeezed, _squeeze_all),
            ("reshape", _squeeze_all, _squeezed),
        )
        for op, s_key_of, t_key_of in passes:
            t_classes = _classes(self.tgt, t_key_of)
            for s_key, members in _classes(self.src, s_key_of).items():
                others = t_classes.get(s_key, [])
                unique = len(members) == len(others) == 1
                for s, t in zip(members, others, strict=False):
                    status = CERTAIN if unique else AMBIGUOUS
                    why = "the only" if unique else "paired by order among"
                    self.take(s, t, status, f"{why} {_fmt(s.shape)} -> {_fmt(t.shape)}", op)

    def by_class_order(self) -> None:
        """What is left: same shape and same last name component, by order; always ambiguous."""
        for kind in (True, False):
            t_classes = _classes(self.tgt, _same)
            for shape, members in _classes(self.src, _same).items():
                others = t_classes.get(shape, [])
                for s in members:
                    match = [
                        t for t in others if not t.paired and (_leaf(t.name) == _leaf(s.name) or not kind)
                    ]
                    if match and not s.paired:
                        reason = (
                            f"{len(members)} vs {len(others)} tensors of {_fmt(shape)}; paired by order only"
                        )
                        self.take(s, match[0], AMBIGUOUS, reason)
                        self.companions()


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _same(shape: Shape) -> Shape | None:
    return shape


def _free(items: Iterable[_Item]) -> list[_Item]:
    return [i for i in items if not i.paired]


def _classes(items: Iterable[_Item], key: Callable[[Shape], Shape | None]) -> dict[Shape, list[_Item]]:
    out: dict[Shape, list[_Item]] = {}
    for item in _free(items):
        k = key(item.shape)
        if k is not None:
            out.setdefault(k, []).append(item)
    return out


def _slot(pos: int, anchor_positions: Sequence[int]) -> int:
    """Index of the last certain pair before ``pos`` (-1: none), on that side's order."""
    before = [i for i, p in enumerate(anchor_positions) if p < pos]
    return max(before, key=lambda i: anchor_positions[i]) if before else -1


def _by_slot(items: list[_Item], anchor_positions: Sequence[int]) -> dict[tuple[Shape, int], list[_Item]]:
    out: dict[tuple[Shape, int], list[_Item]] = {}
    for item in _free(items):
        out.setdefault((item.shape, _slot(item.pos, anchor_positions)), []).append(item)
    return out


def _slot_signatures(
    items: list[_Item], anchor_positions: Sequence[int]
) -> dict[int, list[tuple[Shape, str]]]:
    """Each slot's still-unpaired tensors as (shape, last name component), in order."""
    out: dict[int, list[tuple[Shape, str]]] = {}
    for item in _free(items):
        out.setdefault(_slot(item.pos, anchor_positions), []).append((item.shape, _leaf(item.name)))
    return out


def _within_slot(members: list[_Item], others: list[_Item]) -> list[tuple[_Item, _Item]]:
    """Pair by the last name component where it is unique on both sides, the rest by order."""
    out: list[tuple[_Item, _Item]] = []
    s_leaves = [_leaf(i.name) for i in members]
    t_leaves = [_leaf(i.name) for i in others]
    left_s, left_t = list(members), list(others)
    for s in members:
        leaf = _leaf(s.name)
        if s_leaves.count(leaf) == 1 and t_leaves.count(leaf) == 1:
            t = next(t for t in others if _leaf(t.name) == leaf)
            out.append((s, t))
            left_s.remove(s)
            left_t.remove(t)
    return out + list(zip(left_s, left_t, strict=True))


def _transposed(shape: Shape) -> Shape | None:
    return shape[::-1] if len(shape) == 2 and shape[0] != shape[1] else None


def _squeezed(shape: Shape) -> Shape | None:
    out = tuple(d for d in shape if d != 1)
    return out if out != shape else None


def _squeeze_all(shape: Shape) -> Shape | None:
    return tuple(d for d in shape if d != 1)


def _kind(name: str) -> str:
    return "bias" if "bias" in _leaf(name) else "weight"


def _runs(items: list[_Item], whole: _Item) -> list[list[_Item]]:
    """Runs of k consecutive same-kind (weight/bias) tensors that stack on dim 0 into ``whole``."""
    found = []
    for k in _FUSED_PARTS:
        if not whole.shape or whole.shape[0] % k:
            continue
        part = (whole.shape[0] // k, *whole.shape[1:])
        alike = [i for i in items if i.shape == part and _kind(i.name) == _kind(whole.name)]
        runs = [alike[i : i + k] for i in range(len(alike) - k + 1)]
        found += runs + [run for run in _named_runs(alike, k) if run not in runs]
    return found


def _named_runs(alike: list[_Item], k: int) -> list[list[_Item]]:
    """q, k, v (or k, v) parts under one module (``attn.q_proj``, ``attn.k_proj`` ...), in that order
    wherever the file stores them: a
    safetensors file lists its names sorted (``k_proj``, ``out_proj``, ``q_proj``, ``v_proj``), so
    the parts need not stand next to each other."""
    letters = {3: "qkv", 2: "kv"}.get(k)
    if letters is None:
        return []
    by_module: dict[str, dict[str, list[_Item]]] = {}
    for item in alike:
        by_module.setdefault(_module(_module(item.name)), {}).setdefault(_qkv_letter(item.name), []).append(
            item
        )
    return [
        [parts[letter][0] for letter in letters]
        for parts in by_module.values()
        if all(len(parts.get(letter, [])) == 1 for letter in letters)
    ]


def _qkv_letter(name: str) -> str:
    words = _words(name)
    for letter, spelled in (("q", "query"), ("k", "key"), ("v", "value")):
        if letter in words or spelled in words:
            return letter
    return "?"


def _qkv_named(run: list[_Item]) -> bool:
    return "".join(_qkv_letter(p.name) for p in run) in ("qkv", "kv")


def _rotary_notes(pairs: list[_Pair]) -> list[_Pair]:
    """Meta's ``wq``/``wk`` against Hugging Face's ``q_proj``/``k_proj``: the rows may be permuted."""
    out = []
    for p in pairs:
        if p.op == "rename" and len(p.sources) == 1:
            a, b = p.sources[0], p.targets[0]
            direction = (
                "meta_to_hf"
                if _ROTARY[0].search(a) and _ROTARY[1].search(b)
                else "hf_to_meta"
                if _ROTARY[1].search(a) and _ROTARY[0].search(b)
                else ""
            )
            if direction:
                reason = (
                    "Meta and Hugging Face order q/k rows differently for rotary embeddings (transformers' "
                    "convert_llama_weights_to_hf permutes them per head): if the two apply rotary otherwise,"
                    f' make this rule a [[transform]] op = "rotary_permute", direction = "{direction}", '
                    "n_heads = this tensor's heads (the key/value heads for k)"
                )
                p = replace(p, status=AMBIGUOUS, reason=reason)
        out.append(p)
    return out


def _square_transposes(pairs: list[_Pair]) -> list[_Pair]:
    """Where this segment's 2-D weights are transposed, a square one may be too (its shape cannot tell)."""
    if not any(p.op == "transpose" for p in pairs):
        return pairs
    out = []
    for p in pairs:
        shape = p.target_shapes[0] if p.target_shapes else ()
        if p.op == "rename" and len(shape) == 2 and shape[0] == shape[1]:
            reason = (
                f"square {_fmt(shape)}: its shape cannot tell, but the other 2-D weights here are transposed"
            )
            p = replace(p, op="transpose", status=AMBIGUOUS, reason=reason)
        out.append(p)
    return out


def _fmt(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# -- the proposal -----------------------------------------------------------------------------------
def propose(
    source: Mapping[str, Sequence[int]],
    target: Mapping[str, Sequence[int]],
) -> Proposal:
    """Propose how ``source`` tensors (name -> shape, in module order) fill ``target``'s.

    Example:
        >>> src = {"layers.0.w": (6, 2), "layers.1.w": (6, 2), "out.w": (3, 2)}
        >>> tgt = {"blocks.0.q.w": (2, 2), "blocks.0.k.w": (2, 2), "blocks.0.v.w": (2, 2),
        ...        "blocks.1.q.w": (2, 2), "blocks.1.k.w": (2, 2), "blocks.1.v.w": (2, 2), "head.w": (3, 2)}
        >>> p = propose(src, tgt)
        >>> [(r.op, r.sources, r.targets) for r in p.rules]  # doctest: +NORMALIZE_WHITESPACE
        [('split', ('layers.{n}.w',), ('blocks.{n}.q.w', 'blocks.{n}.k.w', 'blocks.{n}.v.w')),
         ('rename', ('out.w',), ('head.w',))]
    """
    s_shapes = {k: tuple(v) for k, v in source.items()}
    t_shapes = {k: tuple(v) for k, v in target.items()}
    # a template cannot name a brace (no escape): such names stay unused/unfilled, never a template
    s_side = _structure({k: v for k, v in s_shapes.items() if not _braced(k)})
    t_side = _structure({k: v for k, v in t_shapes.items() if not _braced(k)})
    group_pairs = _align_groups(s_side.groups, t_side.groups)
    rules = _flat_rules(s_side, t_side, group_pairs)
    for s_group, t_group in group_pairs:
        rules += _block_rules(s_group, t_group)
    proposal = _finish(rules, s_shapes, t_shapes)
    braced = sum(1 for name in (*s_shapes, *t_shapes) if _braced(name))
    if not braced:
        return proposal
    note = f"{braced} tensor name(s) holding a brace left out (a mapping template cannot name a brace)"
    return replace(proposal, notes=(*proposal.notes, note))


def _braced(name: str) -> bool:
    return "{" in name or "}" in name


def _flat_rules(s_side: _Side, t_side: _Side, group_pairs: list[tuple[_Group, _Group]]) -> list[ProposedRule]:
    """Pair everything outside blocks; each aligned block group stands in the order as a certain pair."""
    src = [_Item(n, s, p) for n, s, p in s_side.flat]
    tgt = [_Item(n, s, p) for n, s, p in t_side.flat]
    aligned_s, aligned_t = {id(s) for s, _ in group_pairs}, {id(t) for _, t in group_pairs}
    src += [_Item(n, s, p) for g in s_side.groups if id(g) not in aligned_s for n, s, p in g.tensors]
    tgt += [_Item(n, s, p) for g in t_side.groups if id(g) not in aligned_t for n, s, p in g.tensors]
    for i, (s_group, t_group) in enumerate(group_pairs):
        src.append(_Item(f"\0group{i}", (-10, i), s_group.first))
        tgt.append(_Item(f"\0group{i}", (-10, i), t_group.first))
    src.sort(key=lambda i: i.pos)
    tgt.sort(key=lambda i: i.pos)
    return [_rule(p) for p in _pair_segment(src, tgt) if not p.sources[0].startswith("\0")]


def _block_rules(s_group: _Group, t_group: _Group) -> list[ProposedRule]:
    src = [_Item(rest, shape, i) for i, (rest, shape) in enumerate(s_group.members)]
    tgt = [_Item(rest, shape, i) for i, (rest, shape) in enumerate(t_group.members)]
    numbers = tuple(zip(s_group.numbers, t_group.numbers, strict=True))
    out = []
    for p in _pair_segment(src, tgt):
        out.append(
            ProposedRule(
                tuple(s_group.name("{n}", s) for s in p.sources),
                tuple(t_group.name("{n}", t) for t in p.targets),
                p.op,
                p.status,
                f"{p.reason} (in each of {len(numbers)} blocks)",
                p.dim,
                numbers,
                p.target_shapes,
                p.source_shapes,
            )
        )
    return out


def _rule(p: _Pair) -> ProposedRule:
    return ProposedRule(
        p.sources, p.targets, p.op, p.status, p.reason, p.dim, (), p.target_shapes, p.source_shapes
    )


def _finish(rules: list[ProposedRule], source: Mapping[str, Shape], target: Mapping[str, Shape]) -> Proposal:
    """Order the rules by the target's order, and list what no rule fills or uses."""
    t_order = {name: i for i, name in enumerate(target)}
    filled: set[str] = set()
    used: set[str] = set()
    for rule in rules:
        for sources, targets in rule.concrete():
            used.update(sources)
            filled.update(targets)
    first = {id(r): min(t_order.get(t, len(t_order)) for _, ts in r.concrete() for t in ts) for r in rules}
    ordered = tuple(sorted(rules, key=lambda r: first[id(r)]))
    unfilled = tuple(t for t in target if t not in filled)
    unused = tuple(s for s in source if s not in used)
    return Proposal(ordered, len(target), unfilled, unused)


def propose_mapping(
    source: Any,
    target: Any,
    *,
    key: str | None = None,
    read_options: ReadOptions | None = None,
    target_key: str | None = None,
) -> Proposal:
    """Propose a mapping from ``source`` to ``target`` (what :func:`ckptsurgeon.diff` accepts for each).

    Tied aliases (``lm_head.weight`` viewing ``wte.weight``) are left out on both sides: the tensor
    they view is mapped, and loading fills the alias.

    Example:
        >>> p = propose_mapping("tv_vit.pth", "timm_vit.pth")   # doctest: +SKIP
        >>> p.summary()                                         # doctest: +SKIP
        '152/152 target tensors covered by 20 rules; 0 ambiguous (to confirm), ...'
    """
    from .result import source_records, target_of
    from .target import target_from_records

    found = source_records(source, key, read_options)
    if found is None:
        raise TypeError(f"propose_mapping: cannot read a source of type {type(source).__name__}")
    resolved = target_of(target, read_options, target_key)
    src_tied = target_from_records(found.records, "source", "checkpoint").tied
    src = {n: r.shape for n, r in found.records.items() if n not in src_tied}
    tgt = {n: r.shape for n, r in resolved.tensors.items() if n not in resolved.tied}
    proposal = propose(src, tgt)
    aliases = len(resolved.tied) + len(src_tied)
    note = (f"{aliases} tied aliases left out (the tensor each views is mapped)",) if aliases else ()
    return replace(proposal, notes=proposal.notes + note)


# -- the mapping file ---------------------------------------------------------------------------------
def to_mapping(proposal: Proposal) -> MappingFile:
    """The proposal as a :class:`ckptsurgeon.surgery.mapping.Mapping`: renames, then transforms, each
    with its ``status`` and its reason as the ``note``. A name kept as it is needs no rule; blocks
    numbered alike on both sides stay one template rule, others are written block by block.

    Example:
        >>> src, tgt = {"enc.0.w": (2, 3), "enc.1.w": (2, 3)}, {"blocks.0.w": (3, 2), "blocks.1.w": (3, 2)}
        >>> m = to_mapping(propose(src, tgt))
        >>> [(t.op, t.sources, t.targets, t.status) for t in m.transforms]
        [('transpose', ('enc.{n}.w',), ('blocks.{n}.w',), 'certain')]
    """
    from ..surgery.mapping import Mapping as MappingFile
    from ..surgery.mapping import Rename

    renames: list[Rename] = []
    transforms: list[TensorTransform] = []
    for rule in proposal.rules:
        for sources, targets in _written_names(rule):
            if rule.op == "rename":
                if sources != targets:
                    renames.append(Rename(sources[0], targets[0], note=rule.reason, status=rule.status))
                continue
            transforms.append(_transform(rule, sources, targets))
    return MappingFile(renames=tuple(renames), transforms=tuple(transforms))


def _written_names(rule: ProposedRule) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """The rule's templates when its blocks are numbered alike on both sides, else each block's names."""
    if all(a == b for a, b in rule.blocks):
        return [(rule.sources, rule.targets)]
    return rule.concrete()


def _transform(rule: ProposedRule, sources: tuple[str, ...], targets: tuple[str, ...]) -> TensorTransform:
    from ..surgery.mapping import TensorTransform

    fields: dict[str, Any] = {"note": rule.reason, "status": rule.status}
    if rule.op == "transpose":
        fields["dims"] = (0, 1)
    elif rule.op in ("split", "concat"):
        dim = rule.dim or 0
        parts = rule.target_shapes if rule.op == "split" else rule.source_shapes
        fields |= {"dim": dim, "sizes": tuple(shape[dim] for shape in parts)}  # sizes: reversible
    elif rule.op == "reshape":
        fields["shape"] = rule.target_shapes[0]
        fields["reverse_shape"] = rule.source_shapes[0]
    return TensorTransform(rule.op, sources, targets, **fields)


def proposal_toml(proposal: Proposal, source: str = "SOURCE", target: str = "TARGET") -> str:
    """The mapping file ``ckpt diff --propose-map`` writes: a header saying what the proposal covers
    and how to review it, then the mapping (docs/mapping.md).

    Example:
        >>> text = proposal_toml(propose({"a.w": (4, 2)}, {"b.w": (4, 2)}), "a.pth", "b.pth")
        >>> "[[rename]]" in text and 'status = "certain"' in text
        True
    """
    header = [
        f"# Proposed by `ckpt diff {source} {target} --propose-map`: {proposal.summary()}.",
        '# Review every rule marked status = "ambiguous" (its note says why), then set it to "certain"',
        "# or change it: applying a mapping with an ambiguous rule is refused.",
        "# A name kept as it is needs no rule.",
        *(f"# {note}" for note in proposal.notes),
        *_listed("target tensors no rule fills", proposal.unfilled),
        *_listed("source tensors no rule uses", proposal.unused),
    ]
    comments = (printable(line) for line in header)  # a name holding a newline cannot write a TOML line
    return "\n".join(comments) + "\n" + to_mapping(proposal).to_toml()


def _listed(title: str, names: Sequence[str], limit: int = 50) -> list[str]:
    if not names:
        return []
    more = [f"#   ... and {len(names) - limit} more"] if len(names) > limit else []
    return [f"# {title}:", *(f"#   {n}" for n in names[:limit]), *more]


def write_proposal(
    proposal: Proposal, path: str, *, force: bool = False, source: str = "SOURCE", target: str = "TARGET"
) -> None:
    """Write :func:`proposal_toml` to ``path`` atomically; an existing file only with ``force``.

    Example:
        >>> write_proposal(propose({"a": (1,)}, {"b": (1,)}), "map.toml")   # doctest: +SKIP
    """
    import os

    from ..errors import OutputError
    from ..fileio.writing import atomic_output

    for name in (source, target, target.rsplit(":", 1)[0]):  # a target "models.py:net()" names its file
        try:
            same = os.path.isfile(path) and os.path.samefile(path, name)
        except (OSError, ValueError):
            same = False
        if same:  # even with --force: a mapping file never replaces the checkpoint or the code it maps
            raise OutputError(f"{path}: is {name}, an input of this diff; name a new file for --propose-map")
    text = proposal_toml(proposal, source, target).encode("utf-8")
    with atomic_output(path, force=force) as fh:
        fh.write(text)
