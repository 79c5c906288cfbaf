"""Per-key costs of a many-tensor checkpoint: the zip directory parsed once per open, small
storages written from a few reads, and the shortcuts behind them equal to the long way round."""

from __future__ import annotations

import io
import itertools
import re
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ckptsurgeon
from ckptsurgeon.core.grouping import natural_key
from ckptsurgeon.core.record import Storage, TensorRecord
from ckptsurgeon.errors import FormatError, OutputError
from ckptsurgeon.fileio.spans import FD_CACHE
from ckptsurgeon.formats import _torchwriter, zipio

N = 300  # small tensors: a few windows of small storages


def many_small(path: Path, n: int = N) -> dict[str, torch.Tensor]:
    tensors = {f"module.layers.{i}.weight": torch.arange(i, i + 24, dtype=torch.float32) for i in range(n)}
    torch.save(tensors, path)
    return tensors


def member_data_start(path: Path, member: str) -> int:
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    data = path.read_bytes()
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    return info.header_offset + 30 + name_len + extra_len


def count_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


# -- the zip directory ------------------------------------------------------------------------
def test_open_parses_the_directory_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "many.pth"
    many_small(path)
    parses = count_calls(monkeypatch, zipio, "_parse_entries")
    ckpt = ckptsurgeon.open_checkpoint(path)  # detect, then read: one parse between them
    assert len(ckpt.weights().tensors) == N
    assert len(parses) == 1
    ckptsurgeon.open_checkpoint(path)
    assert len(parses) == 2  # the reader took it: nothing is kept for a later open


