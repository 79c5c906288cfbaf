"""torch.distributed.checkpoint folders: the scanned metadata, the records and their loaders."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import assert_one_line_error, run_cli

from ckptsurgeon.core.record import TensorRecord, tensor_to_bytes
from ckptsurgeon.errors import FormatError, UnsafeCheckpointError
from ckptsurgeon.formats import ReadOptions, open_checkpoint
from ckptsurgeon.formats import dcp as dcp_reader
from ckptsurgeon.formats._dcpmeta import is_allowed

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        self.fc = torch.nn.Linear(4, 2)


def training_state() -> dict:
    """A nested {"model", "optim", ...} state after one Adam step, plus a few other dtypes."""
    torch.manual_seed(0)
    model = TinyNet()
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    model.fc(model.features(torch.randn(5, 3))).sum().backward()
    optim.step()
    extra = {"mask": torch.tensor([True, False]), "half": torch.randn(3).bfloat16(), "ids": torch.arange(4)}
    return {"model": model.state_dict(), "optim": optim.state_dict(), "extra": extra, "epoch": 3}


@pytest.fixture
def dcp_folder(tmp_path: Path) -> tuple[Path, dict]:
    state = training_state()
    folder = tmp_path / "step_1"
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    return folder, state


def flat_tensors(node: object, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(node, torch.Tensor):
        return {prefix: node}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(flat_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def test_dcp_folder_reads_names_shapes_dtypes_and_data(dcp_folder: tuple[Path, dict]) -> None:
    folder, state = dcp_folder
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "dcp"
    assert ckpt.files[0] == folder / ".metadata" and all(p.suffix == ".distcp" for p in ckpt.files[1:])
    assert ckpt.file_size == sum(p.stat().st_size for p in ckpt.files)
    expected = flat_tensors(state)
    got = {name: rec for name, rec in flat_records(ckpt.tree).items()}
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        rec = got[name]
        assert rec.name == name  # the record keeps its dotted FQN
        assert (rec.dtype, rec.shape) == (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))
        loaded = rec.to_torch()
        assert loaded.dtype == tensor.dtype and tensor_to_bytes(loaded) == tensor_to_bytes(tensor), name


def flat_records(node: object, prefix: str = "") -> dict[str, TensorRecord]:
    if isinstance(node, TensorRecord):
        return {prefix: node}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out: dict[str, TensorRecord] = {}
    for key, value in items:
        out.update(flat_records(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def test_nesting_is_rebuilt_and_the_model_chosen(dcp_folder: tuple[Path, dict]) -> None:
    folder, state = dcp_folder
    ckpt = open_checkpoint(folder)
    assert list(ckpt.tree) == ["model", "optim", "extra", "epoch"]
    assert ckpt.tree["epoch"] == dcp_reader.BYTES_PLACEHOLDER
    assert isinstance(ckpt.tree["optim"]["param_groups"], list)
    weights = ckpt.weights()
    assert weights.key == "model"
    assert list(weights.tensors) == list(state["model"])
    assert any("placeholders" in note for note in ckpt.notes)


def test_flat_model_state_dict(tmp_path: Path) -> None:
    model = TinyNet()
    dcp.save(model.state_dict(), checkpoint_id=tmp_path / "flat", no_dist=True)
    weights = open_checkpoint(tmp_path / "flat").weights()
    assert weights.key == ""
    assert {k: v.shape for k, v in weights.tensors.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }


def test_nest_falls_back_to_flat_names_on_conflicts() -> None:
    items = {"a.b": 1, "a": 2}
    assert dcp_reader.nest(items, {"a.b": ("a", "b"), "a": ("a",)}) == items
    assert dcp_reader.nest(items, None) == items
    assert dcp_reader.nest({"g.0.lr": 1}, {"g.0.lr": ("g", 0, "lr")}) == {"g": [{"lr": 1}]}


# -- the metadata pickle scan ------------------------------------------------------------------
class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_metadata_that_would_run_code_is_refused(
    dcp_folder: tuple[Path, dict], tmp_path: Path, protocol: int
) -> None:
    folder, _ = dcp_folder
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps({"x": RunsCode(marker)}, protocol=protocol))
    with pytest.raises(UnsafeCheckpointError) as info:
        open_checkpoint(folder)
    assert info.value.blocked_globals == (f"{os.system.__module__}.system",)
    assert "system" in info.value.message and "--unsafe-trust-pickle" in info.value.message
    assert not marker.exists()


def test_dcp_functions_are_not_allowed_only_classes() -> None:
    assert is_allowed("torch.distributed.checkpoint.metadata.TensorStorageMetadata")
    assert is_allowed("torch.bfloat16") and is_allowed("torch.strided")
    assert not is_allowed("torch.distributed.checkpoint.state_dict_saver.save")
    assert not is_allowed("torch.distributed.checkpoint.format_utils.dcp_to_torch_save")
    assert not is_allowed("torch.load")
    assert not is_allowed("builtins.eval")


def test_obfuscated_stack_global_is_refused(dcp_folder: tuple[Path, dict]) -> None:
    folder, _ = dcp_folder
    # a DUP between the strings and STACK_GLOBAL: the operands are no longer plain pushes (the scanner
    # that `ckpt scan` uses names it as scan does)
    data = b"\x80\x04\x8c\x02os\x8c\x06system2\x93\x94."
    (folder / ".metadata").write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match="a global whose name is built at load time"):
        open_checkpoint(folder)


def test_allow_global_is_not_honoured_for_dcp_metadata(dcp_folder: tuple[Path, dict]) -> None:
    """torch unpickles .metadata with full trust, so an allowed name would really be called."""
    from collections import Counter

    folder, _ = dcp_folder
    (folder / ".metadata").write_bytes(pickle.dumps(Counter(a=1)))
    with pytest.raises(UnsafeCheckpointError, match=r"collections\.Counter"):
        open_checkpoint(folder)
    with pytest.raises(UnsafeCheckpointError, match=r"collections\.Counter"):
        open_checkpoint(folder, ReadOptions(allow_globals=frozenset({"collections.Counter"})))


def damage(folder: Path, case: str) -> str:
    if case == "missing_distcp":
        for path in folder.glob("*.distcp"):
            path.unlink()
        return "is missing; it holds"
    if case == "truncated_distcp":
        path = next(folder.glob("*.distcp"))
        path.write_bytes(path.read_bytes()[:100])
        return "truncated"
    if case == "garbage_metadata":
        (folder / ".metadata").write_bytes(b"\x80\x04\x95garbage")
        return "not a valid pickle"
    if case == "truncated_metadata":
        data = (folder / ".metadata").read_bytes()
        (folder / ".metadata").write_bytes(data[: len(data) // 2])
        return "not a valid pickle"
    raise AssertionError(case)


CASES = ["missing_distcp", "truncated_distcp", "garbage_metadata", "truncated_metadata"]


@pytest.mark.parametrize("case", CASES)
def test_damaged_dcp_folder_is_a_format_error(dcp_folder: tuple[Path, dict], case: str) -> None:
    folder, _ = dcp_folder
    fragment = damage(folder, case)
    with pytest.raises(FormatError, match=fragment):
        open_checkpoint(folder)


def _inspect_registered() -> bool:
    try:
        import ckptsurgeon.commands.inspect  # noqa: F401
    except ImportError:
        return False
    return True


needs_inspect = pytest.mark.skipif(not _inspect_registered(), reason="the `inspect` command is not there yet")


@needs_inspect
@pytest.mark.parametrize("case", CASES)
def test_damaged_dcp_folder_gives_one_line_and_exit_2(dcp_folder: tuple[Path, dict], case: str) -> None:
    folder, _ = dcp_folder
    fragment = damage(folder, case)
    assert_one_line_error(run_cli("inspect", str(folder)), fragment)


@needs_inspect
def test_hostile_dcp_metadata_gives_one_line_and_exit_2(
    dcp_folder: tuple[Path, dict], tmp_path: Path
) -> None:
    folder, _ = dcp_folder
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    assert_one_line_error(run_cli("inspect", str(folder)), "system")
    assert not marker.exists()


@needs_inspect
def test_inspect_a_dcp_folder(dcp_folder: tuple[Path, dict], tmp_path: Path) -> None:
    folder, _ = dcp_folder
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    result = run_cli("inspect", str(copy))
    assert result.exit_code == 0, result.stderr
    assert "features.0.weight" in result.stdout
