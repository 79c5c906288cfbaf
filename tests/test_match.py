"""The diff engine against torch's own truth: load_state_dict on real modules, counts compared."""

from __future__ import annotations

import importlib.util
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, REAL

from ckptsurgeon.core.record import TensorRecord
from ckptsurgeon.core.report import percent
from ckptsurgeon.diffing.compare import compare
from ckptsurgeon.diffing.diagnosis import KeyTransform, best_transform, candidate_prefixes, diagnose
from ckptsurgeon.diffing.result import DiffResult, diff

_spec = importlib.util.spec_from_file_location("story_models", FIXTURES / "models.py")
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)
MODELS = FIXTURES / "models.py"
VGG_TARGET = f"torch.nn.DataParallel({MODELS}:vgg_like(num_classes=2))"


def torch_truth(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    """What load_state_dict reports, with the model's own version metadata attached so that
    BatchNorm's num_batches_tracked quirk does not hide missing keys."""
    sd = OrderedDict(state)
    sd._metadata = model.state_dict()._metadata  # type: ignore[attr-defined]
    mismatched: set[str] = set()
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        mismatched = set(re.findall(r"size mismatch for (\S+?):", str(exc)))
        for name in mismatched:
            del sd[name]
        result = model.load_state_dict(sd, strict=False)
    missing = set(result.missing_keys) - mismatched
    matched = set(model.state_dict()) - missing - mismatched
    return {
        "matched": matched,
        "missing": missing,
        "unexpected": set(result.unexpected_keys),
        "mismatched": mismatched,
    }


def assert_matches_truth(
    result: DiffResult, truth: dict[str, set[str]], tied: set[str] = frozenset()
) -> None:
    assert set(result.matched) == truth["matched"] - tied
    assert set(result.missing) | tied == truth["missing"]
    assert set(result.unexpected) == truth["unexpected"]
    assert {m.name for m in result.shape_mismatched} == truth["mismatched"]


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def renamed(state: dict[str, torch.Tensor], transform: KeyTransform) -> dict[str, torch.Tensor]:
    return {transform.rename(k): v for k, v in state.items()}


# -- the story ------------------------------------------------------------------------------------
def test_vgg_story_zero_of_38_then_36_with_module_prefix() -> None:
    result = diff(FIXTURES / "vgg_1000.pth", VGG_TARGET)
    target = torch.nn.DataParallel(models.vgg_like(num_classes=2))
    state = load(FIXTURES / "vgg_1000.pth")
    assert_matches_truth(result, torch_truth(target, state))
    assert result.headline == "0 of 38 target tensors would load (0%)"
    assert not result.ok
    d = result.diagnosis
    assert d.transform == KeyTransform(add="module.")
    after = torch_truth(target, renamed(state, d.transform))
    assert len(after["matched"]) == d.loads_after == 36
    assert after["mismatched"] == {"module.classifier.6.weight", "module.classifier.6.bias"}
    assert d.drop == ("classifier.6.weight", "classifier.6.bias")
    assert d.head is not None and (d.head.source_classes, d.head.target_classes) == (1000, 2)
    assert result.explanation.message == (
        "As saved: 0 of 38 would load. The target's keys start with `module.` (DataParallel) and the "
        "file's don't: adding it loads 36 of 38. The other 2 are the classifier head: classifier.6.weight "
        "[1000, 64] → [2, 64], classifier.6.bias [1000] → [2]. It is the output layer for 1000 classes and "
        "the target has 2: expected when fine-tuning on other classes, not a bug; drop it and the new head "
        "trains from scratch. If the target's 2 classes are 2 of the file's 1000: ckpt adapt --keep-classes "
        "I,J,... (or @FILE, one index per line) keeps those rows of the head, in that order."
    )
    assert result.explanation.alarm.startswith("NOTHING WOULD LOAD: 0 of 38")


@pytest.mark.parametrize(
    ("fixture", "factory", "total"),
    [
        ("resnet_dp_6.pth", "resnet_like", 122),
        ("xception_dp_6.pth", "xception_like", 109),
    ],
)
def test_dataparallel_story_heads(fixture: str, factory: str, total: int) -> None:
    spec = f"{MODELS}:{factory}(num_classes=2)"
    result = diff(FIXTURES / fixture, spec)
    model = getattr(models, factory)(num_classes=2)
    state = load(FIXTURES / fixture)
    assert_matches_truth(result, torch_truth(model, state))
    assert result.loadable == 0 and result.total == total
    d = result.diagnosis
    assert d.transform == KeyTransform(strip="module.")
    after = torch_truth(model, renamed(state, d.transform))
    assert len(after["matched"]) == d.loads_after == total - 2
    assert after["mismatched"] == {"fc.weight", "fc.bias"} == {m.name for m in d.head.tensors}
    assert (d.head.source_classes, d.head.target_classes) == (6, 2)
    assert d.filter_as_saved.kept == 0
    assert (d.filter_after.kept, d.filter_after.wrong_shape) == (total, 2)
    assert d.mapping["module.conv1.weight"] == "conv1.weight" and "module.fc.weight" not in d.mapping


def test_name_only_filter_idiom_is_what_torch_does() -> None:
    state = load(FIXTURES / "resnet_dp_6.pth")
    model = models.resnet_like(num_classes=2)
    model_sd = model.state_dict()
    filtered = {k: v for k, v in state.items() if k in model_sd}
    result = diff(FIXTURES / "resnet_dp_6.pth", model)
    assert len(filtered) == result.diagnosis.filter_as_saved.kept == 0
    fixed = {k.removeprefix("module."): v for k, v in state.items()}
    filtered = {k: v for k, v in fixed.items() if k in model_sd}
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(filtered, strict=False)
    wrong = sum(v.shape != model_sd[k].shape for k, v in filtered.items())
    assert (len(filtered), wrong) == (
        result.diagnosis.filter_after.kept,
        result.diagnosis.filter_after.wrong_shape,
    )
    assert "0 of 122 keys" in result.explanation.filter_idiom
    assert "random weights, silently" in result.explanation.filter_idiom


def _compiled_tinynet(tmp_path: Path, prefix: str) -> Path:
    state = load(REAL / "tinynet_compiled.pth")
    path = tmp_path / "stacked.pth"
    torch.save({prefix + k.removeprefix("_orig_mod."): v for k, v in state.items()}, path)
    return path


@pytest.mark.parametrize(
    "prefix", ["_orig_mod.", "_orig_mod.module.", "module._orig_mod.", "module._orig_mod.module."]
)
def test_stacked_wrappers_are_stripped_to_a_fixed_point(tmp_path: Path, prefix: str) -> None:
    path = REAL / "tinynet_compiled.pth" if prefix == "_orig_mod." else _compiled_tinynet(tmp_path, prefix)
    model = models.tinynet(num_classes=6)
    result = diff(path, model)
    state = load(path)
    assert_matches_truth(result, torch_truth(model, state))
    d = result.diagnosis
    assert d.transform == KeyTransform(strip=prefix)
    assert d.loads_after == 16 == len(torch_truth(model, renamed(state, d.transform))["matched"])
    assert d.head is None and d.after.ok


def test_lightning_checkpoint_model_prefix() -> None:
    path = REAL / "lightning_tinynet.ckpt"
    result = diff(path, f"{MODELS}:tinynet(num_classes=6)")
    assert result.source_key == "state_dict"
    raw = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    model = models.tinynet(num_classes=6)
    assert_matches_truth(result, torch_truth(model, raw))
    assert result.diagnosis.transform == KeyTransform(strip="model.")
    assert result.diagnosis.loads_after == 16
    assert "`model.` (Lightning or a trainer)" in result.explanation.message
    assert result.explanation.fix_commands[1] == (
        f"ckpt rename {path} --strip-prefix model. -o lightning_tinynet.renamed.ckpt"
    )


def test_lightning_prefix_replaced_by_dataparallel_prefix() -> None:
    path = REAL / "lightning_tinynet.ckpt"
    result = diff(path, torch.nn.DataParallel(models.tinynet(num_classes=2)))
    d = result.diagnosis
    assert d.transform == KeyTransform(strip="model.", add="module.")
    assert d.loads_after == 14
    assert "replacing one with the other loads 14 of 16" in result.explanation.message


def test_tied_lm_head_is_not_missing() -> None:
    from safetensors.torch import load_file

    result = diff(REAL / "hf_gpt2_tiny", f"{MODELS}:gpt2_like()")
    model = models.gpt2_like()
    state = load_file(REAL / "hf_gpt2_tiny" / "model.safetensors")
    assert_matches_truth(result, torch_truth(model, state), tied={"lm_head.weight"})
    assert result.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert result.comparison.status == "tied" and not result.ok  # strict=True raises on lm_head.weight
    assert result.headline == "28 of 28 target tensors would load (100%)"
    assert "lm_head.weight is tied to transformer.wte.weight" in result.explanation.message


def test_batchnorm_trap_reports_what_is_truly_missing(tmp_path: Path) -> None:
    model = models.tinynet(num_classes=6)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old_bn.pth"
    torch.save(state, path)  # a plain dict: no _metadata, like pre-0.4.1 checkpoints
    quirk = models.tinynet(num_classes=6).load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert quirk.missing_keys == []  # torch hides them...
    result = diff(path, models.tinynet(num_classes=6))
    truth = torch_truth(models.tinynet(num_classes=6), state)
    assert_matches_truth(result, truth)
    assert set(result.missing) == {"features.1.num_batches_tracked", "features.4.num_batches_tracked"}
    assert not result.ok
    assert "2 of the missing are BatchNorm num_batches_tracked counters" in result.explanation.message


def test_identical_checkpoint_is_ok_with_no_fix() -> None:
    result = diff(FIXTURES / "vgg_1000.pth", FIXTURES / "vgg_1000.pth")
    assert result.ok and result.coverage == 100.0
    assert result.explanation.fix_commands == () and result.explanation.alarm is None
    assert result.explanation.filter_idiom == ""


def test_head_only_mismatch_without_prefix(tmp_path: Path) -> None:
    path = tmp_path / "resnet6.pth"
    torch.save(models.resnet_like(num_classes=6).state_dict(), path)
    result = diff(path, f"{MODELS}:resnet_like(num_classes=2)")
    assert result.headline == "120 of 122 target tensors would load (98.3%)"
    assert result.diagnosis.transform.is_identity
    assert result.explanation.message.startswith(
        "As saved: 120 of 122 would load. The other 2 are the classifier head: fc.weight [6, 32] → [2, 32]"
    )
    assert result.explanation.alarm is None
    assert result.explanation.fix_commands == (
        f"ckpt adapt {path} '{MODELS}:resnet_like(num_classes=2)' -o resnet6.adapted.pth",
        f"ckpt strip-head {path} --target '{MODELS}:resnet_like(num_classes=2)' -o resnet6.stripped.pth",
    )
    assert result.passes(98.0) and not result.passes(99.0) and not result.passes()


# -- in-memory inputs and the search itself -------------------------------------------------------
def rec(*shape: int, dtype: str = "float32") -> TensorRecord:
    return TensorRecord("x", dtype, tuple(shape))


def test_mapping_sources_and_targets_with_tensors() -> None:
    model = models.tinynet(num_classes=6)
    result = diff(model.state_dict(), model.state_dict())
    assert result.ok and result.source == "SOURCE"
    result = diff({"fc.weight": torch.zeros(6, 32, dtype=torch.float16)}, {"fc.weight": rec(6, 32)})
    assert result.ok
    assert [(x.source_dtype, x.target_dtype) for x in result.dtype_differences] == [("float16", "float32")]
    assert "differ in dtype (float16 in the file, float32 in the target)" in result.explanation.message


def test_candidate_prefixes_come_from_the_data() -> None:
    names = ["backbone.body.layer1.conv.weight", "backbone.body.layer2.conv.weight", "head.fc.weight"]
    found = candidate_prefixes(names)
    assert "backbone." in found and "backbone.body." in found and "head." in found


def test_unknown_prefix_found_from_data() -> None:
    src = {
        "encoder_wrapper.blocks.0.w": (4, 4),
        "encoder_wrapper.blocks.1.w": (4, 4),
        "encoder_wrapper.norm.w": (4,),
    }
    tgt = {"blocks.0.w": (4, 4), "blocks.1.w": (4, 4), "norm.w": (4,)}
    assert best_transform(src, tgt) == KeyTransform(strip="encoder_wrapper.")


def test_extracting_a_submodule_strips_a_partial_prefix() -> None:
    src = {"backbone.conv.w": (3,), "backbone.bn.w": (3,), "head.fc.w": (10, 3)}
    d = diagnose(src, {"conv.w": (3,), "bn.w": (3,)})
    assert d.transform == KeyTransform(strip="backbone.")
    assert d.loads_after == 2 and d.extra == ("head.fc.w",)


def test_identity_preferred_when_nothing_loads_more() -> None:
    assert best_transform({"a.w": (2,)}, {"a.w": (2,)}).is_identity
    assert best_transform({"a.w": (2,)}, {"b.w": (3,)}).is_identity


def test_suffix_proposal_with_shape_check_and_ambiguity() -> None:
    src = {
        "a.stage1.conv.weight": (8, 3),
        "b.stage2.conv.weight": (16, 8),
        "c.stage3.conv.weight": (32, 16),
        "enc.proj.weight": (4, 4),
        "enc.a.norm.weight": (4,),
        "enc.b.norm.weight": (4,),
    }
    tgt = {
        "body.stage1.conv.weight": (8, 3),
        "body.stage2.conv.weight": (16, 8),
        "body.stage3.conv.weight": (32, 16),
        "other.proj.weight": (5, 5),
        "x.norm.weight": (4,),
    }
    d = diagnose(src, tgt)
    assert d.transform.is_identity  # 'a.' is on one key of six: a guess about one layer, not a wrapper
    assert dict(d.proposed_mapping) == {
        "a.stage1.conv.weight": "body.stage1.conv.weight",
        "b.stage2.conv.weight": "body.stage2.conv.weight",
        "c.stage3.conv.weight": "body.stage3.conv.weight",
    }
    assert d.ambiguous == ("x.norm.weight",)  # two file keys fit equally well: refused
    assert "other.proj.weight" not in dict(d.proposed_mapping).values()  # shapes differ
    assert d.mapping == {}  # a proposal is never part of what adapt applies
    result = diff({k: rec(*v) for k, v in src.items()}, {k: rec(*v) for k, v in tgt.items()})
    assert "proposes 3 renames, e.g. a.stage1.conv.weight → body.stage1.conv.weight; with them 3 of 5" in (
        result.explanation.message
    )


def test_mismatched_head_needs_class_dimension_only() -> None:
    d = diagnose({"conv.weight": (8, 3), "fc.weight": (6, 8)}, {"conv.weight": (16, 3), "fc.weight": (2, 8)})
    assert [m.name for m in d.head.tensors] == ["fc.weight"]
    result = diff(
        {"conv.weight": rec(8, 3), "fc.weight": rec(6, 8)},
        {"conv.weight": rec(16, 3), "fc.weight": rec(2, 8)},
    )
    assert "1 tensor has another shape (conv.weight [8, 3] → [16, 3])" in result.explanation.message


def test_almost_nothing_alarm() -> None:
    target = {f"l{i}.w": rec(2) for i in range(20)}
    result = diff({"l0.w": rec(2)}, target)
    assert result.explanation.alarm.startswith("ONLY 5.0% WOULD LOAD: 1 of 20 target tensors")
    assert "below the 50% minimum coverage" in result.explanation.alarm


def test_compare_keeps_torch_order_and_tied_symmetry() -> None:
    target = {"emb.weight": rec(4, 2), "head.weight": rec(4, 2)}
    c = compare({"head.weight": rec(4, 2)}, target, {"head.weight": "emb.weight"})
    assert c.complete and not c.ok and c.tied == {"emb.weight": "head.weight"}


def test_percent_never_rounds_to_the_ends() -> None:
    assert [percent(n, 3) for n in range(4)] == ["0%", "33.3%", "66.6%", "100%"]
    assert percent(1, 100000) == "0.1%" and percent(0, 0) == "100%"
