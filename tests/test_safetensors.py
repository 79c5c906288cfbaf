"""The safetensors reader (strict header validation) and streaming writer."""

from __future__ import annotations

import json
import math
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import REAL, REPO, assert_one_line_error, run_cli

from ckptsurgeon.core.record import TensorRecord, tensor_to_bytes
from ckptsurgeon.errors import FormatError, OutputError
from ckptsurgeon.formats import ReadOptions, open_checkpoint
from ckptsurgeon.formats import safetensors as st


def sample_tensors() -> dict[str, torch.Tensor]:
    """One tensor of each dtype and shape kind the formats must carry bit-exactly."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=gen)
    return {
        "f32": base,
        "f64": base.double(),
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "i64": torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4),
        "i32": torch.arange(7, dtype=torch.int32),
        "i16": torch.tensor([-3, 0, 3], dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "u16": torch.tensor([0, 1, 65535], dtype=torch.uint16),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "f8e4m3": base.to(torch.float8_e4m3fn),
        "f8e5m2": base.to(torch.float8_e5m2),
        "nan": torch.tensor([float("nan"), float("inf"), -0.0]),
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and tensor_to_bytes(a) == tensor_to_bytes(b)


def write_file(path: Path, records: dict[str, TensorRecord], metadata: dict[str, str] | None = None) -> Path:
    with open(path, "wb") as fh:
        st.write(records, fh, metadata)
    return path


def header_of(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


# -- round trips against the reference implementation -----------------------------------------
def test_written_file_loads_with_safetensors_bit_exactly(tmp_path: Path) -> None:
    tensors = sample_tensors()
    out = write_file(
        tmp_path / "ours.safetensors", {k: TensorRecord.from_torch(k, v) for k, v in tensors.items()}
    )
    loaded = safetensors.torch.load_file(out)
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert same_bits(loaded[name], tensor), name


def test_reference_file_reads_bit_exactly(tmp_path: Path) -> None:
    tensors = sample_tensors()
    ref = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, ref, metadata={"note": "hello"})
    ckpt = open_checkpoint(ref)
    assert ckpt.format == "safetensors"
    assert ckpt.metadata == {"note": "hello"}
    assert ckpt.file_size == ref.stat().st_size
    records = ckpt.weights().tensors
    assert sorted(records) == sorted(tensors)
    for name, tensor in tensors.items():
        rec = records[name]
        assert (rec.dtype, rec.shape) == (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
        assert same_bits(rec.to_torch(), tensor), name


def test_real_hf_fixture_reads_and_rewrites_bit_exactly(tmp_path: Path) -> None:
    src = REAL / "hf_gpt2_tiny" / "model.safetensors"
    ref = safetensors.torch.load_file(src)
    ckpt = open_checkpoint(src, ReadOptions(check=True))
    records = ckpt.weights().tensors
    assert len(records) == len(ref) == 28
    assert ckpt.metadata == {"format": "pt"}
    assert "lm_head.weight" not in records
    out = write_file(tmp_path / "copy.safetensors", records, ckpt.metadata)
    again = safetensors.torch.load_file(out)
    assert all(same_bits(again[k], ref[k]) for k in ref)


def test_non_contiguous_record_is_written_contiguous(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    src = write_file(tmp_path / "src.safetensors", {"m": TensorRecord.from_torch("m", base)})
    rec = open_checkpoint(src).tree["m"]
    transposed = TensorRecord("t", rec.dtype, (4, 3), rec.storage, stride=(1, 4))
    out = write_file(tmp_path / "t.safetensors", {"t": transposed})
    assert same_bits(safetensors.torch.load_file(out)["t"], base.t().contiguous())


# -- layout ------------------------------------------------------------------------------------
def test_header_is_padded_and_data_aligned_by_dtype(tmp_path: Path) -> None:
    records = {k: TensorRecord.from_torch(k, v) for k, v in sample_tensors().items()}
    out = write_file(tmp_path / "a.safetensors", records, {"source": "test"})
    length, header = header_of(out)
    assert (8 + length) % 8 == 0
    assert header["__metadata__"] == {"source": "test", "format": "pt"}
    names = list(header)[1:]
    starts = [header[n]["data_offsets"][0] for n in names]
    assert starts == sorted(starts)  # the header lists the tensors in data order
    assert sorted(names) == sorted(records)
    for name, entry in header.items():
        if name != "__metadata__":
            begin = entry["data_offsets"][0]
            assert begin % records[name].itemsize == 0, name


def test_records_point_at_absolute_offsets(tmp_path: Path) -> None:
    out = write_file(tmp_path / "a.safetensors", {"x": TensorRecord.from_torch("x", torch.ones(2))})
    length, _ = header_of(out)
    rec = open_checkpoint(out).tree["x"]
    assert (rec.storage.path, rec.storage.offset, rec.storage.nbytes) == (out, 8 + length, 8)
    assert rec.read_bytes() == out.read_bytes()[8 + length :]


def test_reading_a_header_imports_neither_torch_nor_safetensors() -> None:
    src = REAL / "hf_gpt2_tiny" / "model.safetensors"
    code = (
        "import sys; from ckptsurgeon.formats import open_checkpoint; "
        f"c = open_checkpoint({str(src)!r}); assert len(c.tree) == 28; "
        "print(sorted(m for m in ('torch', 'safetensors', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "[]"


# -- tied tensors --------------------------------------------------------------------------------
def test_tied_tensors_are_written_once_and_restored(tmp_path: Path) -> None:
    weight = torch.randn(10, 4)
    src = write_file(
        tmp_path / "src.safetensors",
        {
            "wte.weight": TensorRecord.from_torch("wte.weight", weight),
            "ln.bias": TensorRecord.from_torch("ln.bias", torch.zeros(4)),
        },
    )
    wte = open_checkpoint(src).tree["wte.weight"]
    tied = {
        "wte.weight": wte,
        "ln.bias": open_checkpoint(src).tree["ln.bias"],
        "lm_head.weight": wte.renamed("lm_head.weight"),
    }
    out = write_file(tmp_path / "tied.safetensors", tied)
    _, header = header_of(out)
    assert "lm_head.weight" not in header
    assert json.loads(header["__metadata__"][st.ALIASES_KEY]) == {"lm_head.weight": "wte.weight"}
    assert sorted(safetensors.torch.load_file(out)) == ["ln.bias", "wte.weight"]
    ckpt = open_checkpoint(out)
    assert list(ckpt.tree) == ["ln.bias", "wte.weight", "lm_head.weight"]  # safetensors order, aliases last
    assert ckpt.tree["lm_head.weight"].storage is ckpt.tree["wte.weight"].storage
    assert same_bits(ckpt.tree["lm_head.weight"].to_torch(), weight)
    assert any("lm_head.weight" in note for note in ckpt.notes)
    # writing the restored tree again stores the tensor once again
    again = write_file(tmp_path / "again.safetensors", ckpt.tree, ckpt.metadata)
    assert again.stat().st_size == out.stat().st_size


def test_find_aliases_ignores_different_views_of_one_storage(tmp_path: Path) -> None:
    src = write_file(tmp_path / "src.safetensors", {"m": TensorRecord.from_torch("m", torch.arange(6.0))})
    rec = open_checkpoint(src).tree["m"]
    half = TensorRecord("half", rec.dtype, (3,), rec.storage, storage_offset=3)
    assert st.find_aliases({"m": rec, "half": half, "m2": rec.renamed("m2")}) == {"m2": "m"}
    out = write_file(tmp_path / "views.safetensors", {"m": rec, "half": half})
    assert same_bits(safetensors.torch.load_file(out)["half"], torch.arange(3.0, 6.0))


def test_unstorable_dtype_is_an_output_error(tmp_path: Path) -> None:
    rec = TensorRecord.from_torch("c", torch.zeros(2, dtype=torch.complex128))
    with pytest.raises(OutputError, match="c: dtype complex128 cannot be stored"):
        write_file(tmp_path / "c.safetensors", {"c": rec})


# -- the malformed-header corpus ---------------------------------------------------------------
def raw_file(path: Path, header: bytes | str, data: bytes = b"", length: int | None = None) -> Path:
    body = header.encode("utf-8") if isinstance(header, str) else header
    size = len(body) if length is None else length
    path.write_bytes(struct.pack("<Q", size) + body + data)
    return path


def entry(dtype: object = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


def js(obj: object) -> str:
    return json.dumps(obj)


BAD_HEADERS = {
    # name: (header, data, declared length or None, fragment of the message)
    "header_over_100MB": ("{}", b"", 100_000_001, "exceeds the 100000000-byte limit"),
    "header_past_end": ('{"a": 1}', b"", 4096, "truncated safetensors file"),
    "not_utf8": (b'{"\xff\xfe": 1}', b"", None, "not valid UTF-8"),
    "not_json": ("{not json}", b"", None, "not valid JSON"),
    "trailing_garbage": ('{"__metadata__": {}} xyz', b"", None, "not valid JSON"),
    "nan_constant": ('{"__metadata__": {"a": NaN}}', b"", None, "not valid JSON"),
    "duplicate_tensor": (
        f'{{"w": {js(entry())}, "w": {js(entry())}}}',
        bytes(8),
        None,
        "'w' appears twice",
    ),
    "duplicate_field": (
        '{"w": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}',
        bytes(8),
        None,
        "'dtype' appears twice",
    ),
    "metadata_not_object": (js({"__metadata__": ["a"]}), b"", None, "__metadata__ must be an object"),
    "metadata_value_not_str": (
        js({"__metadata__": {"epoch": 3}}),
        b"",
        None,
        "__metadata__['epoch'] must be a string",
    ),
    "entry_not_object": (js({"w": 5}), b"", None, "tensor 'w': the entry is a JSON int"),
    "missing_dtype": (js({"w": {"shape": [2], "data_offsets": [0, 8]}}), bytes(8), None, "no 'dtype'"),
    "missing_shape": (js({"w": {"dtype": "F32", "data_offsets": [0, 8]}}), bytes(8), None, "no 'shape'"),
    "missing_offsets": (js({"w": {"dtype": "F32", "shape": [2]}}), bytes(8), None, "no 'data_offsets'"),
    "dtype_not_str": (js({"w": entry(dtype=4)}), bytes(8), None, "dtype must be a string"),
    "unknown_dtype": (js({"w": entry(dtype="F99")}), bytes(8), None, "unknown dtype 'F99'"),
    "shape_not_list": (js({"w": entry(shape=2)}), bytes(8), None, "shape must be a list"),
    "shape_negative": (js({"w": entry(shape=[-2])}), bytes(8), None, "shape must be a list of non-negative"),
    "shape_float": (js({"w": entry(shape=[2.0])}), bytes(8), None, "shape must be a list of non-negative"),
    "shape_bool": (js({"w": entry(shape=[True, 2])}), bytes(8), None, "shape must be a list of non-negative"),
    "offsets_three": (js({"w": entry(offsets=[0, 4, 8])}), bytes(8), None, "data_offsets must be two"),
    "offsets_negative": (js({"w": entry(offsets=[-8, 0])}), bytes(8), None, "data_offsets must be two"),
    "offsets_reversed": (js({"w": entry(offsets=[8, 0])}), bytes(8), None, "end 0 is before begin 8"),
    "size_mismatch": (js({"w": entry(shape=[3])}), bytes(8), None, "needs 12 bytes but data_offsets span 8"),
    "shape_overflow": (js({"w": entry(shape=[1 << 40, 1 << 40])}), bytes(8), None, "overflows a 64-bit"),
    "offsets_out_of_bounds": (js({"w": entry()}), bytes(4), None, "ends at data byte 8"),
    "overlap": (js({"a": entry(), "b": entry(offsets=[4, 12])}), bytes(12), None, "overlaps tensor 'a'"),
    "gap_between": (
        js({"a": entry(), "b": entry(offsets=[12, 20])}),
        bytes(20),
        None,
        "4 bytes after tensor 'a'",
    ),
    "gap_at_start": (js({"a": entry(offsets=[4, 12])}), bytes(12), None, "at the start of the data"),
    "tail_not_covered": (js({"a": entry()}), bytes(16), None, "8 bytes after the last tensor"),
    # a zero dim makes the element count 0, but each dim must still be a size torch can hold (int64)
    "shape_zero_times_2_70": (js({"w": entry(shape=[0, 1 << 70], offsets=[0, 0])}), b"", None, "below 2**63"),
    "shape_zero_times_2_63": (js({"w": entry(shape=[0, 1 << 63], offsets=[0, 0])}), b"", None, "below 2**63"),
    # the reference multiplies left to right in u64: [2**40, 2**40, 0] overflows before the 0
    "shape_overflow_before_zero": (
        js({"w": entry(shape=[1 << 40, 1 << 40, 0], offsets=[0, 0])}),
        b"",
        None,
        "overflows a 64-bit element count",
    ),
    "shape_negative_zero": (
        '{"w": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}',
        b"",
        None,
        "shape must be a list of non-negative",
    ),
    "float_out_of_range": (
        '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1e400}}',
        bytes(8),
        None,
        "out of range",
    ),
    "lone_surrogate_in_ignored_field": (
        '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": "\\ud800"}}',
        bytes(8),
        None,
        "unpaired surrogate",
    ),
    "bad_alias_target": (
        js({"__metadata__": {st.ALIASES_KEY: '{"b": "zz"}'}, "a": entry()}),
        bytes(8),
        None,
        "tied to 'zz'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_malformed_header_is_a_format_error(tmp_path: Path, case: str) -> None:
    header, data, length, fragment = BAD_HEADERS[case]
    path = raw_file(tmp_path / f"{case}.safetensors", header, data, length)
    with pytest.raises(FormatError) as info:
        open_checkpoint(path)
    message = info.value.message
    assert fragment in message and str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "shape", [[0, (1 << 63) - 1], [(1 << 63) - 1, 0], [0, 1 << 40, 1 << 40], [0], [3, 0, 5]]
)
def test_empty_tensors_with_huge_dims_are_accepted_like_the_reference(tmp_path: Path, shape: list) -> None:
    """Zero elements, each dim an int64: the reference (and torch) accept these; so do we."""
    path = raw_file(tmp_path / "z.safetensors", js({"w": entry(shape=shape, offsets=[0, 0])}))
    assert st.read(path).weights().tensors["w"].shape == tuple(shape)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    assert tuple(safetensors_torch.load_file(path)["w"].shape) == tuple(shape)


@pytest.mark.parametrize(
    "shape",
    [
        [0, 2, 1 << 62],
        [0, 1 << 62, 2],
        [0, 3, 1 << 62],
        [0, 1 << 40, 1 << 40],
        [1 << 62, 2, 0],
        [0, 1 << 31, 1 << 31, 1 << 31],
        [5, 0, 1 << 62, 2],
    ],
)
def test_empty_tensors_load_exactly_when_torch_can_hold_them(tmp_path: Path, shape: list) -> None:
    """Found by the differential test: ``[0, 2, 2**62]`` was accepted, but torch cannot compute its
    strides, so the safetensors library's load fails; the verdicts now agree shape by shape."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = raw_file(tmp_path / "z.safetensors", js({"w": entry(shape=shape, offsets=[0, 0])}))
    try:
        safetensors_torch.load_file(path)
        theirs = True
    except Exception:  # torch's RuntimeError, through the library
        theirs = False
    try:
        st.read(path)
        ours = True
    except FormatError:
        ours = False
    assert ours == theirs, shape


