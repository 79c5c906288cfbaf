"""The fast write paths: copies vouched for by a zip CRC (no CRC pass of their own), the plain-zip
reader and writer, batched span CRCs, and the grouped rename table (issue 5, second round)."""

from __future__ import annotations

import io
import random
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from ckptsurgeon.core.grouping import collapse
from ckptsurgeon.core.record import TensorRecord
from ckptsurgeon.fileio import readback, spans
from ckptsurgeon.fileio.spans import span_crcs
from ckptsurgeon.formats import zipio
from ckptsurgeon.formats._torchwriter import write as write_torchzip
from ckptsurgeon.surgery.plan import make_plan, strip_prefix
from ckptsurgeon.surgery.planreport import _rename_rows

BIG = (512, 1024)  # 2 MiB of float32: above BIG_SPAN


def big_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "module.big.weight": torch.randn(BIG, generator=gen),
        "module.big.bias": torch.randn(BIG[0], generator=gen),
        "module.other.weight": torch.randn(BIG, generator=gen),
    }
    path = tmp_path / "src.pth"
    torch.save(tensors, path)
    return path, tensors


def flip_in_member(path: Path, member_suffix: str, at: int) -> None:
    """Flip one byte inside a member's data, leaving its recorded CRC as it was."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + name_len + extra_len + at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every span copied to an output without a CRC pass (vouched for)."""
    counted: list[int] = []
    real = spans.copy_span

    def spy(path: Path, offset: int, length: int, fh: Any, crc: int | None = 0, hasher: Any = None) -> int:
        if fh is not None and crc is None:
            counted.append(length)
        return real(path, offset, length, fh, crc, hasher)

    monkeypatch.setattr(spans, "copy_span", spy)
    return counted


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_big_members_are_copied_without_a_crc_pass_and_bit_exact(
    tmp_path: Path, copies: list[int], suffix: str
) -> None:
    src, tensors = big_checkpoint(tmp_path)
    out = tmp_path / f"out{suffix}"
    result = run_cli("rename", src, "-o", out, "--strip-prefix", "module.")
    assert result.exit_code == 0, result.stderr
    assert sum(copies) == 2 * 4 * BIG[0] * BIG[1]  # the two big weights, not the bias
    if suffix == ".pth":
        loaded = torch.load(out, weights_only=True)
        with zipfile.ZipFile(out) as zf:
            assert zf.testzip() is None  # every member's CRC is right
    else:
        from safetensors.torch import load_file

        loaded = load_file(out)
    assert sorted(loaded) == sorted(k.removeprefix("module.") for k in tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name.removeprefix("module.")], tensor)


