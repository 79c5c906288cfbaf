"""The read-back helper (issue 5, round 4): a verified write checksums its big spans from the output
file in a second thread while it writes, and starts their writeback, so verification and the fsync
find nothing big left to do. These tests pin that it is a real check of the output's bytes."""

from __future__ import annotations

import os
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_one_line_error, run_cli

from ckptsurgeon.fileio import readback, spans
from ckptsurgeon.surgery import verify

BIG = (512, 1024)  # 2 MiB of float32: above BIG_SPAN, so the helper follows it


def big_source(tmp_path: Path, suffix: str) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "module.a.weight": torch.randn(BIG, generator=gen),
        "module.a.bias": torch.randn(16, generator=gen),
        "module.b.weight": torch.randn(BIG, generator=gen),
    }
    path = tmp_path / f"src{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, path)
    else:
        torch.save(tensors, path)
    return path, tensors


def load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)


@pytest.fixture
def followed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, bool]]:
    """Every span the helper handled: (offset, length, checksummed)."""
    seen: list[tuple[int, int, bool]] = []
    real = readback.ReadBack._one

    def spy(self: readback.ReadBack, offset: int, length: int, upto: int) -> None:
        if upto == offset + length:
            seen.append((offset, length, self.checksum))
        real(self, offset, length, upto)

    monkeypatch.setattr(readback.ReadBack, "_one", spy)
    return seen


@pytest.fixture
def verify_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the big spans verification had to read itself (streamed by copy_span)."""
    lengths: list[int] = []
    in_verify: list[bool] = []
    real_copy_span = spans.copy_span
    real_verify = verify.verify

    def spy_copy_span(path: Path, offset: int, length: int, fh: object, *args: Any, **kwargs: Any) -> int:
        if in_verify and fh is None:
            lengths.append(length)
        return real_copy_span(path, offset, length, fh, *args, **kwargs)

    def spy_verify(*args: object, **kwargs: object) -> None:
        in_verify.append(True)
        try:
            real_verify(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            in_verify.clear()

    monkeypatch.setattr(spans, "copy_span", spy_copy_span)
    monkeypatch.setattr(verify, "verify", spy_verify)
    return lengths


@pytest.mark.parametrize("src_suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("out_suffix", [".pth", ".safetensors"])
def test_big_spans_are_read_back_once_and_not_again_by_verification(
    tmp_path: Path,
    followed: list[tuple[int, int, bool]],
    verify_reads: list[int],
    src_suffix: str,
    out_suffix: str,
) -> None:
    src, tensors = big_source(tmp_path, src_suffix)
    out = tmp_path / f"out{out_suffix}"
    result = run_cli("rename", src, "-o", out, "--strip-prefix", "module.")
    assert result.exit_code == 0, result.stderr
    big = 4 * BIG[0] * BIG[1]
    assert sorted(length for _o, length, checked in followed if checked) == [big, big]
    assert verify_reads == []  # verification found both big CRCs already known
    loaded = load(out)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name.removeprefix("module.")], tensor)


def test_no_verify_only_starts_writeback(tmp_path: Path, followed: list[tuple[int, int, bool]]) -> None:
    src, _ = big_source(tmp_path, ".pth")
    out = tmp_path / "out.safetensors"
    assert run_cli("convert", src, "-o", out, "--no-verify").exit_code == 0
    assert len(followed) == 2
    assert not any(checked for _o, _n, checked in followed)


def test_bytes_changed_after_the_copy_fail_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper's CRC is of the output's own bytes: a byte the writer got wrong is caught."""
    src, _ = big_source(tmp_path, ".pth")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    real = spans.start_writeback

    def corrupting(fh: Any, offset: int, length: int, *, upto: int | None = None) -> None:
        if upto is None and length >= spans.BIG_SPAN:  # a whole big span is written: spoil a byte
            fh.flush()
            byte = os.pread(fh.fileno(), 1, offset + 100)
            os.pwrite(fh.fileno(), bytes([byte[0] ^ 0xFF]), offset + 100)
        real(fh, offset, length, upto=upto)

    monkeypatch.setattr(spans, "start_writeback", corrupting)
    result = run_cli("convert", src, "-o", out_dir / "o.safetensors")
    assert_one_line_error(result, "verification failed", "differs from what was written")
    assert list(out_dir.iterdir()) == []