def test_header_may_start_and_end_with_json_whitespace(tmp_path: Path) -> None:
    """As for the reference: whitespace around the object is JSON (a NUL or a BOM is not)."""
    path = raw_file(tmp_path / "ws.safetensors", f" \n{js({'w': entry()})}\t ", bytes(8))
    assert list(st.read(path).weights().tensors) == ["w"]
    for bad in (f"\ufeff{js({'w': entry()})}", f"{js({'w': entry()})}\x00"):
        with pytest.raises(FormatError):
            st.read(raw_file(tmp_path / "bad.safetensors", bad, bytes(8)))


def test_short_file_and_non_object_header_are_format_errors(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x05\x00\x00")
    with pytest.raises(FormatError, match="shorter than the 8-byte header length"):
        st.read(short)
    array = raw_file(tmp_path / "array.safetensors", "[1, 2]")
    with pytest.raises(FormatError, match="does not start with"):
        st.read(array)


def _inspect_registered() -> bool:
    try:
        import ckptsurgeon.commands.inspect  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not _inspect_registered(), reason="the `inspect` command (written by the lead) is not there yet"
)
@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_malformed_header_gives_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    header, data, length, fragment = BAD_HEADERS[case]
    path = raw_file(tmp_path / f"{case}.safetensors", header, data, length)
    before = path.read_bytes()
    assert_one_line_error(run_cli("inspect", str(path)), fragment)
    assert path.read_bytes() == before


