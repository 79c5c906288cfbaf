"""DCP folders read without ``pickle.load`` (issue 13 item 2): hostile .metadata, torch as the reference."""

from __future__ import annotations

import pathlib
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from corpus import glob, s
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

from ckptsurgeon.core.record import tensor_to_bytes
from ckptsurgeon.core.walk import records
from ckptsurgeon.errors import FormatError
from ckptsurgeon.formats import open_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def save(state: dict, folder: Path) -> Path:
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    return folder


def torch_metadata(folder: Path) -> object:
    return FileSystemReader(folder).read_metadata()  # the test's own files: torch's reader is the reference


def torch_load(folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: torch.empty_like(v) for k, v in like.items()}
    dcp.load(out, checkpoint_id=folder, no_dist=True)
    return out


def test_build_on_the_path_class_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    folder = save({"w": torch.ones(2)}, tmp_path / "c")
    before = pathlib.Path.is_relative_to
    attack = (
        glob("pathlib", "Path") + b"N}" + s("is_relative_to") + glob("pathlib", "PurePosixPath") + b"s\x86b0"
    )
    (folder / ".metadata").write_bytes(b"\x80\x02" + attack + (folder / ".metadata").read_bytes()[2:])
    with pytest.raises(FormatError, match=r"on the class or function pathlib\.Path itself"):
        open_checkpoint(folder)
    assert pathlib.Path.is_relative_to is before


def test_a_data_file_outside_the_folder_is_refused(tmp_path: Path) -> None:
    folder = save({"w": torch.ones(2)}, tmp_path / "c")
    meta = torch_metadata(folder)
    for info in meta.storage_data.values():
        (tmp_path / "outside.distcp").write_bytes((folder / info.relative_path).read_bytes())
        info.relative_path = "../outside.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(FormatError, match="points outside the checkpoint folder"):
        open_checkpoint(folder)


def test_tensors_equal_torchs_own_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = {
        "f": torch.randn(3, 5),
        "h": torch.randn(4).half(),
        "b": torch.randn(2, 2).bfloat16(),
        "i": torch.arange(6).view(2, 3),
        "m": torch.tensor([True, False]),
        "s": torch.tensor(3.5),
        "t": torch.randn(6, 4).t(),  # a non-contiguous view
    }
    folder = save(state, tmp_path / "c")
    reference = torch_load(folder, state)
    got = {r.name: r.to_torch() for r in records(open_checkpoint(folder).tree)}
    assert sorted(got) == sorted(reference)
    for name, tensor in reference.items():
        assert got[name].dtype == tensor.dtype and tensor_to_bytes(got[name]) == tensor_to_bytes(tensor), name


def two_chunk_folder(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """One tensor saved as two chunks (as two ranks would): rows 0-1 and rows 2-3."""
    full = torch.randn(4, 3)
    folder = save({"top": full[:2].clone(), "bottom": full[2:].clone()}, tmp_path / "c")
    meta = torch_metadata(folder)
    storage = {index.fqn: info for index, info in meta.storage_data.items()}
    props = meta.state_dict_metadata["top"].properties
    chunks = [
        ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 3])),
        ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([2, 3])),
    ]
    meta.state_dict_metadata = {"w": TensorStorageMetadata(props, torch.Size([4, 3]), chunks)}
    meta.storage_data = {
        MetadataIndex("w", torch.Size([0, 0])): storage["top"],
        MetadataIndex("w", torch.Size([2, 0])): storage["bottom"],
    }
    meta.planner_data = {"w": ("w",)}
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    return folder, full


def test_a_tensor_in_two_chunks_equals_torchs_load(tmp_path: Path) -> None:
    folder, full = two_chunk_folder(tmp_path)
    reference = torch_load(folder, {"w": full})["w"]
    assert torch.equal(reference, full)
    assert torch.equal(open_checkpoint(folder).tree["w"].to_torch(), reference)


