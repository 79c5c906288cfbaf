"""``ckpt adapt`` and ``ckpt strip-head`` on the story fixtures: the outputs load, verified with torch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, assert_one_line_error, run_cli, sha256

MODELS = FIXTURES / "models.py"
VGG_TARGET = f"torch.nn.DataParallel({MODELS}:vgg_like(num_classes=2))"
RESNET_TARGET = f"{MODELS}:resnet_like(num_classes=2)"
XCEPTION_TARGET = f"{MODELS}:xception_like(num_classes=2)"

STORIES = [
    (
        "vgg_1000.pth",
        VGG_TARGET,
        "add prefix 'module.'",
        ["module.classifier.6.weight", "module.classifier.6.bias"],
    ),
    ("resnet_dp_6.pth", RESNET_TARGET, "strip prefix 'module.'", ["fc.weight", "fc.bias"]),
    ("xception_dp_6.pth", XCEPTION_TARGET, "strip prefix 'module.'", ["fc.weight", "fc.bias"]),
]


def _models():
    spec = importlib.util.spec_from_file_location("story_models", MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _target(name: str) -> torch.nn.Module:
    models = _models()
    if name.startswith("vgg"):
        return torch.nn.DataParallel(models.vgg_like(num_classes=2))
    if name.startswith("resnet"):
        return models.resnet_like(num_classes=2)
    return models.xception_like(num_classes=2)


def _load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.contiguous().reshape(-1).view(torch.uint8).equal(b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize(("fixture", "target", "transform", "head"), STORIES)
def test_story_fixture_adapts_and_loads(
    tmp_path: Path, fixture: str, target: str, transform: str, head: list[str], suffix: str
) -> None:
    src = FIXTURES / fixture
    before = sha256(src)
    out = tmp_path / f"adapted{suffix}"
    result = run_cli("adapt", src, target, "-o", out, "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    report = doc["report"]
    assert report["transform"] == transform
    assert sorted(report["missing"]) == sorted(head)
    assert report["unused"] == []
    assert doc["output"]["verified"] is True

    model = _target(fixture)
    state = _load(out)
    loaded = model.load_state_dict(state, strict=False)
    assert sorted(loaded.missing_keys) == sorted(report["missing"])
    assert loaded.unexpected_keys == []
    assert len(state) == report["summary"]["loaded"]

    original = torch.load(src, map_location="cpu", weights_only=True)
    renames = {e["from"]: e["to"] for e in doc["plan"]["renamed"]}
    for old, tensor in original.items():
        new = renames.get(old, old)
        if old in {d["name"] for d in doc["plan"]["dropped"]}:
            assert new not in state
            continue
        assert _bit_equal(state[new], tensor), new
        assert _bit_equal(model.state_dict()[new], tensor), new
    assert sha256(src) == before


def test_adapt_table_report_and_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "r.pth"
    result = run_cli("adapt", FIXTURES / "resnet_dp_6.pth", RESNET_TARGET, "-o", out, "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert not out.exists()
    assert (
        "120 of 122 target tensors load (98.3%) with load_state_dict(strict=False); nothing unexpected."
        in result.stdout
    )
    assert "Key transform: strip prefix 'module.'." in result.stdout
    assert "fc.{bias,weight}  missing   keeps the target's own initialisation" in result.stdout
    assert result.stdout.endswith("Dry run: nothing was written.\n")


def test_adapt_needs_an_output() -> None:
    result = run_cli("adapt", FIXTURES / "resnet_dp_6.pth", RESNET_TARGET)
    assert_one_line_error(result, "no output: name it with -o OUT")


def test_adapt_bad_target_is_one_line(tmp_path: Path) -> None:
    result = run_cli("adapt", FIXTURES / "resnet_dp_6.pth", "nope.py:build()", "-o", tmp_path / "x.pth")
    assert_one_line_error(result)
    assert not (tmp_path / "x.pth").exists()


def test_strip_head_with_target_drops_exactly_the_misfits(tmp_path: Path) -> None:
    out = tmp_path / "s.pth"
    result = run_cli(
        "strip-head", FIXTURES / "resnet_dp_6.pth", "--target", RESNET_TARGET, "-o", out, "--format", "json"
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [d["name"] for d in doc["plan"]["dropped"]] == ["module.fc.weight", "module.fc.bias"]
    assert doc["plan"]["dropped"][0]["shape"] == [6, 32]
    assert doc["plan"]["renamed"] == []
    state = torch.load(out, weights_only=True)
    assert len(state) == 120 and all(k.startswith("module.") for k in state)


def test_strip_head_without_target_finds_the_head(tmp_path: Path) -> None:
    out = tmp_path / "v.pth"
    result = run_cli("strip-head", FIXTURES / "vgg_1000.pth", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "classifier.6.weight  float32  [1000, 64]  classifier head" in result.stdout
    assert "classifier.6.bias    float32  [1000]      classifier head" in result.stdout
    state = torch.load(out, weights_only=True)
    assert "classifier.6.weight" not in state and "classifier.3.weight" in state


def test_strip_head_named_and_refusals(tmp_path: Path) -> None:
    result = run_cli("strip-head", FIXTURES / "xception_dp_6.pth", "--head", "module.fc", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "module.fc.weight" in result.stdout and "Plan: " in result.stdout
    assert_one_line_error(
        run_cli("strip-head", FIXTURES / "vgg_1000.pth", "--head", "nope", "--dry-run"), "--head nope"
    )
    both = run_cli(
        "strip-head", FIXTURES / "vgg_1000.pth", "--head", "fc", "--target", RESNET_TARGET, "--dry-run"
    )
    assert_one_line_error(both, "not both")


def test_adapt_refuses_to_write_when_nothing_loads(tmp_path: Path) -> None:
    out = tmp_path / "a.pth"
    result = run_cli("adapt", FIXTURES / "vgg_1000.pth", RESNET_TARGET, "-o", out)
    assert_one_line_error(result, "nothing would load into", "(0 of 122 target tensors); nothing was written")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_adapt_dry_run_alarms_and_exits_1_when_nothing_loads(tmp_path: Path) -> None:
    result = run_cli("adapt", FIXTURES / "vgg_1000.pth", RESNET_TARGET, "--dry-run")
    assert result.exit_code == 1, result.stderr
    assert "0 of 122 target tensors load (0%)" in result.stdout
    assert result.stdout.endswith("Dry run: nothing was written.\n")
    warning = [line for line in result.stderr.splitlines() if line.startswith("ckpt: warning:")]
    assert len(warning) == 1 and "writing it would be refused" in warning[0]
    doc = json.loads(
        run_cli("adapt", FIXTURES / "vgg_1000.pth", RESNET_TARGET, "--dry-run", "--format", "json").stdout
    )
    assert doc["status"] == "refused"


def test_adapt_min_coverage(tmp_path: Path) -> None:
    out = tmp_path / "a.pth"
    src = FIXTURES / "resnet_dp_6.pth"
    result = run_cli("adapt", src, RESNET_TARGET, "-o", out, "--min-coverage", "99")
    assert_one_line_error(result, "only 120 of 122 target tensors would load", "below --min-coverage 99%")
    assert not out.exists()
    assert run_cli("adapt", src, RESNET_TARGET, "-o", out, "--min-coverage", "98").exit_code == 0
    assert out.exists()


def test_adapt_target_key(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    model = _models().resnet_like(num_classes=2)
    torch.save({"state_dict": model.state_dict(), "ema": {"x": torch.ones(1)}, "epoch": 3}, target)
    out = tmp_path / "a.safetensors"
    args = ("adapt", FIXTURES / "resnet_dp_6.pth", target, "-o", out, "--format", "json")
    result = run_cli(*args, "--target-key", "state_dict")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["report"]["summary"]["loaded"] == 120
    assert_one_line_error(run_cli(*args, "--target-key", "nope", "--force"), "no entry 'nope'")


OPTIMIZER_NOTE = (
    "ckpt: note: the output keeps 'optimizer_states': optimizer state that describes the old parameters "
    "(2 tensors dropped), so resuming training from it would fail; --weights-only leaves it out\n"
)


def test_strip_head_notes_stale_optimizer_state(tmp_path: Path) -> None:
    src = FIXTURES / "real" / "lightning_tinynet.ckpt"
    result = run_cli("strip-head", src, "-o", tmp_path / "o.ckpt")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "ckpt: weights from entry 'state_dict'\n" + OPTIMIZER_NOTE
    lean = run_cli("strip-head", src, "-o", tmp_path / "w.ckpt", "--weights-only")
    assert lean.exit_code == 0 and "optimizer state" not in lean.stderr


def test_adapt_notes_stale_optimizer_state(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 6))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    src = tmp_path / "ref.pth"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, src)
    target = tmp_path / "target.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).state_dict(), target)
    result = run_cli("adapt", src, target, "-o", tmp_path / "out.pth")
    assert result.exit_code == 0, result.stderr
    assert "ckpt: note: the output keeps 'optimizer': optimizer state" in result.stderr
    assert "(2 tensors dropped)" in result.stderr
