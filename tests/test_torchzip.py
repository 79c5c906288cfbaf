"""The torch zip reader (restricted, torch-free) and writer, checked against torch itself."""

from __future__ import annotations

import argparse
import io
import pathlib
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ckptsurgeon.core.record import TensorRecord, tensor_to_bytes
from ckptsurgeon.errors import FormatError, OutputError, UnsafeCheckpointError
from ckptsurgeon.formats import ReadOptions, open_checkpoint
from ckptsurgeon.formats._torchwriter import write
from ckptsurgeon.pickling.placeholders import Reduced

REAL = Path(__file__).resolve().parent.parent / "fixtures" / "real"


# -- comparing a record tree with what torch.load returns ----------------------------------
def assert_same(ours: Any, theirs: Any, where: str = "<root>") -> None:
    """Names, dtypes, shapes, Parameter-ness and every byte equal; plain values equal."""
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, TensorRecord), where
        assert ours.dtype == str(theirs.dtype).removeprefix("torch."), where
        assert ours.shape == tuple(theirs.shape), where
        assert ours.is_parameter == isinstance(theirs, torch.nn.Parameter), where
        assert ours.requires_grad == theirs.requires_grad, where
        assert tensor_to_bytes(ours.to_torch()) == tensor_to_bytes(theirs), where
        assert ours.read_bytes() == tensor_to_bytes(theirs), where
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs), where
        assert list(ours) == list(theirs), where
        assert getattr(ours, "_metadata", None) == getattr(theirs, "_metadata", None), where
        for key in theirs:
            assert_same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(theirs, list | tuple):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same(a, b, f"{where}.{i}")
    else:
        assert ours == theirs, where


