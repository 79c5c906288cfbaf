"""`ckpt diff --values` / `compare_values`: every number checked against torch, computed here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli

import ckptsurgeon
from ckptsurgeon.diffing.values import ValueDiff


def expected(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """The reference numbers: float64, A the reference."""
    a64, b64 = a.to(torch.float64).flatten(), b.to(torch.float64).flatten()
    return {
        "max_abs": float((a64 - b64).abs().max()),
        "rel_l2": float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(a64)),
        "cosine": float(torch.nn.functional.cosine_similarity(a64, b64, dim=0)),
    }


def check_numbers(result: ValueDiff, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    entry = next(t for t in result.to_json()["tensors"] if t["name"] == name)
    want = expected(a, b)
    for measure, value in want.items():
        assert entry[measure] == pytest.approx(value, rel=1e-9, abs=1e-15), (name, measure)
    assert entry["bit_equal"] is False


def save(tmp_path: Path, name: str, state: dict[str, torch.Tensor]) -> str:
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    a = {
        "frozen.weight": torch.randn(8, 4, generator=g),
        "frozen.bias": torch.randn(8, generator=g),
        "layers.0.weight": torch.randn(16, 8, generator=g),
        "layers.1.weight": torch.randn(16, 8, generator=g),
        "head.weight": torch.randn(3, 16, generator=g),
        "extra.weight": torch.randn(2, generator=g),
    }
    b = {k: v.clone() for k, v in a.items() if k != "extra.weight"}
    b["layers.0.weight"] += 1e-3 * torch.randn(16, 8, generator=g)
    b["layers.1.weight"] += 1e-1 * torch.randn(16, 8, generator=g)
    b["head.weight"] = torch.randn(5, 16, generator=g)  # another class count: not compared
    b["new.weight"] = torch.zeros(2)
    return save(tmp_path, "a.pth", a), save(tmp_path, "b.pth", b), a, b


def test_float32_numbers_frozen_layer_and_lists(pair) -> None:
    path_a, path_b, a, b = pair
    result = ckptsurgeon.compare_values(path_a, path_b)
    for name in ("layers.0.weight", "layers.1.weight"):
        check_numbers(result, name, a[name], b[name])
    data = result.to_json()
    statuses = {t["name"]: t["status"] for t in data["tensors"]}
    assert statuses == {
        "layers.1.weight": "changed",
        "layers.0.weight": "changed",
        "frozen.weight": "equal",
        "frozen.bias": "equal",
    }
    # sorted by change: the larger relative L2 first, then the unchanged
    assert [t["name"] for t in data["tensors"]][:2] == ["layers.1.weight", "layers.0.weight"]
    frozen = next(t for t in data["tensors"] if t["name"] == "frozen.weight")
    assert frozen["bit_equal"] and frozen["max_abs"] == 0 and frozen["rel_l2"] == 0
    assert frozen["cosine"] == pytest.approx(1.0)
    assert data["only_in_a"] == ["extra.weight"]
    assert data["only_in_b"] == ["new.weight"]
    assert data["shape_mismatched"] == [
        {"name": "head.weight", "b_name": "head.weight", "a_shape": [3, 16], "b_shape": [5, 16]}
    ]
    assert data["summary"]["compared"] == 4 and data["summary"]["equal"] == 2
    assert result.passes() is False
    text = result.render()
    assert "Unchanged, bit for bit (2 tensors):\n  frozen.{bias,weight}" in text
    assert "Only in A, not compared (1 tensor):\n  extra.weight" in text
    assert "Shape mismatched, not compared (1 tensor): head.weight [3, 16] → [5, 16]" in text
    rows = [line for line in text.splitlines() if line.startswith("changed")]
    assert len(rows) == 1 and "layers.{0,1}.weight" in rows[0]  # collapsed, worst member shown
    worst = expected(a["layers.1.weight"], b["layers.1.weight"])
    assert f"{worst['rel_l2']:.4g}" in rows[0]


def test_half_precisions_compare_in_float64(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 16, generator=g)
    h = torch.randn(64, generator=g).to(torch.float16)
    a = {"w": w, "h": h, "same": torch.tensor([1.0, 0.5, -2.0])}
    b = {"w": w.to(torch.bfloat16), "h": (h.float() * 1.01).to(torch.float16), "same": a["same"].half()}
    result = ckptsurgeon.compare_values(save(tmp_path, "a.pth", a), save(tmp_path, "b.pth", b))
    check_numbers(result, "w", w, b["w"])
    check_numbers(result, "h", h, b["h"])
    data = {t["name"]: t for t in result.to_json()["tensors"]}
    assert (data["w"]["a_dtype"], data["w"]["b_dtype"]) == ("float32", "bfloat16")
    assert data["same"]["status"] == "same-values" and data["same"]["bit_equal"] is False
    assert result.passes() is False  # another dtype is never bit for bit
    atol = max(t["max_abs"] for t in data.values())
    loose = ckptsurgeon.compare_values(save(tmp_path, "a.pth", a), save(tmp_path, "b.pth", b), atol=atol)
    assert loose.passes()
    allclose = all(torch.allclose(b[k].double(), a[k].double(), rtol=0, atol=atol * 0.99) for k in a)
    tight = ckptsurgeon.compare_values(
        save(tmp_path, "a.pth", a), save(tmp_path, "b.pth", b), atol=atol * 0.99
    )
    assert tight.passes() is allclose is False


def test_nan_is_reported_never_equal(tmp_path: Path) -> None:
    w = torch.tensor([1.0, float("nan"), 3.0])
    a = save(tmp_path, "a.pth", {"w": w, "v": torch.ones(2)})
    b = save(tmp_path, "b.pth", {"w": w.clone(), "v": torch.ones(2)})
    result = ckptsurgeon.compare_values(a, b, atol=1e9)
    entry = next(t for t in result.to_json()["tensors"] if t["name"] == "w")
    assert entry["status"] == "nan" and entry["bit_equal"] is False and entry["within"] is False
    assert entry["nan_a"] == 1 and entry["nan_b"] == 1 and entry["max_abs"] is None
    assert result.tensors[0].name == "w"  # NaN sorts first
    assert not result.passes()
    cli = run_cli("diff", "--values", a, b)
    assert cli.exit_code == 1
    assert "nan (in A and B)" in cli.stdout and "equal in value only" not in cli.stdout
    assert "1 with NaN" in cli.stdout


def test_zero_reference_rel_l2(tmp_path: Path) -> None:
    a = save(tmp_path, "a.pth", {"z": torch.zeros(3), "zz": torch.zeros(2)})
    b = save(tmp_path, "b.pth", {"z": torch.tensor([0.0, 2.0, 0.0]), "zz": torch.zeros(2)})
    result = ckptsurgeon.compare_values(a, b)
    z = next(t for t in result.tensors if t.name == "z")
    assert math.isinf(z.rel_l2) and z.cosine is None and z.max_abs == 2.0
    zz = next(t for t in result.tensors if t.name == "zz")
    assert zz.rel_l2 == 0.0 and zz.status == "equal"
    assert next(t for t in result.to_json()["tensors"] if t["name"] == "z")["rel_l2"] is None


def test_prefix_renamed_pair(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    a = {"conv.weight": torch.randn(4, 3, generator=g), "fc.weight": torch.randn(2, 4, generator=g)}
    b = {"module." + k: v.clone() for k, v in a.items()}
    b["module.fc.weight"] *= 2
    result = ckptsurgeon.compare_values(save(tmp_path, "a.pth", a), save(tmp_path, "b.pth", b))
    data = result.to_json()
    assert data["transform"] == {"strip": "", "add": "module."}
    assert data["only_in_a"] == [] and data["only_in_b"] == []
    fc = data["tensors"][0]
    assert (fc["name"], fc["b_name"]) == ("fc.weight", "module.fc.weight")
    check_numbers(result, "fc.weight", a["fc.weight"], b["module.fc.weight"])
    assert data["tensors"][1]["status"] == "equal"
    # and the other way round: B's wrapper stripped
    back = ckptsurgeon.compare_values(save(tmp_path, "b2.pth", b), save(tmp_path, "a2.pth", a))
    assert back.transform.strip == "module." and len(back.tensors) == 2


def test_state_dicts_directly() -> None:
    a = {"w": torch.tensor([3.0, 4.0])}
    result = ckptsurgeon.compare_values(a, {"w": torch.tensor([3.0, 5.0])}, rtol=0.3)
    assert result.tensors[0].max_abs == 1.0 and result.tensors[0].rel_l2 == pytest.approx(0.2)
    assert result.passes()


def test_cli_exit_codes(pair, tmp_path: Path) -> None:
    path_a, _path_b, a, _b = pair
    same = run_cli("diff", "--values", path_a, path_a)
    assert same.exit_code == 0 and "PASS: every tensor equal bit for bit" in same.stdout
    b = {k: v + 1e-4 for k, v in a.items()}
    path_b = save(tmp_path, "near.pth", b)
    assert run_cli("diff", "--values", path_a, path_b).exit_code == 1
    assert run_cli("diff", "--values", path_a, path_b, "--atol", "1e-3").exit_code == 0
    assert run_cli("diff", "--values", path_a, path_b, "--atol", "1e-6").exit_code == 1
    assert run_cli("diff", "--values", path_a, path_b, "--rtol", "1e-6").exit_code == 1
    out = run_cli("diff", "--values", path_a, path_b, "--atol", "1e-3", "--format", "json")
    data = json.loads(out.stdout)
    assert data["passes"] is True and data["tolerance"] == {"atol": 1e-3, "rtol": 0.0}
    assert all(t["within"] for t in data["tensors"])
    verbose = run_cli("diff", "--values", path_a, path_b, "-v")
    assert "layers.0.weight" in verbose.stdout and "layers.{0,1}" not in verbose.stdout
    assert_one_line_error(run_cli("diff", "--values", path_a, str(tmp_path / "missing.pth")))
    assert run_cli("diff", path_a, path_b, "--atol", "1").exit_code == 2
    assert run_cli("diff", "--values", path_a, path_b, "--min-coverage", "50").exit_code == 2


def test_pairs_are_read_a_piece_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from safetensors.torch import save_file

    from ckptsurgeon.core.record import TensorRecord
    from ckptsurgeon.diffing import values

    monkeypatch.setattr(values, "PIECE", 1000)  # many pieces, and a short last one
    g = torch.Generator().manual_seed(3)
    a = {"w": torch.randn(70, 111, generator=g), "h": torch.randn(4001, generator=g).bfloat16()}
    b = {"w": a["w"] + 1e-2 * torch.randn(70, 111, generator=g), "h": a["h"].clone()}
    b["h"][4000] = float("nan")
    path_a = save(tmp_path, "a.pth", a)
    path_b = str(tmp_path / "b.safetensors")
    save_file(b, path_b)

    def whole(self: TensorRecord) -> torch.Tensor:
        raise AssertionError(f"{self.name} read whole")

    monkeypatch.setattr(TensorRecord, "to_torch", whole)
    result = ckptsurgeon.compare_values(path_a, path_b, progress=True)
    monkeypatch.undo()
    check_numbers(result, "w", a["w"], b["w"])
    h = next(t for t in result.to_json()["tensors"] if t["name"] == "h")
    assert h["status"] == "nan" and h["nan_b"] == 1 and h["bit_equal"] is False
    assert "comparing values" in capsys.readouterr().err  # the bar, on stderr


def test_values_against_an_architecture_is_a_usage_error() -> None:
    from conftest import FIXTURES

    result = run_cli("diff", "--values", FIXTURES / "vit_28.pth", f"{FIXTURES / 'models.py'}:tv_vit_like()")
    assert result.exit_code == 2 and result.exception is None
    assert "is an architecture (it holds no values)" in result.stderr