def test_no_verify_still_checksums_each_big_source_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without verification nothing vouches for a member: each big one is checksummed (by the
    source helper, against the CRC its archive records) while the writer copies it."""
    src, _ = big_checkpoint(tmp_path)
    checked: list[int] = []
    real = readback.SourceCrcs._checksum

    def spy(self: readback.SourceCrcs, path: Path, offset: int, length: int) -> int:
        if Path(path).name == src.name:
            checked.append(length)
        return real(self, path, offset, length)

    monkeypatch.setattr(readback.SourceCrcs, "_checksum", spy)
    out = tmp_path / "out.safetensors"
    assert run_cli("convert", src, "-o", out, "--no-verify").exit_code == 0
    assert checked == [4 * BIG[0] * BIG[1]] * 2


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_flipped_byte_in_a_big_source_member_fails_the_write(
    tmp_path: Path, suffix: str, verify: bool
) -> None:
    src, _ = big_checkpoint(tmp_path)
    flip_in_member(src, "data/0", 12345)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["convert", src, "-o", out_dir / f"o{suffix}", *([] if verify else ["--no-verify"])]
    result = run_cli(*args)
    assert_one_line_error(result, "CRC-32", "data/0", str(src))
    assert list(out_dir.iterdir()) == []


def test_zip_writer_output_reads_back_everywhere(tmp_path: Path) -> None:
    recs = {
        f"t{i}": TensorRecord.from_torch(f"t{i}", torch.arange(i * 7, dtype=torch.float32)) for i in range(40)
    }
    buf = io.BytesIO()
    write_torchzip(recs, buf, "arch")
    path = tmp_path / "w.pth"
    path.write_bytes(buf.getvalue())
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        expected = {i.filename: (i.header_offset, i.file_size, i.CRC) for i in zf.infolist()}
    plain = zipio.read_directory(path)
    assert plain is not None
    assert {n: (m.header_offset, m.file_size, m.CRC) for n, m in plain.items()} == expected
    loaded = torch.load(path, weights_only=True)
    for name, rec in recs.items():
        assert torch.equal(loaded[name], rec.to_torch())


def test_zip64_fields_when_members_are_big(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zipio, "_ZIP64_MEMBER", 100)  # every member over 100 bytes takes zip64 fields
    recs = {"w": TensorRecord.from_torch("w", torch.arange(1000, dtype=torch.float32))}
    path = tmp_path / "z.pth"
    with open(path, "wb") as fh:
        write_torchzip(recs, fh)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
    assert torch.equal(torch.load(path, weights_only=True)["w"], recs["w"].to_torch())
    assert zipio.read_directory(path) is None  # zip64 member fields: left to zipfile


def test_torch_written_archives_take_the_fast_directory(tmp_path: Path) -> None:
    path = tmp_path / "t.pth"
    torch.save({"a": torch.ones(3), "b": torch.zeros(2, 2)}, path)
    plain = zipio.read_directory(path)
    with zipfile.ZipFile(path) as zf:
        assert plain is not None and sorted(plain) == sorted(zf.namelist())


def test_span_crcs_match_zlib_in_any_order(tmp_path: Path) -> None:
    rng = random.Random(5)
    data = bytes(rng.getrandbits(8) for _ in range(3 * spans.COPY_CHUNK))
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    ranges = [(rng.randrange(0, len(data) - 600), rng.randrange(1, 600)) for _ in range(200)]
    ranges += [(10, 2 * spans.COPY_CHUNK), (0, len(data))]  # big ones stream
    rng.shuffle(ranges)
    assert span_crcs(path, ranges) == [zlib.crc32(data[o : o + n]) for o, n in ranges]


def test_collapse_keeps_differently_written_numbers_apart() -> None:
    groups = collapse(["l.01.w", "l.1.w", "l.2.w"])
    assert sorted(m for g in groups for m in g.members) == ["l.01.w", "l.1.w", "l.2.w"]


def test_grouped_rename_table_for_many_names() -> None:
    recs = {
        f"module.blocks.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}": TensorRecord("", "float32", (2,))
        for i in range(2000)
    }
    plan = make_plan(recs, [strip_prefix("module.")])
    assert _rename_rows(plan, verbose=False) == [
        ["module.blocks.{0..999}.{bias,weight}", "blocks.{0..999}.{bias,weight}"]
    ]


def test_each_write_keeps_its_crcs_to_itself(tmp_path: Path) -> None:
    """CRCs a write computes live in its own context: another write, and the reads after it, do not
    see them; the CRCs its sources' archives recorded before it are seen by every write."""
    path = tmp_path / "data.bin"
    data = bytes(range(256)) * 64
    path.write_bytes(data)
    key = (*spans.file_identity(path), 0, len(data))
    spans.expect_crc(spans.file_identity(path), 0, 256, zlib.crc32(data[:256]), "data.bin: member data/0")
    with spans.write_scope() as first:
        spans.copy_span(path, 0, len(data), None)
        assert first.crcs.known_crc(key) == zlib.crc32(data)
        assert spans.recorded_crc(path, 0, 256) == zlib.crc32(data[:256])  # recorded before the write
    with spans.write_scope() as second:
        assert second.crcs.known_crc(key) is None
        assert spans.recorded_crc(path, 0, len(data)) is None
        assert spans.recorded_crc(path, 0, 256) == zlib.crc32(data[:256])
    assert spans.current_context().crcs.known_crc(key) is None
