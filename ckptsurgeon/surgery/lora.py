"""``ckpt merge-lora``: a LoRA adapter merged into its base model's weights, as peft's ``merge_and_unload``.

Every updated weight is a :class:`~ckptsurgeon.surgery.transforms.Transform` of three inputs
(the base weight ``W``, the adapter's ``lora_A`` and ``lora_B``) with one output, ``W``'s name,
dtype and shape: ``W + (B @ A) * scale`` computed in float32 and cast back to ``W``'s dtype (the
delta transposed for ``fan_in_fan_out``: GPT-2's Conv1D). ``scale`` is ``lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``), per module from ``rank_pattern`` and
``alpha_pattern`` as peft matches them. A tensor the adapter stores whole (``modules_to_save``)
replaces the base tensor of that name (a head the base ties to its embedding and so does not
store, GPT-2's ``lm_head``, is written as a tensor of its own, untied, as peft's
``merge_and_unload`` + ``save_pretrained`` give). Every other base tensor passes through; the adapter's
factors are the transforms' inputs, not written. The adapter's ``base_model.model.`` names are
matched to the base's by the key-transform search ``diff`` uses.

What cannot be merged exactly is refused, with one line, before anything is written: DoRA, other
PEFT types, LoRA on embeddings or convolutions, trained biases, a module the base does not have,
shapes that do not fit.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.checkpoint import StateDictCandidate
from ..core.dtypes import DTYPES
from ..core.record import TensorRecord
from ..core.report import format_shape
from ..core.source import Source, open_source
from ..diffing.diagnosis import KeyTransform, best_transform
from ..errors import InputError, SurgeryError
from ..formats import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ReadOptions, open_checkpoint
from ..formats.peft import ADAPTER_PARTS, PEFT_PREFIX, kind, load_config
from .operations import PathLike, _need_output, gc_paused, write_options
from .pipeline import write_checkpoint
from .plan import Entry, Plan
from .results import SurgeryResult
from .transforms import Output, Transform, _torch_dtype

MERGEABLE = ("lora_A", "lora_B")  # the only adapter parts merged: LoRA's factors of a Linear or Conv1D
# config fields that make a LoRA adapter something W + B @ A * scale does not reproduce
_UNMERGEABLE_FLAGS = {
    "use_dora": "DoRA (use_dora) rescales each weight by a learned magnitude",
    "lora_bias": "lora_bias trains a bias in lora_B",
    "use_qalora": "QALoRA (use_qalora) pools the input",
    "ensure_weight_tying": "ensure_weight_tying adapts a tied head and its embedding as one",
}
_UNMERGEABLE_LISTS = {
    "layer_replication": "layer_replication shares layers the base holds once",
    "target_parameters": "target_parameters adapts nn.Parameters, not layers",
    "trainable_token_indices": "trainable_token_indices trains single embedding rows",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens) applies only after its invocation",
}


@dataclass(frozen=True)
class LoraSettings:
    """What of ``adapter_config.json`` the merge uses (peft's defaults where a field is absent).

    Example:
        >>> s = LoraSettings(r=8, lora_alpha=16, alpha_pattern={"q_proj": 32})
        >>> s.scale("model.layers.0.self_attn.q_proj"), s.scale("model.layers.0.self_attn.v_proj")
        (4.0, 2.0)
    """

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)

    def rank(self, module: str) -> int:
        """The module's rank: its ``rank_pattern`` entry (matched as peft matches it), else ``r``."""
        return self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)

    def alpha(self, module: str) -> float:
        """The module's ``lora_alpha``: its ``alpha_pattern`` entry, else ``lora_alpha``."""
        return self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.lora_alpha)

    def scale(self, module: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), as peft's LoRA layer scales."""
        rank = self.rank(module)
        return self.alpha(module) / (math.sqrt(rank) if self.use_rslora else rank)


