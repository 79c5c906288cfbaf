"""What ``diff`` says about a PEFT adapter folder instead of "nothing would load": the modules of
the target it updates, for which base model, and how to use it (the folder itself is read by
:mod:`ckptsurgeon.formats.peft`).
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ..core.checkpoint import Checkpoint
from ..core.report import printable
from ..formats.peft import PEFT_PREFIX, adapter_config, adapter_modules, adapter_parts, kind
from .explain import Explanation

if TYPE_CHECKING:  # pragma: no cover
    from ..core.record import TensorRecord


def matched_modules(modules: Iterable[str], target_names: Iterable[str]) -> list[str]:
    """The adapter's modules that the target holds: the same dotted path, or one that ends the
    other's (``transformer.h.0.attn`` against a target built without ``transformer.``).

    Example:
        >>> matched_modules(["transformer.h.0.attn", "x.y"], ["h.0.attn.weight", "h.0.attn.bias"])
        ['transformer.h.0.attn']
    """
    target_modules = {name.rsplit(".", 1)[0] for name in target_names if "." in name}
    target_tails = {".".join(m.split(".")[i:]) for m in target_modules for i in range(len(m.split(".")))}
    found = []
    for module in modules:
        parts = module.split(".")
        if module in target_tails or any(".".join(parts[i:]) in target_modules for i in range(len(parts))):
            found.append(module)
    return found


def adapter_explanation(
    explanation: Explanation,
    ckpt: Checkpoint,
    records: Mapping[str, TensorRecord],
    target: Iterable[str],
    loadable: int,
    total: int,
) -> Explanation:
    """What ``diff`` says for an adapter folder instead of "nothing would load": what it is, for
    which base model, how many of the target's modules it updates, and how to use it.

    Example:
        >>> e = adapter_explanation(explanation, ckpt, records, target_names)   # doctest: +SKIP
        >>> e.alarm                                                            # doctest: +SKIP
        'This is a LoRA adapter for gpt2, not a full checkpoint: ...'
    """
    config = adapter_config(ckpt.metadata)
    modules, whole = adapter_modules(records)
    parts = adapter_parts(records)
    target_names = list(target)
    matched = matched_modules(modules, target_names)
    base = config.get("base_model_name_or_path")
    name = kind(config)
    article = "an" if name[:1].upper() in "AEIOU" else "a"
    alarm = (
        f"This is {article} {name} adapter for {base or 'a base model it does not name'}, not a full "
        f"checkpoint: its {len(records)} tensors update {len(modules)} modules of the base model, "
        f"{len(matched)} of which are in the target (matched by stripping `{PEFT_PREFIX}` and "
        f"{_names(['`.' + p + '`' for p in parts], 4) or 'the adapter parts'})"
        + (f", and store {len(whole)} whole ({_names(whole)})" if whole else "")
        + ". Load the base model's weights, then the adapter with peft "
        f"(PeftModel.from_pretrained(model, {str(ckpt.path)!r})), or merge it into the base weights "
        + (
            f"(ckpt merge-lora BASE {shlex.quote(str(ckpt.path))} -o OUT, as peft's merge_and_unload())."
            if name == "LoRA"
            else "(peft's merge_and_unload())."
        )
    )
    message = (
        f"As saved: {loadable} of {total} would load: the file holds an adapter's tensors, "
        "not the model's weights; diff the base model's own checkpoint to check that it loads."
    )
    # the config's names and the path may hold anything: escaped, as the report escapes the file's keys
    return dataclasses.replace(
        explanation,
        message=message,
        alarm=printable(alarm),
        filter_idiom="",
        fix_commands=(),
        proposal_commands=(),
    )


def _names(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
