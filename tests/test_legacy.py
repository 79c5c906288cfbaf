"""Legacy (non-zip) torch.save files and bare pickles, read torch-free and checked against torch."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from test_torchzip import CASES, assert_same

from ckptsurgeon.errors import FormatError, UnsafeCheckpointError
from ckptsurgeon.formats import ReadOptions, open_checkpoint
from ckptsurgeon.pickling.emitter import Emitter


def save_legacy(tmp_path: Path, obj: Any, name: str = "old.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_legacy_matches_torch_load(tmp_path: Path, case: str) -> None:
    path = save_legacy(tmp_path, CASES[case])
    ckpt = open_checkpoint(path)
    assert ckpt.format == "torch-legacy"
    # torch cannot load its own legacy files holding uint16/float8 (UntypedStorage has no dtype):
    # compare those with the tensors that were saved.
    expected = CASES[case] if case == "dtypes" else torch.load(path, weights_only=True)
    assert_same(ckpt.tree, expected)
    assert all(r.is_raw for r in ckpt.weights().tensors.values() if r.numel and r.is_contiguous)


def test_legacy_storage_offsets_point_at_the_bytes(tmp_path: Path) -> None:
    w = torch.arange(5, dtype=torch.float32)
    path = save_legacy(tmp_path, {"w": w, "h": torch.ones(3).half()})
    rec = open_checkpoint(path).tree["w"]
    raw = path.read_bytes()
    assert raw[rec.storage.offset : rec.storage.offset + 20] == w.numpy().tobytes()
    assert int.from_bytes(raw[rec.storage.offset - 8 : rec.storage.offset], "little") == 5


@pytest.mark.parametrize("keep", [0.95, 0.7, 0.3, 0.1])
def test_truncated_legacy_file(tmp_path: Path, keep: float) -> None:
    path = save_legacy(tmp_path, {"w": torch.randn(64), "b": torch.randn(8)})
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(FormatError, match="truncated") as info:
        open_checkpoint(path)
    assert "\n" not in info.value.message


def test_legacy_read_grows_its_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptsurgeon.formats import legacy

    monkeypatch.setattr(legacy, "FIRST_READ", 64)
    sd = OrderedDict((f"layer.{i}.weight", torch.full((2,), float(i))) for i in range(50))
    path = save_legacy(tmp_path, sd)
    assert_same(open_checkpoint(path).tree, torch.load(path, weights_only=True))


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_bare_pickle_of_plain_data(tmp_path: Path, protocol: int) -> None:
    obj = {
        "epoch": 3,
        "name": "run-é",
        "lr": 0.5,
        "big": 2**80,
        "neg": -7,
        "items": [1, (2, 3), None],
        "flags": {True, False},
        "frozen": frozenset({1}),
        "raw": b"\x00\x01",
        "od": OrderedDict(a=1),
        "c": 1 + 2j,
        "ba": bytearray(b"xy"),
    }
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    if protocol < 2:  # not recognised as a checkpoint by its first bytes
        with pytest.raises(FormatError, match="not a checkpoint"):
            open_checkpoint(path)
        return
    ckpt = open_checkpoint(path)
    assert ckpt.format == "pickle"
    assert ckpt.tree == obj
    assert ckpt.notes == ["a plain pickle, not a torch.save file", "it holds no tensors"]


def test_protocol_0_and_1_opcodes_are_interpreted(tmp_path: Path) -> None:
    from ckptsurgeon.pickling.pickles import Unpickler
    from ckptsurgeon.pickling.safety import DataResolver

    obj = {"a": [1, 2.5, "x", None, True], "b": (1,), "c": {"d": -(2**70)}}
    for protocol in (0, 1):
        assert Unpickler(pickle.dumps(obj, protocol=protocol), DataResolver()).load() == obj


def test_emitter_output_is_read_back(tmp_path: Path) -> None:
    obj = {"a": [1, 2.5, None, True, "é", b"\x01", (1, 2, 3, 4)], "big": -(2**100), "od": OrderedDict(x=1)}
    shared = [1]
    obj["s1"], obj["s2"] = shared, shared
    em = Emitter()
    em.dump(obj)
    path = tmp_path / "e.pkl"
    path.write_bytes(em.getvalue())
    tree = open_checkpoint(path).tree
    assert tree == obj and tree["s1"] is tree["s2"]
    assert pickle.loads(em.getvalue()) == obj


def test_bare_pickle_with_persistent_ids_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.pkl"
    path.write_bytes(b"\x80\x02X\x03\x00\x00\x00abcQ.")
    with pytest.raises(FormatError, match="persistent id"):
        open_checkpoint(path)


def test_legacy_whole_model_is_named(tmp_path: Path) -> None:
    path = save_legacy(tmp_path, torch.nn.Linear(2, 2))
    with pytest.raises(UnsafeCheckpointError, match="whole pickled model object"):
        open_checkpoint(path)
    ckpt = open_checkpoint(path, ReadOptions(unsafe=True))
    assert sorted(ckpt.weights().tensors) == ["bias", "weight"]


def test_legacy_unsafe_option_loads_with_torch(tmp_path: Path) -> None:
    path = save_legacy(tmp_path, {"w": torch.arange(3.0)})
    ckpt = open_checkpoint(path, ReadOptions(unsafe=True))
    assert torch.equal(ckpt.tree["w"].to_torch(), torch.arange(3.0))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x80\x02}q\x00(X\x01\x00\x00\x00a\x95", "truncated"),
        (b"\x80\x02\xfe.", "unknown opcode 0xfe"),
        (b"\x80\x02e.", "stack underflow"),
        (b"\x80\x02j\x00\x01\x00\x00.", "memo entry 256"),
        (b"\x80\x02\x8c\x02\xff\xfe.", "not valid UTF-8"),
        (b"\x80\x02\x97.", "out-of-band"),
        (b"\x80\x02]K\x01b.", "BUILD on a list"),
    ],
)
def test_malformed_bare_pickles(tmp_path: Path, data: bytes, fragment: str) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(data)
    with pytest.raises(FormatError, match=fragment) as info:
        open_checkpoint(path)
    assert "\n" not in info.value.message


def test_legacy_big_endian_flag(tmp_path: Path) -> None:
    """A legacy file whose sys_info says big-endian: counts and data are read big-endian."""
    w = torch.arange(4, dtype=torch.int32)
    path = save_legacy(tmp_path, {"w": w})
    raw = bytearray(path.read_bytes())
    raw = raw.replace(b"little_endianq\x02\x88", b"little_endianq\x02\x89")
    raw[-24:] = (4).to_bytes(8, "big") + w.numpy().astype(">i4").tobytes()
    path.write_bytes(bytes(raw))
    rec = open_checkpoint(path).tree["w"]
    assert rec.storage.byteorder == "big"
    assert torch.equal(rec.to_torch(), w)
