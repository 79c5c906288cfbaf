"""``--dtype`` streams (issue 12, item 9): peak memory flat in the file's size, values equal to
torch's own cast bit for bit, ties kept, integer and bool tensors untouched."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from ckptsurgeon.core.record import Storage, TensorRecord
from ckptsurgeon.formats import open_checkpoint
from ckptsurgeon.surgery.casting import CAST_PIECE, cast_storage, cast_tensors

MIB = 1 << 20

# four large float32 tensors of SIZE_MIB in all, and a small int64 one
_GENERATE = """
import sys, torch
size_mib, out = int(sys.argv[1]), sys.argv[2]
rows = size_mib * 2**20 // 4 // 4 // 256
gen = torch.Generator().manual_seed(0)
sd = {f"layer{i}.weight": torch.randn(rows, 256, generator=gen) for i in range(4)}
sd["steps"] = torch.arange(10)
torch.save(sd, out)
"""

# getrusage(RUSAGE_CHILDREN) is the largest peak of any child waited for so far: each
# measurement runs in its own fresh Python, which reports its one child's peak.
_MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def generate(path: Path, size_mib: int) -> Path:
    subprocess.run([sys.executable, "-c", _GENERATE, str(size_mib), str(path)], check=True)
    return path


def peak_rss_mib(*args: str | Path) -> float:
    """Peak resident memory of ``ckpt ARGS`` run in a subprocess, in MiB (Linux: ru_maxrss in KiB)."""
    command = [sys.executable, "-m", "ckptsurgeon", *map(str, args)]
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KiB on Linux")
def test_peak_memory_of_a_cast_is_flat_in_the_file_size(tmp_path: Path) -> None:
    small, large = generate(tmp_path / "small.pth", 40), generate(tmp_path / "large.pth", 200)
    growth = {}
    for suffix in (".pth", ".safetensors"):
        peaks = [
            peak_rss_mib("convert", src, "-o", tmp_path / f"{src.stem}.cast{suffix}", "--dtype", "bf16")
            for src in (small, large)
        ]
        growth[suffix] = peaks[1] - peaks[0]
    # 160 MiB more input (80 MiB more output) costs at most a few chunks more: the cast
    # converts a bounded piece at a time. A whole-storage cast grew by ~200 MiB here.
    assert all(more < 40 for more in growth.values()), growth


def random_floats(count: int, dtype: torch.dtype) -> torch.Tensor:
    """Random values with every awkward kind: NaN (with payloads), ±inf, ±0, subnormals, the
    largest finite values, and values exactly halfway between two bfloat16 numbers."""
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31, (count,), generator=gen, dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    special = torch.tensor(
        [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-45, 3.4e38, 65520.0, 1e-8]
    )
    halfway = (torch.arange(64, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)
    nan_bits = torch.tensor([0x7F800001, 0xFFC00123, 0x7FBFFFFF, 0x7FC00000], dtype=torch.int64)
    payload_nan = nan_bits.to(torch.int32).view(torch.float32)
    return torch.cat([values, special, halfway, payload_nan]).to(dtype)


CASTS = [
    (source, flag, target)
    for source in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    for flag, target in (("bf16", torch.bfloat16), ("fp16", torch.float16))
    if source != target
]


@pytest.mark.parametrize(("source", "flag", "target"), CASTS)
def test_cast_equals_torch_bit_for_bit(
    tmp_path: Path, source: torch.dtype, flag: str, target: torch.dtype
) -> None:
    values = random_floats(3 * CAST_PIECE // source.itemsize + 77, source)  # several pieces
    src = tmp_path / "src.pth"
    torch.save({"w": values, "view": values[5:1000]}, src)
    for suffix in (".pth", ".safetensors"):
        out = tmp_path / f"out{suffix}"
        result = run_cli("convert", src, "-o", out, "--dtype", flag)
        assert result.exit_code == 0, result.stderr
        got = open_checkpoint(out).weights().tensors["w"].to_torch()
        want = values.to(target)
        assert got.dtype == target
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # NaN bits included


def test_ranges_of_a_cast_storage_are_the_cast_of_their_elements() -> None:
    values = random_floats(1000, torch.float32)
    raw = values.numpy().tobytes()
    source = Storage("0", "float32", len(raw), loader=lambda: raw)
    cast = cast_storage(source, "bfloat16")
    whole = values.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    assert cast.nbytes == len(whole) and cast.read() == whole
    for start, length in [(0, 2), (2, 10), (1, 3), (999, 1001), (1998, 2), (7, 0)]:
        assert bytes(cast.read(start, length)) == whole[start : start + length], (start, length)


def test_tied_weights_stay_one_storage_and_ints_are_untouched(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    emb = torch.randn(300, 64, generator=gen)
    base = torch.randn(1000, generator=gen)
    state = {
        "emb.weight": emb,
        "head.weight": emb,  # tied
        "a": base[:500],  # two views of one storage
        "b": base[500:].view(20, 25),
        "steps": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
        "q": torch.tensor([-3, 0, 5], dtype=torch.int8),
    }
    src = tmp_path / "src.pth"
    torch.save(state, src)
    out = tmp_path / "out.pth"
    result = run_cli("convert", src, "-o", out, "--dtype", "bf16")
    assert result.exit_code == 0, result.stderr
    loaded = torch.load(out, weights_only=True)
    assert loaded["emb.weight"].data_ptr() == loaded["head.weight"].data_ptr()
    assert loaded["a"].untyped_storage().data_ptr() == loaded["b"].untyped_storage().data_ptr()
    for name in ("emb.weight", "head.weight", "a", "b"):
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], state[name].to(torch.bfloat16)), name
    for name in ("steps", "mask", "q"):
        assert loaded[name].dtype == state[name].dtype and torch.equal(loaded[name], state[name])


def test_tied_weights_stay_tied_in_safetensors(tmp_path: Path) -> None:
    emb = torch.randn(30, 8)
    src = tmp_path / "src.pth"
    torch.save({"emb.weight": emb, "head.weight": emb}, src)
    out = tmp_path / "out.safetensors"
    assert run_cli("convert", src, "-o", out, "--dtype", "fp16").exit_code == 0
    tensors = open_checkpoint(out).weights().tensors
    assert tensors["head.weight"].storage is tensors["emb.weight"].storage  # stored once, alias restored
    assert torch.equal(tensors["head.weight"].to_torch(), emb.half())


def test_cast_records_share_one_cast_storage() -> None:
    raw = torch.arange(8, dtype=torch.float32).numpy().tobytes()
    storage = Storage("0", "float32", 32, loader=lambda: raw)
    recs = {
        "a": TensorRecord("a", "float32", (4,), storage),
        "b": TensorRecord("b", "float32", (4,), storage, storage_offset=4),
    }
    cast = cast_tensors(recs, "fp16")
    assert cast["a"].storage is cast["b"].storage
    assert cast["b"].read_bytes() == torch.arange(4, 8, dtype=torch.float16).numpy().tobytes()


def test_a_damaged_member_is_named_when_cast(tmp_path: Path) -> None:
    src = tmp_path / "src.pth"
    torch.save({"w": torch.randn(1024, 1024)}, src)  # 4 MiB: read in pieces
    with zipfile.ZipFile(src) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data/0"))
    data = bytearray(src.read_bytes())
    at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 3 * MIB
    data[at] ^= 0xFF
    src.write_bytes(bytes(data))
    out = tmp_path / "out.safetensors"
    assert_one_line_error(run_cli("convert", src, "-o", out, "--dtype", "bf16"), "CRC-32", "damaged")
    assert not out.exists()


def test_a_big_endian_legacy_storage_is_cast_from_its_values(tmp_path: Path) -> None:
    w = torch.tensor([1.5, -2.25, 3e-39, float("inf")], dtype=torch.float32)
    path = tmp_path / "old.pth"
    torch.save({"w": w}, path, _use_new_zipfile_serialization=False)
    raw = bytearray(path.read_bytes())
    raw = raw.replace(b"little_endianq\x02\x88", b"little_endianq\x02\x89")
    raw[-24:] = (4).to_bytes(8, "big") + w.numpy().astype(">f4").tobytes()
    path.write_bytes(bytes(raw))
    out = tmp_path / "out.pth"
    result = run_cli("convert", path, "-o", out, "--dtype", "bf16")
    assert result.exit_code == 0, result.stderr
    got = torch.load(out, weights_only=True)["w"]
    assert torch.equal(got.view(torch.int16), w.to(torch.bfloat16).view(torch.int16))


def test_sharded_cast_output(tmp_path: Path) -> None:
    values = random_floats(50_000, torch.float32)
    src = tmp_path / "src.pth"
    torch.save({f"w{i}": values[i * 10_000 : (i + 1) * 10_000].clone() for i in range(5)}, src)
    out = tmp_path / "shards"
    result = run_cli("convert", src, "-o", out, "--dtype", "bf16", "--max-shard-size", "50KB")
    assert result.exit_code == 0, result.stderr
    tensors = open_checkpoint(out).weights().tensors
    for i in range(5):
        want = values[i * 10_000 : (i + 1) * 10_000].to(torch.bfloat16)
        assert torch.equal(tensors[f"w{i}"].to_torch().view(torch.int16), want.view(torch.int16))
