"""The diagnosis in words: what loads, why not, the head, the filter idiom, and the fix commands."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.coverage import DEFAULT_MIN_COVERAGE, enough
from ..core.grouping import collapse
from ..core.prefixes import KNOWN_WRAPPERS
from ..core.report import counted, percent, plural, shell_quote
from .compare import Comparison, FilterIdiom, ShapeMismatch
from .diagnosis import Diagnosis, Head, ShapeFix, Vocabulary
from .heads import CLASSIFIER_WORDS

FILTER = "{k: v for k, v in sd.items() if k in model_sd}"


@dataclass(frozen=True)
class Explanation:
    """Sentences for the report: the diagnosis ``message``, the ``filter_idiom`` note, an ``alarm``
    when coverage as saved is below the bar (:mod:`ckptsurgeon.core.coverage`), the ``fix_commands``
    to run next, and the ``proposal_commands`` that apply a suffix proposal after review."""

    message: str
    filter_idiom: str
    alarm: str | None
    fix_commands: tuple[str, ...]
    proposal_commands: tuple[str, ...] = ()


def explain(
    diagnosis: Diagnosis,
    source: str,
    target_spec: str | None,
    key: str | None = None,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
) -> Explanation:
    """Put ``diagnosis`` into words, naming ``source`` and ``target_spec`` in the fix commands;
    ``min_coverage`` is the coverage bar of the alarm and of ``ckpt adapt``.

    Example:
        >>> from .diagnosis import diagnose
        >>> e = explain(diagnose({"w": (2,)}, {"w": (2,)}), "a.pth", "b.pth")
        >>> e.message, e.fix_commands
        ('All 1 target tensors load as is.', ())
    """
    return Explanation(
        message=" ".join(_sentences(diagnosis, min_coverage, _diff_command(source, target_spec, key))),
        filter_idiom=_filter_sentence(diagnosis),
        alarm=_alarm(diagnosis.as_saved, min_coverage),
        fix_commands=fix_commands(diagnosis, source, target_spec, key, min_coverage),
        proposal_commands=proposal_commands(diagnosis, source, target_spec, key, min_coverage),
    )


def _diff_command(source: str, target_spec: str | None, key: str | None) -> str:
    """``ckpt diff SRC TARGET [--key K]``: the command whose report lists the fixes, spelled out,
    since adapt and load_into say these sentences without the commands under them."""
    key_opt = f" --key {shell_quote(key)}" if key else ""
    return f"ckpt diff {shell_quote(source)} {shell_quote(target_spec or 'TARGET')}{key_opt}"


def _sentences(
    d: Diagnosis, min_coverage: float = DEFAULT_MIN_COVERAGE, diff_command: str = "ckpt diff SRC TARGET"
) -> list[str]:
    saved = d.as_saved
    if saved.ok:
        return [f"All {saved.total} target tensors load as is.", *_notes(saved)]
    if saved.complete:  # only tied aliases left out
        return [
            f"All {saved.total} target tensors the file must hold load as is, but it leaves out "
            f"{counted(len(saved.tied), 'tied alias', 'tied aliases')}, so it does not "
            "load strictly.",
            *_notes(saved),
        ]
    out = [f"As saved: {saved.loadable} of {saved.total} would load."]
    final = saved
    if d.improves:
        out.append(_transform_sentence(d))
        final = d.after
    out += _remainder(d, final)
    out += _notes(final)
    if not enough(final.loadable, final.total, min_coverage) and final.total:
        out.append(_low_coverage_sentence(d, final, min_coverage))
    if d.proposed_mapping:
        loads = final.loadable + len(d.proposed_mapping)
        first, second = d.proposed_mapping[0]
        out.append(
            "Prefix changes are not enough: matching keys by their longest common dotted suffix "
            f"(same shape) proposes {len(d.proposed_mapping)} renames, e.g. {first} → {second}; "
            f"with them {loads} of {final.total} would load. It is a guess, which ckpt adapt does not "
            f"apply: review it, then apply it with the commands `{diff_command}` lists."
        )
    if d.ambiguous:
        out.append(
            f"{len(d.ambiguous)} target keys matched several file keys equally well and were left out."
        )
    if final.total and not enough(final.loadable + len(d.proposed_mapping), final.total, min_coverage):
        out.append(
            f"The same network from another implementation? `{diff_command} --propose-map map.toml` pairs "
            "the tensors by structure (blocks, order, shapes) into a mapping file to review and apply."
        )
    return out


def _transform_sentence(d: Diagnosis) -> str:
    t, n, total = d.transform, d.after.loadable, d.after.total
    if t.strip and t.add:
        return (
            f"The file's keys start with {describe_prefix(t.strip)} and the target's with "
            f"{describe_prefix(t.add)}: replacing one with the other loads {n} of {total}."
        )
    if t.add:
        where, verb = f"The target's keys start with {describe_prefix(t.add)} and the file's don't", "adding"
    else:
        where, verb = (
            f"The file's keys start with {describe_prefix(t.strip)} and the target's don't",
            "stripping",
        )
    return f"{where}: {verb} it loads {n} of {total}."


def _remainder(d: Diagnosis, final: Comparison) -> list[str]:
    out: list[str] = []
    head, vocabulary = d.head, d.vocabulary
    explained = [*(head.tensors if head else ()), *(vocabulary.tensors if vocabulary else ())]
    explained += [f.mismatch for f in d.shape_fixes]
    rest = len(final.missing) + len(final.shape_mismatched)
    out += _shape_fix_sentences(d.shape_fixes)
    if head:
        out += _head_sentences(head, _lead(rest, len(head.tensors), len(explained)))
    if vocabulary:
        out += _vocabulary_sentences(vocabulary, _lead(rest, len(vocabulary.tensors), len(explained)))
    explained_names = {m.name for m in explained}
    others = [m for m in final.shape_mismatched if m.name not in explained_names]
    if others:
        out.append(
            f"{counted(len(others), 'tensor has', 'tensors have')} another shape "
            f"({', '.join(_shape_change(m) for m in others[:3])}{_more(len(others), 3)}): "
            "a different model size or variant, not just a head."
        )
    if final.missing:
        out.append(f"Missing from the file: {len(final.missing)} ({_labels(final.missing)}).")
    if final.unexpected:
        in_file = d.extra or final.unexpected  # the file's own names, not the transformed ones
        out.append(f"In the file but not in the target: {len(in_file)} ({_labels(in_file)}).")
    return out


def _lead(rest: int, count: int, explained: int) -> str:
    """ "The other 2 are" when these are all that is left to explain, else "Of the other 5, 2 are"."""
    verb = plural(count, "is", "are")
    if rest == count == explained:
        return f"The other {count} {verb}"
    return f"Of the other {rest}, {count} {verb}"


def _head_sentences(head: Head, lead: str) -> list[str]:
    return [*_head_description(head, lead), *_keep_classes_sentence(head)]


def _keep_classes_sentence(head: Head) -> list[str]:
    """For a head that shrinks: ``--keep-classes`` keeps chosen rows instead of dropping them."""
    src, tgt = head.source_classes, head.target_classes
    if tgt >= src:
        return []
    return [
        f"If the target's {tgt} classes are {tgt} of the file's {src}: ckpt adapt --keep-classes I,J,... "
        "(or @FILE, one index per line) keeps those rows of the head, in that order."
    ]


def _head_description(head: Head, lead: str) -> list[str]:
    which = "classifier head" if _is_classifier(head.modules) else "output head"
    if len(head.modules) == 1:
        shapes = ", ".join(_shape_change(m) for m in head.tensors)
        return [
            f"{lead} the {which}: {shapes}.",
            f"It is the output layer for {head.source_classes} classes and the target has "
            f"{head.target_classes}: expected when fine-tuning on other classes, not a bug; "
            "drop it and the new head trains from scratch.",
        ]
    per_module = "; ".join(
        f"{module} ({', '.join(_shape_change(m) for m in head.tensors if _module_of(m) == module)})"
        for module in head.modules
    )
    return [
        f"{lead} {len(head.modules)} {which}s, each the output layer for {head.source_classes} classes "
        f"where the target has {head.target_classes}: {per_module}.",
        "Every layer whose output is the class count is a head (auxiliary and distillation heads too): "
        "expected when fine-tuning on other classes, not a bug; drop them and the new heads train from "
        "scratch.",
    ]


def _vocabulary_sentences(vocabulary: Vocabulary, lead: str) -> list[str]:
    shapes = ", ".join(_shape_change(m) for m in vocabulary.tensors)
    src, tgt = vocabulary.source_tokens, vocabulary.target_tokens
    out = [f"{lead} the vocabulary: {shapes}."]
    out += [f"{alias} is tied to {held}: it changes size with it." for alias, held in vocabulary.tied_aliases]
    kept = (
        f"the {src} trained rows and initialises only the new ones"
        if tgt > src
        else (f"the first {tgt} trained rows and drops the rest")
    )
    out.append(
        f"Their rows are tokens, not classes: the file has a vocabulary of {src} tokens and the target "
        f"{tgt} (tokens added to or removed from its tokenizer; another tokenizer's rows mean other tokens). "
        f"Resizing keeps the trained rows: load the "
        f"file into the model built with {src} tokens, then model.resize_token_embeddings({tgt}) (Hugging "
        f"Face) keeps {kept}. Dropping these tensors (as ckpt adapt does unless asked) starts the "
        "embeddings from scratch."
    )
    out.append(_resize_sentence(vocabulary))
    return out


def _resize_sentence(vocabulary: Vocabulary) -> str:
    """``embed_tokens / lm_head: 99 -> 120 tokens: keeps the 99 trained rows, 21 new rows from their
    mean: --resize-vocab``: what ``ckpt adapt --resize-vocab`` does to these tensors.

    Example:
        >>> from .diagnosis import find_vocabulary
        >>> _resize_sentence(find_vocabulary((ShapeMismatch("wte.weight", (99, 8), (120, 8)),)))[:70]
        'wte: 99 -> 120 tokens: ckpt adapt --resize-vocab keeps the 99 trained '
    """
    src, tgt = vocabulary.source_tokens, vocabulary.target_tokens
    if tgt > src:
        keeps = (
            f"keeps the {src} trained rows, {tgt - src} new {plural(tgt - src, 'row', 'rows')} "
            "from their mean (or zeros: --new-rows zeros)"
        )
    else:
        keeps = f"keeps the first {tgt} trained rows and drops the other {src - tgt}"
    modules = " / ".join(vocabulary.modules)
    return (
        f"{modules}: {src} -> {tgt} tokens: ckpt adapt --resize-vocab {keeps}, in the file it writes "
        "(load_into(..., resize_vocab=True) in memory)."
    )


_FIX_VERBS = {
    "pos_embed": "resampled (bicubic, as timm's resample_abs_pos_embed)",
    "rel_pos_bias": "resized (as timm's resize_rel_pos_bias_table)",
    "input_conv": "adapted (timm's adapt_input_conv rule)",
}


def _shape_fix_sentences(fixes: Sequence[ShapeFix]) -> list[str]:
    """One sentence per tensor whose shape changed but whose learned values ckpt adapt keeps.

    Example:
        >>> from .diagnosis import find_shape_fixes
        >>> m = ShapeMismatch("pos_embed", (1, 197, 8), (1, 577, 8))
        >>> print(_shape_fix_sentences(find_shape_fixes((m,), ["pos_embed"]))[0][:80])
        pos_embed: a 14x14 grid + 1 token -> 24x24 + 1: resampled (bicubic, as timm's re
    """
    return [
        f"{f.words}: {_FIX_VERBS[f.kind]} by ckpt adapt and load_into, which keeps the learned values; "
        f"{f.option} ({f.keyword}) leaves it out instead."
        for f in fixes
    ]


def _notes(c: Comparison) -> list[str]:
    out: list[str] = []
    counters = [n for n in c.missing if n.rsplit(".", 1)[-1] == "num_batches_tracked"]
    if counters:
        out.append(
            f"{len(counters)} of the missing are BatchNorm num_batches_tracked counters: load_state_dict "
            "tolerates their absence when the dict carries no version metadata (it fills in 0), "
            "but they are not in the file."
        )
    out += _tied_sentences(c.tied)
    if c.dtype_differences:
        pairs = sorted({(x.source_dtype, x.target_dtype) for x in c.dtype_differences})
        kinds = ", ".join(f"{a} in the file, {b} in the target" for a, b in pairs)
        out.append(
            f"{len(c.dtype_differences)} matched tensors differ in dtype ({kinds}): "
            "load_state_dict casts them."
        )
    return out


def _tied_sentences(tied: Mapping[str, str]) -> list[str]:
    """What a tied alias left out of the file means, and the ways that load it."""
    if not tied:
        return []
    out = [
        f"{alias} is tied to {held} (one parameter), which the file holds." for alias, held in tied.items()
    ]
    aliases = plural(len(tied), "the tied alias", f"the {len(tied)} tied aliases")
    out.append(
        f"load_state_dict(strict=True) raises on {aliases} the file leaves out (as missing keys); "
        "load with strict=False (or ckptsurgeon.load_into): loading the tensor an alias shares fills it, "
        "as long as the model keeps them tied. Hugging Face models re-tie with tie_weights(), which "
        "from_pretrained calls on load (it reports nothing missing)."
    )
    return out


def _filter_sentence(d: Diagnosis) -> str:
    if d.as_saved.complete:
        return ""
    saved = _filter_text(d.filter_as_saved, "keeps")
    if not d.improves:
        return f"A name-only filter `{FILTER}` {saved}"
    after = _filter_text(d.filter_after, "would keep")
    return f"A name-only filter `{FILTER}` {saved} After the prefix fix, the same filter {after}"


def _filter_text(f: FilterIdiom, verb: str) -> str:
    if f.kept == 0:
        return (
            f"{verb} 0 of {f.source_total} keys: load_state_dict(strict=False) then loads nothing and "
            "raises nothing, and training starts from random weights, silently."
        )
    if f.wrong_shape:
        return (
            f"{verb} {f.kept} of {f.source_total} keys, but {f.wrong_shape} of them have the wrong shape, so "
            f"load_state_dict raises a size mismatch; also filter on shape to keep the {f.fits} that fit."
        )
    return f"{verb} {f.kept} of {f.source_total} keys, all of the right shape."


def _low_coverage_sentence(d: Diagnosis, final: Comparison, min_coverage: float) -> str:
    after = " after the key fix" if d.improves else ""
    if final.loadable == 0:
        return f"Nothing loads{after}: is the file a checkpoint of this architecture?"
    share = percent(final.loadable, final.total)
    return (
        f"{final.loadable} of {final.total} loading{after} ({share}) is below "
        f"the {min_coverage:g}% minimum coverage: ckpt adapt and load_into refuse it (--min-coverage / "
        "min_coverage= lowers the bar). Is the file a checkpoint of this architecture?"
    )


def _alarm(c: Comparison, min_coverage: float = DEFAULT_MIN_COVERAGE) -> str | None:
    """The loud line when less than ``min_coverage`` percent of the target (or nothing) loads as saved.

    Example:
        >>> from .diagnosis import diagnose
        >>> _alarm(diagnose({"a": (2,)}, {"a": (2,), "b": (2,), "c": (2,)}).as_saved)[:60]
        'ONLY 33.3% WOULD LOAD: 1 of 3 target tensors are in the file'
    """
    if enough(c.loadable, c.total, min_coverage):
        return None
    if c.loadable == 0:
        what = "NOTHING WOULD LOAD"
    else:
        return (
            f"ONLY {percent(c.loadable, c.total)} WOULD LOAD: {c.loadable} of {c.total} target tensors are "
            f"in the file under the same name and shape, below the {min_coverage:g}% minimum coverage. "
            "Loaded with strict=False (or after a name filter), the rest of the model keeps its random "
            "weights, silently."
        )
    return (
        f"{what}: {c.loadable} of {c.total} target tensors are in the file under the same name and shape. "
        "Loaded with strict=False (or after a name filter), the model keeps its random weights, silently."
    )


# Keys with no place in the target that the step-by-step rename drops by name; beyond this, adapt only.
MAX_DROP_FLAGS = 4


def fix_commands(
    d: Diagnosis,
    source: str,
    target_spec: str | None,
    key: str | None = None,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
) -> tuple[str, ...]:
    """The ``ckpt`` commands that make the file load: ``adapt`` in one go, then the step-by-step pair.

    None when too little would load even after the fix (below ``min_coverage``: adapt refuses).

    Example:
        >>> from .diagnosis import diagnose
        >>> fix_commands(diagnose({"m.w": (2,), "m.x": (1,)}, {"w": (2,), "x": (1,)}), "a.pth", "b.pth")
        ('ckpt adapt a.pth b.pth -o a.adapted.pth', 'ckpt rename a.pth --strip-prefix m. -o a.renamed.pth')
    """
    if d.as_saved.ok or not enough(d.after.loadable, d.after.total, min_coverage):
        return ()
    src, tgt = shell_quote(source), shell_quote(target_spec or "TARGET")
    key_opt = f" --key {shell_quote(key)}" if key else ""
    needs_drop = bool(d.after.shape_mismatched or d.after.unexpected)
    if not d.improves and not needs_drop:
        return ()  # only keys the file does not have are missing: no command can add them
    bar = _coverage_option(d.after.loadable, d.after.total, min_coverage)
    commands = [f"ckpt adapt {src} {tgt}{key_opt}{bar} -o {_output(source, 'adapted')}"]
    if d.improves:
        if len(d.extra) > MAX_DROP_FLAGS:
            return tuple(commands)  # too many to list by hand: adapt drops them
        flags = (f" --strip-prefix {shell_quote(d.transform.strip)}" if d.transform.strip else "") + (
            f" --add-prefix {shell_quote(d.transform.add)}" if d.transform.add else ""
        )
        flags = "".join(f" --drop {shell_quote(name)}" for name in d.extra) + flags
        renamed = _output(source, "renamed")
        commands.append(f"ckpt rename {src}{key_opt}{flags} -o {renamed}")
        if _misfits(d):
            commands.append(f"ckpt strip-head {renamed} --target {tgt} -o {_output(source, 'adapted')}")
    elif needs_drop and _misfits(d):
        commands.append(f"ckpt strip-head {src}{key_opt} --target {tgt} -o {_output(source, 'stripped')}")
    return tuple(commands)


def _misfits(d: Diagnosis) -> bool:
    """True when a shape-mismatched tensor is left to drop (not one ckpt adapt reshapes: a shape fix)."""
    fixed = {f.mismatch.name for f in d.shape_fixes}
    return any(m.name not in fixed for m in d.after.shape_mismatched)


def proposal_commands(
    d: Diagnosis,
    source: str,
    target_spec: str | None,
    key: str | None = None,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
) -> tuple[str, ...]:
    """The commands that apply the suffix proposal, for after review: a ``ckpt rename`` giving
    every key its target name (the key transform, then one anchored ``--replace`` per proposed
    module) into ``SOURCE.mapped...``, then ``ckpt adapt`` on that. Empty without a proposal.

    Example:
        >>> from .diagnosis import diagnose
        >>> d = diagnose({"m.e.s1.conv.w": (3,), "m.e.s2.conv.w": (4,), "m.e.s2.bn.w": (4,)},
        ...              {"b.s1.conv.w": (3,), "e.s2.conv.w": (4,), "e.s2.bn.w": (4,)})
        >>> print("\\n".join(proposal_commands(d, "a.pth", "b.pth")))
        ckpt rename a.pth --strip-prefix m. --replace '^e\\.s1\\.conv\\.(w)$' 'b.s1.conv.\\1' -o a.mapped.pth
        ckpt adapt a.mapped.pth b.pth -o a.adapted.pth
    """
    if not d.proposed_mapping:
        return ()
    src, tgt = shell_quote(source), shell_quote(target_spec or "TARGET")
    key_opt = f" --key {shell_quote(key)}" if key else ""
    t = d.transform
    pairs = [(t.rename(old), new) for old, new in d.proposed_mapping]
    flags = f" --strip-prefix {shell_quote(t.strip)}" if t.strip else ""
    if t.add and all(new.startswith(t.add) for _, new in pairs):
        pairs = [(old[len(t.add) :], new[len(t.add) :]) for old, new in pairs]
        flags += _replace_flags(pairs) + f" --add-prefix {shell_quote(t.add)}"
    else:
        flags += (f" --replace '^' {shell_quote(t.add)}" if t.add else "") + _replace_flags(pairs)
    renamed = _output(source, "mapped")
    loads = d.after.loadable + len(d.proposed_mapping)
    bar = _coverage_option(loads, d.after.total, min_coverage)
    return (
        f"ckpt rename {src}{key_opt}{flags} -o {renamed}",
        f"ckpt adapt {renamed} {tgt}{bar} -o {_output(source, 'adapted')}",
    )


def _replace_flags(pairs: Sequence[tuple[str, str]]) -> str:
    """One anchored ``--replace`` per (old module, new module), its leaves as alternatives.

    Example:
        >>> print(_replace_flags([("pool.dense.weight", "x.dense.weight"), ("pool.dense.bias", "x.dense.b")]))
         --replace '^pool\\.dense\\.(weight)$' 'x.dense.\\1' --replace '^pool\\.dense\\.bias$' x.dense.b
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for old, new in pairs:
        old_module, _, old_leaf = old.rpartition(".")
        new_module, _, new_leaf = new.rpartition(".")
        key = (old_module, new_module) if old_leaf == new_leaf else (old, new)
        groups.setdefault(key, []).append(old_leaf if old_leaf == new_leaf else "")
    flags = []
    for (old, new), leaves in groups.items():
        if leaves == [""]:  # a whole-key rename: the leaves differ
            pattern, repl = f"^{re.escape(old)}$", _literal(new)
        else:
            alternatives = "|".join(re.escape(leaf) for leaf in sorted(leaves))
            pattern = f"^{re.escape(old)}" + r"\." + f"({alternatives})$"
            repl = _literal(new) + "." + r"\1"
        flags.append(f" --replace {shell_quote(pattern)} {shell_quote(repl)}")
    return "".join(flags)


def _literal(text: str) -> str:
    """``text`` as a literal ``re.sub`` replacement (backslashes doubled)."""
    return text.replace("\\", "\\\\")


def _coverage_option(loads: int, total: int, min_coverage: float) -> str:
    """`` --min-coverage P`` when adapt's default bar would refuse what the caller's bar accepts."""
    if min_coverage >= DEFAULT_MIN_COVERAGE or enough(loads, total):
        return ""
    return f" --min-coverage {min_coverage:g}"


def _output(source: str, tag: str) -> str:
    """``a.adapted.pth``: a name for a fix's output, keeping the source's suffix when the registry
    proposes it for a new file (:data:`ckptsurgeon.formats.WRITERS`), else ``.pth``."""
    from ..formats import WRITERS

    path = Path(source)
    kept = [s for kind in WRITERS.values() for s in kind.proposed_suffixes]
    suffix = path.suffix if path.suffix in kept else WRITERS["pth"].suffixes[0]
    stem = path.stem if path.suffix else path.name
    return shell_quote(f"{stem}.{tag}{suffix}")  # in the working folder: the source's may be read-only


# -- wording helpers ------------------------------------------------------------------------------
def _module_of(m: ShapeMismatch) -> str:
    return m.name.rpartition(".")[0]


def _shape_change(m: ShapeMismatch) -> str:
    return f"{m.file_name} {_shape(m.source_shape)} → {_shape(m.target_shape)}"


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _is_classifier(modules: Sequence[str]) -> bool:
    words = CLASSIFIER_WORDS
    return any(w in part for m in modules for part in m.split(".") for w in words) and not any(
        "lm_head" in m for m in modules
    )


def _labels(names: Sequence[str], limit: int = 3) -> str:
    groups = collapse(list(names), merge_leaves=True)
    shown = ", ".join(g.label for g in groups[:limit])
    return shown + _more(len(groups), limit)


def _more(count: int, limit: int) -> str:
    return f" and {count - limit} more" if count > limit else ""


def describe_prefix(prefix: str) -> str:
    """``_orig_mod.module.`` -> "`_orig_mod.module.` (torch.compile, DataParallel)" for messages.

    Example:
        >>> describe_prefix("module.")
        '`module.` (DataParallel)'
    """
    who = {
        "module": "DataParallel",
        "_orig_mod": "torch.compile",
        "model": "Lightning or a trainer",
        "_fsdp_wrapped_module": "FSDP",
        "_checkpoint_wrapped_module": "activation checkpointing",
        "_forward_module": "Lightning Fabric",
    }
    parts = prefix.split(".")[:-1]
    names = [who[p] for p in parts if p in KNOWN_WRAPPERS and p in who]
    return f"`{prefix}` ({', '.join(names)})" if names and len(names) == len(parts) else f"`{prefix}`"