def pattern_key(patterns: Mapping[str, Any], module: str) -> str:
    """The first pattern matching the end of ``module`` at a dot (peft's ``get_pattern_key``).

    Example:
        >>> pattern_key({"v_proj": 4, "layers.0.q_proj": 2}, "model.layers.0.q_proj")
        'layers.0.q_proj'
        >>> pattern_key({"v_proj": 4}, "model.layers.0.q_proj")
        'model.layers.0.q_proj'
    """
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            continue
    return module


def lora_settings(config: Mapping[str, Any], where: str) -> LoraSettings:
    """The merge settings of a validated adapter config; a SurgeryError for what cannot be merged exactly.

    Example:
        >>> lora_settings({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True}, "a").scale("q")
        4.0
        >>> lora_settings({"peft_type": "IA3"}, "a")
        Traceback (most recent call last):
        ...
        ckptsurgeon.errors.SurgeryError: a: an IA3 adapter; merge-lora merges LoRA adapters only ...
    """
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        name = kind(config)
        article = "an" if name[:1].upper() in "AEIOU" else "a"
        raise SurgeryError(
            f"{where}: {article} {name} adapter; merge-lora merges LoRA adapters only "
            "(merge it with peft's merge_and_unload())"
        )
    reasons = [why for flag, why in _UNMERGEABLE_FLAGS.items() if config.get(flag) is True]
    reasons += [why for name, why in _UNMERGEABLE_LISTS.items() if config.get(name)]
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        reasons.append(f"bias={json.dumps(bias)} trains biases the adapter stores beside its factors")
    if reasons:
        raise SurgeryError(
            f"{where}: cannot merge exactly: {reasons[0]}; merge it with peft's merge_and_unload()"
        )
    alpha = config.get("lora_alpha")
    return LoraSettings(
        r=config.get("r") or 8,
        lora_alpha=8 if alpha is None else alpha,
        use_rslora=config.get("use_rslora") is True,
        fan_in_fan_out=config.get("fan_in_fan_out") is True,
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
    )


# -- the plan ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Factors:
    module: str  # as peft names it (without base_model.model.)
    a: TensorRecord
    b: TensorRecord
    a_name: str  # as the adapter file names them
    b_name: str


