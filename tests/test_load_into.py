"""``load_into``: the diagnosis applied to a live model; never a silent zero-load."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import FIXTURES, REAL

import ckptsurgeon
from ckptsurgeon.errors import LoadError
from ckptsurgeon.surgery.adapting import LoadReport, load_into


def models():
    spec = importlib.util.spec_from_file_location("story_models_load", FIXTURES / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def source(name: str) -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_resnet_dataparallel_file_into_plain_model() -> None:
    torch.manual_seed(0)
    model = models().resnet_like(num_classes=2)
    fc_before = model.fc.weight.detach().clone()
    report = load_into(model, FIXTURES / "resnet_dp_6.pth")
    assert isinstance(report, LoadReport)
    assert report.missing == ("fc.weight", "fc.bias")
    assert [m.file_name for m in report.skipped] == ["module.fc.weight", "module.fc.bias"]
    assert report.transform == "strip prefix 'module.'"
    assert report.headline == "120 of 122 target tensors load (98.3%)"
    src = source("resnet_dp_6.pth")
    state = model.state_dict()
    for name in report.loaded:
        assert same(state[name], src[f"module.{name}"]), name
    assert torch.equal(model.fc.weight, fc_before)


def test_vgg_plain_file_into_dataparallel_and_plain_models() -> None:
    m = models()
    wrapped = torch.nn.DataParallel(m.vgg_like(num_classes=2))
    report = ckptsurgeon.load_into(wrapped, str(FIXTURES / "vgg_1000.pth"))
    assert report.transform == "add prefix 'module.'"
    assert sorted(report.missing) == ["module.classifier.6.bias", "module.classifier.6.weight"]
    plain = m.vgg_like(num_classes=2)
    report = load_into(plain, FIXTURES / "vgg_1000.pth")
    assert report.transform == "none" and len(report.loaded) == 36
    assert same(plain.features[0].weight.detach(), source("vgg_1000.pth")["features.0.weight"])


def test_xception_from_a_state_dict() -> None:
    model = models().xception_like(num_classes=2)
    report = load_into(model, source("xception_dp_6.pth"))
    assert report.missing == ("fc.weight", "fc.bias") and report.unused == ()


def test_nothing_loads_raises_and_leaves_the_model_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(7, 3), torch.nn.Linear(3, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        LoadError, match=r"nothing would load into Sequential .*\(0 of 4 target tensors\); nothing was loaded"
    ):
        load_into(model, FIXTURES / "resnet_dp_6.pth")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_min_coverage_and_strict_shapes() -> None:
    model = models().resnet_like(num_classes=2)
    with pytest.raises(LoadError, match=r"below min_coverage=99\.5%"):
        load_into(model, FIXTURES / "resnet_dp_6.pth", min_coverage=99.5)
    with pytest.raises(LoadError, match=r"2 tensor\(s\) do not fit.*module.fc.weight \[6, 32\] vs \[2, 32\]"):
        load_into(model, FIXTURES / "resnet_dp_6.pth", strict_shapes=True)
    report = load_into(models().resnet_like(num_classes=6), FIXTURES / "resnet_dp_6.pth", strict_shapes=True)
    assert report.ok and report.coverage == 100.0


def test_lightning_checkpoint_with_model_prefix_and_key() -> None:
    tiny = models().tinynet()
    report = load_into(tiny, REAL / "lightning_tinynet.ckpt")
    assert report.ok and report.transform == "strip prefix 'model.'"
    ckpt = torch.load(REAL / "lightning_tinynet.ckpt", map_location="cpu", weights_only=False)
    assert same(tiny.fc.weight.detach(), ckpt["state_dict"]["model.fc.weight"])
    nested = {"state_dict": ckpt["state_dict"], "epoch": 1}
    assert load_into(models().tinynet(), nested, key="state_dict").ok


def test_compiled_cuda_tagged_file_loads_on_cpu() -> None:
    tiny = models().tinynet()
    report = load_into(tiny, REAL / "tinynet_compiled.pth")
    assert report.ok and report.transform == "strip prefix '_orig_mod.'"


def test_tied_weights_are_not_missing() -> None:
    gpt = models().gpt2_like()
    report = load_into(gpt, REAL / "hf_gpt2_tiny")
    assert report.ok, report.missing
    assert report.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert gpt.lm_head.weight is gpt.transformer.wte.weight


def test_meta_model_is_refused() -> None:
    with torch.device("meta"):
        model = models().tinynet()
    with pytest.raises(LoadError, match="meta device"):
        load_into(model, REAL / "tinynet_compiled.pth")


def test_report_renders() -> None:
    report = load_into(models().resnet_like(num_classes=2), FIXTURES / "resnet_dp_6.pth")
    text = report.render()
    assert text.splitlines()[0] == (
        "120 of 122 target tensors load (98.3%) with load_state_dict(strict=False); nothing unexpected."
    )
    assert "fc.{bias,weight}  missing   keeps the target's own initialisation" in text
    data = json.loads(report.render("json"))
    assert data["summary"]["loaded"] == 120 and data["missing"] == ["fc.weight", "fc.bias"]
    assert data["skipped"][0] == {
        "name": "fc.weight",
        "source_shape": [6, 32],
        "target_shape": [2, 32],
        "source_name": "module.fc.weight",
    }


def test_bad_source_type() -> None:
    with pytest.raises(LoadError, match="cannot read a int"):
        load_into(torch.nn.Linear(1, 1), 3)  # type: ignore[arg-type]


def test_diff_and_load_into_read_a_nested_state_dict_alike() -> None:
    ckpt = torch.load(REAL / "lightning_tinynet.ckpt", map_location="cpu", weights_only=False)
    nested = {"state_dict": ckpt["state_dict"], "epoch": 1}
    model = models().tinynet()
    result = ckptsurgeon.diff(nested, model, key="state_dict")
    report = load_into(model, nested, key="state_dict")
    assert result.source_count == len(ckpt["state_dict"]) > 0
    assert result.diagnosis.loads_after == len(report.loaded) == report.total
    for bad in ({"state_dict": 3}, {"other": {}}):
        with pytest.raises(LoadError, match="no entry 'state_dict' holding tensors"):
            load_into(model, bad, key="state_dict")
        with pytest.raises(LoadError, match="no entry 'state_dict' holding tensors"):
            ckptsurgeon.diff(bad, model, key="state_dict")
