"""Format detection by content, and a clear one-line refusal for everything that is not a checkpoint."""

from __future__ import annotations

import gzip
import os
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REAL

from ckptsurgeon.errors import CkptError, FormatError, InputError, NotAStateDictError
from ckptsurgeon.formats import detect


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "empty"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "git-lfs pointer"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML page"),
        (b"  <html><head></head></html>", "HTML page"),
        (b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}", "NumPy"),
        (b"\x89HDF\r\n\x1a\n" + bytes(64), "HDF5"),
        (b"GGUF\x03\x00\x00\x00" + bytes(32), "GGUF"),
        (gzip.compress(b"hello"), "gzip"),
        (os.urandom(0) + bytes(range(256)) * 4, "not a checkpoint"),
        (b"PK\x05\x06" + bytes(18), "empty zip"),
        (b"PK\x03\x04" + bytes(40), "truncated or damaged zip"),
    ],
)
def test_not_a_checkpoint_is_named(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = write(tmp_path / "model.pth", content)
    with pytest.raises(CkptError) as excinfo:
        detect(path)
    assert fragment in str(excinfo.value)
    assert "\n" not in str(excinfo.value)
    assert str(path) in str(excinfo.value)


def test_torchscript_and_export_archives_are_named(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    torch.jit.script(model).save(str(tmp_path / "ts.pt"))
    with pytest.raises(NotAStateDictError, match=r"TorchScript"):
        detect(tmp_path / "ts.pt")
    exported = torch.export.export(model, (torch.randn(1, 2),))
    torch.export.save(exported, tmp_path / "ep.pt2")
    with pytest.raises(NotAStateDictError, match=r"torch\.export"):
        detect(tmp_path / "ep.pt2")


def test_other_zip_is_not_a_checkpoint(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(FormatError, match=r"without data\.pkl"):
        detect(tmp_path / "x.zip")


def test_detects_by_content_not_suffix(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")  # a torch zip, misnamed
    assert detect(tmp_path / "weights.safetensors") == "torch-zip"
    torch.save({"w": torch.zeros(2)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    assert detect(tmp_path / "old.bin") == "torch-legacy"
    assert detect(REAL / "hf_gpt2_tiny" / "model.safetensors") == "safetensors"
    assert detect(REAL / "hf_gpt2_tiny") == "sharded"
    assert detect(REAL / "lightning_tinynet.ckpt") == "torch-zip"


@pytest.mark.parametrize("kind", ["missing", "dangling", "loop", "fifo", "empty_dir"])
def test_bad_paths(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "p"
    if kind == "dangling":
        path.symlink_to(tmp_path / "nowhere")
    elif kind == "loop":
        path.symlink_to(tmp_path / "q")
        (tmp_path / "q").symlink_to(path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "empty_dir":
        path.mkdir()
    with pytest.raises(InputError) as excinfo:
        detect(path)
    message = str(excinfo.value)
    assert str(path) in message and "\n" not in message
