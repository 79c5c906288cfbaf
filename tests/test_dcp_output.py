"""DCP as an output (``--to dcp``), checked against torch's own readers: dcp.load into a model's
state dict (one process, no process group) and format_utils.dcp_to_torch_save; ``--key`` on a
DCP input; atomic folders (nothing left after a failure, no overwrite without --force)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import ckptsurgeon
from ckptsurgeon.errors import OutputError


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 2, dtype=torch.bfloat16)


def source_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    net.bn.num_batches_tracked.fill_(7)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_equal_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def consolidated(folder: Path) -> dict[str, torch.Tensor]:
    """torch's own consolidation of a DCP folder, read back with torch.load."""
    out = folder.parent / f"{folder.name}.torch.pth"
    dcp_to_torch_save(folder, out)
    return torch.load(out, weights_only=True)


def no_leftovers(folder: Path) -> bool:
    return not [n for n in os.listdir(folder) if n.endswith(".ckpt-tmp")]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_dcp_output_loads_with_dcp_load_and_dcp_to_torch_save(tmp_path: Path, suffix: str) -> None:
    state = source_state()
    src = tmp_path / f"model{suffix}"
    save_file(state, src) if suffix == ".safetensors" else torch.save(state, src)
    out = tmp_path / "dcp_out"
    result = run_cli("convert", src, "-o", out, "--to", "dcp")
    assert result.exit_code == 0, result.stderr
    assert "verified bit for bit" in result.stdout
    assert not result.stderr.strip() or "warning" not in result.stderr.lower()
    assert (out / ".metadata").is_file()

    model = Net()  # fresh random weights: dcp.load must overwrite every one of them in place
    target = model.state_dict()
    dcp.load(target, checkpoint_id=str(out), no_dist=True)
    model.load_state_dict(target)
    assert_equal_states({k: v.detach() for k, v in model.state_dict().items()}, state)

    assert_equal_states(consolidated(out), state)
    assert no_leftovers(tmp_path)


def test_a_sharded_folder_converts_to_dcp(tmp_path: Path) -> None:
    state = source_state()
    src = tmp_path / "model.safetensors"
    save_file(state, src)
    shards = tmp_path / "shards"
    ckptsurgeon.convert(src, shards, max_shard_size=200)
    assert len(list(shards.glob("*.safetensors"))) > 1
    out = tmp_path / "dcp_out"
    result = ckptsurgeon.convert(shards, out, to="dcp")
    assert result.written is not None and result.written.format == "dcp"
    assert_equal_states(consolidated(out), state)


def test_a_training_checkpoint_keeps_only_its_weights(tmp_path: Path) -> None:
    state = source_state()
    src = tmp_path / "last.pth"
    torch.save({"epoch": 3, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, src)
    out = tmp_path / "dcp_out"
    result = run_cli("convert", src, "-o", out, "--to", "dcp")
    assert result.exit_code == 0, result.stderr
    assert "left out 2 non-weight entries (dcp holds the weights only): epoch, optimizer" in result.stderr
    assert_equal_states(consolidated(out), state)


def test_a_cast_is_written_and_verified(tmp_path: Path) -> None:
    state = {"w": torch.randn(4, 4), "i": torch.arange(3)}
    src = tmp_path / "m.safetensors"
    save_file(state, src)
    out = tmp_path / "dcp_out"
    ckptsurgeon.convert(src, out, to="dcp", dtype="bf16")
    got = consolidated(out)
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["w"], state["w"].to(torch.bfloat16))
    assert torch.equal(got["i"], state["i"])


def test_no_overwrite_without_force_and_force_replaces_a_dcp_folder(tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3)}, src)
    out = tmp_path / "dcp_out"
    assert run_cli("convert", src, "-o", out, "--to", "dcp").exit_code == 0
    before = sorted(os.listdir(out))
    assert_one_line_error(run_cli("convert", src, "-o", out, "--to", "dcp"), "already exists", "--force")
    assert sorted(os.listdir(out)) == before
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(5)}, other)
    assert run_cli("convert", other, "-o", out, "--to", "dcp", "--force").exit_code == 0
    assert torch.equal(consolidated(out)["w"], torch.zeros(5))
    assert no_leftovers(tmp_path)


def test_force_never_replaces_a_folder_that_is_not_a_dcp_checkpoint(tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3)}, src)
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("convert", src, "-o", out, "--to", "dcp", "--force")
    assert_one_line_error(result, "not a DCP checkpoint")
    assert (out / "keep.txt").read_text() == "mine"


def test_force_never_deletes_other_files_beside_a_dcp_checkpoint(tmp_path: Path) -> None:
    """A folder holding a .metadata and more (a training run's folder, its scripts and subfolders): the
    whole folder used to be replaced, deleting them. --force replaces a DCP checkpoint, nothing else."""
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3)}, src)
    out = tmp_path / "run"
    assert run_cli("convert", src, "-o", out, "--to", "dcp").exit_code == 0
    (out / "train.py").write_text("mine")
    (out / "logs").mkdir()
    (out / "logs" / "events").write_text("mine too")
    before = sorted(os.listdir(out))
    result = run_cli("convert", src, "-o", out, "--to", "dcp", "--force")
    assert_one_line_error(result, "holds 'logs' beside its DCP checkpoint")
    assert sorted(os.listdir(out)) == before and (out / "train.py").read_text() == "mine"
    assert (out / "logs" / "events").read_text() == "mine too"


