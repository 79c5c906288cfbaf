"""Differential test: our safetensors header verdicts equal the safetensors library's.

Hypothesis generates headers (known and unknown dtypes; shapes with 0, negative, huge, float,
bool and nested dims; data_offsets tiled, overlapping, gapped, out of range, unsorted, reversed;
``__metadata__`` with non-string values; then raw edits: a duplicated key, a BOM, whitespace
around the object, trailing bytes, invalid UTF-8, ``-0``, a header length past the end). For
each file, the reference verdict is ``safetensors.safe_open(path, "pt")`` reading every tensor
(torch is the consumer: a shape torch cannot hold is a refusal); ours is
:func:`ckptsurgeon.formats.safetensors.read` raising :class:`FormatError` or not.

Where we deliberately differ (docs/security.md, "safetensors"):

- a key given twice (a tensor name, a ``__metadata__`` key): the reference keeps the last one,
  we refuse (two tensors under one name is a damaged or forged file; which one wins is a guess);
- dtype ``F4`` (4-bit floats, two per byte): the reference reads it, ckptsurgeon has no 4-bit
  dtype and refuses it as unknown.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
safetensors = pytest.importorskip("safetensors")
pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as hs  # noqa: E402

from ckptsurgeon.errors import FormatError  # noqa: E402
from ckptsurgeon.formats import safetensors as ours  # noqa: E402

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}
ITEMSIZE |= {"F8_E4M3": 1, "C64": 8, "U16": 2, "U64": 8, "I8": 1}
ODD_DTYPES = ["F33", "f32", "F4", "F6_E2M3", "", 4, None, ["F32"]]
HUGE = [2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70]
DIMS = hs.one_of(
    hs.integers(0, 3),
    hs.integers(0, 3),
    hs.sampled_from(HUGE),
    hs.sampled_from([-1, -(2**63), 2.0, 0.5, True, False, [2], "2", None]),
)
SHAPES = hs.one_of(
    hs.lists(DIMS, max_size=4), hs.lists(hs.integers(0, 3), max_size=3), hs.sampled_from([2, "2"])
)
EXTRA = hs.dictionaries(
    hs.sampled_from(["x", "note"]), hs.one_of(hs.integers(-5, 5), hs.text(max_size=3)), max_size=1
)
OFFSET_EDITS = ["none"] * 6 + ["shift", "overlap", "gap", "past_end", "reverse", "negative", "float", "three"]
RAW_EDITS = ["none"] * 8 + [
    "duplicate_tensor",
    "duplicate_metadata_key",
    "bom",
    "leading_space",
    "trailing_space",
    "trailing_nul",
    "trailing_garbage",
    "invalid_utf8",
    "negative_zero",
    "length_past_end",
    "tail_byte",
    "short_data",
]


FAULTS = ["none", "none", "none", "dtype", "shape", "offsets", "metadata", "raw", "raw"]
GOOD_METADATA = hs.one_of(
    hs.just("absent"),
    hs.none(),
    hs.dictionaries(hs.text("kv", max_size=2), hs.text("kv", max_size=2), max_size=2),
)
BAD_METADATA = hs.one_of(
    hs.dictionaries(
        hs.text("kv", max_size=2), hs.one_of(hs.integers(), hs.none(), hs.just([])), min_size=1, max_size=2
    ),
    hs.just(["a"]),
    hs.just("text"),
)


@hs.composite
def headers(draw: Any) -> tuple[bytes, set[str]]:
    """A safetensors file as bytes, and the deliberate differences it exercises.

    One kind of fault at most per file (or none, a third of the time), so that each fault meets
    otherwise valid files and valid files are common; the odd values may still be harmless
    (a huge dim next to a 0, an offset edit on an empty tensor).
    """
    fault = draw(hs.sampled_from(FAULTS))
    names = draw(
        hs.lists(hs.text(alphabet="ab.0", max_size=3), unique=True, min_size=fault != "none", max_size=4)
    )
    odd = draw(hs.sampled_from(names)) if names and fault in ("dtype", "shape", "offsets") else None
    entries: dict[str, dict[str, Any]] = {}
    sizes: dict[str, int] = {}
    for name in names:
        dtype = draw(
            hs.sampled_from(ODD_DTYPES)
            if name == odd and fault == "dtype"
            else hs.sampled_from(sorted(ITEMSIZE))
        )
        shape = draw(SHAPES if name == odd and fault == "shape" else hs.lists(hs.integers(0, 3), max_size=3))
        entries[name] = {"dtype": dtype, "shape": shape, **draw(EXTRA)}
        sizes[name] = _nbytes(dtype, shape)
    order = draw(hs.permutations(names))
    pos = 0
    for name in order:  # tile the data region in a shuffled order (the header order stays as drawn)
        entries[name]["data_offsets"] = [pos, pos + sizes[name]]
        pos += sizes[name]
    if odd is not None and fault == "offsets":
        _edit_offsets(entries[odd], draw(hs.sampled_from(OFFSET_EDITS[6:])))
    header: dict[str, Any] = {}
    metadata = draw(BAD_METADATA if fault == "metadata" else GOOD_METADATA)
    if metadata != "absent":
        header["__metadata__"] = metadata
    header.update(entries)
    text = json.dumps(header)
    data = bytes(min(pos, 4096))
    raw_edit = draw(hs.sampled_from(RAW_EDITS[8:])) if fault == "raw" else "none"
    return _edit_raw(text, data, names, raw_edit)


def _nbytes(dtype: Any, shape: Any) -> int:
    """The byte size the tiling gives an entry: right when the entry is valid, a guess otherwise."""
    dims = shape if isinstance(shape, list) else []
    numel = 1
    for d in dims:
        numel *= d if type(d) is int and d >= 0 else 1
    size = numel * ITEMSIZE.get(dtype, 1) if isinstance(dtype, str) else 4
    return size if size <= 4096 else 8


def _edit_offsets(entry: dict[str, Any], edit: str) -> None:
    begin, end = entry["data_offsets"]
    entry["data_offsets"] = {
        "none": [begin, end],
        "shift": [begin + 1, end + 1],
        "overlap": [max(begin - 2, 0), end],
        "gap": [begin + 4, end + 4],
        "past_end": [begin, end + 10_000],
        "reverse": [end, begin],
        "negative": [-1, end],
        "float": [float(begin), end],
        "three": [begin, end, end],
    }[edit]


def _edit_raw(text: str, data: bytes, names: list[str], edit: str) -> tuple[bytes, set[str]]:
    differences: set[str] = set()
    length_extra = 0
    if edit == "duplicate_tensor" and names:
        again = json.dumps({names[0]: json.loads(text)[names[0]]})[1:-1]
        text = text[:-1] + ", " + again + "}"
        differences.add("duplicate key")
    elif edit == "duplicate_metadata_key" and '"__metadata__": {"' in text:
        text = text.replace('"__metadata__": {', '"__metadata__": {"k": "v", "k": "w", ', 1)
        differences.add("duplicate key")
    elif edit == "bom":
        text = "\ufeff" + text
    elif edit == "leading_space":
        text = " \n\t" + text
    elif edit == "trailing_space":
        text += "  \r\n"
    elif edit == "trailing_nul":
        text += "\x00"
    elif edit == "trailing_garbage":
        text += "x"
    elif edit == "negative_zero":
        text = text.replace("[0,", "[-0,", 1)
    elif edit == "length_past_end":
        length_extra = len(data) + 1
    elif edit == "tail_byte":
        data += b"\x00"
    elif edit == "short_data":
        data = data[:-1]
    raw = text.encode("utf-8")
    if edit == "invalid_utf8":
        raw = raw.replace(b'"', b'"\xff', 1)
    if '"F4"' in text:
        differences.add("F4")
    return struct.pack("<Q", len(raw) + length_extra) + raw + data, differences


def reference_accepts(path: Path) -> bool:
    try:
        with safetensors.safe_open(str(path), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                fh.get_tensor(key)
    except Exception:  # any refusal: SafetensorError, torch's own errors on a shape it cannot hold
        return False
    return True


def we_accept(path: Path) -> bool:
    try:
        ours.read(path)
    except FormatError:
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers())
def test_our_verdict_equals_the_reference(case: tuple[bytes, set[str]]) -> None:
    raw, differences = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.safetensors"
        path.write_bytes(raw)
        reference, mine = reference_accepts(path), we_accept(path)
    if differences and reference and not mine:
        return  # a deliberate difference (see the module docstring): stricter, never looser
    assert mine == reference, (raw[:300], differences)


@pytest.mark.parametrize(
    ("header", "data"),
    [
        ({"w": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}, b""),
        ({"w": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}, b""),
        ({"w": {"dtype": "U8", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}, b""),
        (
            {
                "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "v": {"dtype": "F32", "shape": [0], "data_offsets": [2, 2]},
            },
            bytes(4),
        ),
    ],
    ids=["zero_times_2_70", "zero_times_2_63", "overflow_before_zero", "empty_inside_another"],
)
def test_known_edges_are_refused_by_both(tmp_path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path = tmp_path / "e.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    assert not reference_accepts(path)
    assert not we_accept(path)


def test_the_deliberate_differences_are_real(tmp_path: Path) -> None:
    """The reference does accept a duplicated name and F4: the exemptions above are needed."""
    for text, data in (
        (
            '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
            '"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            bytes(4),
        ),
        ('{"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}', bytes(1)),
    ):
        path = tmp_path / "d.safetensors"
        path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)
        assert reference_accepts(path) and not we_accept(path)


@pytest.mark.parametrize("before", [b" ", b"\n", b" \t\r\n"])
@pytest.mark.parametrize("name", ["w.safetensors", "w.bin"])
def test_a_header_after_whitespace_is_detected_as_the_reference_reads_it(
    tmp_path: Path, before: bytes, name: str
) -> None:
    """JSON may begin with whitespace; the reference reads such a file, so detection (not only
    the reader) must take it, whatever the file is called."""
    import torch

    from ckptsurgeon.core.walk import records
    from ckptsurgeon.formats import open_checkpoint

    text = before + json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(text)) + text + struct.pack("<2f", 1.5, -2.0))
    assert reference_accepts(path)
    checkpoint = open_checkpoint(path)
    assert checkpoint.format == "safetensors"
    [record] = records(checkpoint.tree)
    assert torch.equal(record.to_torch(), torch.tensor([1.5, -2.0]))
