"""`ckpt inspect` on every real fixture: counts equal what torch itself reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, REAL, assert_one_line_error, run_cli
from safetensors.torch import load_file

from ckptsurgeon import inspect
from ckptsurgeon.formats import ReadOptions


def torch_truth(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj[key] if key else obj


@pytest.mark.parametrize(
    ("name", "key", "prefix"),
    [
        ("tinynet_compiled.pth", None, "_orig_mod."),
        ("lightning_tinynet.ckpt", "state_dict", "model."),
        ("hf_gpt2_tiny/model.safetensors", None, ""),
    ],
)
def test_real_fixtures_match_torch(name: str, key: str | None, prefix: str) -> None:
    path = REAL / name
    truth = torch_truth(path, key)
    report = inspect(path)
    assert report.weights.key == (key or "")
    assert report.tensor_count == len(truth)
    assert report.element_count == sum(t.numel() for t in truth.values())
    assert report.tensor_bytes == sum(t.numel() * t.element_size() for t in truth.values())
    assert report.wrapper_prefix == prefix
    for tensor_name, record in report.weights.tensors.items():
        tensor = truth[tensor_name]
        assert record.dtype == str(tensor.dtype).removeprefix("torch.")
        assert record.shape == tuple(tensor.shape)


def test_parameter_count_excludes_batchnorm_statistics() -> None:
    report = inspect(REAL / "tinynet_compiled.pth")
    # Conv2d(3,16,3)+BN(16)+Conv2d(16,32,3)+BN(32)+Linear(32,6), parameters only
    assert report.parameter_count == (16 * 27 + 16) + 32 + (32 * 16 * 9 + 32) + 64 + (32 * 6 + 6)
    assert report.devices == ["cuda:0"]


def test_lightning_entries_are_sized() -> None:
    report = inspect(REAL / "lightning_tinynet.ckpt")
    entries = {e.key: e for e in report.entries}
    assert entries["state_dict"].kind == "weights"
    assert entries["optimizer_states"].kind == "optimizer"
    assert entries["optimizer_states"].tensor_count > 0
    assert entries["epoch"].kind == "value" and entries["epoch"].summary == "1"
    assert entries["hyper_parameters"].kind == "value"


def test_table_output(cli) -> None:
    result = run_cli("inspect", REAL / "tinynet_compiled.pth")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("file") and lines[0].endswith("tinynet_compiled.pth")
    assert "format       torch.save zip archive" in lines
    assert "prefix       _orig_mod.  (every key starts with it)" in lines
    assert "saved on     cuda:0  (opens on CPU)" in lines
    assert any(line.startswith("_orig_mod.features.0.weight") and "[16, 3, 3, 3]" in line for line in lines)
    assert result.stderr == ""


MARKDOWN_SUMMARY = """\
| field       | value                                            |
|-------------|--------------------------------------------------|
| file        | fixtures/real/tinynet_compiled.pth               |
| format      | torch.save zip archive                           |
| file size   | 27.7 KiB                                         |
| tensors     | 16                                               |
| parameters  | 5,382  (5,480 with BatchNorm running statistics) |
| tensor data | 21.4 KiB                                         |
| dtypes      | float32 21.4 KiB (14), int64 16 B (2)            |
| prefix      | _orig_mod.  (every key starts with it)           |
| saved on    | cuda:0  (opens on CPU)                           |