def test_a_read_error_in_the_helper_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _ = big_source(tmp_path, ".pth")
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def failing(fd: int, offset: int, length: int) -> object:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(spans, "read_fd_span", failing)
    result = run_cli("convert", src, "-o", out_dir / "o.pth")
    assert_one_line_error(result, "could not be written", "Input/output error", "nothing was written")
    assert list(out_dir.iterdir()) == []
    assert spans.current_context().followers == {}  # the helper is gone, whatever happened


def test_library_writes_outside_a_follower_are_unchanged(tmp_path: Path) -> None:
    """Writers used directly (no pipeline) still work: nothing follows their file."""
    from ckptsurgeon.core.record import TensorRecord
    from ckptsurgeon.formats._torchwriter import write as write_torchzip

    recs = {"w": TensorRecord.from_torch("w", torch.arange(600_000, dtype=torch.float32))}
    path = tmp_path / "w.pth"
    with open(path, "wb") as fh:
        write_torchzip(recs, fh)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
    assert torch.equal(torch.load(path, weights_only=True)["w"], recs["w"].to_torch())


@pytest.mark.parametrize("src_suffix", [".pth", ".safetensors"])  # vouched copy, checksummed copy
@pytest.mark.parametrize("out_suffix", [".pth", ".safetensors"])
def test_big_spans_go_in_pieces_and_their_crc_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, src_suffix: str, out_suffix: str
) -> None:
    monkeypatch.setattr(spans, "WRITEBACK_PIECE", 300_000)  # a 2 MiB tensor: 4-7 pieces
    pieces: list[tuple[int, int, int]] = []
    real = readback.ReadBack._one

    def spy(self: readback.ReadBack, offset: int, length: int, upto: int) -> None:
        pieces.append((offset, length, upto))
        real(self, offset, length, upto)

    monkeypatch.setattr(readback.ReadBack, "_one", spy)
    src, tensors = big_source(tmp_path, src_suffix)
    out = tmp_path / f"out{out_suffix}"
    result = run_cli("convert", src, "-o", out)
    assert result.exit_code == 0, result.stderr
    spans_seen = sorted({(o, n) for o, n, _u in pieces})
    assert len(spans_seen) == 2
    for offset, length in spans_seen:
        ends = [u for o, n, u in pieces if (o, n) == (offset, length)]
        assert ends == sorted(ends) and ends[-1] == offset + length and len(ends) >= 4
    loaded = load(out)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor)


def test_sharded_outputs_are_read_back_too(
    tmp_path: Path, followed: list[tuple[int, int, bool]], verify_reads: list[int]
) -> None:
    src, tensors = big_source(tmp_path, ".pth")
    out = tmp_path / "shards"
    result = run_cli("convert", src, "-o", out, "--max-shard-size", "3MiB")
    assert result.exit_code == 0, result.stderr
    assert len(list(out.glob("model-*.safetensors"))) == 2
    big = 4 * BIG[0] * BIG[1]
    assert sorted(length for _o, length, checked in followed if checked) == [big, big]
    assert verify_reads == []
    from ckptsurgeon import open_checkpoint

    got = open_checkpoint(out).weights().tensors
    for name, tensor in tensors.items():
        assert torch.equal(got[name].to_torch(), tensor)


# -- the source helper: big spans with no recorded CRC (a safetensors source) -------------------
@pytest.fixture
def source_checked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Lengths of the source spans the source helper checksummed."""
    seen: list[int] = []
    real = readback.SourceCrcs.submit

    def spy(self: readback.SourceCrcs, path: Any, offset: int, length: int) -> Any:
        seen.append(length)
        return real(self, path, offset, length)

    monkeypatch.setattr(readback.SourceCrcs, "submit", spy)
    return seen


@pytest.mark.parametrize("verify_flag", [[], ["--no-verify"]])
@pytest.mark.parametrize("out_suffix", [".pth", ".safetensors"])
def test_safetensors_source_spans_are_checksummed_beside_the_copy(
    tmp_path: Path, source_checked: list[int], out_suffix: str, verify_flag: list[str]
) -> None:
    src, tensors = big_source(tmp_path, ".safetensors")
    out = tmp_path / f"out{out_suffix}"
    result = run_cli("rename", src, "-o", out, "--strip-prefix", "module.", *verify_flag)
    assert result.exit_code == 0, result.stderr
    assert source_checked == [4 * BIG[0] * BIG[1]] * 2  # the big ones; the bias streamed checksummed
    if out_suffix == ".pth":
        with zipfile.ZipFile(out) as zf:
            assert zf.testzip() is None  # the CRCs patched in at close are the members' own
    loaded = load(out)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name.removeprefix("module.")], tensor)
    assert spans.current_context().source_crcs == []


def test_a_pth_source_needs_no_source_helper_when_verified(tmp_path: Path, source_checked: list[int]) -> None:
    src, _ = big_source(tmp_path, ".pth")
    assert run_cli("convert", src, "-o", tmp_path / "o.safetensors").exit_code == 0
    assert source_checked == []  # its archive's CRCs vouch for the big members


def test_verification_compares_the_output_with_the_source_helpers_crc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the source's bytes the helper read are not the ones copied (the source changed under
    us, say), verification fails and nothing is written."""
    src, _ = big_source(tmp_path, ".safetensors")
    real = spans.read_fd_span

    def other_bytes(fd: int, offset: int, length: int) -> Iterator[memoryview]:
        for i, chunk in enumerate(real(fd, offset, length)):
            if i == 0 and threading.current_thread().name == "ckpt-source-crc":
                chunk = memoryview(bytes([chunk[0] ^ 0xFF]) + bytes(chunk[1:]))
            yield chunk

    monkeypatch.setattr(spans, "read_fd_span", other_bytes)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli("convert", src, "-o", out_dir / "o.pth")
    assert_one_line_error(result, "verification failed")
    assert list(out_dir.iterdir()) == []