def merge_plan(
    base: Mapping[str, TensorRecord],
    adapter: Mapping[str, TensorRecord],
    settings: LoraSettings,
    where: str = "the adapter",
) -> tuple[Plan, dict[str, TensorRecord]]:
    """The plan that merges ``adapter`` into ``base``, and the dict it was made for (the base's
    tensors, then the adapter's under their own names: the transforms' inputs).

    Example:
        >>> base = {"q.weight": TensorRecord("q.weight", "float32", (4, 6))}
        >>> adapter = {"base_model.model.q.lora_A.weight": TensorRecord("a", "float32", (2, 6)),
        ...            "base_model.model.q.lora_B.weight": TensorRecord("b", "float32", (4, 2))}
        >>> plan, planned = merge_plan(base, adapter, LoraSettings(r=2, lora_alpha=4))
        >>> plan.entries[0].transform.description, plan.dropped_names[0]
        ('merge LoRA: W + B @ A * 2', 'base_model.model.q.lora_A.weight')
    """
    factors, whole = _split_adapter(adapter, where)
    if not factors and not whole:
        raise SurgeryError(f"{where}: holds no LoRA tensors; nothing to merge")
    expected = {f"{f.module}.weight": _merged_shape(f, settings, where) for f in factors}
    expected.update({name: tuple(adapter[stored].shape) for name, stored in whole.items()})
    keys = best_transform(expected, {n: tuple(r.shape) for n, r in base.items()})
    collide = next((n for n in adapter if n in base), None)
    if collide is not None:
        raise SurgeryError(
            f"{where}: the adapter's {collide!r} is also a base tensor; cannot tell them apart"
        )
    transforms: dict[str, Transform] = {}
    consumed: dict[str, str] = {}
    for f in factors:
        name = _base_name(keys, f"{f.module}.weight", base, expected, where)
        transforms[name] = merge_transform(base[name], f, settings.scale(f.module), settings.fan_in_fan_out)
        consumed[f.a_name] = consumed[f.b_name] = f"LoRA factor of {name}"
    untied: dict[str, str] = {}  # a stored head the base ties to its embedding -> the head's name
    for bare, stored in whole.items():
        tied_to = _tied_embedding(base, keys.rename(bare), adapter[stored])
        if tied_to is not None:
            untied[stored] = keys.rename(bare)
            consumed[stored] = tied_to
            continue
        name = _base_name(keys, bare, base, expected, where)
        if name in transforms:
            raise SurgeryError(f"{where}: {name!r} is both adapted and stored whole; cannot merge both")
        transforms[name] = copy_transform(base[name], stored)
        consumed[stored] = f"the adapter's copy of {name} (modules_to_save)"
    planned = {**base, **adapter}
    entries = []
    for old, rec in planned.items():
        shape = tuple(rec.shape)
        transform = transforms.get(old)
        if transform is not None:
            entries.append(Entry(old, old, "", rec.dtype, shape, transform))
        elif old in untied:
            entries.append(Entry(old, untied[old], "", rec.dtype, shape))
        elif old in consumed:
            entries.append(Entry(old, None, consumed[old], rec.dtype, shape))
        else:
            entries.append(Entry(old, old, "", rec.dtype, shape))
    steps = [f"merge {len(factors)} LoRA module(s) of {where}"]
    if whole:
        steps.append(f"replace {len(whole)} tensor(s) with the adapter's copies (modules_to_save)")
    for stored, head in untied.items():
        steps.append(
            f"{head}: the base stores it tied to {consumed[stored]}, the adapter trained its own copy "
            "(modules_to_save): written as a tensor of its own, the embedding unchanged, as peft's "
            "merge_and_unload() + save_pretrained() do; set tie_word_embeddings to false in the model's "
            "config (save_pretrained writes it so), or loading ties the head to the embedding again"
        )
    if not keys.is_identity:
        steps.append(f"adapter names matched to the base's: {_describe(keys)}")
    return Plan(tuple(entries), tuple(steps)), planned


def _split_adapter(adapter: Mapping[str, TensorRecord], where: str) -> tuple[list[_Factors], dict[str, str]]:
    """(each module's factors, the tensors stored whole: bare name -> stored name); anything
    else of an adapter (embedding or conv LoRA, DoRA magnitudes, biases of lora_B) is refused."""
    parts: dict[str, dict[str, str]] = {}
    whole: dict[str, str] = {}
    for name in adapter:
        bare = name.removeprefix(PEFT_PREFIX)
        pieces = bare.split(".")
        at = next((i for i, p in enumerate(pieces) if p.startswith(ADAPTER_PARTS)), None)
        if at is None:
            whole[bare] = name
            continue
        if pieces[at] not in MERGEABLE or pieces[at + 1 :] != ["weight"] or at == 0:
            raise SurgeryError(
                f"{where}: {name!r} is not a lora_A/lora_B weight; merge-lora merges LoRA on Linear and "
                "Conv1D layers only (merge it with peft's merge_and_unload())"
            )
        parts.setdefault(".".join(pieces[:at]), {})[pieces[at]] = name
    factors = []
    for module, pair in parts.items():
        missing = next((p for p in MERGEABLE if p not in pair), None)
        if missing is not None:
            raise SurgeryError(f"{where}: {module!r} has no {missing}.weight; save the adapter again")
        a, b = pair["lora_A"], pair["lora_B"]
        factors.append(_Factors(module, adapter[a], adapter[b], a, b))
    return factors, whole


