"""Atomic output: temp file beside the target, fsync, rename; refusal without --force."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import FIXTURES, run_cli

from ckptsurgeon.errors import OutputError
from ckptsurgeon.fileio.writing import atomic_output


def test_writes_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    with atomic_output(out) as fh:
        fh.write(b"hello")
    assert out.read_bytes() == b"hello"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_refuses_existing_output_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists; pass --force"), atomic_output(out) as fh:
        fh.write(b"new")
    assert out.read_bytes() == b"old"
    with atomic_output(out, force=True) as fh:
        fh.write(b"new")
    assert out.read_bytes() == b"new"


def test_failure_leaves_target_untouched_and_no_debris(tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(out, force=True) as fh:
        fh.write(b"partial")
        raise RuntimeError("boom")
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_overwriting_a_file_that_is_being_read(tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(b"abcdef")
    with open(src, "rb") as reader:
        with atomic_output(src, force=True) as fh:
            fh.write(reader.read().upper())
        reader.seek(0)
        assert reader.read() == b"abcdef"  # the old inode is still readable
    assert src.read_bytes() == b"ABCDEF"


def test_missing_folder_and_folder_as_output(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"), atomic_output(tmp_path / "nope" / "x.bin"):
        pass
    with pytest.raises(OutputError, match="is a folder"), atomic_output(tmp_path):
        pass


def test_an_interrupt_says_whether_the_output_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C before the rename: nothing written; between the rename and the end of the command:
    the output is complete, and ckpt names it (only this command's outputs)."""
    import ckptsurgeon.fileio.writing as writing

    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt

    src = FIXTURES / "vgg_1000.pth"
    assert run_cli("convert", src, "-o", tmp_path / "first.safetensors").exit_code == 0
    with monkeypatch.context() as patch:
        patch.setattr(writing, "_link_anonymous", interrupt)
        patch.setattr(writing.tempfile, "mkstemp", interrupt)  # where O_TMPFILE is not available
        result = run_cli("convert", src, "-o", tmp_path / "second.safetensors")
    assert (result.exit_code, result.stderr) == (130, "ckpt: interrupted; no output was written\n")
    with monkeypatch.context() as patch:
        patch.setattr(writing, "fsync_dir", interrupt)
        result = run_cli("convert", src, "-o", tmp_path / "third.safetensors")
    assert result.exit_code == 130
    assert result.stderr.startswith(
        f"ckpt: interrupted after writing {tmp_path / 'third.safetensors'} in full"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.safetensors", "third.safetensors"]