| name                                     | dtype   | shape          | size     |
|------------------------------------------|---------|----------------|----------|
| _orig_mod.features.0.weight              | float32 | [16, 3, 3, 3]  | 1.7 KiB  |
"""


def test_markdown_summary_is_a_table_with_a_header(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(FIXTURES.parent)
    result = run_cli("inspect", "fixtures/real/tinynet_compiled.pth", "--format", "markdown")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(MARKDOWN_SUMMARY)


def test_markdown_fields_escape_pipes() -> None:
    from ckptsurgeon.core.report import render_fields

    text = render_fields([("metadata", "note=a|b")], "markdown")
    assert text == "| field    | value     |\n|----------|-----------|\n| metadata | note=a\\|b |"


def test_json_shape(cli) -> None:
    result = run_cli("inspect", REAL / "lightning_tinynet.ckpt", "--format", "json", "--hash")
    data = json.loads(result.stdout)
    assert data["format"] == "torch-zip"
    assert data["weights_key"] == "state_dict"
    assert data["summary"]["tensor_count"] == 16
    assert data["summary"]["wrapper_prefix"] == "model."
    first = data["tensors"][0]
    assert first == {
        "name": "model.features.0.weight",
        "dtype": "float32",
        "shape": [16, 3, 3, 3],
        "nbytes": 1728,
    }
    assert len(data["sha256"]) == 64
    assert {e["key"] for e in data["entries"]} >= {"state_dict", "optimizer_states", "epoch"}


def test_grouped_rows_and_all(tmp_path: Path) -> None:
    state = {f"layers.{i}.attn.{p}.weight": torch.zeros(4, 4) for i in range(32) for p in "qk"}
    torch.save(state, tmp_path / "m.pth")
    grouped = run_cli("inspect", tmp_path / "m.pth").stdout
    assert "layers.{0..31}.attn.q.weight  float32  [4, 4]   32 × 64 B" in grouped.splitlines()
    every = run_cli("inspect", tmp_path / "m.pth", "--all").stdout
    assert "layers.31.attn.q.weight" in every


def test_key_option(cli) -> None:
    result = run_cli("inspect", REAL / "lightning_tinynet.ckpt", "--key", "optimizer_states.0.state.0")
    assert result.exit_code == 0, result.stderr
    assert "chosen with --key" in result.stdout
    bad = run_cli("inspect", REAL / "lightning_tinynet.ckpt", "--key", "nope")
    assert_one_line_error(bad, "no entry 'nope'", "state_dict")


def test_story_fixtures_if_present() -> None:
    path = FIXTURES / "vgg_1000.pth"
    if not path.exists():
        pytest.skip("story fixtures not generated yet")
    report = inspect(path)
    assert report.tensor_count == 38


@pytest.mark.parametrize("args", [("missing.pth",), (".",)])
def test_errors_are_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = run_cli("inspect", *(str(tmp_path / a) for a in args))
    assert_one_line_error(result)


def test_sharded_folder_and_index(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a.weight": torch.ones(2, 2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b.weight": torch.ones(3)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {
        "metadata": {"total_size": 28},
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for target in (tmp_path, tmp_path / "model.safetensors.index.json"):
        report = inspect(target)
        assert report.tensor_count == 2 and report.element_count == 7
        assert len(report.files) == 2


def test_legacy_file(tmp_path: Path) -> None:
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(3)}
    torch.save(state, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    report = inspect(tmp_path / "old.pth")
    assert report.format == "torch-legacy"
    assert {n: r.shape for n, r in report.weights.tensors.items()} == {"w": (2, 3), "n": ()}
    assert torch.equal(report.weights.tensors["w"].to_torch(), state["w"])


def test_inspect_reads_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save({"w": torch.zeros(1000, 1000)}, tmp_path / "m.pth")
    from ckptsurgeon.core import record

    def refuse(*_args: object, **_kwargs: object) -> bytes:
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(record, "pread_exact", refuse)
    report = inspect(tmp_path / "m.pth", options=ReadOptions())
    assert report.tensor_bytes == 4_000_000


@pytest.mark.parametrize(
    ("path", "said"),
    [
        (FIXTURES / "vgg_1000.pth", "CRC-32 of all"),
        (REAL / "hf_gpt2_tiny" / "model.safetensors", "byte spans"),
    ],
)
def test_check_says_what_it_checked(path: Path, said: str) -> None:
    result = run_cli("inspect", path, "--check")
    assert result.exit_code == 0, result.stderr
    assert said in result.stdout.splitlines()[-1]
    assert said not in run_cli("inspect", path).stdout


def test_a_huge_int_beside_the_weights_is_described_not_printed(tmp_path: Path) -> None:
    """repr() of an int over 4300 digits raises in Python 3.11+: inspect describes it instead."""
    path = tmp_path / "big_int.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 1 << 200_000}, path)
    for args in ([], ["--format", "json"]):
        result = run_cli("inspect", path, *args)
        assert result.exit_code == 0, result.stderr
        assert "int of 200,001 bits" in result.stdout