def _merged_shape(f: _Factors, settings: LoraSettings, where: str) -> tuple[int, ...]:
    a, b = f.a, f.b
    for rec in (a, b):
        if len(rec.shape) != 2 or not _floating(rec.dtype):
            raise SurgeryError(
                f"{where}: {f.module!r}: {rec.name} is {rec.dtype}{format_shape(rec.shape)}, not a 2-D "
                "floating matrix; merge-lora merges LoRA on Linear and Conv1D layers only"
            )
    if a.shape[0] != b.shape[1]:
        raise SurgeryError(
            f"{where}: {f.module!r}: lora_A {format_shape(a.shape)} and lora_B {format_shape(b.shape)} "
            "do not multiply; save the adapter again"
        )
    rank = settings.rank(f.module)
    if a.shape[0] != rank:
        raise SurgeryError(
            f"{where}: {f.module!r} has rank {a.shape[0]}, its config says r={rank}; "
            "the scale would be wrong: fix r/rank_pattern in the config"
        )
    out, inp = b.shape[0], a.shape[1]
    return (inp, out) if settings.fan_in_fan_out else (out, inp)


def _base_name(
    keys: KeyTransform,
    name: str,
    base: Mapping[str, TensorRecord],
    expected: Mapping[str, tuple[int, ...]],
    where: str,
) -> str:
    target = keys.rename(name)
    rec = base.get(target)
    if rec is None:
        raise SurgeryError(
            f"{where}: {name!r} has no tensor in the base ({target!r} is missing); "
            "is this the adapter's base model?"
        )
    if tuple(rec.shape) != tuple(expected[name]):
        raise SurgeryError(
            f"{where}: {name!r} would be {format_shape(expected[name])}, the base's {target!r} is "
            f"{format_shape(rec.shape)}; is this the adapter's base model (fan_in_fan_out?)"
        )
    if not _floating(rec.dtype):
        raise SurgeryError(
            f"{where}: the base's {target!r} is {rec.dtype}, not floating; cannot merge into it"
        )
    return target


def _tied_embedding(base: Mapping[str, TensorRecord], head: str, copy: TensorRecord) -> str | None:
    """The base's embedding that ``head`` (an output head's weight the base does not store, e.g.
    GPT-2's ``lm_head.weight`` saved by save_pretrained) is tied to: the one embedding-named tensor of
    ``copy``'s shape; None when ``head`` is in the base, is not a head, or no single embedding fits.

    Example:
        >>> base = {"transformer.wte.weight": TensorRecord("transformer.wte.weight", "float32", (50, 16))}
        >>> _tied_embedding(base, "lm_head.weight", TensorRecord("x", "float32", (50, 16)))
        'transformer.wte.weight'
    """
    from ..diffing.heads import _embedding_named, _head_named

    module = head.rpartition(".")[0]
    if head in base or not head.endswith(".weight") or not _head_named(module):
        return None
    shape = tuple(copy.shape)
    found = [
        name
        for name, rec in base.items()
        if tuple(rec.shape) == shape
        and name.endswith(".weight")
        and _embedding_named(name.rpartition(".")[0])
    ]
    return found[0] if len(found) == 1 else None


def _describe(keys: KeyTransform) -> str:
    parts = [f"strip {keys.strip!r}"] if keys.strip else []
    parts += [f"add {keys.add!r}"] if keys.add else []
    return ", ".join(parts)


def _floating(dtype: str) -> bool:
    known = DTYPES.get(dtype)
    return known is not None and known.is_floating


# -- the transforms ---------------------------------------------------------------------------
def merge_transform(w: TensorRecord, factors: _Factors, scale: float, fan_in_fan_out: bool) -> Transform:
    """``W + (B @ A) * scale`` (the delta transposed for ``fan_in_fan_out``) in float32, as ``W``'s dtype.

    Example:
        >>> import torch
        >>> w = TensorRecord.from_torch("w", torch.zeros(2, 3))
        >>> a = TensorRecord.from_torch("a", torch.ones(1, 3))
        >>> b = TensorRecord.from_torch("b", torch.ones(2, 1))
        >>> merge_transform(w, _Factors("m", a, b, "a", "b"), 0.5, False).value((w, a, b), 0).tolist()
        [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    """

    def compute(inputs: tuple[TensorRecord, ...], _index: int) -> Any:
        import torch

        weight, lora_a, lora_b = (rec.to_torch() for rec in inputs)
        delta = lora_b.to(torch.float32) @ lora_a.to(torch.float32)
        if fan_in_fan_out:
            delta = delta.T
        return (weight.to(torch.float32) + delta * scale).to(weight.dtype)

    what = "W + (B @ A)^T" if fan_in_fan_out else "W + B @ A"
    return Transform(
        f"merge LoRA: {what} * {scale:g}",
        (w.name, factors.a_name, factors.b_name),
        (Output(w.name, w.dtype, tuple(w.shape)),),
        compute,
    )


