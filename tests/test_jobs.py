"""``--jobs N``: a sharded set written by several threads holds the bytes of a serial write; one
failing shard stops the others and leaves no output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file, save_file

import ckptsurgeon
from ckptsurgeon.errors import OutputError
from ckptsurgeon.formats import shardwriter


def source(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(64, 64) for i in range(12)}
    state["half"] = torch.randn(300).to(torch.bfloat16)
    state["tied"] = state["layer0.weight"]
    src = tmp_path / "src.pth"
    torch.save(state, src)
    return src


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("to", ["safetensors", "pth"])
def test_jobs_4_writes_the_bytes_of_jobs_1(tmp_path: Path, to: str) -> None:
    src = source(tmp_path)
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    for out, jobs in ((serial, "1"), (parallel, "4")):
        result = run_cli("convert", src, "-o", out, "--to", to, "--max-shard-size", "40KB", "--jobs", jobs)
        assert result.exit_code == 0, result.stderr
    got, want = files(parallel), files(serial)
    assert len(want) > 4
    assert got == want


def test_sharded_input_to_sharded_output_in_parallel(tmp_path: Path) -> None:
    src = source(tmp_path)
    first = tmp_path / "first"
    ckptsurgeon.convert(src, first, max_shard_size="40KB", jobs=1)
    again_serial, again_parallel = tmp_path / "s", tmp_path / "p"
    ckptsurgeon.convert(first, again_serial, max_shard_size="30KB", jobs=1)
    ckptsurgeon.convert(first, again_parallel, max_shard_size="30KB", jobs=3)
    assert files(again_parallel) == files(again_serial)
    merged = {}
    for shard in again_parallel.glob("*.safetensors"):
        merged.update(load_file(shard))
    reference = torch.load(src, weights_only=True)
    for name, tensor in merged.items():
        assert torch.equal(tensor, reference[name]), name


def test_a_failing_shard_stops_all_and_leaves_no_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = source(tmp_path)
    real = shardwriter._write_shard

    def failing(path: Path, *args: object, **kwargs: object) -> Path:
        if path.name.startswith("model-00003"):
            raise OutputError(f"{path.name}: no space left on the device; nothing was written")
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shardwriter, "_write_shard", failing)
    out = tmp_path / "out"
    result = run_cli("convert", src, "-o", out, "--max-shard-size", "40KB", "--jobs", "4")
    assert_one_line_error(result, "model-00003", "no space left")
    assert sorted(os.listdir(tmp_path)) == ["src.pth"]


def test_jobs_must_be_positive(tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2)}, src)
    result = run_cli("convert", src, "-o", tmp_path / "o", "--max-shard-size", "1KB", "--jobs", "0")
    assert result.exit_code == 2 and "--jobs" in result.stderr
    with pytest.raises(OutputError, match="--jobs"):
        ckptsurgeon.convert(src, tmp_path / "o", max_shard_size="1KB", jobs=0)
