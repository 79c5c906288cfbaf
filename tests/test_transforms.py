"""Plans that carry values: transforms with several inputs or outputs, written and reloaded by torch.

Every value is compared with torch computing the same thing from the source tensors, after the
output was reloaded by ``torch.load`` or ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptsurgeon.core.record import Storage, TensorRecord
from ckptsurgeon.core.source import open_source
from ckptsurgeon.errors import OutputError, SurgeryError
from ckptsurgeon.surgery.pipeline import WriteOptions, write_checkpoint
from ckptsurgeon.surgery.plan import add_prefix, drop, make_plan, strip_prefix
from ckptsurgeon.surgery.planreport import plan_json, render_plan
from ckptsurgeon.surgery.transforms import Output, Transform, average, cast_transform, split

SUFFIXES = [".safetensors", ".pth"]


def source_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    tensors = {
        "ema.w": torch.randn(5, 7),
        "swa.w": torch.randn(5, 7),
        "attn.qkv.weight": torch.randn(12, 6),
        "attn.qkv.bias": torch.randn(12),
        "steps": torch.tensor(17),
    }
    path = tmp_path / "src.pth"
    torch.save(tensors, path)
    return path, tensors


def reload(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_average_of_two_tensors_is_torchs_mean(tmp_path: Path, suffix: str) -> None:
    path, want = source_file(tmp_path)
    source = open_source(path)
    plan = make_plan(source.tensors, []).with_transform(average(source.tensors, ["ema.w", "swa.w"], "w"))
    out = tmp_path / f"out{suffix}"
    result = write_checkpoint(source, plan, WriteOptions(out))  # verified: reopened and compared
    got = reload(out)
    assert result.verified and set(got) == {"w", "attn.qkv.weight", "attn.qkv.bias", "steps"}
    assert torch.equal(got["w"], (want["ema.w"] + want["swa.w"]) / 2)
    for name in ("attn.qkv.weight", "attn.qkv.bias", "steps"):
        assert torch.equal(got[name], want[name]), name
    assert plan.mapping["swa.w"] is None
    assert plan.dropped[0].reason == "input of average of ema.w, swa.w"


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dim", [0, 1])
def test_split_fused_qkv_into_q_k_v_is_torch_chunk(tmp_path: Path, suffix: str, dim: int) -> None:
    path, want = source_file(tmp_path)
    source = open_source(path)
    qkv = split(source.tensors, "attn.qkv.weight", ["attn.q.weight", "attn.k.weight", "attn.v.weight"], dim)
    plan = make_plan(source.tensors, []).with_transform(qkv)
    out = tmp_path / f"out{suffix}"
    write_checkpoint(source, plan, WriteOptions(out))
    got = reload(out)
    assert "attn.qkv.weight" not in got
    for name, part in zip(("q", "k", "v"), torch.chunk(want["attn.qkv.weight"], 3, dim=dim), strict=True):
        assert torch.equal(got[f"attn.{name}.weight"], part), name
        assert got[f"attn.{name}.weight"].is_contiguous()
    assert torch.equal(got["ema.w"], want["ema.w"])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_several_transforms_renames_and_a_cast_in_one_plan(tmp_path: Path, suffix: str) -> None:
    path, want = source_file(tmp_path)
    source = open_source(path)
    recs = source.tensors
    plan = (
        make_plan(recs, [strip_prefix("attn.")])
        .with_transform(average(recs, ["ema.w", "swa.w"], "w"))
        .with_transform(split(recs, "attn.qkv.bias", ["q.bias", "k.bias", "v.bias"]))
    )
    out = tmp_path / f"out{suffix}"
    result = write_checkpoint(source, plan, WriteOptions(out, dtype="bf16"))
    got = reload(out)
    assert torch.equal(got["w"], ((want["ema.w"] + want["swa.w"]) / 2).to(torch.bfloat16))
    for name, part in zip("qkv", torch.chunk(want["attn.qkv.bias"], 3), strict=True):
        assert torch.equal(got[f"{name}.bias"], part.to(torch.bfloat16)), name
    assert torch.equal(got["qkv.weight"], want["attn.qkv.weight"].to(torch.bfloat16))
    assert got["steps"].dtype == torch.int64 and int(got["steps"]) == 17
    assert result.cast == 1  # qkv.weight: the transformed outputs are cast after their transform


def test_the_plan_shows_each_transform_before_anything_is_read(tmp_path: Path) -> None:
    def unreadable() -> bytes:
        raise AssertionError("read while planning")

    storage = Storage("0", "float32", 4 * 48, loader=unreadable)
    recs = {"qkv": TensorRecord("qkv", "float32", (12, 4), storage), "b": TensorRecord("b", "float32", (3,))}
    plan = make_plan(recs, []).with_transform(split(recs, "qkv", ["q", "k", "v"])).with_cast(recs, "fp16")
    applied = plan.apply(recs)
    assert [(r.name, r.dtype, r.shape) for r in applied.values()] == [
        ("q", "float16", (4, 4)),
        ("k", "float16", (4, 4)),
        ("v", "float16", (4, 4)),
        ("b", "float16", (3,)),
    ]
    data = json.loads(render_plan(plan, "json"))
    assert data == plan_json(plan)
    assert data["summary"] == {"tensors": 2, "renamed": 0, "unchanged": 0, "dropped": 0, "transformed": 2}
    assert data["transformed"][0] == {
        "name": "qkv",
        "transform": "split along dimension 0 into 3, cast to float16",
        "inputs": ["qkv"],
        "outputs": [{"name": n, "dtype": "float16", "shape": [4, 4]} for n in "qkv"],
    }
    assert data["transformed"][1]["transform"] == "cast float32 -> float16"
    text = render_plan(plan)
    assert text.startswith("Plan: 2 tensors: 0 renamed, 0 unchanged, 0 dropped, 2 transformed")
    assert re.search(r"\nqkv +q, k, v +split along dimension 0 into 3, cast to float16", text)
    with pytest.raises(AssertionError, match="read while planning"):
        applied["q"].read_bytes()  # the data is read only now, through the transform


def test_a_dry_run_with_dtype_lists_the_casts(tmp_path: Path) -> None:
    import ckptsurgeon

    path, _ = source_file(tmp_path)
    result = ckptsurgeon.convert(path, dtype="bf16", dry_run=True)
    doc = result.to_json()["plan"]
    assert doc["summary"]["transformed"] == 4 and doc["summary"]["unchanged"] == 1  # steps is int64
    assert {t["transform"] for t in doc["transformed"]} == {"cast float32 -> bfloat16"}
    markdown = result.render("markdown")
    assert "| transformed" in markdown and "cast float32 -> bfloat16" in markdown


def test_a_transform_may_return_bytes(tmp_path: Path) -> None:
    path, want = source_file(tmp_path)
    source = open_source(path)

    def flipped(inputs: tuple[TensorRecord, ...], _index: int) -> bytes:
        return inputs[0].to_torch().flip(0).numpy().tobytes()

    flip = Transform("flip rows", ("ema.w",), (Output("ema.w", "float32", (5, 7)),), flipped)
    out = tmp_path / "out.safetensors"
    write_checkpoint(source, make_plan(source.tensors, []).with_transform(flip), WriteOptions(out))
    assert torch.equal(load_file(str(out))["ema.w"], want["ema.w"].flip(0))


def test_an_output_other_than_declared_is_refused_by_name(tmp_path: Path) -> None:
    path, _ = source_file(tmp_path)
    source = open_source(path)
    wrong = Transform(
        "transpose",
        ("ema.w",),
        (Output("ema.w", "float32", (5, 7)),),
        lambda inputs, _i: inputs[0].to_torch().T,
    )
    out = tmp_path / "out.safetensors"
    plan = make_plan(source.tensors, []).with_transform(wrong)
    with pytest.raises(
        SurgeryError, match=r"output 'ema.w' came out float32\[7, 5\], declared float32\[5, 7\]"
    ):
        write_checkpoint(source, plan, WriteOptions(out))
    assert not out.exists()


def test_verification_compares_with_what_the_transform_computes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ckptsurgeon.formats.safetensors as st_format

    path, _ = source_file(tmp_path)
    source = open_source(path)
    plan = make_plan(source.tensors, []).with_transform(average(source.tensors, ["ema.w", "swa.w"], "w"))
    real = st_format._write_tensor

    def off_by_one_bit(fh, name, rec):  # the average, with one bit flipped
        if name != "w":
            return real(fh, name, rec)
        data = bytearray(rec.read_bytes())
        data[0] ^= 1
        fh.write(bytes(data))

    monkeypatch.setattr(st_format, "_write_tensor", off_by_one_bit)
    out = tmp_path / "out.safetensors"
    with pytest.raises(OutputError, match="verification failed: 'w' differs"):
        write_checkpoint(source, plan, WriteOptions(out))
    assert not out.exists()


def test_plan_rules_hold_for_transforms() -> None:
    recs = {n: TensorRecord(n, "float32", (4, 2)) for n in ("a", "b", "c")}
    plan = make_plan(recs, [])
    with pytest.raises(SurgeryError, match="name collision: 'a' and 'b' would both become 'b'"):
        plan.with_transform(split(recs, "a", ["b", "x"]))
    with pytest.raises(SurgeryError, match="no tensor 'z'"):
        average(recs, ["a", "z"], "m")
    with pytest.raises(SurgeryError, match="not divisible into 3 parts"):
        split(recs, "a", ["x", "y", "z"])
    averaged = plan.with_transform(average(recs, ["a", "b"], "m"))
    with pytest.raises(SurgeryError, match="'a' is already transformed"):
        averaged.with_transform(split(recs, "a", ["x", "y"]))
    with pytest.raises(SurgeryError, match=r"transforms 'a' \(split along dimension 0 into 2\); only a plan"):
        plan.with_transform(split(recs, "a", ["x", "y"])).inverse()
    renamed = averaged.then(make_plan(averaged.output_names, [add_prefix("x.")]))
    assert renamed.output_names == ["x.m", "x.c"]
    assert renamed.entries[0].transform.inputs == ("a", "b")  # still read from the source names
    with pytest.raises(SurgeryError, match="drops 'm', an output of average of a, b"):
        averaged.then(make_plan(averaged.output_names, [drop("m")]))


def test_a_cast_plan_is_stable_and_casts_from_the_source() -> None:
    recs = {"w": TensorRecord("w", "float32", (2,)), "n": TensorRecord("n", "int64", (2,))}
    plan = make_plan(recs, []).with_cast(recs, "bf16")
    assert plan.with_cast(recs, "bfloat16") is plan
    again = plan.with_cast(recs, "fp16")
    assert again.entries[0].transform.description == "cast float32 -> float16"
    assert plan.with_cast(recs, "fp32").transformed == []  # back to the source dtype: nothing to do
    assert cast_transform("w", "v", "float32", (2,), "bf16").renamed({"v": "u"}).outputs[0].name == "u"