def copy_transform(w: TensorRecord, saved_name: str) -> Transform:
    """The adapter's whole copy of ``W`` (``modules_to_save``: ``saved_name``), as ``W``'s dtype."""

    def compute(inputs: tuple[TensorRecord, ...], _index: int) -> Any:
        return inputs[1].to_torch().to(_torch_dtype(w.dtype))

    return Transform(
        "the adapter's copy (modules_to_save)",
        (w.name, saved_name),
        (Output(w.name, w.dtype, tuple(w.shape)),),
        compute,
    )


# -- the operation ----------------------------------------------------------------------------
def adapter_folder(adapter: PathLike) -> Path:
    """The adapter's folder: ``adapter`` itself, or the folder of its config or weights file."""
    path = Path(adapter)
    if path.is_file() and path.name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS):
        path = path.parent
    if not path.is_dir() or not (path / ADAPTER_CONFIG).is_file():
        raise InputError(
            f"{adapter}: not a PEFT adapter folder (no {ADAPTER_CONFIG}); "
            "name the folder peft's save_pretrained wrote"
        )
    return path


def merge_lora(
    base: PathLike,
    adapter: PathLike,
    output: PathLike | None = None,
    *,
    key: str | None = None,
    to: str | None = None,
    dtype: str | None = None,
    max_shard_size: int | str | None = None,
    weights_only: bool = False,
    force: bool = False,
    verify: bool = True,
    dry_run: bool = False,
    read_options: ReadOptions | None = None,
    progress: bool | None = None,
    jobs: int | None = None,
) -> SurgeryResult:
    """Merge the LoRA adapter folder ``adapter`` into the weights of ``base`` and write ``output``.

    The result is what peft's ``merge_and_unload()`` gives (float32 arithmetic, cast back to each
    weight's dtype); ``result.plan`` lists each merged weight as a transform. The other options are
    :func:`ckptsurgeon.convert`'s. What cannot be merged exactly (DoRA, other PEFT types, a module
    the base lacks, shapes that differ, trained biases) raises
    :class:`~ckptsurgeon.errors.SurgeryError`; nothing is written then.

    Example:
        >>> r = ckptsurgeon.merge_lora("gpt2.safetensors", "lora-out", "merged.safetensors")  # doctest: +SKIP
        >>> r.written.summary()                                                               # doctest: +SKIP
        'wrote merged.safetensors (safetensors, 148 tensors, 474.7 MiB), verified bit for bit'
    """
    options = write_options(output, to, dtype, max_shard_size, weights_only, force, verify, progress, jobs)
    _need_output(options, dry_run)
    folder = adapter_folder(adapter)
    where = os.fspath(folder)
    settings = lora_settings(load_config(folder / ADAPTER_CONFIG), where)
    with gc_paused():
        adapter_tensors = open_checkpoint(folder, read_options).weights().tensors
        source = open_source(base, key, read_options)
        plan, planned = merge_plan(source.tensors, adapter_tensors, settings, where)
        merged = Source(
            source.checkpoint, StateDictCandidate(source.weights.key, planned), source.read_options
        )
        if dtype is not None:
            plan = plan.with_cast(planned, dtype)
        written = None if dry_run or options is None else write_checkpoint(merged, plan, options)
    return SurgeryResult(source=os.fspath(base), weights_key=source.weights.key, plan=plan, written=written)