# every dtype both torch and safetensors know, in an order unlike safetensors' own
_ALL_DTYPES = [
    torch.float32, torch.bool, torch.uint64, torch.int8, torch.float8_e5m2, torch.bfloat16,
    torch.complex64, torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.int16, torch.uint16,
    torch.float16, torch.int32, torch.uint32, torch.uint8, torch.float64, torch.int64,
]  # fmt: skip


def _random_tensors(seed: int) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    result = {}
    for _ in range(rng.randint(1, 40)):
        dtype = rng.choice(_ALL_DTYPES)
        name = rng.choice(["a", "B", "layer.", "é", "10", "9", "x.y"]) + str(rng.randint(0, 30))
        shape = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
        numel = math.prod(shape)
        width = torch.empty(0, dtype=dtype).element_size()
        raw = torch.randint(0, 2 if dtype == torch.bool else 256, (numel * width,), dtype=torch.uint8)
        result[name] = raw.view(dtype).reshape(shape)
    return result


@pytest.mark.parametrize("seed", range(25))
def test_output_is_byte_identical_to_safetensors_save_file(tmp_path: Path, seed: int) -> None:
    tensors = _random_tensors(seed)
    records = {k: TensorRecord.from_torch(k, v) for k, v in tensors.items()}
    ours = write_file(tmp_path / "ours.safetensors", records)
    theirs = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(tensors, theirs, metadata={"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes()
