"""Resolving a diff target: checkpoints, inspect JSON, and architectures built on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, REAL

from ckptsurgeon.diffing.target import resolve_target, target_from_module
from ckptsurgeon.errors import TargetError

MODELS = FIXTURES / "models.py"


def test_file_factory_is_built_on_the_meta_device() -> None:
    target = resolve_target(f"{MODELS}:vgg_like(num_classes=2)")
    assert target.kind == "architecture"
    assert len(target.tensors) == 38
    assert target.tensors["classifier.6.weight"].shape == (2, 64)
    assert not any(rec.has_data for rec in target.tensors.values())  # meta: shapes only


def test_nested_calls_compose_wrappers() -> None:
    target = resolve_target(f"torch.nn.DataParallel({MODELS}:vgg_like(num_classes=2))")
    assert all(name.startswith("module.") for name in target.tensors)
    assert target.tensors["module.classifier.6.bias"].shape == (2,)
    assert target.description == f"torch.nn.DataParallel({MODELS}:vgg_like(num_classes=2))"


def test_relative_file_path_and_positional_literal_args(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FIXTURES.parent)
    target = resolve_target("fixtures/models.py:resnet_like(2)")
    assert target.tensors["fc.weight"].shape == (2, 32)
    assert "bn1.running_mean" in target.buffers and "conv1.weight" not in target.buffers
    assert target.modules["fc"] == "Linear"


def test_huge_architecture_costs_no_memory() -> None:
    target = resolve_target("torch.nn.Linear(200000, 100000)")  # 80 GB if it were allocated
    assert target.tensors["weight"].shape == (100000, 200000)


def test_tied_parameters_are_recognised() -> None:
    target = resolve_target(f"{MODELS}:gpt2_like()")
    assert target.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert len(target.tensors) == 29


def test_target_from_live_module() -> None:
    target = target_from_module(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
    assert target.shapes() == {
        "0.weight": (2, 3),
        "0.bias": (2,),
        "1.weight": (2,),
        "1.bias": (2,),
        "1.running_mean": (2,),
        "1.running_var": (2,),
        "1.num_batches_tracked": (),
    }
    assert target.buffers == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}


def test_inspect_json_target(tmp_path: Path) -> None:
    doc = {
        "format": "torch-zip",
        "tensors": [
            {"name": "fc.weight", "dtype": "float32", "shape": [2, 4], "nbytes": 32},
            {"name": "fc.bias", "dtype": "float16", "shape": [2], "nbytes": 4},
        ],
    }
    path = tmp_path / "model.json"
    path.write_text(json.dumps(doc))
    target = resolve_target(str(path))
    assert target.kind == "inspect-json"
    assert target.shapes() == {"fc.weight": (2, 4), "fc.bias": (2,)}
    assert target.tensors["fc.bias"].dtype == "float16"


def test_malformed_inspect_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"tensors": [{"name": "x"}]}))
    with pytest.raises(TargetError, match=r"tensors\[0\] lacks"):
        resolve_target(str(path))


def test_checkpoint_target_safetensors_folder() -> None:
    target = resolve_target(str(REAL / "hf_gpt2_tiny"))
    assert target.kind == "checkpoint"
    assert len(target.tensors) == 28
    assert target.tensors["transformer.wte.weight"].shape == (1000, 64)


def test_checkpoint_target_records_shared_storage_as_tied(tmp_path: Path) -> None:
    pytest.importorskip("ckptsurgeon.formats.torchzip")
    weight = torch.zeros(4, 3)
    path = tmp_path / "tied.pth"
    torch.save({"emb.weight": weight, "head.weight": weight, "head.bias": torch.zeros(4)}, path)
    target = resolve_target(str(path))
    assert target.tied == {"head.weight": "emb.weight"}


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (f"{MODELS}:vgg_like(pretrained=True)", "pretrained weights"),
        ("torch.nn.Linear(2, 2, weights='IMAGENET1K_V1')", "pretrained weights"),
        ("transformers.AutoModel.from_pretrained('gpt2')", "from_pretrained loads weights"),
        ("os.system('touch marker')", "not a model factory"),
        ("__import__('os').system('x')", "only calls of dotted names"),
        ("exec('x')", "needs its module"),
        ("torch.nn.Linear(2, x)", "neither a Python literal nor a call"),
        ("torch.nn.Linear(*[2, 2])", "`*` arguments"),
        ("torch.nn.Linear(**{'in_features': 2})", "`**` arguments"),
        ("torch.nn.Linear(2, 2)[0]", "must be a call"),
        ("torch.nn.Linear(2,", "not a path and not a call"),
        ("torch.nn.NoSuchLayer(2)", "does not exist"),
        ("torch.nn.Linear('a', 2)", "building the target failed: TypeError"),
        ("torch.zeros(2)", "not a torch.nn.Module"),
        ("nonexistent_pkg_ckpt.models.build()", "install nonexistent_pkg_ckpt"),
        ("missing/models.py:build()", "no such Python file"),
        ("no_such_checkpoint.pth", "no such file or folder"),
        ("", "the target is empty"),
    ],
)
def test_bad_targets_give_one_line_errors(spec: str, fragment: str) -> None:
    with pytest.raises(TargetError) as info:
        resolve_target(spec)
    assert fragment in info.value.message
    assert "\n" not in info.value.message


def test_missing_optional_package_says_what_to_install() -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(TargetError, match="install torchvision"):
            resolve_target("torchvision.models.resnet50(num_classes=2)")
    else:
        pytest.skip("torchvision is installed")


def test_network_access_fails_fast(tmp_path: Path) -> None:
    code = tmp_path / "net_models.py"
    code.write_text(
        "import urllib.request\n"
        "def build():\n"
        "    urllib.request.urlopen('http://weights.invalid/model.pth', timeout=30)\n"
    )
    with pytest.raises(TargetError, match="tried to reach the network"):
        resolve_target(f"{code}:build()")
    import socket

    assert socket.getaddrinfo.__module__ == "socket"  # the guard is removed afterwards


def test_user_file_that_raises_on_import(tmp_path: Path) -> None:
    code = tmp_path / "broken.py"
    code.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(TargetError, match=r"running .*broken\.py failed: RuntimeError: boom"):
        resolve_target(f"{code}:build()")


def test_torchvision_target_when_installed() -> None:
    pytest.importorskip("torchvision")
    target = resolve_target("torch.nn.DataParallel(torchvision.models.vgg19(num_classes=2))")
    assert len(target.tensors) == 38
    assert target.tensors["module.classifier.6.weight"].shape == (2, 4096)


def test_target_key_picks_the_entry_of_a_nested_target() -> None:
    from ckptsurgeon.diffing.target import resolve_target

    target = resolve_target("fixtures/real/lightning_tinynet.ckpt", key="optimizer_states.0.state.0")
    assert set(target.tensors) == {"step", "exp_avg", "exp_avg_sq"}
    assert target.description.endswith("[optimizer_states.0.state.0]")


def test_a_json_target_must_be_inspect_output(tmp_path: Path) -> None:
    from ckptsurgeon.diffing.target import resolve_target
    from ckptsurgeon.errors import TargetError

    (tmp_path / "t.json").write_text('{"a": 1}')
    with pytest.raises(TargetError, match="ckpt inspect --format json"):
        resolve_target(str(tmp_path / "t.json"))