def test_wrong_output_names_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3)}, src)
    assert_one_line_error(run_cli("convert", src, "-o", tmp_path / "x.pth", "--to", "dcp"), "contradicts")
    result = run_cli("convert", src, "-o", tmp_path / "d", "--to", "dcp", "--max-shard-size", "1KB")
    assert_one_line_error(result, "--max-shard-size")


def test_a_failure_mid_write_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.checkpoint.filesystem as fs

    state = {f"w{i}": torch.randn(64) for i in range(6)}
    src = tmp_path / "m.safetensors"
    save_file(state, src)
    real = fs._write_item
    calls = []

    def failing(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:  # some tensors are already in the data file
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(fs, "_write_item", failing)
    out = tmp_path / "dcp_out"
    result = run_cli("convert", src, "-o", out, "--to", "dcp")
    assert_one_line_error(result, "dcp.save failed", "nothing was written")
    assert len(calls) == 3
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_a_failed_verification_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptsurgeon.surgery.verify as verify_module

    src = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(3)}, src)

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OutputError("out: verification failed: 'w' differs")

    monkeypatch.setattr(verify_module, "verify", refuse)
    with pytest.raises(OutputError, match="verification failed"):
        ckptsurgeon.convert(src, tmp_path / "dcp_out", to="dcp")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


# -- --key on a DCP input ---------------------------------------------------------------------
@pytest.fixture
def training_dcp(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = source_state()
    optim = {"state": {"fc.weight": {"exp_avg": torch.randn(2, 4)}}, "lr": 0.1}
    folder = tmp_path / "step-100"
    dcp.save({"model": state, "optim": optim, "step": 100}, checkpoint_id=str(folder), no_dist=True)
    return folder, state


def test_key_model_exports_only_the_model_of_a_dcp_input(
    tmp_path: Path, training_dcp: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    folder, state = training_dcp
    out = tmp_path / "model.safetensors"
    result = run_cli("convert", folder, "-o", out, "--key", "model")
    assert result.exit_code == 0, result.stderr
    assert_equal_states(load_file(out), state)

    out_dcp = tmp_path / "model_only"
    result = run_cli("convert", folder, "-o", out_dcp, "--to", "dcp", "--key", "model")
    assert result.exit_code == 0, result.stderr
    assert_equal_states(consolidated(out_dcp), state)


def test_key_on_a_dcp_input_for_rename_adapt_and_diff(
    tmp_path: Path, training_dcp: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    folder, state = training_dcp
    out = tmp_path / "renamed.safetensors"
    result = run_cli("rename", folder, "-o", out, "--key", "model", "--add-prefix", "net.")
    assert result.exit_code == 0, result.stderr
    assert sorted(load_file(out)) == sorted(f"net.{k}" for k in state)

    optim_only = run_cli("convert", folder, "-o", tmp_path / "optim.safetensors", "--key", "optim.state")
    assert optim_only.exit_code == 0, optim_only.stderr
    assert sorted(load_file(tmp_path / "optim.safetensors")) == ["fc.weight.exp_avg"]

    torch.save(state, tmp_path / "target.pth")
    diff = run_cli("diff", folder, tmp_path / "target.pth", "--key", "model", "--format", "json")
    assert diff.exit_code == 0, diff.stderr

    adapted = tmp_path / "adapted.safetensors"
    result = run_cli("adapt", folder, tmp_path / "target.pth", "-o", adapted, "--key", "model")
    assert result.exit_code == 0, result.stderr
    assert_equal_states(load_file(adapted), state)

    missing = run_cli("convert", folder, "-o", tmp_path / "x.safetensors", "--key", "nope")
    assert_one_line_error(missing, "nope")


def test_a_flipped_byte_in_the_written_folder_is_caught_before_it_is_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptsurgeon.formats import dcpwriter

    state = {"w": torch.arange(4096, dtype=torch.float32)}
    src = tmp_path / "m.safetensors"
    save_file(state, src)
    real = dcpwriter._save

    def corrupting(tensors: object, folder: Path, *args: object) -> None:
        real(tensors, folder, *args)  # type: ignore[arg-type]
        data = next(folder.glob("*.distcp"))
        raw = bytearray(data.read_bytes())
        at = raw.find(torch.tensor([2000.0]).numpy().tobytes())
        raw[at] ^= 0x01
        data.write_bytes(bytes(raw))

    monkeypatch.setattr(dcpwriter, "_save", corrupting)
    result = run_cli("convert", src, "-o", tmp_path / "dcp_out", "--to", "dcp")
    assert_one_line_error(result, "dcp_out: verification failed", "nothing was kept")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_rename_writes_dcp_and_load_into_honours_key(
    tmp_path: Path, training_dcp: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    folder, state = training_dcp
    out = tmp_path / "renamed_dcp"
    result = run_cli("rename", folder, "-o", out, "--to", "dcp", "--key", "model", "--add-prefix", "net.")
    assert result.exit_code == 0, result.stderr
    assert_equal_states(consolidated(out), {f"net.{k}": v for k, v in state.items()})

    model = Net()
    report = ckptsurgeon.load_into(model, folder, key="model")
    assert not report.missing
    assert_equal_states({k: v.detach() for k, v in model.state_dict().items()}, state)