def test_torch_never_unpickles_the_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {"model": {"w": torch.randn(2, 3)}, "step": 7}
    folder = save(state, tmp_path / "c")

    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("torch's unrestricted reader was called")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(FileSystemReader, "read_metadata", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ckpt = open_checkpoint(folder)
    assert torch.equal(ckpt.tree["model"]["w"].to_torch(), state["model"]["w"])


def test_chunks_that_do_not_cover_the_tensor_are_refused(tmp_path: Path) -> None:
    folder, _ = two_chunk_folder(tmp_path)
    meta = torch_metadata(folder)
    meta.state_dict_metadata["w"].size = torch.Size([5, 3])
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(FormatError, match="chunks of 'w' hold 12 elements"):
        open_checkpoint(folder)


class _Anything:
    """What a recording find_class returns: accepts any call, state and items."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> _Anything:
        return _Anything()


def test_scan_safe_means_plain_pickle_imports_only_allowed_globals(tmp_path: Path) -> None:
    """The differential check: when ``scan`` calls a DCP folder safe, CPython's own unpickler
    (recording, importing nothing) meets no global outside the .metadata allowlist."""
    import io

    from ckptsurgeon.formats._dcpmeta import is_allowed
    from ckptsurgeon.pickling.scan import scan

    # a .distcp of several entries is several zips end to end: scan reads the spans .metadata names
    folder = save({"model": {"w": torch.ones(2, 3), "b": torch.zeros(4)}, "step": 7}, tmp_path / "c")
    assert scan(folder).safe
    seen: list[str] = []

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> type:
            seen.append(f"{module}.{name}")
            return _Anything

    Recording(io.BytesIO((folder / ".metadata").read_bytes())).load()
    assert seen and all(is_allowed(g) for g in seen), seen


class _MakesADir:
    """Pickles as a call to ``os.mkdir``: harmless, and visible when torch runs it."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.mkdir, (str(self.target),)


def _chunk_globals(folder: Path) -> list[str]:
    """What CPython's unpickler (recording, importing nothing) meets in every chunk torch's
    reader would load: the spans from torch's own metadata, each opened with zipfile."""
    import io
    import zipfile

    seen: list[str] = []

    class Recording(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> type:
            seen.append(f"{module}.{name}")
            return _Anything

        def persistent_load(self, pid: object) -> object:
            return None

    for info in torch_metadata(folder).storage_data.values():  # type: ignore[attr-defined]
        data = (folder / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            main = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
            Recording(io.BytesIO(zf.read(main))).load()
    return seen


def test_scan_reads_every_chunk_of_a_data_file(tmp_path: Path) -> None:
    """A payload in a non-tensor entry runs on ``dcp.load`` (torch loads those with
    weights_only=False): ``scan`` names it, and says safe only when no chunk imports anything unsafe."""
    from ckptsurgeon.pickling.safety import UNSAFE, classify
    from ckptsurgeon.pickling.scan import scan

    ran = tmp_path / "ran"
    folder = save({"w": torch.ones(3), "b": torch.zeros(2), "extra": _MakesADir(ran)}, tmp_path / "c")
    assert "posix.mkdir" in _chunk_globals(folder)  # the reference, read by CPython's pickle
    result = scan(folder)
    data_file = next(f for f in result.files if f.path.suffix == ".distcp")
    assert result.status == UNSAFE and data_file.unsafe_globals == ["posix.mkdir"]
    assert not ran.exists()  # scan ran nothing ...
    out = {"w": torch.empty(3), "b": torch.empty(2), "extra": None}
    dcp.load(out, checkpoint_id=folder, no_dist=True)
    assert ran.is_dir()  # ... where torch's own load does run it

    clean = save({"w": torch.ones(3), "b": torch.zeros(2), "step": 3}, tmp_path / "clean")
    assert scan(clean).safe
    assert not [g for g in _chunk_globals(clean) if classify(g).kind == UNSAFE]
