"""The descriptor cache never serves an old file: a checkpoint replaced at its path, or a
relative path read again after ``chdir``, reads the bytes that are there now (the reference:
the safetensors library reading the same file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptsurgeon.core.walk import records
from ckptsurgeon.formats import open_checkpoint


def _values(path: Path | str) -> dict[str, torch.Tensor]:
    return {r.name: r.to_torch() for r in records(open_checkpoint(path).tree)}


def _assert_reads_as_safetensors(path: Path | str) -> None:
    ours, theirs = _values(path), load_file(os.fspath(path))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_file_replaced_at_its_path_is_read_anew(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(64), "b": torch.zeros(8)}, path)
    _assert_reads_as_safetensors(path)  # its descriptor is now cached
    staged = tmp_path / "new.safetensors"
    save_file({"w": torch.arange(64.0), "b": torch.ones(8)}, staged)  # the same layout, new values
    os.replace(staged, path)
    _assert_reads_as_safetensors(path)


def test_a_file_rewritten_in_place_is_read_anew(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(16)}, path)
    _assert_reads_as_safetensors(path)
    save_file({"w": torch.full((16,), 3.0), "x": torch.ones(2)}, path)  # same inode, new size
    _assert_reads_as_safetensors(path)


def test_a_relative_path_after_chdir_is_the_other_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((4,), value)}, tmp_path / name / "m.safetensors")
    monkeypatch.chdir(tmp_path / "a")
    _assert_reads_as_safetensors("m.safetensors")
    monkeypatch.chdir(tmp_path / "b")
    assert torch.equal(_values("m.safetensors")["w"], torch.full((4,), 2.0))
