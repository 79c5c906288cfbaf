"""``ckpt convert`` / ``rename`` writes: round trips, casting, training checkpoints, overwrite rules."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FIXTURES, REAL, assert_one_line_error, run_cli, sha256

from ckptsurgeon.core.source import open_source
from ckptsurgeon.errors import OutputError
from ckptsurgeon.formats import open_checkpoint
from ckptsurgeon.surgery.pipeline import WriteOptions, output_kind, write_checkpoint
from ckptsurgeon.surgery.plan import make_plan, strip_prefix


def bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same(a: torch.Tensor, b: torch.Tensor, name: str = "") -> None:
    assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), name
    assert bits(a) == bits(b), name


def zoo() -> dict[str, torch.Tensor]:
    """Every awkward case: dtypes, 0-dim, empty, non-contiguous, a view with an offset, tied weights."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(10, 4, generator=gen)
    base = torch.randn(6, 5, generator=gen)
    return {
        "f32": torch.randn(3, 4, generator=gen),
        "f16": torch.randn(5, generator=gen).half(),
        "bf16": torch.randn(2, 3, generator=gen).bfloat16(),
        "f64": torch.randn(2, generator=gen).double(),
        "i64": torch.arange(7),
        "i8": torch.tensor([-3, 0, 5], dtype=torch.int8),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "count": torch.tensor(42),
        "empty": torch.empty(0, 3),
        "transposed": base.t(),
        "slice": base[2:4],
        "wte.weight": emb,
        "lm_head.weight": emb,
    }


