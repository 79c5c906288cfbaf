"""Sharded checkpoints: the index reader (with its validation), model folders, and the writer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import REAL, REPO, assert_one_line_error, run_cli

from ckptsurgeon.core.record import TensorRecord, tensor_to_bytes
from ckptsurgeon.errors import CkptError, FormatError, InputError, OutputError
from ckptsurgeon.formats import ReadOptions, open_checkpoint, sharded, shardwriter
from ckptsurgeon.formats import safetensors as st


def model_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "embed.weight": torch.randn(16, 8, generator=gen),  # 512 bytes
        "layers.0.weight": torch.randn(8, 8, generator=gen).half(),  # 128
        "layers.0.bias": torch.zeros(8, dtype=torch.bfloat16),  # 16
        "layers.1.weight": torch.randn(8, 8, generator=gen),  # 256
        "layers.1.steps": torch.tensor(7),  # 8
        "mask": torch.tensor([True, False]),  # 2
        "empty": torch.empty(0, 3),  # 0
    }


def records(tensors: dict[str, torch.Tensor]) -> dict[str, TensorRecord]:
    return {name: TensorRecord.from_torch(name, t) for name, t in tensors.items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and tensor_to_bytes(a) == tensor_to_bytes(b)


def hf_folder(tmp_path: Path, weight_map_edit: dict | None = None) -> Path:
    """A two-shard safetensors folder written by the reference library, with its index."""
    folder = tmp_path / "model"
    folder.mkdir()
    tensors = model_tensors()
    names = list(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for shard, shard_names in parts.items():
        safetensors.torch.save_file(
            {n: tensors[n] for n in shard_names}, folder / shard, metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(shard_names, shard))
    weight_map.update(weight_map_edit or {})
    index = {"metadata": {"total_size": 922}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


# -- reading ---------------------------------------------------------------------------------
def test_reads_an_hf_sharded_folder(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path)
    tensors = model_tensors()
    for path in (folder, folder / "model.safetensors.index.json"):
        ckpt = open_checkpoint(path)
        assert ckpt.format == "sharded"
        assert ckpt.path == folder / "model.safetensors.index.json"
        assert [p.name for p in ckpt.files] == [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]
        assert ckpt.file_size == sum(p.stat().st_size for p in ckpt.files)
        assert ckpt.metadata == {"total_size": "922"}
        got = ckpt.weights().tensors
        assert list(got) == list(tensors)
        for name, tensor in tensors.items():
            assert same_bits(got[name].to_torch(), tensor), name


def test_folder_with_a_single_file_opens_that_file(tmp_path: Path) -> None:
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((REAL / "hf_gpt2_tiny" / "model.safetensors").read_bytes())
    ckpt = open_checkpoint(folder)
    assert ckpt.format == "safetensors" and ckpt.path == folder / "model.safetensors"
    assert len(ckpt.weights().tensors) == 28
    assert "opened model.safetensors" in ckpt.notes[0]


def test_real_hf_folder_opens(tmp_path: Path) -> None:
    ckpt = open_checkpoint(REAL / "hf_gpt2_tiny")
    assert len(ckpt.weights().tensors) == 28


def test_folder_without_weights_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="a folder without a checkpoint"):
        sharded.read(tmp_path)


def test_tensors_in_a_shard_but_not_in_the_index_are_reported(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path)
    index = folder / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    del raw["weight_map"]["mask"]
    index.write_text(json.dumps(raw))
    ckpt = open_checkpoint(folder)
    assert "mask" not in ckpt.tree
    assert any("mask (model-00002-of-00002.safetensors)" in n and "not in the index" in n for n in ckpt.notes)


def bad_index(tmp_path: Path, case: str) -> Path:
    """Each index fault from the brief, as its own folder."""
    if case == "missing_shard":
        folder = hf_folder(tmp_path)
        (folder / "model-00002-of-00002.safetensors").unlink()
    elif case == "parent_escape":
        folder = hf_folder(tmp_path, {"mask": "../model-00002-of-00002.safetensors"})
    elif case == "absolute_path":
        folder = hf_folder(tmp_path, {"mask": "/etc/passwd"})
    elif case == "symlink_escape":
        outside = tmp_path / "elsewhere.safetensors"
        safetensors.torch.save_file({"mask": torch.tensor([True])}, outside)
        folder = hf_folder(tmp_path, {"mask": "link.safetensors"})
        os.symlink(outside, folder / "link.safetensors")
    elif case == "name_not_in_shard":
        folder = hf_folder(tmp_path, {"ghost.weight": "model-00001-of-00002.safetensors"})
    elif case == "shard_is_folder":
        folder = hf_folder(tmp_path, {"mask": "sub"})
        (folder / "sub").mkdir()
    else:
        folder = tmp_path / "model"
        folder.mkdir()
        (folder / "model.safetensors.index.json").write_text(INDEX_TEXTS[case])
    return folder / "model.safetensors.index.json"


INDEX_TEXTS = {
    "not_json": "{weight_map: ",
    "not_an_object": "[1, 2]",
    "no_weight_map": '{"metadata": {}}',
    "weight_map_not_strings": '{"weight_map": {"a": 1}}',
    "duplicate_name": '{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}',
    "metadata_not_object": '{"metadata": 3, "weight_map": {}}',
}
INDEX_FRAGMENTS = {
    "missing_shard": "shard model-00002-of-00002.safetensors is missing; it holds 4 of the 7 tensors",
    "parent_escape": "points outside the index's folder",
    "absolute_path": "points outside the index's folder",
    "symlink_escape": "a symbolic link leads outside the folder",
    "name_not_in_shard": "'ghost.weight' is mapped to model-00001-of-00002.safetensors, which does not",
    "shard_is_folder": "shard sub is not a file",
    "not_json": "not valid JSON",
    "not_an_object": "not a sharded-checkpoint index",
    "no_weight_map": "not a sharded-checkpoint index",
    "weight_map_not_strings": "weight_map must map tensor names to shard file names",
    "duplicate_name": "'a' appears twice in the index",
    "metadata_not_object": "metadata must be a JSON object",
}


@pytest.mark.parametrize("case", sorted(INDEX_FRAGMENTS))
def test_bad_index_is_a_format_error(tmp_path: Path, case: str) -> None:
    index = bad_index(tmp_path, case)
    with pytest.raises(FormatError) as info:
        open_checkpoint(index.parent)
    assert INDEX_FRAGMENTS[case] in info.value.message
    assert str(index) in info.value.message


def _inspect_registered() -> bool:
    try:
        import ckptsurgeon.commands.inspect  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not _inspect_registered(), reason="the `inspect` command (written by the lead) is not there yet"
)
@pytest.mark.parametrize("case", sorted(INDEX_FRAGMENTS))
def test_bad_index_gives_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    index = bad_index(tmp_path, case)
    assert_one_line_error(run_cli("inspect", str(index)), INDEX_FRAGMENTS[case])


# -- writing ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("5gb", 5 * 10**9),
        ("2GiB", 2 * 2**30),
        ("500MB", 500 * 10**6),
        ("10 KiB", 10240),
        ("1.5GiB", 3 * 2**29),
        ("1024", 1024),
        ("7B", 7),
        ("3KB", 3000),
        ("4MiB", 4 * 2**20),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert shardwriter.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5 parsecs", "-5GB", "0", "0.2", "5G B", "1e9", "five"])
def test_parse_size_rejects_junk(text: str) -> None:
    with pytest.raises(CkptError, match="size"):
        shardwriter.parse_size(text)


def test_plan_packs_greedily_and_gives_big_tensors_their_own_shard() -> None:
    recs = {
        "a": TensorRecord("a", "float32", (10,)),  # 40
        "b": TensorRecord("b", "float32", (10,)),  # 40
        "big": TensorRecord("big", "float32", (100,)),  # 400 > limit
        "c": TensorRecord("c", "float32", (5,)),  # 20
        "d": TensorRecord("d", "float32", (5,)),  # 20
    }
    assert shardwriter.plan_shards(recs, 100) == [["a", "b"], ["big"], ["c", "d"]]


def test_write_sharded_safetensors_round_trip(tmp_path: Path) -> None:
    tensors = model_tensors()
    out = tmp_path / "out"
    written = shardwriter.write(records(tensors), out, max_shard_bytes=600)
    names = [p.name for p in written]
    assert names == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 922}
    assert list(index["weight_map"]) == list(tensors)
    assert set(index["weight_map"].values()) == set(names[:2])
    for shard in names[:2]:
        loaded = safetensors.torch.load_file(out / shard)  # each shard is a valid file for the reference
        assert all(same_bits(loaded[n], tensors[n]) for n in loaded)
    got = open_checkpoint(out).weights().tensors
    assert list(got) == list(tensors)
    assert all(same_bits(got[n].to_torch(), tensors[n]) for n in tensors)


def test_single_shard_is_written_without_an_index(tmp_path: Path) -> None:
    written = shardwriter.write(
        records(model_tensors()), tmp_path / "one", max_shard_bytes=shardwriter.parse_size("5GB")
    )
    assert [p.name for p in written] == ["model.safetensors"]
    assert open_checkpoint(tmp_path / "one").format == "safetensors"


def test_tied_weights_survive_sharding(tmp_path: Path) -> None:
    src = tmp_path / "tied.safetensors"
    with open(src, "wb") as fh:
        st.write(records({"a": torch.randn(40), "wte": torch.randn(30), "b": torch.randn(40)}), fh)
    base = open_checkpoint(src).tree
    tied = {"a": base["a"], "wte": base["wte"], "b": base["b"], "lm_head": base["wte"].renamed("lm_head")}
    out = tmp_path / "out"
    shardwriter.write(tied, out, max_shard_bytes=200)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "lm_head" not in index["weight_map"]
    ckpt = open_checkpoint(out)
    assert set(ckpt.tree) == {"a", "wte", "b", "lm_head"}
    assert ckpt.tree["lm_head"].storage is ckpt.tree["wte"].storage
    assert same_bits(ckpt.tree["lm_head"].to_torch(), base["wte"].to_torch())


def test_write_refuses_existing_output_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shardwriter.write(records(model_tensors()), out, max_shard_bytes=600)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputError, match="already exists; pass --force"):
        shardwriter.write(records(model_tensors()), out, max_shard_bytes=600)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    shardwriter.write(records(model_tensors()), out, max_shard_bytes=10**9, force=True)
    assert not (out / "model.safetensors.index.json").exists()  # a stale index would shadow the new file
    assert len(open_checkpoint(out).weights().tensors) == 7


def test_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        shardwriter.write(records(model_tensors()), target, max_shard_bytes=600)


def test_bin_shards_round_trip(tmp_path: Path) -> None:
    tensors = model_tensors()
    out = tmp_path / "bin"
    written = shardwriter.write(records(tensors), out, max_shard_bytes=600, fmt="pth")
    assert [p.name for p in written] == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
    ]
    for shard in written[:2]:
        loaded = torch.load(shard, weights_only=True)
        assert all(same_bits(loaded[n], tensors[n]) for n in loaded)
    ckpt = open_checkpoint(out, ReadOptions())
    assert ckpt.format == "sharded"
    got = ckpt.weights().tensors
    assert list(got) == list(tensors)
    assert all(same_bits(got[n].to_torch(), tensors[n]) for n in tensors)


def test_bin_index_written_by_torch_reads(tmp_path: Path) -> None:
    tensors = model_tensors()
    names = list(tensors)
    weight_map = {}
    for i, part in enumerate((names[:4], names[4:]), start=1):
        shard = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({n: tensors[n] for n in part}, tmp_path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    got = open_checkpoint(tmp_path).weights().tensors
    assert all(same_bits(got[n].to_torch(), tensors[n]) for n in tensors)


def test_tied_weights_in_bin_shards_share_storage(tmp_path: Path) -> None:
    src = tmp_path / "tied.safetensors"
    with open(src, "wb") as fh:
        st.write(records({"a": torch.randn(40), "wte": torch.randn(30), "b": torch.randn(40)}), fh)
    base = open_checkpoint(src).tree
    tied = {"a": base["a"], "wte": base["wte"], "b": base["b"], "lm_head": base["wte"].renamed("lm_head")}
    out = tmp_path / "bin"
    shardwriter.write(tied, out, max_shard_bytes=200, fmt="pth")
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    shard = index["weight_map"]["lm_head"]
    assert shard == index["weight_map"]["wte"]
    loaded = torch.load(out / shard, weights_only=True)
    assert loaded["lm_head"].untyped_storage().data_ptr() == loaded["wte"].untyped_storage().data_ptr()
    got = open_checkpoint(out).weights().tensors
    assert same_bits(got["lm_head"].to_torch(), base["wte"].to_torch())


def test_reading_a_sharded_safetensors_folder_does_not_import_torch(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path)
    code = (
        "import sys; from ckptsurgeon.formats import open_checkpoint; "
        f"c = open_checkpoint({str(folder)!r}); assert len(c.weights().tensors) == 7; "
        "print(sorted(m for m in ('torch', 'safetensors', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert result.stdout.strip() == "[]"


def test_force_rewrite_removes_the_earlier_set(tmp_path: Path) -> None:
    """Rewriting a sharded folder with --force leaves no stale shard of the earlier set behind."""
    from ckptsurgeon.formats.shardwriter import write

    source = open_checkpoint(REAL / "hf_gpt2_tiny").weights().tensors
    out = tmp_path / "out"
    write(source, out, max_shard_bytes=100_000)
    assert len(list(out.iterdir())) > 3
    write(source, out, max_shard_bytes=400_000, force=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    (out / "notes.txt").write_text("mine")
    write(source, out, max_shard_bytes=10_000_000, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "notes.txt"]


def test_a_shard_the_index_does_not_list_is_noted(tmp_path: Path) -> None:
    """Like from_pretrained, only what the index lists is read; inspect says what it left aside."""
    out = tmp_path / "sharded"
    assert (
        run_cli(
            "convert", REPO / "fixtures" / "vgg_1000.pth", "-o", out, "--max-shard-size", "20KB"
        ).exit_code
        == 0
    )
    index = out / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    last = sorted(set(doc["weight_map"].values()))[-1]
    doc["weight_map"] = {k: v for k, v in doc["weight_map"].items() if v != last}
    index.write_text(json.dumps(doc))
    result = run_cli("inspect", out)
    assert result.exit_code == 0
    assert f"note: the folder also holds {last}, which {index.name} does not list (not read)" in result.stdout
