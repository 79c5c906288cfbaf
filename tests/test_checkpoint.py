"""Finding the weights in a nested training checkpoint, and grouping names for display."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
from conftest import FIXTURES, REAL

from ckptsurgeon.core.checkpoint import Checkpoint
from ckptsurgeon.core.grouping import collapse, natural_sorted
from ckptsurgeon.core.prefixes import shared_prefix, wrapper_prefix
from ckptsurgeon.core.record import TensorRecord
from ckptsurgeon.errors import KeySelectionError
from ckptsurgeon.formats import open_checkpoint


def rec(*shape: int, dtype: str = "float32") -> TensorRecord:
    return TensorRecord("", dtype, tuple(shape))


def make(tree: object) -> Checkpoint:
    return Checkpoint(path=Path("x.pth"), format="torch-zip", tree=tree)


def test_flat_state_dict_is_the_root() -> None:
    ckpt = make(OrderedDict([("fc.weight", rec(2, 3)), ("fc.bias", rec(2))]))
    weights = ckpt.weights()
    assert weights.key == ""
    assert list(weights.tensors) == ["fc.weight", "fc.bias"]
    assert weights.tensors["fc.bias"].name == "fc.bias"
    assert ckpt.top_level("") == []


def test_lightning_style_prefers_state_dict_over_optimizer() -> None:
    tree = {
        "epoch": 3,
        "optimizer_states": [{"state": {0: {"exp_avg": rec(100, 100)}}, "param_groups": []}],
        "state_dict": {"model.fc.weight": rec(2, 3)},
        "hyper_parameters": {"lr": 0.1},
    }
    ckpt = make(tree)
    assert ckpt.weights().key == "state_dict"
    keys = {c.key for c in ckpt.candidates()}
    assert keys == {"state_dict", "optimizer_states.0.state.0"}
    entries = {e.key: e for e in ckpt.top_level("state_dict")}
    assert entries["state_dict"].kind == "weights"
    assert entries["optimizer_states"].kind == "optimizer"
    assert entries["optimizer_states"].nbytes == 100 * 100 * 4
    assert entries["epoch"].kind == "value" and entries["epoch"].summary == "3"


@pytest.mark.parametrize("name", ["model", "model_state_dict", "net", "module", "state_dict_ema"])
def test_known_weight_keys(name: str) -> None:
    tree = {name: {"w": rec(4)}, "optimizer": {"state": {0: {"m": rec(8)}}}, "args": "x"}
    assert make(tree).weights().key == name


def test_state_dict_beats_ema_and_largest_non_optimizer_is_fallback() -> None:
    tree = {"state_dict_ema": {"w": rec(4)}, "state_dict": {"w": rec(4)}}
    assert make(tree).weights().key == "state_dict"
    tree = {"optim": {"s": {"exp": rec(1000)}}, "stuff": {"a": rec(2)}, "blob": {"b": rec(3)}}
    assert make(tree).weights().key == "blob"


def test_key_selection_with_dots_and_indices() -> None:
    tree = {"model.ema": {"w": rec(1)}, "model": {"w": rec(2)}, "lst": [{"x": rec(3)}]}
    ckpt = make(tree)
    assert ckpt.weights("model.ema").tensors["w"].shape == (1,)
    assert ckpt.weights("lst.0").tensors["x"].shape == (3,)
    with pytest.raises(KeySelectionError, match="no entry 'nope'"):
        ckpt.weights("nope")
    with pytest.raises(KeySelectionError, match="holds no tensors"):
        make({"a": {"b": 1}, "c": {"w": rec(1)}}).weights("a")


def test_nested_module_dicts_are_flattened() -> None:
    tree = {"model": {"backbone": {"conv.weight": rec(2)}, "head": {"fc.weight": rec(3)}}}
    assert list(make(tree).weights("model").tensors) == ["backbone.conv.weight", "head.fc.weight"]
    tree = {"model": {"conv.weight": rec(2), "head": {"fc.weight": rec(3)}, "absent": None}}
    assert list(make(tree).weights().tensors) == ["conv.weight", "head.fc.weight"]


def test_no_tensors_at_all() -> None:
    with pytest.raises(KeySelectionError, match="holds no tensors"):
        make({"epoch": 1}).weights()


def test_shared_storage_counted_once() -> None:
    from ckptsurgeon.core.record import Storage

    storage = Storage("0", "float32", 400, loader=lambda: bytes(400))
    a = TensorRecord("", "float32", (100,), storage)
    b = TensorRecord("", "float32", (10,), storage, storage_offset=10)
    assert make({"a": a, "b": b}).weights().nbytes == 400


def test_prefixes() -> None:
    assert wrapper_prefix(["_orig_mod.module.a.w", "_orig_mod.module.b.w"]) == "_orig_mod.module."
    assert wrapper_prefix(["model.a.w", "model.b.w"]) == "model."
    assert wrapper_prefix(["features.0.w", "fc.w"]) == ""
    assert wrapper_prefix(["backbone.a.w", "backbone.b.w"]) == ""
    assert shared_prefix(["w"]) == ""


def test_grouping_and_natural_order() -> None:
    names = [f"layers.{i}.attn.q.weight" for i in range(32)] + ["embed.weight", "layers.10.extra"]
    labels = [g.label for g in collapse(names)]
    assert labels == ["embed.weight", "layers.{0..31}.attn.q.weight", "layers.10.extra"]
    assert natural_sorted(["a.10", "a.9", "a.1"]) == ["a.1", "a.9", "a.10"]
    gaps = collapse(["f.0.w", "f.2.w", "f.5.w"])
    assert [g.label for g in gaps] == ["f.{0,2,5}.w"]
    resnet = [f"layer{i}.{j}.bn1.weight" for i in range(1, 5) for j in range(2)]
    assert [g.label for g in collapse(resnet)] == ["layer{1..4}.{0,1}.bn1.weight"]
    leaves = collapse(["conv1.weight", "conv1.bias", "fc.weight"], merge_leaves=True)
    assert [g.label for g in leaves] == ["conv1.{bias,weight}", "fc.weight"]


def test_state_dict_saved_beside_plain_values() -> None:
    ckpt = make(
        {"fc.weight": rec(2, 3), "fc.bias": rec(2), "epoch": 3, "optimizer": {"state": {0: {"m": rec(8)}}}}
    )
    weights = ckpt.weights()
    assert weights.key == "" and list(weights.tensors) == ["fc.weight", "fc.bias"]
    assert [(e.key, e.kind) for e in ckpt.top_level("")] == [("epoch", "value"), ("optimizer", "optimizer")]


def test_a_key_on_a_plain_state_dict_says_to_leave_it_out() -> None:
    with pytest.raises(KeySelectionError, match="the file itself is the state dict, leave out --key"):
        open_checkpoint(FIXTURES / "vgg_1000.pth").weights("state_dict")


def test_a_missing_key_lists_a_few_entries_not_hundreds() -> None:
    with pytest.raises(KeySelectionError, match=r"'state_dict', .*, and 5 more$"):
        open_checkpoint(REAL / "lightning_tinynet.ckpt").weights("nope")
