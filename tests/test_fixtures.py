"""The story fixtures: deterministic, small, and named like the real architectures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"fixture_{name}", FIXTURES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


models = _load("models")
make = _load("make_fixtures")

STORY = ("vgg_1000.pth", "resnet_dp_6.pth", "xception_dp_6.pth", "vit_28.pth")


def test_regenerating_gives_byte_identical_files(tmp_path: Path) -> None:
    first = make.make_fixtures(tmp_path / "a")
    second = make.make_fixtures(tmp_path / "b")
    assert [p.name for p in first] == list(STORY)
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
        assert a.read_bytes() == (FIXTURES / a.name).read_bytes(), (
            f"fixtures/{a.name} is stale: rerun make_fixtures.py"
        )


def test_fixtures_are_small() -> None:
    total = sum((FIXTURES / name).stat().st_size for name in STORY)
    assert total < 2 * 1024 * 1024


def test_vgg_layout_mirrors_torchvision_vgg19() -> None:
    sd = torch.load(FIXTURES / "vgg_1000.pth", weights_only=True)
    convs = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]
    expected = [f"features.{i}.{p}" for i in convs for p in ("weight", "bias")]
    expected += [f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
    assert list(sd) == expected
    assert len(sd) == 38
    assert tuple(sd["classifier.6.weight"].shape) == (1000, 64)
    assert tuple(sd["classifier.6.bias"].shape) == (1000,)


def test_dataparallel_fixtures_carry_module_prefix() -> None:
    for name, count in (("resnet_dp_6.pth", 122), ("xception_dp_6.pth", 109)):
        sd = torch.load(FIXTURES / name, weights_only=True)
        assert len(sd) == count
        assert all(k.startswith("module.") for k in sd)
        assert sd["module.fc.weight"].shape[0] == 6


def test_resnet_naming_mirrors_torchvision_resnet18() -> None:
    keys = list(models.resnet_like(num_classes=2).state_dict())
    assert len(keys) == 122  # torchvision's resnet18 has exactly 122 state-dict entries
    assert keys[:6] == [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
    ]
    assert "layer1.0.downsample.0.weight" not in keys
    for layer in (2, 3, 4):
        assert f"layer{layer}.0.downsample.0.weight" in keys
        assert f"layer{layer}.0.downsample.1.running_var" in keys
        assert f"layer{layer}.1.bn2.weight" in keys
    assert keys[-2:] == ["fc.weight", "fc.bias"]


def test_xception_naming_mirrors_timm_legacy_xception() -> None:
    keys = set(models.xception_like(num_classes=2).state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "conv2.weight",
        "bn2.weight",
        "block1.skip.weight",
        "block1.skipbn.weight",
        "block1.rep.0.conv1.weight",
        "block1.rep.0.pointwise.weight",
        "block1.rep.1.weight",
        "block2.rep.1.conv1.weight",
        "block4.rep.4.pointwise.weight",
        "conv3.conv1.weight",
        "conv3.pointwise.weight",
        "bn3.weight",
        "conv4.pointwise.weight",
        "bn4.bias",
        "fc.weight",
        "fc.bias",
    ):
        assert key in keys, key
    assert "block3.skip.weight" not in keys  # same width, stride 1: no skip conv, as in timm


@pytest.mark.parametrize("factory", ["vgg_like", "resnet_like", "xception_like", "tinynet"])
def test_models_run_forward(factory: str) -> None:
    torch.manual_seed(0)
    model = getattr(models, factory)(num_classes=2).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert tuple(out.shape) == (1, 2)


def test_gpt2_like_matches_the_hf_fixture_and_ties_lm_head() -> None:
    from safetensors import safe_open

    model = models.gpt2_like()
    sd = model.state_dict()
    assert model.lm_head.weight is model.transformer.wte.weight
    with safe_open(str(FIXTURES / "real" / "hf_gpt2_tiny" / "model.safetensors"), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert set(sd) - set(stored) == {"lm_head.weight"}
    assert all(tuple(sd[k].shape) == shape for k, shape in stored.items())
    assert tuple(model(torch.tensor([[1, 2, 3]])).shape) == (1, 3, 1000)


def test_tinynet_matches_the_real_compiled_fixture() -> None:
    sd = torch.load(FIXTURES / "real" / "tinynet_compiled.pth", map_location="cpu", weights_only=True)
    ours = models.tinynet(num_classes=6).state_dict()
    assert {k.removeprefix("_orig_mod."): tuple(v.shape) for k, v in sd.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }
