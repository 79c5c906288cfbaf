"""Keeping learned weights when only the shape changed: position tables and the input conv.

The arithmetic is compared with timm 1.0.31's own outputs (fixtures/reference/, made by
fixtures/reference/make_reference.py with timm installed): bit for bit for the channel rule, within
float tolerance for interpolation. End to end, a tiny ViT at another image size and a tiny ResNet
with 1 and 4 input channels (defined here) go through ``ckpt adapt`` and ``load_into``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, assert_one_line_error, run_cli
from safetensors.torch import load_file
from torch import nn

import ckptsurgeon
from ckptsurgeon.core.record import TensorRecord
from ckptsurgeon.diffing.diagnosis import diagnose
from ckptsurgeon.errors import CkptError, SurgeryError
from ckptsurgeon.surgery.plan import make_plan
from ckptsurgeon.surgery.resample import (
    adapt_input_conv,
    adapt_input_conv_tensor,
    grid_change,
    resample_pos_embed,
    resample_pos_embed_tensor,
    resize_rel_pos_bias,
    resize_rel_pos_bias_tensor,
)

REFERENCE = FIXTURES / "reference"
CASES = json.loads((REFERENCE / "timm_reference.json").read_text())["cases"]
TENSORS = load_file(REFERENCE / "timm_reference.safetensors")


def _case(name: str) -> dict:
    return next(c for c in CASES if c["name"] == name)


def _records(**tensors: torch.Tensor) -> dict[str, TensorRecord]:
    return {name: TensorRecord.from_torch(name, t) for name, t in tensors.items()}


# -- the arithmetic against timm's own outputs ---------------------------------------------------
def test_reference_holds_every_case() -> None:
    kinds = [c["function"].rsplit(".", 1)[-1] for c in CASES]
    assert kinds.count("resample_abs_pos_embed") == 5
    assert kinds.count("adapt_input_conv") == 8
    assert kinds.count("resize_rel_pos_bias_table") == 2
    assert json.loads((REFERENCE / "timm_reference.json").read_text())["timm"] == "1.0.31"


@pytest.mark.parametrize("case", [c for c in CASES if "pos_embed" in c["name"]], ids=lambda c: c["name"])
def test_pos_embed_matches_timm(case: dict) -> None:
    p = case["params"]
    assert (p["interpolation"], p["antialias"]) == ("bicubic", True)
    table, want = TENSORS[f"{case['name']}.in.pos_embed"], TENSORS[f"{case['name']}.out"]
    got = resample_pos_embed_tensor(table, p["old_size"], p["new_size"], p["num_prefix_tokens"])
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the transform infers the grids and the prefix from the shapes alone, and gives the same values
    t = resample_pos_embed(_records(pe=table), "pe", tuple(want.shape))
    torch.testing.assert_close(t.value((TensorRecord.from_torch("pe", table),), 0), want, atol=1e-5, rtol=0)
    assert f"+ {p['num_prefix_tokens']}" in t.description or p["num_prefix_tokens"] == 0


@pytest.mark.parametrize("case", [c for c in CASES if "in_conv" in c["name"]], ids=lambda c: c["name"])
def test_input_conv_matches_timm_bit_for_bit(case: dict) -> None:
    weight, want = TENSORS[f"{case['name']}.in.weight"], TENSORS[f"{case['name']}.out"]
    n = case["params"]["in_chans"]
    assert torch.equal(adapt_input_conv_tensor(weight, n), want)
    t = adapt_input_conv(_records(w=weight), "w", n)
    assert t.outputs[0].dtype == str(want.dtype).removeprefix("torch.")  # the input's dtype
    got = t.value((TensorRecord.from_torch("w", weight),), 0)
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("case", [c for c in CASES if "rel_pos" in c["name"]], ids=lambda c: c["name"])
def test_rel_pos_bias_matches_timm(case: dict) -> None:
    table, want = TENSORS[f"{case['name']}.in.table"], TENSORS[f"{case['name']}.out"]
    new = case["params"]["new_window_size"][0]
    torch.testing.assert_close(resize_rel_pos_bias_tensor(table, new), want, atol=1e-5, rtol=0)
    t = resize_rel_pos_bias(_records(t=table), "t", tuple(want.shape))
    torch.testing.assert_close(t.value((TensorRecord.from_torch("t", table),), 0), want, atol=1e-5, rtol=0)


def test_bfloat16_pos_embed_is_computed_in_float32_and_cast_back() -> None:
    case = _case("pos_embed_t1_14to24")
    table = TENSORS["pos_embed_t1_14to24.in.pos_embed"].to(torch.bfloat16)
    t = resample_pos_embed(_records(pe=table), "pe", (1, 577, 64))
    got = t.value((TensorRecord.from_torch("pe", table),), 0)
    assert got.dtype == torch.bfloat16
    want = resample_pos_embed_tensor(table.float(), (14, 14), (24, 24), 1).to(torch.bfloat16)
    assert torch.equal(got, want)
    assert case["params"]["num_prefix_tokens"] == 1


def test_two_dimensional_table_and_one_dimensional_sequence() -> None:
    table = TENSORS["pos_embed_t0_16to8.in.pos_embed"]
    flat = table[0]  # [256, 64], as an nn.Embedding's weight
    t = resample_pos_embed(_records(pe=flat), "pe", (64, 64))
    got = t.value((TensorRecord.from_torch("pe", flat),), 0)
    torch.testing.assert_close(got, TENSORS["pos_embed_t0_16to8.out"][0], atol=1e-5, rtol=0)
    # a 1-D sequence: interpolated along its length (linear), the prefix kept
    seq = torch.randn(1, 1 + 50, 8)
    t = resample_pos_embed(_records(pe=seq), "pe", (1, 61, 8), old_size=50, new_size=60, prefix_tokens=1)
    got = t.value((TensorRecord.from_torch("pe", seq),), 0)
    body = F.interpolate(seq[:, 1:].permute(0, 2, 1), size=60, mode="linear").permute(0, 2, 1)
    assert torch.equal(got[:, :1], seq[:, :1])
    torch.testing.assert_close(got[:, 1:], body, atol=1e-6, rtol=0)


def test_grids_are_inferred_after_zero_one_or_two_prefix_tokens() -> None:
    assert grid_change((1, 256, 8), (1, 64, 8)) == grid_change((1, 256, 8), (1, 64, 8), prefix_tokens=0)
    assert (grid_change((1, 197, 8), (1, 577, 8)).prefix, grid_change((1, 198, 8), (1, 146, 8)).prefix) == (
        1,
        2,
    )
    assert grid_change((1, 197, 8), (1, 577, 16)) is None  # another width: not a resampling
    assert grid_change((1, 197, 8), (1, 200, 8)) is None  # 200 - p is no square


def test_impossible_cases_are_refused_in_one_line() -> None:
    recs = _records(pe=torch.zeros(1, 50, 8), w=torch.zeros(16, 3, 7, 7), t=torch.zeros(169, 4))
    refusals = [
        (lambda: resample_pos_embed(recs, "pe", (1, 60, 8)), "not a square grid"),
        (lambda: resample_pos_embed(recs, "pe", (1, 197, 16)), "of one width"),
        (lambda: resample_pos_embed(recs, "pe", (1, 60, 8), old_size=(7, 7), new_size=(6, 6)), "old_size="),
        (lambda: adapt_input_conv(recs, "w", 3), "already has 3"),
        (lambda: adapt_input_conv(recs, "pe", 1), "not a conv weight"),
        (lambda: resize_rel_pos_bias(recs, "t", (529, 6)), "as many heads"),
    ]
    for make, fragment in refusals:
        with pytest.raises(SurgeryError) as info:
            make()
        message = str(info.value)
        assert "\n" not in message and fragment in message, message
    from ckptsurgeon.surgery.resample import conv_shape_refusal

    line = conv_shape_refusal("conv1.weight", (16, 3, 7, 7), (8, 1, 7, 7))
    assert line is not None and "changes more than the input channels" in line


def test_transform_plugs_into_a_plan() -> None:
    table = TENSORS["pos_embed_t1_7to14.in.pos_embed"]
    recs = _records(pos_embed=table)
    plan = make_plan(recs, []).with_transform(resample_pos_embed(recs, "pos_embed", (1, 197, 64)))
    out = plan.apply(recs)
    torch.testing.assert_close(
        out["pos_embed"].to_torch(), TENSORS["pos_embed_t1_7to14.out"], atol=1e-5, rtol=0
    )


# -- the diagnosis ---------------------------------------------------------------------------------
def test_diagnosis_names_the_grid_and_the_option() -> None:
    src = {"cls_token": (1, 1, 8), "pos_embed": (1, 197, 8), "patch_embed.proj.weight": (8, 3, 16, 16)}
    tgt = {"cls_token": (1, 1, 8), "pos_embed": (1, 577, 8), "patch_embed.proj.weight": (8, 1, 16, 16)}
    d = diagnose(src, tgt)
    assert [(f.kind, f.words) for f in d.shape_fixes] == [
        ("pos_embed", "pos_embed: a 14x14 grid + 1 token -> 24x24 + 1"),
        ("input_conv", "patch_embed.proj.weight: 3 input channels -> 1"),
    ]
    assert d.head is None and d.vocabulary is None
    result = ckptsurgeon.diff(
        {n: torch.zeros(s) for n, s in src.items()}, {n: torch.zeros(s) for n, s in tgt.items()}
    )
    message = result.explanation.message
    assert "pos_embed: a 14x14 grid + 1 token -> 24x24 + 1: resampled" in message
    assert "--no-resample-pos-embed" in message and "--no-adapt-input-conv" in message
    shape_fixes = result.to_json()["diagnosis"]["shape_fixes"]
    assert [f["name"] for f in shape_fixes] == ["pos_embed", "patch_embed.proj.weight"]


def test_only_the_first_conv_and_only_dimension_one() -> None:
    src = {"conv1.weight": (8, 3, 7, 7), "layer.conv.weight": (8, 3, 3, 3)}
    d = diagnose(src, {"conv1.weight": (8, 1, 7, 7), "layer.conv.weight": (8, 1, 3, 3)})
    assert [f.mismatch.name for f in d.shape_fixes] == ["conv1.weight"]
    d = diagnose({"conv1.weight": (8, 3, 7, 7)}, {"conv1.weight": (4, 1, 7, 7)})
    assert d.shape_fixes == ()
    d = diagnose({"pos_embed": (1, 50, 8)}, {"pos_embed": (1, 60, 8)})  # not a square grid
    assert d.shape_fixes == ()


# -- end to end ----------------------------------------------------------------------------------------
class TinyViT(nn.Module):
    """timm's ViT naming: cls_token, pos_embed, patch_embed.proj, blocks, norm, head."""

    def __init__(self, img_size: int = 28, patch: int = 4, dim: int = 64, classes: int = 10) -> None:
        super().__init__()
        grid = img_size // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(dim, 2, 2 * dim, batch_first=True)] * 1)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class TinyResNet(nn.Module):
    """torchvision's ResNet naming: conv1, bn1, layer1, fc."""

    def __init__(self, in_chans: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 16, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _saved(tmp_path: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def _vit_files(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    trained = TinyViT(img_size=28).state_dict()
    trained["pos_embed"] = TENSORS["pos_embed_t1_7to14.in.pos_embed"].clone()  # timm's case: 7x7 -> 14x14
    return _saved(tmp_path, "vit_28.pth", trained), _saved(tmp_path, "vit_56.pth", TinyViT(56).state_dict())


def test_vit_at_another_image_size(tmp_path: Path) -> None:
    src, target = _vit_files(tmp_path)
    out = tmp_path / "vit_56.adapted.pth"
    result = run_cli("adapt", src, target, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "resample pos_embed: a 7x7 grid + 1 token -> 14x14 + 1 (bicubic, antialias)" in result.stdout
    model = TinyViT(img_size=56)
    loaded = torch.load(out, weights_only=True)
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    assert (missing, unexpected) == ([], [])  # the report predicts nothing missing
    assert "32 of 32" not in result.stdout and "100%" in result.stdout
    want = TENSORS["pos_embed_t1_7to14.out"]
    torch.testing.assert_close(model.pos_embed.detach(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded["pos_embed"], want, atol=1e-5, rtol=0)
    assert model(torch.randn(2, 3, 56, 56)).shape == (2, 10)

    # the JSON lists the transform with the tensor it touched, in the plan and in the report
    result = run_cli("adapt", src, target, "--dry-run", "--format", "json")
    doc = json.loads(result.stdout)
    assert [t["name"] for t in doc["plan"]["transformed"]] == ["pos_embed"]
    assert doc["report"]["transformed"][0]["name"] == "pos_embed"
    assert doc["report"]["summary"]["missing"] == 0


def test_vit_without_resampling_leaves_pos_embed_to_the_model(tmp_path: Path) -> None:
    src, target = _vit_files(tmp_path)
    out = tmp_path / "vit_56.kept.pth"
    result = run_cli("adapt", src, target, "-o", out, "--no-resample-pos-embed", "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    assert report["missing"] == ["pos_embed"] and report["transformed"] == []
    missing, unexpected = TinyViT(56).load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert (missing, unexpected) == (report["missing"], [])


def test_vit_load_into(tmp_path: Path) -> None:
    src, _ = _vit_files(tmp_path)
    model = TinyViT(img_size=56)
    report = ckptsurgeon.load_into(model, src)
    assert report.missing == () and [t[0] for t in report.transformed] == ["pos_embed"]
    torch.testing.assert_close(model.pos_embed.detach(), TENSORS["pos_embed_t1_7to14.out"], atol=1e-5, rtol=0)
    model = TinyViT(img_size=56)
    before = model.pos_embed.detach().clone()
    report = ckptsurgeon.load_into(model, src, resample_pos_embed=False)
    assert report.missing == ("pos_embed",) and torch.equal(model.pos_embed.detach(), before)


@pytest.mark.parametrize("chans", [1, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resnet_with_other_input_channels(tmp_path: Path, chans: int, dtype: str) -> None:
    torch.manual_seed(1)
    trained = TinyResNet(3).to(getattr(torch, dtype)).state_dict()
    trained["conv1.weight"] = TENSORS[f"in_conv_{chans}ch_{dtype}.in.weight"].clone()
    src = _saved(tmp_path, "resnet_rgb.pth", {f"module.{k}": v for k, v in trained.items()})
    target = _saved(tmp_path, f"resnet_{chans}.pth", TinyResNet(chans).state_dict())
    out = tmp_path / f"resnet_{chans}.adapted.pth"
    result = run_cli("adapt", src, target, "-o", out, "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    assert report["missing"] == [] and report["transformed"][0]["name"] == "conv1.weight"
    loaded = torch.load(out, weights_only=True)
    want = TENSORS[f"in_conv_{chans}ch_{dtype}.out"]  # timm's own output on this same weight
    assert loaded["conv1.weight"].dtype == want.dtype and torch.equal(loaded["conv1.weight"], want)
    model = TinyResNet(chans)
    missing, unexpected = model.load_state_dict(loaded, strict=False)
    assert (missing, unexpected) == ([], [])
    assert model(torch.randn(2, chans, 32, 32)).shape == (2, 10)

    model = TinyResNet(chans)
    report_py = ckptsurgeon.load_into(model, src)
    assert torch.equal(model.conv1.weight.detach(), want.float())
    assert report_py.transformed[0][:2] == ("conv1.weight", "module.conv1.weight")


def test_resnet_without_adapting_and_the_impossible_conv(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = _saved(tmp_path, "resnet_rgb.pth", TinyResNet(3).state_dict())
    target = _saved(tmp_path, "resnet_1.pth", TinyResNet(1).state_dict())
    result = run_cli("adapt", src, target, "--dry-run", "--no-adapt-input-conv", "--format", "json")
    report = json.loads(result.stdout)["report"]
    assert report["missing"] == ["conv1.weight"] and report["transformed"] == []
    # a first conv whose output channels differ too is not adapted: left out, and strict refuses it
    other = TinyResNet(1)
    other.conv1 = nn.Conv2d(1, 8, 7, bias=False)
    d = ckptsurgeon.diff(src, {k: v for k, v in other.state_dict().items()})
    assert d.diagnosis.shape_fixes == ()
    with pytest.raises(CkptError) as info:
        ckptsurgeon.load_into(other, src, strict_shapes=True)
    assert "\n" not in str(info.value) and "conv1.weight" in str(info.value)
    # 2 -> 1 channels is not timm's rule (it sums groups of 3): left out, said so
    two = TinyResNet(3).state_dict() | {"conv1.weight": torch.zeros(16, 2, 7, 7)}
    result = run_cli("adapt", _saved(tmp_path, "two.pth", two), target, "--dry-run", "--format", "json")
    report = json.loads(result.stdout)["report"]
    assert report["transformed"] == [] and report["skipped"][0]["name"] == "conv1.weight"


def test_resnet_story_fixture_to_grayscale_via_architecture(tmp_path: Path) -> None:
    spec = f"{FIXTURES / 'models.py'}:resnet_like(num_classes=6, in_chans=1)"
    out = tmp_path / "gray.pth"
    result = run_cli("adapt", FIXTURES / "resnet_dp_6.pth", spec, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "adapt module.conv1.weight: 3 input channels -> 1 (summed over the 3)" in result.stdout
    source = torch.load(FIXTURES / "resnet_dp_6.pth", weights_only=True)["module.conv1.weight"]
    assert torch.equal(torch.load(out, weights_only=True)["conv1.weight"], source.sum(1, keepdim=True))


def test_refused_resample_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    # an adapt that drops everything but a resampled table is still below the coverage bar
    src = _saved(tmp_path, "a.pth", {"pos_embed": torch.zeros(1, 50, 8), "x": torch.zeros(3)})
    tgt = _saved(
        tmp_path,
        "b.pth",
        {"pos_embed": torch.zeros(1, 197, 8), **{f"y{i}": torch.zeros(2) for i in range(4)}},
    )
    assert_one_line_error(run_cli("adapt", src, tgt, "-o", tmp_path / "c.pth"), "would load")


def test_relative_position_bias_table_to_another_window(tmp_path: Path) -> None:
    name = "layers.0.blocks.0.attn.relative_position_bias_table"
    table, want = TENSORS["rel_pos_bias_7to12.in.table"], TENSORS["rel_pos_bias_7to12.out"]
    body = {f"layers.0.blocks.0.mlp.fc{i}.weight": torch.randn(4, 4) for i in (1, 2)}
    src = _saved(tmp_path, "swin_7.pth", {name: table, **body})
    target = _saved(tmp_path, "swin_12.pth", {name: torch.zeros(529, 4), **body})
    out = tmp_path / "swin_12.adapted.pth"
    result = run_cli("adapt", src, target, "-o", out, "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    assert report["missing"] == [] and report["transformed"][0]["name"] == name
    torch.testing.assert_close(torch.load(out, weights_only=True)[name], want, atol=1e-5, rtol=0)
    result = run_cli("adapt", src, target, "--dry-run", "--no-resample-pos-embed", "--format", "json")
    assert json.loads(result.stdout)["report"]["missing"] == [name]