def save(tmp_path: Path, obj: Any, name: str = "src.pth") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_round_trip_pth_safetensors_sharded_pth_is_bit_exact(tmp_path: Path) -> None:
    original = zoo()
    src = save(tmp_path, original)
    st, shards, back = tmp_path / "a.safetensors", tmp_path / "shards", tmp_path / "back.pth"
    for args in (
        (src, "-o", st),
        (st, "-o", shards, "--max-shard-size", "64"),
        (shards, "-o", back),
    ):
        result = run_cli("convert", *args)
        assert result.exit_code == 0, result.stderr
        assert "verified bit for bit" in result.stdout
    assert (shards / "model.safetensors.index.json").is_file()
    assert len(list(shards.glob("model-*.safetensors"))) > 2
    final = torch.load(back, weights_only=True)
    assert list(final) == list(original) or set(final) == set(original)
    for name, tensor in original.items():
        assert_same(final[name], tensor, name)
    assert final["lm_head.weight"].data_ptr() == final["wte.weight"].data_ptr()
    header_len = struct.unpack("<Q", st.read_bytes()[:8])[0]
    header = json.loads(st.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "pt"
    assert "lm_head.weight" not in header or "wte.weight" not in header


def test_safetensors_output_is_readable_by_the_reference_library(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    original = zoo()
    src = save(tmp_path, original)
    out = tmp_path / "out.safetensors"
    assert run_cli("convert", src, "-o", out).exit_code == 0
    loaded = load_file(str(out))
    for name, tensor in loaded.items():
        assert_same(tensor, original[name], name)


@pytest.mark.parametrize(
    ("flag", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]
)
def test_cast_floating_tensors_only_and_keep_ties(tmp_path: Path, flag: str, dtype: torch.dtype) -> None:
    original = zoo()
    src = save(tmp_path, original)
    out = tmp_path / "cast.pth"
    result = run_cli("convert", src, "-o", out, "--dtype", flag)
    assert result.exit_code == 0, result.stderr
    final = torch.load(out, weights_only=True)
    for name, tensor in original.items():
        want = tensor.to(dtype) if tensor.is_floating_point() else tensor
        assert_same(final[name], want, name)
    assert final["lm_head.weight"].data_ptr() == final["wte.weight"].data_ptr()


def test_cast_to_safetensors(tmp_path: Path) -> None:
    original = zoo()
    src = save(tmp_path, original)
    out = tmp_path / "cast.safetensors"
    assert run_cli("convert", src, "-o", out, "--dtype", "bf16").exit_code == 0
    ckpt = open_checkpoint(out)
    assert ckpt.weights().tensors["f32"].dtype == "bfloat16"
    assert ckpt.weights().tensors["i64"].dtype == "int64"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("cast", [[], ["--dtype", "fp16"]])
def test_a_tensor_saved_on_the_meta_device_is_named_not_an_internal_error(
    tmp_path: Path, suffix: str, cast: list[str]
) -> None:
    """torch.save keeps no data for a meta tensor: every write path says which tensor, in one line."""
    src = tmp_path / "meta.pth"
    torch.save({"w": torch.ones(2), "n": torch.empty(3, device="meta")}, src)
    before = sha256(src)
    out = tmp_path / "out" / f"o{suffix}"
    out.parent.mkdir()
    assert_one_line_error(run_cli("convert", src, "-o", out, *cast), "n", "meta device")
    assert list(out.parent.iterdir()) == []
    assert sha256(src) == before


def test_lightning_rewrite_keeps_every_non_tensor_entry(tmp_path: Path) -> None:
    src = REAL / "lightning_tinynet.ckpt"
    out = tmp_path / "renamed.ckpt"
    result = run_cli("rename", src, "-o", out, "--strip-prefix", "model.")
    assert result.exit_code == 0, result.stderr
    assert "weights from entry 'state_dict'" in result.stderr
    before = torch.load(src, map_location="cpu", weights_only=False)
    after = torch.load(out, map_location="cpu", weights_only=False)
    assert list(after) == list(before)
    for key in before:
        if key != "state_dict":
            assert_tree_equal(after[key], before[key], key)
    assert {f"model.{k}" for k in after["state_dict"]} == set(before["state_dict"])
    for name, tensor in after["state_dict"].items():
        assert_same(tensor, before["state_dict"][f"model.{name}"], name)


def assert_tree_equal(a: Any, b: Any, where: str) -> None:
    if isinstance(b, torch.Tensor):
        assert_same(a, b, where)
    elif isinstance(b, dict):
        assert list(a) == list(b), where
        for k in b:
            assert_tree_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(b, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_tree_equal(x, y, f"{where}.{i}")
    else:
        assert a == b, where


def test_pth_rewrite_keeps_nesting_and_state_dict_metadata(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    sd = model.state_dict()
    src = save(
        tmp_path,
        {
            "epoch": 7,
            "args": {"lr": 0.1, "name": "run"},
            "model": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        },
    )
    out = tmp_path / "out.pth"
    assert run_cli("rename", src, "-o", out, "--add-prefix", "net.").exit_code == 0
    after = torch.load(out, weights_only=True)
    assert after["epoch"] == 7 and after["args"] == {"lr": 0.1, "name": "run"}
    assert after["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0, 1]}]
    assert list(after["model"]) == [f"net.{k}" for k in sd]
    assert after["model"]._metadata["net.1"] == sd._metadata["1"]


def test_weights_only_prints_sizes_and_drops_the_rest(tmp_path: Path) -> None:
    src = REAL / "lightning_tinynet.ckpt"
    out = tmp_path / "w.pth"
    result = run_cli("convert", src, "-o", out, "--weights-only")
    assert result.exit_code == 0, result.stderr
    assert "left out 9 non-weight entries (--weights-only): epoch, global_step" in result.stderr
    assert "ckpt: note: size: 78.5 KiB -> " in result.stderr
    state = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and len(state) == 16


def test_safetensors_from_a_training_checkpoint_says_what_was_left_out(tmp_path: Path) -> None:
    result = run_cli("convert", REAL / "lightning_tinynet.ckpt", "-o", tmp_path / "w.safetensors")
    assert result.exit_code == 0, result.stderr
    assert "(safetensors holds the weights only): epoch" in result.stderr


def test_compiled_cuda_checkpoint_converts_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "tiny.safetensors"
    result = run_cli("rename", REAL / "tinynet_compiled.pth", "-o", out, "--strip-prefix", "_orig_mod.")
    assert result.exit_code == 0, result.stderr
    assert all(not k.startswith("_orig_mod.") for k in open_checkpoint(out).weights().tensors)


def test_hf_folder_and_dcp_folder_inputs(tmp_path: Path) -> None:
    out = tmp_path / "gpt2.pth"
    assert run_cli("convert", REAL / "hf_gpt2_tiny", "-o", out).exit_code == 0
    from safetensors.torch import load_file

    reference = load_file(str(REAL / "hf_gpt2_tiny" / "model.safetensors"))
    state = torch.load(out, weights_only=True)
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert_same(state[name], tensor, name)

    import torch.distributed.checkpoint as dcp

    original = {"a": torch.randn(3, 2), "b": torch.arange(5), "c": torch.randn(4).half()}
    dcp.save(original, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    out2 = tmp_path / "consolidated.safetensors"
    result = run_cli("convert", tmp_path / "dcp", "-o", out2)
    assert result.exit_code == 0, result.stderr
    consolidated = load_file(str(out2))
    for name, tensor in original.items():
        assert_same(consolidated[name], tensor, name)


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    src = save(tmp_path, zoo())
    out = tmp_path / "out.pth"
    out.write_bytes(b"precious")
    result = run_cli("convert", src, "-o", out)
    assert_one_line_error(result, "already exists; pass --force")
    assert out.read_bytes() == b"precious"


def test_force_over_the_input_itself(tmp_path: Path) -> None:
    original = {f"module.layer{i}.weight": torch.randn(64, 64) for i in range(8)}
    src = save(tmp_path, original)
    ckpt_before = open_checkpoint(src)  # records that point at the old file, mapped and cached
    assert ckpt_before.weights().tensors["module.layer0.weight"].read_bytes()
    result = run_cli("rename", src, "-o", src, "--strip-prefix", "module.", "--force")
    assert result.exit_code == 0, result.stderr
    after = torch.load(src, weights_only=True)
    for name, tensor in original.items():
        assert_same(after[name.removeprefix("module.")], tensor, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pth"]


def test_force_over_a_safetensors_input_being_read(tmp_path: Path) -> None:
    src = save(tmp_path, zoo())
    st = tmp_path / "m.safetensors"
    assert run_cli("convert", src, "-o", st).exit_code == 0
    source = open_source(st)
    plan = make_plan(source.tensors, [])
    write_checkpoint(source, plan, WriteOptions(st, dtype="fp16", force=True))
    reread = open_checkpoint(st).weights().tensors
    assert reread["f32"].dtype == "float16"
    assert_same(reread["f32"].to_torch(), zoo()["f32"].half())


def test_verification_failure_removes_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptsurgeon.formats.safetensors as st_format

    src = save(tmp_path, zoo())
    real = st_format._write_tensor

    def corrupt(fh, name, rec):
        if name == "f32":
            fh.write(b"\xff" * rec.nbytes)
        else:
            real(fh, name, rec)

    monkeypatch.setattr(st_format, "_write_tensor", corrupt)
    out = tmp_path / "bad.safetensors"
    result = run_cli("convert", src, "-o", out)
    assert_one_line_error(result, "verification failed: 'f32' differs")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pth"]
    assert run_cli("convert", src, "-o", out, "--no-verify").exit_code == 0
    assert out.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("-o", "x.onnx"), "cannot tell the format from the suffix"),
        (("-o", "x.pth", "--max-shard-size", "1GB"), "writes a folder"),
        (("-o", "shards", "--max-shard-size", "lots"), "invalid size"),
        ((), "no output"),
        (("-o", "x.pth", "--key", "nope"), "no entry 'nope'"),
    ],
)
def test_usage_errors_are_one_line(
    tmp_path: Path, args: tuple[str, ...], fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    src = save(tmp_path, zoo())
    assert_one_line_error(run_cli("convert", src, *args), fragment)


def test_to_overrides_the_suffix_and_output_kind() -> None:
    assert output_kind(WriteOptions(Path("weights.bin"), to="safetensors")).name == "safetensors"
    assert output_kind(WriteOptions(Path("w.ckpt"))).name == "pth"
    assert output_kind(WriteOptions(Path("dir"), to="pth", max_shard_size=10)).name == "sharded-pth"
    with pytest.raises(OutputError):
        output_kind(WriteOptions(Path("x")))


@pytest.mark.parametrize(
    ("name", "to"), [("v.safetensors", "pth"), ("v.pth", "safetensors"), ("v.pt", "safetensors")]
)
def test_to_that_contradicts_the_suffix_is_refused(tmp_path: Path, name: str, to: str) -> None:
    result = run_cli("convert", FIXTURES / "vgg_1000.pth", "-o", tmp_path / name, "--to", to)
    assert_one_line_error(result, f"--to {to} contradicts the suffix", "leave out --to")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_device_as_output_is_refused_for_what_it_is(force: list[str]) -> None:
    result = run_cli("convert", FIXTURES / "vgg_1000.pth", "-o", "/dev/null", *force)
    assert_one_line_error(result, "/dev/null: exists and is not a regular file")


def test_sharded_pth_output_and_json_report(tmp_path: Path) -> None:
    src = save(tmp_path, zoo())
    out = tmp_path / "bin"
    result = run_cli("convert", src, "-o", out, "--to", "pth", "--max-shard-size", "100", "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["status"] == "ok" and doc["output"]["format"] == "sharded-pth"
    assert (out / "pytorch_model.bin.index.json").is_file()
    tensors = open_checkpoint(out).weights().tensors
    assert set(tensors) == set(zoo())


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    src = save(tmp_path, zoo())
    result = run_cli("rename", src, "-o", tmp_path / "x.pth", "--add-prefix", "m.", "--dry-run")
    assert result.exit_code == 0
    assert result.stdout.endswith("Dry run: nothing was written.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.pth"]


def test_progress_bar_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = save(tmp_path, zoo())
    source = open_source(src)
    write_checkpoint(source, None, WriteOptions(tmp_path / "p.pth", progress=True))
    assert "writing p.pth" in capsys.readouterr().err


def test_library_rename_plan_written(tmp_path: Path) -> None:
    src = save(tmp_path, {"module.a": torch.ones(2)})
    before = sha256(src)
    source = open_source(src)
    result = write_checkpoint(
        source, make_plan(source.tensors, [strip_prefix("module.")]), WriteOptions(tmp_path / "o.pth")
    )
    assert result.summary().startswith(f"wrote {tmp_path / 'o.pth'} (pth, 1 tensor, ")
    assert list(torch.load(tmp_path / "o.pth", weights_only=True)) == ["a"]
    assert sha256(src) == before


def test_torchvision_reference_checkpoint_keeps_args_optimizer_and_epoch(tmp_path: Path) -> None:
    import argparse

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    args = argparse.Namespace(lr=0.1, data="/data", epochs=90)
    src = save(
        tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "args": args}
    )
    out = tmp_path / "out.pth"
    result = run_cli("rename", src, "-o", out, "--add-prefix", "module.")
    assert result.exit_code == 0, result.stderr
    before = torch.load(src, weights_only=False)
    after = torch.load(out, weights_only=False)
    assert list(after) == list(before)
    assert after["args"] == args and after["epoch"] == 3
    assert_tree_equal(after["optimizer"], before["optimizer"], "optimizer")
    assert list(after["model"]) == ["module.weight", "module.bias"]


def test_dcp_non_tensor_values_are_never_written_as_placeholders(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    weights = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
    dcp.save({"model": weights, "step": 5}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    out = tmp_path / "model.pth"
    result = run_cli("convert", tmp_path / "dcp", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "only the weights are written): step" in result.stderr
    state = torch.load(out, weights_only=True)
    assert list(state) == ["weight", "bias"]
    assert_same(state["weight"], weights["weight"])


def test_sharded_output_into_the_input_folder_is_refused(tmp_path: Path) -> None:
    src = save(tmp_path, zoo())
    shards = tmp_path / "shards"
    assert run_cli("convert", src, "-o", shards, "--max-shard-size", "64").exit_code == 0
    before = {p.name: sha256(p) for p in shards.iterdir()}
    result = run_cli("convert", shards, "-o", shards, "--max-shard-size", "128", "--force")
    assert_one_line_error(result, "holds the input's shards")
    assert {p.name: sha256(p) for p in shards.iterdir()} == before


def test_safetensors_output_notes_tied_tensors(tmp_path: Path) -> None:
    src = save(tmp_path, zoo())
    result = run_cli("convert", src, "-o", tmp_path / "z.safetensors")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == (
        "ckpt: note: 1 tied tensor written once, its alias recorded in the metadata "
        "('ckptsurgeon.aliases', as safetensors' save_model does): lm_head.weight -> wte.weight; "
        "ckpt reads aliases back, plain safetensors.load_file returns only the kept name\n"
    )
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(tmp_path / "z.safetensors"))
    assert run_cli("convert", src, "-o", tmp_path / "z.pth").stderr == ""


def test_oversized_tensor_gets_its_own_shard_and_a_note(tmp_path: Path) -> None:
    src = save(tmp_path, {"big": torch.zeros(64), "a": torch.zeros(2), "b": torch.zeros(2)})
    result = run_cli("convert", src, "-o", tmp_path / "shards", "--max-shard-size", "100")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == (
        "ckpt: note: 1 tensor is bigger than the shard size limit (100 B), "
        "so it got a shard of its own: big (256 B)\n"
    )
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "big": "model-00001-of-00002.safetensors",
        "a": "model-00002-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
    }


def test_one_tensor_is_singular(tmp_path: Path) -> None:
    src = save(tmp_path, {"w": torch.ones(2)})
    out = tmp_path / "one.safetensors"
    result = run_cli("convert", src, "-o", out)
    assert result.stdout == (
        "Plan: 1 tensor: 0 renamed, 1 unchanged, 0 dropped\n"
        "\n"
        f"wrote {out} (safetensors, 1 tensor, {out.stat().st_size} B), verified bit for bit\n"
    )


def test_dcp_placeholder_shows_as_a_plain_description(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": {"w": torch.ones(2)}, "step": 5}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    result = run_cli("inspect", tmp_path / "dcp")
    assert result.exit_code == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if line.startswith("step"))
    assert row.split(None, 4)[4] == "<non-tensor value (DCP bytes entry, not loaded)>"
    assert "'<non-tensor" not in result.stdout


def test_an_existing_folder_as_output_is_named_as_a_folder(tmp_path: Path) -> None:
    """Not "cannot tell the format from the suffix": the output is a folder, and shards could go there."""
    folder = tmp_path / "out"
    folder.mkdir()
    for extra in ([], ["--to", "pth"]):
        result = run_cli("convert", FIXTURES / "vgg_1000.pth", "-o", folder, *extra)
        assert_one_line_error(result, f"{folder}: is a folder", "--max-shard-size")
    assert list(folder.iterdir()) == []