def torch_bytes_of(obj: Any, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def save(tmp_path: Path, obj: Any, name: str = "m.pth", **kwargs: Any) -> Path:
    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return path


def _cases() -> dict[str, Any]:
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    lin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    return {
        "parameters": {
            "w": torch.nn.Parameter(torch.randn(2, 3)),
            "frozen": torch.nn.Parameter(torch.ones(2), False),
        },
        "module_state_dict": lin.state_dict(),
        "shared_views": {
            "a": base,
            "row": base[1],
            "col": base[:, 2],
            "t": base.t(),
            "tail": base.view(-1)[5:],
        },
        "non_contiguous": {"t": torch.randn(3, 5).t(), "step": torch.arange(20.0)[::3]},
        "dtypes": {
            "bf16": torch.randn(3, 2).to(torch.bfloat16),
            "f16": torch.randn(5).half(),
            "f64": torch.randn(2, 2, dtype=torch.float64),
            "i64": torch.arange(7),
            "i32": torch.arange(-3, 3, dtype=torch.int32),
            "i8": torch.tensor([-1, 2], dtype=torch.int8),
            "u8": torch.tensor([255, 1], dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "u16": torch.tensor([1, 65535], dtype=torch.uint16),
            "f8": torch.randn(4).to(torch.float8_e4m3fn),
            "f8b": torch.randn(4).to(torch.float8_e5m2),
            "c64": torch.randn(3, dtype=torch.complex64),
        },
        "zero_dim_and_empty": {
            "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0, 4),
            "int0": torch.tensor(7),
        },
        "requires_grad": {"g": torch.randn(3, requires_grad=True).detach().requires_grad_()},
        "nested": {
            "model": {"enc": {"w": torch.ones(2)}},
            "list": [torch.zeros(1), {"x": torch.ones(3)}],
            "tup": (1, "a", torch.arange(3)),
            "none": None,
            "f": 1.5,
            "b": b"\x00\xff",
            "s": {1, 2},
        },
        "lightning_like": _training_checkpoint(lin),
        "tied": _tied(),
    }


def _training_checkpoint(model: torch.nn.Module) -> dict[str, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return {
        "epoch": 3,
        "global_step": 12,
        "state_dict": model.state_dict(),
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [{"gamma": 0.1, "base_lrs": [0.1]}],
        "hyper_parameters": {"lr": 0.1, "name": "x"},
        "pytorch-lightning_version": "2.6.6",
        "loops": {"fit_loop": {"state_dict": {}}},
        "callbacks": {},
    }


def _tied() -> dict[str, Any]:
    emb = torch.randn(10, 4)
    return {"wte.weight": emb, "lm_head.weight": emb}


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_read_matches_torch_load(tmp_path: Path, case: str) -> None:
    path = save(tmp_path, CASES[case])
    ckpt = open_checkpoint(path)
    assert ckpt.format == "torch-zip"
    assert_same(ckpt.tree, torch.load(path, weights_only=True))
    assert "torch._utils._rebuild_tensor_v2" in ckpt.globals_used


@pytest.mark.parametrize("case", sorted(CASES))
def test_write_loads_in_torch_and_round_trips(tmp_path: Path, case: str) -> None:
    source = open_checkpoint(save(tmp_path, CASES[case]))
    out = tmp_path / "out.pth"
    with open(out, "wb") as fh:
        write(source.tree, fh)
    expected = torch.load(tmp_path / "m.pth", weights_only=True)
    assert_same(open_checkpoint(out).tree, expected)
    assert_same(_records_of(torch.load(out, weights_only=True)), expected)
    _assert_aligned(out)


def _records_of(obj: Any) -> Any:
    """Turn torch.load's tensors into loader records so assert_same can compare them."""
    if isinstance(obj, torch.Tensor):
        rec = TensorRecord.from_torch("", obj)
        return TensorRecord(
            rec.name,
            rec.dtype,
            rec.shape,
            requires_grad=obj.requires_grad,
            is_parameter=isinstance(obj, torch.nn.Parameter),
            loader=rec.loader,
        )
    if isinstance(obj, dict):
        out = type(obj)((k, _records_of(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(_records_of(v) for v in obj)
    return obj


def _assert_aligned(path: Path) -> None:
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if "/data/" in info.filename:
                name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
                assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
                assert info.compress_type == zipfile.ZIP_STORED


def test_write_keeps_shared_storage_shared(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    source = open_checkpoint(
        save(tmp_path, {"a": base.view(3, 4), "b": base[4:8], "alone": torch.arange(6.0)[2:4]})
    )
    out = tmp_path / "out.pth"
    with open(out, "wb") as fh:
        write(source.tree, fh)
    loaded = torch.load(out, weights_only=True)
    assert loaded["a"].untyped_storage().data_ptr() == loaded["b"].untyped_storage().data_ptr()
    assert loaded["alone"].untyped_storage().nbytes() == 8  # a lone view: only its own bytes
    assert torch.equal(loaded["b"], base[4:8])


def test_write_live_tensors_and_placeholders(tmp_path: Path) -> None:
    tree = {
        "w": TensorRecord.from_torch("w", torch.randn(3, 3).t()),
        "dev": Reduced("torch", "device", ("cuda", 0)),
    }
    out = tmp_path / "out.pth"
    with open(out, "wb") as fh:
        write(tree, fh, archive_name="mine")
    loaded = torch.load(out, weights_only=True)
    assert torch.equal(loaded["w"], tree["w"].to_torch())
    assert loaded["dev"] == torch.device("cuda", 0)
    assert zipfile.ZipFile(out).namelist()[0] == "mine/data.pkl"


def test_write_refuses_shape_only_records(tmp_path: Path) -> None:
    with open(tmp_path / "out.pth", "wb") as fh, pytest.raises(OutputError, match="no data"):
        write({"w": TensorRecord("w", "float32", (2,))}, fh)


@pytest.mark.parametrize("name", ["tinynet_compiled.pth", "lightning_tinynet.ckpt"])
def test_real_fixtures_match_torch(name: str) -> None:
    path = REAL / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    ckpt = open_checkpoint(path)
    assert_same(ckpt.tree, torch.load(path, weights_only=True, map_location="cpu"))
    if name.startswith("tinynet"):
        assert all(r.storage.location == "cuda:0" for r in ckpt.weights().tensors.values())
        assert ckpt.notes == ["tensors were saved on cuda:0; they open on the CPU here"]


def test_data_only_extras_open_without_flag_and_rewrite_faithfully(tmp_path: Path) -> None:
    obj = {
        "args": argparse.Namespace(lr=0.1, arch="resnet", out=pathlib.PosixPath("/runs/a")),
        "best_acc": np.float64(0.75),
        "n": np.int64(3),
        "ok": np.bool_(True),
        "f32": np.float32(1.5),
        "dt": np.dtype("float32"),
        "w": torch.ones(2),
    }
    path = save(tmp_path, obj)
    tree = open_checkpoint(path).tree
    assert tree["args"].lr == 0.1 and tree["args"].arch == "resnet" and str(tree["args"].out) == "/runs/a"
    assert (tree["best_acc"], tree["n"], tree["f32"]) == (0.75, 3, 1.5) and repr(tree["ok"]) == "True"
    out = tmp_path / "out.pth"
    with open(out, "wb") as fh:
        write(tree, fh)
    back = torch.load(out, weights_only=False)  # our own file: full trust is fine here
    assert back["args"] == obj["args"] and back["dt"] == obj["dt"]
    for key in ("best_acc", "n", "ok", "f32"):
        assert type(back[key]) is type(obj[key]) and back[key] == obj[key], key


def _zip_with_pickle(tmp_path: Path, data_pkl: bytes, name: str = "x.pth") -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/version", "3\n")
    return path


def test_allow_global_gives_an_opaque_placeholder(tmp_path: Path) -> None:
    pkl = b"\x80\x02}X\x03\x00\x00\x00cfgcmylib\nConfig\n)\x81}X\x01\x00\x00\x00kK\x05sbs."
    path = _zip_with_pickle(tmp_path, pkl)
    with pytest.raises(UnsafeCheckpointError, match=r"mylib\.Config") as info:
        open_checkpoint(path)
    assert info.value.blocked_globals == ("mylib.Config",)
    cfg = open_checkpoint(path, ReadOptions(allow_globals=frozenset({"mylib.Config"}))).tree["cfg"]
    assert (cfg.module, cfg.name, cfg.newobj, cfg.state) == ("mylib", "Config", True, {"k": 5})
    out = tmp_path / "out.pth"
    with open(out, "wb") as fh:
        write({"cfg": cfg}, fh)
    assert b"cmylib\nConfig\n" in zipfile.ZipFile(out).read("archive/data.pkl")


def test_whole_pickled_model_is_named(tmp_path: Path) -> None:
    path = save(tmp_path, torch.nn.Linear(2, 3))
    with pytest.raises(UnsafeCheckpointError, match="whole pickled model object, not a state dict") as info:
        open_checkpoint(path)
    assert "torch.nn.modules.linear.Linear" in info.value.blocked_globals


def test_unsafe_option_uses_torch_load(tmp_path: Path) -> None:
    path = save(tmp_path, torch.nn.Linear(2, 3))
    ckpt = open_checkpoint(path, ReadOptions(unsafe=True))
    assert sorted(ckpt.weights().tensors) == ["bias", "weight"]
    assert torch.equal(ckpt.tree["weight"].to_torch(), torch.load(path, weights_only=False).weight)


def test_big_endian_archive(tmp_path: Path) -> None:
    values = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    src = save(tmp_path, {"w": values})
    path = tmp_path / "big.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = values.numpy().astype(">f4").tobytes()
            zout.writestr(info.filename, data)
    rec = open_checkpoint(path).tree["w"]
    assert rec.storage.byteorder == "big" and not rec.is_raw
    assert torch.equal(rec.to_torch(), values)


def test_compressed_members_are_read_through_zipfile(tmp_path: Path) -> None:
    src = save(tmp_path, {"w": torch.arange(10.0)})
    path = tmp_path / "deflated.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    rec = open_checkpoint(path).tree["w"]
    assert rec.storage.path is None and torch.equal(rec.to_torch(), torch.arange(10.0))


# -- damaged files --------------------------------------------------------------------------
def _rewrite(src: Path, dst: Path, change: Any) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def test_missing_storage_names_the_tensor(tmp_path: Path) -> None:
    src = save(tmp_path, {"a": torch.ones(2), "b": torch.zeros(3)})
    path = _rewrite(src, tmp_path / "x.pth", lambda n, d: None if n.endswith("data/1") else d)
    with pytest.raises(FormatError, match=r"tensor 'b'.*m/data/1 is missing"):
        open_checkpoint(path)


def test_short_storage_names_the_tensor(tmp_path: Path) -> None:
    src = save(tmp_path, {"a": torch.ones(2), "b": torch.zeros(3)})
    path = _rewrite(src, tmp_path / "x.pth", lambda n, d: d[:4] if n.endswith("data/1") else d)
    with pytest.raises(FormatError, match=r"tensor 'b'.*holds 4 bytes but declares 12"):
        open_checkpoint(path)


def test_tensor_span_past_its_storage(tmp_path: Path) -> None:
    src = save(tmp_path, {"w": torch.ones(4)})
    pkl = zipfile.ZipFile(src).read("m/data.pkl").replace(b"K\x04\x85", b"K\x09\x85")  # size (4,) -> (9,)
    path = _rewrite(src, tmp_path / "x.pth", lambda n, d: pkl if n.endswith("data.pkl") else d)
    with pytest.raises(FormatError, match=r"tensor 'w' \(float32\[9\]\) needs 36 bytes of storage data/0"):
        open_checkpoint(path)


def test_crc_mismatch_found_with_check(tmp_path: Path) -> None:
    path = save(tmp_path, {"w": torch.arange(64.0)})
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("m/data/0")
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    raw[info.header_offset + 30 + name_len + extra_len + 10] ^= 0xFF
    path.write_bytes(bytes(raw))
    open_checkpoint(path)  # structure only: fine
    with pytest.raises(FormatError, match="member m/data/0 fails its check"):
        open_checkpoint(path, ReadOptions(check=True))


@pytest.mark.parametrize("cut", [0.99, 0.9, 0.5, 0.2])
def test_truncated_zip(tmp_path: Path, cut: float) -> None:
    raw = torch_bytes_of({"w": torch.randn(100)})
    path = tmp_path / "cut.pth"
    path.write_bytes(raw[: int(len(raw) * cut)])
    with pytest.raises(FormatError) as info:
        open_checkpoint(path)
    assert "\n" not in info.value.message


@pytest.mark.parametrize(
    ("pkl", "fragment"),
    [
        (b"\x80\x02}q\x00X\x01\x00\x00\x00a\xffs.", "unknown opcode 0xff"),
        (b"\x80\x02}q\x00X\x05\x00\x00\x00ab", "truncated"),
        (b"\x80\x02s.", "stack underflow"),
        (b"\x80\x02h\x07.", "memo entry 7"),
        (b"\x80\x02X\x02\x00\x00\x00\xc3\x28.", "not valid UTF-8"),
        (b"\x80\x02K\x01K\x02.", "STOP with a stack"),
        (b"\x80\x02}(K\x01u.", "odd number"),
        (b"\x80\x02]K\x01K\x02s.", "SETITEMS on a list"),
    ],
)
def test_malformed_pickles_give_one_line(tmp_path: Path, pkl: bytes, fragment: str) -> None:
    with pytest.raises(FormatError, match=fragment) as info:
        open_checkpoint(_zip_with_pickle(tmp_path, pkl))
    assert "\n" not in info.value.message and str(tmp_path) in info.value.message


def test_self_referencing_pickle_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="contains itself"):
        open_checkpoint(_zip_with_pickle(tmp_path, b"\x80\x02]q\x00h\x00a."))


def test_many_tensors_parse_without_torch(tmp_path: Path) -> None:
    sd = OrderedDict((f"layers.{i}.w", torch.zeros(2)) for i in range(3000))
    ckpt = open_checkpoint(save(tmp_path, sd))
    assert len(ckpt.weights().tensors) == 3000
    assert pickle.loads(pickle.dumps(ckpt.format)) == "torch-zip"


def test_sparse_tensors_are_refused_in_one_line(tmp_path: Path) -> None:
    path = save(tmp_path, {"s": torch.randn(3, 3).to_sparse()})
    with pytest.raises(FormatError, match=r"_rebuild_sparse_tensor.*open it with torch.load$"):
        open_checkpoint(path)


def test_a_directory_that_understates_inflation_is_checked_against_the_archive_size() -> None:
    """A central directory may claim a compressed size of file_size / 99: no member is bigger
    than the archive, so the ratio is taken against that."""
    import zipfile

    from ckptsurgeon.formats.torchzip import inflation_problem

    info = zipfile.ZipInfo("archive/data.pkl")
    info.compress_type, info.file_size = zipfile.ZIP_DEFLATED, 2 << 30
    info.compress_size = info.file_size // 99  # the lie
    assert inflation_problem(info) is None  # taken at its word, it passes
    assert "zip bomb" in (inflation_problem(info, archive_size=2 << 20) or "")
    info.compress_size = 1 << 20  # an honest 16x
    info.file_size = 16 << 20
    assert inflation_problem(info, archive_size=2 << 20) is None