def test_a_rewritten_file_is_parsed_again(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    many_small(path, 5)
    assert ckptsurgeon.formats.detect(path) == "torch-zip"  # parsed and kept
    many_small(path, 7)  # same path, same inode: another directory
    assert len(ckptsurgeon.open_checkpoint(path).weights().tensors) == 7


def test_a_kept_directory_is_not_shared_with_its_first_reader(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    many_small(path, 3)
    first = zipio.read_directory(path)
    assert first is not None
    first.clear()  # what a caller does with its dict does not reach the next reader
    second = zipio.read_directory(path)
    assert second is not None and len(second) > 3


# -- writing small storages -------------------------------------------------------------------
def test_small_storages_are_read_in_few_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "many.pth"
    tensors = many_small(src)
    records = ckptsurgeon.open_checkpoint(src).weights().tensors
    reads = count_calls(monkeypatch, _torchwriter, "pread_exact")
    out = io.BytesIO()
    _torchwriter.write({k.removeprefix("module."): r for k, r in records.items()}, out)
    assert 0 < len(reads) <= 5  # 300 storages of 96 bytes: one window
    out.seek(0)
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == [k.removeprefix("module.") for k in tensors]
    assert all(torch.equal(loaded[k.removeprefix("module.")], t) for k, t in tensors.items())


def test_a_flipped_byte_in_a_batched_storage_names_its_member(tmp_path: Path) -> None:
    src = tmp_path / "many.pth"
    many_small(src)
    data = bytearray(src.read_bytes())
    data[member_data_start(src, "many/data/17") + 5] ^= 0xFF
    src.write_bytes(bytes(data))
    records = ckptsurgeon.open_checkpoint(src).weights().tensors
    with pytest.raises(
        FormatError, match=re.escape("member many/data/17: its bytes do not match the CRC-32")
    ):
        _torchwriter.write(records, io.BytesIO())


def test_a_source_truncated_inside_a_run_names_the_storage(tmp_path: Path) -> None:
    src = tmp_path / "many.pth"
    many_small(src)
    records = ckptsurgeon.open_checkpoint(src).weights().tensors
    cut = member_data_start(src, "many/data/250") + 10
    with open(src, "r+b") as fh:
        fh.truncate(cut)
    FD_CACHE.forget(src)
    with pytest.raises(OutputError, match=r"archive/data/250: the source file ends inside this storage"):
        _torchwriter.write(records, io.BytesIO())


def test_rename_of_many_small_tensors_loads_in_torch(tmp_path: Path, cli) -> None:
    src = tmp_path / "many.pth"
    tensors = many_small(src)
    out = tmp_path / "fixed.pth"
    result = cli("rename", src, "-o", out, "--strip-prefix", "module.")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-1].endswith("verified bit for bit")
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == [k.removeprefix("module.") for k in tensors]
    assert all(torch.equal(loaded[k.removeprefix("module.")], t) for k, t in tensors.items())


def test_emitted_pickle_is_the_same_without_the_ready_made_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "mixed.pth"
    base = torch.arange(12, dtype=torch.float32)
    torch.save(
        {
            "a": torch.ones(3, dtype=torch.bfloat16),
            "b": torch.arange(4).to(torch.uint16),  # _rebuild_tensor_v3: an untyped storage
            "c": torch.nn.Parameter(torch.zeros(2, 2)),
            "d": torch.ones(2, dtype=torch.bfloat16, requires_grad=True),
            "e": torch.arange(5).to(torch.uint16),
            "f": base[2:6],
            "g": base.view(3, 4).t(),  # shares f's storage
            "h": torch.ones(3, dtype=torch.bfloat16),
        },
        src,
    )
    tree = ckptsurgeon.open_checkpoint(src).tree
    fast = io.BytesIO()
    _torchwriter.write(tree, fast)
    monkeypatch.setattr(_torchwriter.StoragePlan, "_emit_tensor", long_way_emit)
    slow = io.BytesIO()
    _torchwriter.write(tree, slow)
    assert fast.getvalue() == slow.getvalue()
    fast.seek(0)
    loaded = torch.load(fast, weights_only=True)
    assert loaded["b"].dtype == torch.uint16 and isinstance(loaded["c"], torch.nn.Parameter)
    assert torch.equal(loaded["g"], base.view(3, 4).t()) and loaded["d"].requires_grad


def long_way_emit(self: _torchwriter.StoragePlan, em: object, rec: TensorRecord) -> None:
    """Every tensor's globals written (or referred to) one by one, none ready-made."""
    key, count, offset, stride = self._place(rec)
    self._emit_first(em, rec, key, count, offset, stride)


# -- shortcuts equal to the long way ----------------------------------------------------------
@pytest.mark.parametrize(
    ("shape", "stride", "offset", "byteorder", "loader"),
    [
        ((2, 4), None, 0, "little", False),
        ((2, 4), (4, 1), 3, "little", False),
        ((2, 4), (1, 2), 0, "little", False),  # a transposed view
        ((1, 1), (7, 9), 2, "little", False),  # one element: contiguous whatever the stride
        ((0, 4), None, 0, "little", False),  # empty
        ((2, 4), None, 0, "big", False),
        ((2, 4), None, 0, "little", True),
    ],
)
def test_file_span_is_is_raw_and_byte_span(
    shape: tuple[int, ...], stride: tuple[int, ...] | None, offset: int, byteorder: str, loader: bool
) -> None:
    storage = Storage("data/0", "bfloat16", 64, Path("m.pth"), 4096, byteorder=byteorder)
    rec = TensorRecord(
        "w", "bfloat16", shape, storage, offset, stride, loader=(lambda: None) if loader else None
    )
    long_way = None
    if rec.is_raw and rec.numel:
        start, length = rec.byte_span
        long_way = (storage.path, storage.offset + start, length)
    assert rec.file_span() == long_way
    assert TensorRecord("meta", "float32", (2,)).file_span() is None


def nested_natural_key(name: str) -> tuple[object, ...]:
    """The nested form natural_key had before it was made flat (the same order)."""
    key: list[object] = []
    for i, part in enumerate(re.split(r"(\d+)", name)):
        if i % 2:
            key.append((0, int(part), ""))
        elif part:
            key.append((1, 0, part))
    return tuple(key)


@given(st.lists(st.text(alphabet="ab.0123_9", max_size=8), min_size=2, max_size=12))
def test_natural_key_orders_as_before(names: list[str]) -> None:
    assert sorted(names, key=natural_key) == sorted(names, key=nested_natural_key)
    for a, b in itertools.pairwise(names):
        assert (natural_key(a) == natural_key(b)) == (nested_natural_key(a) == nested_natural_key(b))
