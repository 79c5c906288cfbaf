"""PEFT adapter folders: ``adapter_config.json`` beside ``adapter_model.safetensors`` (or ``.bin``).

What ``PeftModel.save_pretrained`` writes is not a model's checkpoint: the tensors are the
adapter's own (``base_model.model.<module>.lora_A.weight`` ...) plus full copies of any
``modules_to_save``. The reader opens the weights file with its own reader (the restricted
unpickler for ``.bin``), validates the config (one line per fault) and records the fields a
user asks about in the :class:`~ckptsurgeon.core.checkpoint.Checkpoint`'s metadata: strings as they
are, everything else as JSON (:func:`adapter_config` decodes them). :func:`adapter_explanation`
is what ``diff`` says instead of its "nothing would load" alarm.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.checkpoint import Checkpoint
from ..errors import FormatError, InputError
from . import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MAX_ADAPTER_CONFIG_BYTES, ReadOptions, open_checkpoint
from .safetensors import DuplicateKeyError, no_duplicate_keys

if TYPE_CHECKING:  # pragma: no cover
    pass

FORMAT = "peft"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts in front of the base model's names

# config field -> what it must hold; only these are recorded (in this order)
STRING_FIELDS = ("peft_type", "base_model_name_or_path", "task_type")
FIELDS = (
    "peft_type",
    "base_model_name_or_path",
    "task_type",
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
)
# The name components of an adapter's own tensors (LoRA, DoRA, IA3, LoHa, LoKr, OFT, BOFT, VeRA ...).
ADAPTER_PARTS = ("lora_", "ia3_", "hada_", "lokr_", "oft_", "boft_", "vera_", "fourierft_")
DISPLAY_NAMES = {"LORA": "LoRA", "ADALORA": "AdaLoRA", "LOHA": "LoHa", "LOKR": "LoKr", "IA3": "IA3"}


# -- reading -------------------------------------------------------------------------------
def read(path: Path, options: ReadOptions | None = None) -> Checkpoint:
    """Open a PEFT adapter folder: the weights lazily, the config validated and recorded.

    Example:
        >>> ckpt = read(Path("lora-out"))                               # doctest: +SKIP
        >>> adapter_config(ckpt.metadata)["r"], ckpt.format             # doctest: +SKIP
        (8, 'peft')
    """
    folder = Path(path)
    config = load_config(folder / ADAPTER_CONFIG)
    weights_file = _weights_file(folder)
    inner = open_checkpoint(weights_file, options)
    metadata = {**inner.metadata, **record_fields(config)}
    return Checkpoint(
        path=folder,
        format=FORMAT,
        tree=inner.tree,
        files=inner.files or (weights_file,),
        file_size=inner.file_size,
        metadata=metadata,
        notes=[
            f"{folder}: a PEFT adapter folder; opened {weights_file.name} and {ADAPTER_CONFIG}",
            *inner.notes,
        ],
        globals_used=inner.globals_used,
    )


def _weights_file(folder: Path) -> Path:
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise InputError(
        f"{folder}: a PEFT adapter folder ({ADAPTER_CONFIG}) without its weights "
        f"({' or '.join(ADAPTER_WEIGHTS)}); download or save the adapter again"
    )


def load_config(path: Path) -> dict[str, Any]:
    """Parse and validate ``adapter_config.json``; every fault is one line naming the field.

    Example:
        >>> load_config(Path("lora-out/adapter_config.json"))["peft_type"]   # doctest: +SKIP
        'LORA'
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_ADAPTER_CONFIG_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > MAX_ADAPTER_CONFIG_BYTES:
        raise FormatError(f"{path}: larger than {MAX_ADAPTER_CONFIG_BYTES >> 20} MiB: not an adapter config")
    config = _parse_json(path, data)
    for name in FIELDS:
        if config.get(name) is not None:
            _check_field(path, name, config[name])
    if "peft_type" not in config:
        raise FormatError(f'{path}: no "peft_type": not a PEFT adapter config; save the adapter with peft')
    return config


def _parse_json(path: Path, data: bytes) -> dict[str, Any]:
    try:
        config = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicate_keys)
    except UnicodeDecodeError:
        raise FormatError(f"{path}: not UTF-8 text; save the adapter again") from None
    except DuplicateKeyError as exc:
        raise FormatError(f"{path}: {exc.key!r} appears twice; save the adapter again") from None
    except json.JSONDecodeError as exc:
        raise FormatError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); save the adapter again"
        ) from None
    except ValueError as exc:  # a number too long to convert
        raise FormatError(f"{path}: not valid JSON ({exc}); save the adapter again") from None
    except RecursionError:
        raise FormatError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(config, dict):
        raise FormatError(f"{path}: a JSON {type(config).__name__}, not an object: not an adapter config")
    return config


