"""A torch-free table of tensor dtypes: names, sizes, safetensors codes, storage classes.

The canonical dtype name is torch's attribute name (``"float32"``, ``"bfloat16"``),
so ``getattr(torch, name)`` gives the torch dtype when torch is wanted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """One element type.

    Example:
        >>> DTYPES["bfloat16"].itemsize
        2
        >>> BY_SAFETENSORS["F16"].name
        'float16'
    """

    name: str
    itemsize: int
    safetensors: str | None
    storage_class: str | None  # legacy torch storage class name, e.g. "FloatStorage"
    is_floating: bool = False
    is_complex: bool = False
    struct_char: str | None = None  # for decoding a scalar without torch/numpy

    def __str__(self) -> str:
        return self.name


_ALL = (
    DType("float64", 8, "F64", "DoubleStorage", True, struct_char="d"),
    DType("float32", 4, "F32", "FloatStorage", True, struct_char="f"),
    DType("float16", 2, "F16", "HalfStorage", True, struct_char="e"),
    DType("bfloat16", 2, "BF16", "BFloat16Storage", True),
    DType("float8_e4m3fn", 1, "F8_E4M3", None, True),
    DType("float8_e5m2", 1, "F8_E5M2", None, True),
    DType("float8_e4m3fnuz", 1, None, None, True),
    DType("float8_e5m2fnuz", 1, None, None, True),
    DType("float8_e8m0fnu", 1, "F8_E8M0", None, True),
    DType("complex128", 16, None, "ComplexDoubleStorage", is_complex=True),
    DType("complex64", 8, "C64", "ComplexFloatStorage", is_complex=True),
    DType("complex32", 4, None, None, is_complex=True),
    DType("int64", 8, "I64", "LongStorage", struct_char="q"),
    DType("int32", 4, "I32", "IntStorage", struct_char="i"),
    DType("int16", 2, "I16", "ShortStorage", struct_char="h"),
    DType("int8", 1, "I8", "CharStorage", struct_char="b"),
    DType("uint64", 8, "U64", None, struct_char="Q"),
    DType("uint32", 4, "U32", None, struct_char="I"),
    DType("uint16", 2, "U16", None, struct_char="H"),
    DType("uint8", 1, "U8", "ByteStorage", struct_char="B"),
    DType("bool", 1, "BOOL", "BoolStorage", struct_char="?"),
    DType("qint8", 1, None, "QInt8Storage"),
    DType("quint8", 1, None, "QUInt8Storage"),
    DType("qint32", 4, None, "QInt32Storage"),
)

DTYPES: dict[str, DType] = {d.name: d for d in _ALL}
BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in _ALL if d.safetensors}
BY_STORAGE_CLASS: dict[str, DType] = {d.storage_class: d for d in _ALL if d.storage_class}

# Short names accepted on the command line (``--dtype bf16``).
ALIASES: dict[str, str] = {
    "fp64": "float64",
    "f64": "float64",
    "double": "float64",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
}


def get_dtype(name: str) -> DType:
    """Look up a dtype by canonical name, alias, ``torch.``-qualified name or safetensors code.

    Example:
        >>> get_dtype("torch.float16").name
        'float16'
        >>> get_dtype("bf16").name
        'bfloat16'
    """
    key = str(name).removeprefix("torch.")
    key = ALIASES.get(key.lower(), key)
    if key in DTYPES:
        return DTYPES[key]
    if key in BY_SAFETENSORS:
        return BY_SAFETENSORS[key]
    raise KeyError(f"unknown dtype {name!r}")
