"""A flipped byte in a torch zip member is caught wherever its bytes are read whole, not only by --check."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

import ckptsurgeon
from ckptsurgeon.errors import FormatError


def flipped_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "flipped.pth"
    torch.save({"a.weight": torch.arange(64 * 16, dtype=torch.float32).reshape(64, 16)}, path)
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data/0"))
    data = bytearray(path.read_bytes())
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
        (int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")),
    )
    data[info.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 64, bias=False)


def test_to_torch_and_load_into_refuse_a_flipped_byte(tmp_path: Path) -> None:
    path = flipped_checkpoint(tmp_path)
    record = ckptsurgeon.open_checkpoint(path).weights().tensors["a.weight"]  # the header is fine
    with pytest.raises(FormatError, match="do not match the CRC-32"):
        record.to_torch()
    model = Tiny()
    before = model.a.weight.detach().clone()
    with pytest.raises(FormatError, match="member flipped/data/0"):
        ckptsurgeon.load_into(model, path)
    assert torch.equal(model.a.weight, before)  # nothing was loaded


def test_an_intact_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.pth"
    weight = torch.randn(64, 16)
    torch.save({"a.weight": weight}, path)
    model = Tiny()
    ckptsurgeon.load_into(model, path)
    assert torch.equal(model.a.weight, weight)
