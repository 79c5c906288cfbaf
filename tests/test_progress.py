"""Progress bars: on stderr only, on a TTY (or when asked), for sharded writes, --check and --hash."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from ckptsurgeon.core.source import open_source
from ckptsurgeon.fileio import progress
from ckptsurgeon.fileio.progress import Bar, progress_bar, wants_bar
from ckptsurgeon.formats import ReadOptions, open_checkpoint, shardwriter
from ckptsurgeon.formats.torchzip import open_zip, verify_crcs
from ckptsurgeon.inspection import inspect
from ckptsurgeon.pickling.scan import scan
from ckptsurgeon.surgery.pipeline import WriteOptions, write_checkpoint


def save_model(tmp_path: Path, name: str = "src.pth") -> Path:
    path = tmp_path / name
    torch.manual_seed(0)
    torch.save(
        {"a.weight": torch.randn(300, 10), "b.weight": torch.randn(300, 10), "c": torch.arange(10.0)}, path
    )
    return path


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal, so click draws the bar itself."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def tty(monkeypatch: pytest.MonkeyPatch) -> None:
    """stderr counts as a terminal and every job as big enough for a bar."""
    monkeypatch.setattr(progress, "stderr_is_tty", lambda: True)
    monkeypatch.setattr(progress, "PROGRESS_MIN_BYTES", 0)


@pytest.fixture
def small_jobs_get_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every job is big enough, but the TTY test is left alone (CliRunner's stderr is no TTY)."""
    monkeypatch.setattr(progress, "PROGRESS_MIN_BYTES", 0)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(bytes counted, total) of every bar, taken just before it is completed."""
    seen: list[tuple[int, int]] = []
    bars: list[Bar] = []
    complete = Bar.complete

    def spy(self: Bar) -> None:
        if not any(bar is self for bar in bars):  # the first completion of each bar
            bars.append(self)
            seen.append((self.done, self.total))
        complete(self)

    monkeypatch.setattr(Bar, "complete", spy)
    return seen


# -- when a bar is shown ------------------------------------------------------------------------
def test_wants_bar_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    big = progress.PROGRESS_MIN_BYTES
    monkeypatch.setattr(progress, "stderr_is_tty", lambda: False)
    assert (wants_bar(big, None), wants_bar(1, True), wants_bar(big, False)) == (False, True, False)
    monkeypatch.setattr(progress, "stderr_is_tty", lambda: True)
    assert (wants_bar(big, None), wants_bar(big - 1, None), wants_bar(big, False)) == (True, False, False)


def test_bar_draws_on_a_terminal_and_ends_at_100_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    term = FakeTerminal()
    monkeypatch.setattr("sys.stderr", term)
    with progress_bar(1000, True, "copying x") as bar:
        assert bar is not None
        bar.update(300)  # the total was an estimate: completion tops it up
    out = term.getvalue()
    last = out.split("\r")[-1]  # the final redraw
    assert "copying x" in last and "100%" in last and "-" not in last
    assert out.endswith("\n")


def test_no_bar_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    with progress_bar(2**40, None, "copying x") as bar:
        assert bar is None
    assert capsys.readouterr() == ("", "")


# -- sharded writes -----------------------------------------------------------------------------
def test_sharded_convert_bar_on_stderr_stdout_unchanged(tmp_path: Path, tty: None) -> None:
    src = save_model(tmp_path)
    result = run_cli("convert", src, "-o", tmp_path / "out", "--max-shard-size", "13KB")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == (
        "Plan: 3 tensors: 0 renamed, 3 unchanged, 0 dropped\n\n"
        f"wrote {tmp_path / 'out'} (sharded-safetensors, 3 tensors, 24.0 KiB), verified bit for bit\n"
    )
    assert result.stderr == "writing out\n"  # CliRunner's stream is no TTY: click prints the label once


def test_sharded_convert_without_a_terminal_prints_no_bar(tmp_path: Path, small_jobs_get_bars: None) -> None:
    src = save_model(tmp_path)
    result = run_cli("convert", src, "-o", tmp_path / "out", "--max-shard-size", "13KB")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.endswith("verified bit for bit\n")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_sharded_write_counts_every_byte_in_one_bar(
    tmp_path: Path, fmt: str, counted: list[tuple[int, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    source = open_source(save_model(tmp_path))
    options = WriteOptions(tmp_path / "out", to=fmt, max_shard_size=13_000, progress=True)
    result = write_checkpoint(source, None, options)
    shards = [f for f in result.files if not f.name.endswith(".json")]
    assert len(shards) == 2 and result.verified
    assert capsys.readouterr() == ("", "writing out\n")  # one bar for both shards
    assert len(counted) == 1
    done, total = counted[0]
    assert total == 2 * 300 * 10 * 4 + 10 * 4
    assert done == sum(f.stat().st_size for f in shards)  # headers included, each byte once


def test_shard_writer_keeps_its_old_call_and_honours_progress(
    tmp_path: Path, tty: None, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = open_checkpoint(save_model(tmp_path)).weights().tensors
    shardwriter.write(tensors, tmp_path / "quiet", max_shard_bytes=13_000, progress=False)
    assert capsys.readouterr().err == ""
    shardwriter.write(tensors, tmp_path / "auto", max_shard_bytes=13_000)  # default: the TTY rule
    assert capsys.readouterr().err == "writing auto\n"


def test_single_file_bar_counts_vouched_copies(
    tmp_path: Path, counted: list[tuple[int, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "big.pth"
    torch.save({"w": torch.ones(512, 512), "b": torch.ones(3)}, src)  # 1 MiB: a vouched copy
    out = tmp_path / "copy.pth"
    write_checkpoint(open_source(src), None, WriteOptions(out, progress=True))
    assert capsys.readouterr().err == "writing copy.pth\n"
    done, total = counted[0]
    assert total == (512 * 512 + 3) * 4
    assert done == out.stat().st_size


# -- --check and --hash -------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["inspect", "scan"])
def test_check_bar_on_stderr_only(
    tmp_path: Path, command: str, tty: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = save_model(tmp_path)
    plain = run_cli(command, src, "--check")
    monkeypatch.setattr(progress, "stderr_is_tty", lambda: False)
    quiet = run_cli(command, src, "--check")
    assert plain.exit_code == quiet.exit_code == 0
    assert plain.stdout == quiet.stdout
    assert "note: checked: the CRC-32 of all 9 archive members matches" in plain.stdout
    assert plain.stderr == "checking src.pth\n"
    assert quiet.stderr == ""


@pytest.mark.parametrize("command", ["inspect", "scan"])
def test_check_bar_never_enters_json(tmp_path: Path, command: str, tty: None) -> None:
    src = save_model(tmp_path)
    result = run_cli(command, src, "--check", "--format", "json")
    assert result.exit_code == 0
    assert result.stderr == "checking src.pth\n"
    assert "checking" not in json.dumps(json.loads(result.stdout))


def test_inspect_check_exact_output_with_a_bar(tmp_path: Path, tty: None) -> None:
    src = save_model(tmp_path)
    result = run_cli("inspect", src, "--check")
    lines = result.stdout.splitlines()
    assert lines[0] == f"file         {src}"
    assert lines[-3:] == [
        "c         float32  [10]       40 B",
        "",
        "note: checked: the CRC-32 of all 9 archive members matches",
    ]
    assert result.stderr == "checking src.pth\n"


def test_check_without_a_terminal_prints_no_bar(tmp_path: Path, small_jobs_get_bars: None) -> None:
    src = save_model(tmp_path)
    for command in ("inspect", "scan"):
        result = run_cli(command, src, "--check")
        assert result.exit_code == 0 and result.stderr == ""


def test_verify_crcs_counts_every_member_byte(
    tmp_path: Path, counted: list[tuple[int, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    src = save_model(tmp_path)
    with open_zip(src) as zf:
        verify_crcs(zf, src, progress=True)
        sizes = sum(info.file_size for info in zf.infolist())
    assert capsys.readouterr().err == "checking src.pth\n"
    assert counted == [(sizes, sizes)]


def test_library_check_and_scan_honour_read_options(
    tmp_path: Path, tty: None, capsys: pytest.CaptureFixture[str]
) -> None:
    src = save_model(tmp_path)
    open_checkpoint(src, ReadOptions(check=True, progress=False))
    scan(src, ReadOptions(check=True, progress=False))
    assert capsys.readouterr().err == ""
    scan(src, ReadOptions(check=True))
    assert capsys.readouterr().err == "checking src.pth\n"


def test_hash_bar(tmp_path: Path, tty: None, counted: list[tuple[int, int]]) -> None:
    src = save_model(tmp_path)
    result = run_cli("inspect", src, "--hash", "--format", "json")
    assert result.exit_code == 0
    assert result.stderr == "hashing src.pth\n"
    assert len(json.loads(result.stdout)["sha256"]) == 64
    assert counted == [(src.stat().st_size, src.stat().st_size)]


def test_hash_bar_over_all_shards_of_a_folder(
    tmp_path: Path, counted: list[tuple[int, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    source = open_source(save_model(tmp_path))
    write_checkpoint(source, None, WriteOptions(tmp_path / "out", max_shard_size=13_000))
    counted.clear()
    report = inspect(tmp_path / "out", options=ReadOptions(progress=True), with_hash=True)
    assert report.sha256 is not None
    assert capsys.readouterr().err == "hashing out\n"
    size = sum(f.stat().st_size for f in report.files)
    assert len(report.files) >= 2
    assert counted == [(size, size)]
