"""The library API of the write commands: ``ckptsurgeon.convert``, ``rename``, ``strip_head``, ``adapt``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, REAL, sha256

import ckptsurgeon
from ckptsurgeon.core.report import human_bytes
from ckptsurgeon.errors import LoadError, OutputError, SurgeryError
from ckptsurgeon.surgery.results import AdaptResult, SurgeryResult

RESNET_TARGET = f"{FIXTURES / 'models.py'}:resnet_like(num_classes=2)"


def small(tmp_path: Path) -> Path:
    path = tmp_path / "small.pth"
    torch.save({"module.conv.weight": torch.ones(4, 3), "module.fc.weight": torch.zeros(6, 4)}, path)
    return path


def test_public_names_resolve_even_after_the_pipeline_is_imported() -> None:
    import ckptsurgeon.surgery.pipeline

    for name in ckptsurgeon.__all__:
        assert getattr(ckptsurgeon, name) is not None, name
    assert all(callable(f) for f in (ckptsurgeon.convert, ckptsurgeon.rename, ckptsurgeon.adapt))
    assert callable(ckptsurgeon.strip_head)


def test_convert_writes_and_returns_what_was_written(tmp_path: Path) -> None:
    src = small(tmp_path)
    before = sha256(src)
    result = ckptsurgeon.convert(src, tmp_path / "out.safetensors")
    assert isinstance(result, SurgeryResult) and not result.dry_run
    assert result.output == tmp_path / "out.safetensors"
    assert result.written.format == "safetensors" and result.written.verified
    assert result.written.files == [tmp_path / "out.safetensors"]
    assert result.plan.is_identity and result.weights_key == ""
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "out.safetensors"))["module.fc.weight"].shape == (6, 4)
    assert sha256(src) == before
    doc = result.to_json()
    assert doc["status"] == "ok" and doc["output"]["tensors"] == 2 and doc["report"] is None
    assert json.loads(result.render("json")) == json.loads(json.dumps(doc))


def test_convert_dry_run_and_missing_output(tmp_path: Path) -> None:
    src = small(tmp_path)
    result = ckptsurgeon.convert(src, tmp_path / "x.pth", dry_run=True, dtype="bf16")
    assert result.dry_run and result.written is None and result.status == "dry-run"
    assert not (tmp_path / "x.pth").exists()
    with pytest.raises(OutputError, match="no output"):
        ckptsurgeon.convert(src)
    with pytest.raises(OutputError, match="cannot tell the format"):
        ckptsurgeon.convert(src, tmp_path / "x.onnx", dry_run=True)


def test_convert_cast_and_shards_as_keywords(tmp_path: Path) -> None:
    src = small(tmp_path)
    result = ckptsurgeon.convert(src, tmp_path / "shards", max_shard_size="20B", dtype="fp16")
    assert result.written.format == "sharded-safetensors" and result.written.cast == 2
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    assert any("got a shard of its own" in note for note in result.all_notes)


def test_rename_render_is_exact(tmp_path: Path) -> None:
    src = small(tmp_path)
    out = tmp_path / "r.pth"
    result = ckptsurgeon.rename(src, out, strip_prefix="module.", drop=["module.fc.*"])
    assert result.render() == (
        "Plan: 2 tensors: 1 renamed, 0 unchanged, 1 dropped (drop 'module.fc.*'; strip prefix 'module.')\n"
        "\n"
        "renamed             to\n"
        "------------------  -----------\n"
        "module.conv.weight  conv.weight\n"
        "\n"
        "dropped           dtype    shape    reason\n"
        "----------------  -------  -------  ------------------\n"
        "module.fc.weight  float32  [6, 4]   --drop module.fc.*\n"
        "\n"
        f"wrote {out} (pth, 1 tensor, {human_bytes(out.stat().st_size)}), verified bit for bit"
    )
    assert list(torch.load(out, weights_only=True)) == ["conv.weight"]


def test_rename_refusals(tmp_path: Path) -> None:
    src = small(tmp_path)
    with pytest.raises(SurgeryError, match="nothing to do"):
        ckptsurgeon.rename(src, tmp_path / "r.pth")
    with pytest.raises(SurgeryError, match="the plan drops every tensor"):
        ckptsurgeon.rename(src, tmp_path / "r.pth", drop="*")
    assert not (tmp_path / "r.pth").exists()


def test_strip_head_by_structure_and_by_target(tmp_path: Path) -> None:
    result = ckptsurgeon.strip_head(FIXTURES / "resnet_dp_6.pth", dry_run=True)
    assert result.plan.dropped_names == ["module.fc.weight", "module.fc.bias"]
    out = tmp_path / "s.safetensors"
    result = ckptsurgeon.strip_head(FIXTURES / "resnet_dp_6.pth", out, target=RESNET_TARGET)
    assert result.plan.dropped_names == ["module.fc.weight", "module.fc.bias"]
    assert result.written.tensors == 120 and out.is_file()
    with pytest.raises(SurgeryError, match="not both"):
        ckptsurgeon.strip_head(FIXTURES / "resnet_dp_6.pth", target=RESNET_TARGET, head="fc", dry_run=True)


def test_strip_head_target_that_fits_says_so(tmp_path: Path) -> None:
    src = small(tmp_path)
    result = ckptsurgeon.strip_head(src, target=str(src), dry_run=True)
    assert result.plan.dropped == [] and result.notes == ("every tensor fits the target; nothing to drop",)


def test_adapt_returns_plan_report_and_write(tmp_path: Path) -> None:
    out = tmp_path / "a.pth"
    result = ckptsurgeon.adapt(FIXTURES / "resnet_dp_6.pth", RESNET_TARGET, out)
    assert isinstance(result, AdaptResult) and not result.refused
    assert result.report.missing == ("fc.weight", "fc.bias")
    assert result.written.tensors == 120 and result.written.verified
    doc = result.to_json()
    assert doc["status"] == "ok" and doc["report"]["summary"]["loaded"] == 120
    assert "120 of 122 target tensors load (98.3%)" in result.render("markdown")
    models = _models()
    loaded = models.resnet_like(num_classes=2).load_state_dict(
        torch.load(out, weights_only=True), strict=False
    )
    assert sorted(loaded.missing_keys) == ["fc.bias", "fc.weight"] and loaded.unexpected_keys == []


def test_adapt_refuses_when_nothing_loads(tmp_path: Path) -> None:
    out = tmp_path / "a.pth"
    with pytest.raises(LoadError, match=r"nothing would load into .* \(0 of 122 target tensors\); nothing"):
        ckptsurgeon.adapt(FIXTURES / "vgg_1000.pth", RESNET_TARGET, out)
    assert not out.exists()
    dry = ckptsurgeon.adapt(FIXTURES / "vgg_1000.pth", RESNET_TARGET, out, dry_run=True)
    assert dry.refused and dry.status == "refused" and dry.to_json()["status"] == "refused"
    assert "writing it would be refused" in dry.alarm  # type: ignore[operator]
    assert not out.exists()


def test_adapt_min_coverage(tmp_path: Path) -> None:
    out = tmp_path / "a.pth"
    with pytest.raises(LoadError, match=r"only 120 of 122 .* \(98.3%\), below --min-coverage 99%"):
        ckptsurgeon.adapt(FIXTURES / "resnet_dp_6.pth", RESNET_TARGET, out, min_coverage=99)
    assert not out.exists()
    assert ckptsurgeon.adapt(FIXTURES / "resnet_dp_6.pth", RESNET_TARGET, out, min_coverage=98).written


def test_adapt_target_key_picks_the_nested_entry(tmp_path: Path) -> None:
    src = small(tmp_path)
    target = tmp_path / "target.pth"
    torch.save({"model": {"conv.weight": torch.ones(4, 3)}, "epoch": 1}, target)
    result = ckptsurgeon.adapt(src, str(target), target_key="model", dry_run=True)
    assert result.plan.mapping == {"module.conv.weight": "conv.weight", "module.fc.weight": None}
    assert result.report.loaded == ("conv.weight",)


def test_optimizer_note_when_tensors_are_dropped(tmp_path: Path) -> None:
    src = REAL / "lightning_tinynet.ckpt"
    kept = ckptsurgeon.strip_head(src, tmp_path / "o.ckpt")
    assert kept.notes == (
        "the output keeps 'optimizer_states': optimizer state that describes the old parameters "
        "(2 tensors dropped), so resuming training from it would fail; --weights-only leaves it out",
    )
    assert ckptsurgeon.strip_head(src, tmp_path / "w.ckpt", weights_only=True).notes == ()
    assert ckptsurgeon.strip_head(src, tmp_path / "w.safetensors").notes == ()
    assert ckptsurgeon.convert(src, tmp_path / "c.ckpt").notes == ()  # nothing dropped


def test_tied_tensors_note_on_safetensors(tmp_path: Path) -> None:
    emb = torch.randn(5, 2)
    src = tmp_path / "tied.pth"
    torch.save({"wte.weight": emb, "lm_head.weight": emb}, src)
    st = ckptsurgeon.convert(src, tmp_path / "t.safetensors")
    assert st.written.notes == [
        "1 tied tensor written once, its alias recorded in the metadata ('ckptsurgeon.aliases', "
        "as safetensors' save_model does): lm_head.weight -> wte.weight; ckpt reads aliases back, "
        "plain safetensors.load_file returns only the kept name"
    ]
    assert ckptsurgeon.convert(src, tmp_path / "t.pth").written.notes == []


def _models():
    import importlib.util

    spec = importlib.util.spec_from_file_location("api_models", FIXTURES / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module