def _check_field(path: Path, name: str, value: Any) -> None:
    expected = {
        "r": ("a positive integer", lambda v: _is_int(v) and v > 0),
        "lora_alpha": ("a number", _is_number),
        "target_modules": ("a module name list or a regular expression", _is_names_or_text),
        "modules_to_save": ("a list of module names", _is_names),
        "rank_pattern": ("an object mapping module names to ranks", lambda v: _is_mapping(v, _is_int)),
        "alpha_pattern": ("an object mapping module names to alphas", lambda v: _is_mapping(v, _is_number)),
    }
    if name in STRING_FIELDS:
        what, ok = "a string", isinstance(value, str)
    elif name in ("use_rslora", "use_dora", "fan_in_fan_out"):
        what, ok = "true or false", isinstance(value, bool)
    else:
        what, check = expected[name]
        ok = check(value)
    if not ok:
        raise FormatError(
            f"{path}: {name!r} must be {what}, not {_short(value)}; fix the config or save the adapter again"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_names_or_text(value: Any) -> bool:
    return isinstance(value, str) or _is_names(value)


def _is_mapping(value: Any, check: Any) -> bool:
    return isinstance(value, dict) and all(check(v) for v in value.values())


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def record_fields(config: Mapping[str, Any]) -> dict[str, str]:
    """The recorded fields as metadata strings: strings as they are, other values as JSON.

    Example:
        >>> record_fields({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "bias": "none"})
        {'peft_type': 'LORA', 'r': '8', 'target_modules': '["q_proj"]'}
    """
    out: dict[str, str] = {}
    for name in FIELDS:
        value = config.get(name)
        if name in STRING_FIELDS:
            if isinstance(value, str):
                out[name] = value  # as it is; None (not recorded) is left out
        elif name in config:
            out[name] = json.dumps(value)
    return out


def adapter_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The recorded fields back as JSON values (empty when ``metadata`` is not an adapter's).

    Example:
        >>> adapter_config({"peft_type": "LORA", "r": "8", "use_dora": "false", "format": "pt"})
        {'peft_type': 'LORA', 'base_model_name_or_path': None, 'task_type': None, 'r': 8, 'use_dora': False}
    """
    if "peft_type" not in metadata:
        return {}
    out: dict[str, Any] = {}
    for name in FIELDS:
        if name in STRING_FIELDS:
            out[name] = metadata.get(name)
        elif name in metadata:
            out[name] = json.loads(metadata[name])
    return out


# -- describing ----------------------------------------------------------------------------
def kind(config: Mapping[str, Any]) -> str:
    """``LORA`` -> ``LoRA``: the adapter's kind as people write it.

    Example:
        >>> kind({"peft_type": "LORA"}), kind({"peft_type": "IA3"}), kind({})
        ('LoRA', 'IA3', 'PEFT')
    """
    peft_type = str(config.get("peft_type") or "PEFT")
    return DISPLAY_NAMES.get(peft_type, peft_type)


def summary_fields(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The ``inspect`` lines for an adapter: kind and rank, base model, targets, patterns.

    Example:
        >>> summary_fields({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
        [('adapter', 'LoRA, r=8, lora_alpha=16'), ('base model', '(not recorded)'), ('targets', 'q_proj')]
    """
    head = [kind(config)]
    head += [f"{name}={config[name]}" for name in ("r", "lora_alpha") if config.get(name) is not None]
    head += [flag for flag in ("use_rslora", "use_dora", "fan_in_fan_out") if config.get(flag) is True]
    fields = [
        ("adapter", ", ".join(head)),
        ("base model", config.get("base_model_name_or_path") or "(not recorded)"),
    ]
    targets = config.get("target_modules")
    if isinstance(targets, str):
        fields.append(("targets", f"modules matching {targets!r}"))
    elif targets:
        fields.append(("targets", ", ".join(sorted(targets))))
    if config.get("modules_to_save"):
        fields.append(("modules to save", ", ".join(config["modules_to_save"]) + "  (stored whole)"))
    for name in ("rank_pattern", "alpha_pattern"):
        if config.get(name):
            fields.append((name.replace("_", " "), _short(config[name], 100)))
    return fields


def adapter_modules(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """(the base modules the adapter's tensors update, the names stored whole), both without
    ``base_model.model.``: ``...q_proj.lora_A.weight`` updates ``...q_proj``.

    Example:
        >>> adapter_modules(["base_model.model.l.0.q.lora_A.weight", "base_model.model.l.0.q.lora_B.weight",
        ...                  "base_model.model.score.weight"])
        (['l.0.q'], ['score.weight'])
    """
    modules: dict[str, None] = {}
    whole: list[str] = []
    for name in names:
        bare = name.removeprefix(PEFT_PREFIX)
        parts = bare.split(".")
        at = next((i for i, p in enumerate(parts) if p.startswith(ADAPTER_PARTS)), None)
        if at is None:
            whole.append(bare)
        else:
            modules[".".join(parts[:at])] = None
    return list(modules), whole


def adapter_parts(names: Iterable[str]) -> list[str]:
    """The adapter's own name components, in first-seen order (``lora_A``, ``lora_B`` ...).

    Example:
        >>> adapter_parts(["m.q.lora_A.weight", "m.q.lora_B.weight", "m.k.lora_A.weight", "m.score.weight"])
        ['lora_A', 'lora_B']
    """
    found: dict[str, None] = {}
    for name in names:
        part = next((p for p in name.split(".") if p.startswith(ADAPTER_PARTS)), None)
        if part is not None:
            found[part] = None
    return list(found)