def test_a_read_error_in_the_source_helper_is_one_line_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, _ = big_source(tmp_path, ".safetensors")
    real = spans.read_fd_span

    def failing(fd: int, offset: int, length: int) -> Iterator[memoryview]:
        if threading.current_thread().name == "ckpt-source-crc":
            raise OSError(5, "Input/output error")
        return real(fd, offset, length)

    monkeypatch.setattr(spans, "read_fd_span", failing)
    for suffix in (".pth", ".safetensors"):
        out_dir = tmp_path / f"out{suffix}"
        out_dir.mkdir()
        result = run_cli("convert", src, "-o", out_dir / f"o{suffix}")
        assert_one_line_error(result, "Input/output error", "nothing was written")
        assert list(out_dir.iterdir()) == []
        assert spans.current_context().source_crcs == []


def test_a_truncated_source_under_the_source_helper_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The helper names the file when its read runs off the end (here only the helper's read
    does: the writer's copy is left alone)."""
    src, _ = big_source(tmp_path, ".safetensors")
    real = spans.read_fd_span

    def short(fd: int, offset: int, length: int) -> Iterator[memoryview]:
        if threading.current_thread().name == "ckpt-source-crc":
            return real(fd, offset, length + (1 << 30))  # past the end of the file
        return real(fd, offset, length)

    monkeypatch.setattr(spans, "read_fd_span", short)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli("convert", src, "-o", out_dir / "o.pth")
    assert_one_line_error(result, str(src), "truncated")
    assert list(out_dir.iterdir()) == []


def test_the_source_helper_does_not_use_the_shared_descriptor_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's descriptor cache closes the oldest file when it opens a new one; the helper,
    which may lag behind the writer, reads through descriptors of its own."""
    src, tensors = big_source(tmp_path, ".safetensors")
    real_get = spans.FD_CACHE.get
    helper_gets: list[str] = []

    def spy(path: Path) -> int:
        if threading.current_thread().name == "ckpt-source-crc":
            helper_gets.append(str(path))
        return real_get(path)

    monkeypatch.setattr(spans.FD_CACHE, "get", spy)
    out = tmp_path / "o.pth"
    assert run_cli("convert", src, "-o", out).exit_code == 0
    assert helper_gets == []
    loaded = load(out)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_more_source_shards_than_the_descriptor_cache_holds(tmp_path: Path) -> None:
    """40 safetensors shards (the cache keeps 32 descriptors) into one verified .pth and back."""
    from ckptsurgeon.core.record import TensorRecord
    from ckptsurgeon.formats import shardwriter

    gen = torch.Generator().manual_seed(2)
    tensors = {f"layer.{i:02d}.weight": torch.randn(BIG, generator=gen) for i in range(40)}
    folder = tmp_path / "shards"
    records = {k: TensorRecord.from_torch(k, v) for k, v in tensors.items()}
    shardwriter.write(records, folder, max_shard_bytes=4 * BIG[0] * BIG[1] + 1)
    assert len(list(folder.glob("*.safetensors"))) == 40
    out = tmp_path / "one.pth"
    result = run_cli("convert", folder, "-o", out)
    assert result.exit_code == 0, result.stderr
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
    loaded = load(out)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
