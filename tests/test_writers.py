"""The writer registry (formats.WRITERS) is the one source of output kinds: the CLI's --to,
the suffix rule, the suggested output names and the writers themselves all come from it."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import torch
from conftest import FIXTURES
from safetensors.torch import load_file

import ckptsurgeon
from ckptsurgeon.cli import cli
from ckptsurgeon.diffing.diagnosis import diagnose
from ckptsurgeon.diffing.explain import fix_commands
from ckptsurgeon.formats import OUTPUT_FORMATS, WRITERS, OutputKind
from ckptsurgeon.surgery.pipeline import WriteOptions, output_kind

KINDS = list(WRITERS.values())
WRITING_COMMANDS = ("convert", "rename", "strip-head", "adapt")


def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "conv.bias": torch.randn(4),
        "bn.num_batches_tracked": torch.tensor(7),
        "fc.weight": torch.randn(2, 4).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
    }


def load_output(kind: OutputKind, path: Path) -> dict[str, torch.Tensor]:
    """What torch.load / safetensors' load_file return for an output, shards merged by the index (a DCP
    folder: torch's own dcp_to_torch_save, then torch.load)."""
    if kind.folder:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(path, path.parent / f"{path.name}.consolidated.pth")
        return torch.load(path.parent / f"{path.name}.consolidated.pth", weights_only=True)
    if kind.sharded:
        indexes = list(path.glob("*.index.json"))
        assert len(indexes) == 1, sorted(p.name for p in path.iterdir())
        shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
        assert len(shards) > 1
        return {name: t for shard in shards for name, t in load_single(kind.to, path / shard).items()}
    return load_single(kind.to, path)


def load_single(to: str, path: Path) -> dict[str, torch.Tensor]:
    if to == "safetensors":
        return load_file(path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("command", WRITING_COMMANDS)
def test_the_to_choices_are_the_registrys_formats(command: str) -> None:
    params = {p.name: p for p in cli.commands[command].params}
    choice = params["to"].type
    assert isinstance(choice, click.Choice)
    assert tuple(choice.choices) == OUTPUT_FORMATS == tuple(dict.fromkeys(k.to for k in KINDS))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_every_kind_round_trips_a_state_dict(tmp_path: Path, kind: OutputKind) -> None:
    src = tmp_path / "src.pth"
    expected = state_dict()
    torch.save(expected, src)
    out = tmp_path / ("shards" if kind.sharded else "folder" if kind.folder else f"out{kind.suffixes[0]}")
    shard_size = 200 if kind.sharded else None
    result = ckptsurgeon.convert(src, out, to=kind.to, max_shard_size=shard_size)
    assert result.written is not None and result.written.format == kind.name
    loaded = load_output(kind, out)
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.sharded], ids=lambda k: k.name)
def test_each_suffix_chooses_its_kind_and_own_suffixes_refuse_other_formats(kind: OutputKind) -> None:
    for suffix in kind.suffixes:
        assert output_kind(WriteOptions(Path(f"m{suffix}"))) is kind
        assert output_kind(WriteOptions(Path(f"m{suffix.upper()}"), to=kind.to)) is kind
    for suffix in kind.own_suffixes:
        for other in set(OUTPUT_FORMATS) - {kind.to}:
            with pytest.raises(ckptsurgeon.errors.OutputError, match="contradicts the suffix"):
                output_kind(WriteOptions(Path(f"m{suffix}"), to=other))


@pytest.mark.parametrize("kind", [k for k in KINDS if k.sharded], ids=lambda k: k.name)
def test_a_shard_size_chooses_the_sharded_kind(kind: OutputKind) -> None:
    assert output_kind(WriteOptions(Path("folder"), to=kind.to, max_shard_size=10)) is kind


def test_suggested_outputs_keep_only_the_proposed_suffixes() -> None:
    proposed = {s for k in KINDS for s in k.proposed_suffixes}
    diagnosis = diagnose({"m.w": (2,), "m.x": (1,)}, {"w": (2,), "x": (1,)})
    for suffix in sorted({s for k in KINDS for s in k.suffixes}):
        adapt_command = fix_commands(diagnosis, f"a{suffix}", "b.pth")[0]
        kept = suffix if suffix in proposed else WRITERS["pth"].suffixes[0]
        assert adapt_command.endswith(f"-o a.adapted{kept}"), adapt_command


def test_a_fixture_converts_to_every_single_file_kind(tmp_path: Path) -> None:
    reference = torch.load(FIXTURES / "vgg_1000.pth", weights_only=True)
    for kind in (k for k in KINDS if not k.sharded and not k.folder):
        out = tmp_path / f"vgg{kind.suffixes[0]}"
        ckptsurgeon.convert(FIXTURES / "vgg_1000.pth", out)
        loaded = load_output(kind, out)
        assert sorted(loaded) == sorted(reference)
        assert all(torch.equal(loaded[n], reference[n]) for n in reference)
