"""Surgery plans: steps, collisions, composition, inverses, head finding, rendering."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from conftest import REAL, assert_one_line_error, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptsurgeon
from ckptsurgeon.core.record import TensorRecord
from ckptsurgeon.diffing.heads import find_head
from ckptsurgeon.errors import SurgeryError
from ckptsurgeon.surgery.operations import rename_steps
from ckptsurgeon.surgery.plan import (
    Plan,
    add_prefix,
    drop,
    drop_names,
    head_plan,
    keep,
    make_plan,
    plan_from_mapping,
    replace,
    strip_prefix,
)
from ckptsurgeon.surgery.planreport import plan_json, render_plan


def recs(spec: dict[str, tuple[int, ...]]) -> dict[str, TensorRecord]:
    return {name: TensorRecord(name, "float32", shape) for name, shape in spec.items()}


VGG = recs(
    {
        "features.0.weight": (8, 3, 3, 3),
        "features.0.bias": (8,),
        "classifier.0.weight": (64, 32),
        "classifier.0.bias": (64,),
        "classifier.3.weight": (64, 64),
        "classifier.3.bias": (64,),
        "classifier.6.weight": (1000, 64),
        "classifier.6.bias": (1000,),
    }
)


def test_strip_prefix_adds_the_dot_and_leaves_other_keys() -> None:
    plan = make_plan(["module.a.w", "b.w"], [strip_prefix("module")])
    assert plan.mapping == {"module.a.w": "a.w", "b.w": "b.w"}
    assert [e.old for e in plan.renamed] == ["module.a.w"]
    assert [e.old for e in plan.unchanged] == ["b.w"]


def test_strip_prefix_never_empties_a_name() -> None:
    assert make_plan(["module.", "module.x"], [strip_prefix("module.")]).mapping == {
        "module.": "module.",
        "module.x": "x",
    }


def test_replace_is_applied_in_order() -> None:
    steps = [replace(r"^encoder\.", "backbone."), replace(r"backbone\.(\d+)", r"stage\1")]
    plan = make_plan(["encoder.1.w", "head.w"], steps)
    assert plan.mapping == {"encoder.1.w": "stage1.w", "head.w": "head.w"}


def test_drop_and_keep_give_reasons() -> None:
    plan = make_plan(["backbone.a", "backbone.b", "head.w"], [keep("backbone.*"), drop("*.b")])
    assert [(e.old, e.reason) for e in plan.dropped] == [
        ("backbone.b", "--drop *.b"),
        ("head.w", "not matched by --keep backbone.*"),
    ]


def test_apply_renames_records_without_reading() -> None:
    source = recs({"module.fc.weight": (2, 3), "module.fc.bias": (2,)})
    out = make_plan(source, [strip_prefix("module."), drop("*.bias")]).apply(source)
    assert list(out) == ["fc.weight"]
    assert out["fc.weight"].name == "fc.weight"
    assert out["fc.weight"].shape == (2, 3)


def test_apply_refuses_another_dict() -> None:
    plan = make_plan(["a"], [add_prefix("m.")])
    with pytest.raises(SurgeryError, match="made for other tensors"):
        plan.apply(recs({"b": (1,)}))


def test_collision_names_both_keys() -> None:
    with pytest.raises(SurgeryError) as info:
        make_plan(["module.fc.w", "fc.w"], [strip_prefix("module.")])
    assert "'module.fc.w'" in str(info.value) and "'fc.w'" in str(info.value)


@pytest.mark.parametrize(
    ("step", "fragment"),
    [
        (strip_prefix("model."), "strip prefix 'model.': matches no tensor"),
        (drop("nothing.*"), "drop 'nothing.*': matches no tensor"),
        (keep("nothing.*"), "keep only 'nothing.*': matches no tensor"),
        (replace("zzz", "y"), "matches no tensor"),
        (drop_names({"missing": "x"}), "cannot drop 'missing'"),
    ],
)
def test_a_step_that_matches_nothing_is_refused(step, fragment: str) -> None:
    with pytest.raises(SurgeryError, match=fragment.replace("*", r"\*").replace(".", r"\.")):
        make_plan(["module.a.w"], [step])


def test_bad_regex_and_empty_prefix_are_surgery_errors() -> None:
    with pytest.raises(SurgeryError, match="not a valid regular expression"):
        replace("(", "x")
    with pytest.raises(SurgeryError, match="empty prefix"):
        strip_prefix("")
    with pytest.raises(SurgeryError, match="bad replacement"):
        make_plan(["a.w"], [replace("a", r"\2")])


def test_then_composes_and_matches_sequential_application() -> None:
    source = recs({"module.a.w": (1,), "module.fc.w": (2,)})
    first = make_plan(source, [strip_prefix("module.")])
    second = make_plan(first.output_names, [drop("fc.*"), add_prefix("model.")])
    both = first.then(second)
    assert both.mapping == {"module.a.w": "model.a.w", "module.fc.w": None}
    assert list(both.apply(source)) == list(
        make_plan(first.apply(source), second_steps()).apply(first.apply(source))
    )
    with pytest.raises(SurgeryError, match="cannot compose"):
        first.then(make_plan(["x"], [add_prefix("y.")]))


def second_steps():
    return [drop("fc.*"), add_prefix("model.")]


def test_inverse_of_a_rename_plan_and_refusal_when_dropping() -> None:
    plan = make_plan(["module.a.w", "b.w"], [strip_prefix("module.")])
    inverse = plan.inverse()
    assert inverse.mapping == {"a.w": "module.a.w", "b.w": "b.w"}
    assert plan.then(inverse).is_identity
    with pytest.raises(SurgeryError, match="only a plan that drops nothing"):
        make_plan(["a", "b"], [drop("a")]).inverse()


names = st.lists(
    st.text(alphabet="ab.1_é", min_size=1, max_size=8).filter(lambda s: not s.startswith("m.")),
    min_size=1,
    max_size=12,
    unique=True,
)


@settings(max_examples=60, deadline=None)
@given(names)
def test_rename_plans_compose_and_invert(keys: list[str]) -> None:
    source = {k: TensorRecord(k, "float32", (1,)) for k in keys}
    plan = make_plan(source, [add_prefix("m.")])
    back = make_plan(plan.apply(source), [strip_prefix("m.")])
    assert plan.then(back).is_identity
    assert plan.inverse().mapping == back.mapping
    assert plan.then(plan.inverse()).apply(source).keys() == source.keys()


def test_head_name_lists_live_in_heads_py_only() -> None:
    """Lists of head names (two or more of these) are literals of diffing/heads.py alone."""
    names = {"fc", "classifier", "head", "heads", "lm_head", "logits", "last_linear"}
    package = Path(ckptsurgeon.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Tuple | ast.List | ast.Set):
                words = {e.value for e in node.elts if isinstance(e, ast.Constant)}
                if len(words & names) >= 2:
                    found.append(f"{path.relative_to(package)}:{node.lineno}")
    assert found and all(place.startswith("diffing/heads.py:") for place in found), found


def test_find_head_by_name_takes_the_last_layer() -> None:
    names, how = find_head(VGG)
    assert names == ["classifier.6.weight", "classifier.6.bias"]
    assert "classifier.6" in how


def test_find_head_prefers_the_last_2d_layer_of_a_head_module() -> None:
    timm = recs(
        {
            "stem.weight": (8, 3, 3, 3),
            "head.fc.weight": (10, 8),
            "head.fc.bias": (10,),
            "head.norm.weight": (8,),
        }
    )
    assert find_head(timm)[0] == ["head.fc.weight", "head.fc.bias"]


def test_find_head_falls_back_to_the_last_linear_layer() -> None:
    plain = recs(
        {"body.0.weight": (8, 3), "body.0.bias": (8,), "out_layer.weight": (5, 8), "out_layer.bias": (5,)}
    )
    names, how = find_head(plain)
    assert names == ["out_layer.weight", "out_layer.bias"]
    assert "last layer of the file" in how


@pytest.mark.parametrize(
    "last",
    [
        {"transformer.wte.weight": (1000, 64)},  # GPT-2 in a sorted safetensors file: the embedding is last
        {"model.embed_tokens.weight": (1000, 64), "model.embed_tokens.bias": (1000,)},
        {"out_layer.weight": (5, 8)},  # a linear layer without a bias: could be anything
    ],
)
def test_find_head_never_takes_an_embedding_or_a_bias_free_layer_by_position(
    last: dict[str, tuple[int, ...]],
) -> None:
    tensors = recs({"h.0.mlp.c_fc.weight": (64, 256), "h.0.mlp.c_fc.bias": (256,), **last})
    module = next(iter(last)).rpartition(".")[0]
    with pytest.raises(SurgeryError, match=f"last layer \\('{module}'\\) is not a linear layer with a bias"):
        find_head(tensors)


def test_strip_head_refuses_gpt2_instead_of_dropping_its_embedding(tmp_path: Path) -> None:
    result = run_cli("strip-head", REAL / "hf_gpt2_tiny", "-o", tmp_path / "g.safetensors", "--dry-run")
    assert_one_line_error(result, "no classifier head found", "'transformer.wte'", "--head NAME")


def test_find_head_refuses_to_guess() -> None:
    gpt = recs({"h.0.mlp.c_fc.weight": (64, 256), "ln_f.weight": (64,), "ln_f.bias": (64,)})
    with pytest.raises(SurgeryError, match="--head NAME"):
        find_head(gpt)


def test_find_head_by_name_and_bad_name() -> None:
    assert find_head(VGG, "classifier.3")[0] == ["classifier.3.weight", "classifier.3.bias"]
    assert find_head(VGG, "classifier.*.bias")[0] == [
        "classifier.0.bias",
        "classifier.3.bias",
        "classifier.6.bias",
    ]
    with pytest.raises(SurgeryError, match="--head fc: no such layer; the last layers are"):
        find_head(VGG, "fc")


def test_head_plan_lists_every_dropped_tensor_with_shape() -> None:
    plan = head_plan(VGG)
    assert [(e.old, e.shape) for e in plan.dropped] == [
        ("classifier.6.weight", (1000, 64)),
        ("classifier.6.bias", (1000,)),
    ]
    assert all(e.reason == "classifier head" for e in plan.dropped)
    assert "classifier.6" in plan.steps[0]


def test_plan_from_mapping() -> None:
    plan = plan_from_mapping(
        VGG, {"features.0.weight": "module.features.0.weight"}, {"classifier.6.bias": "x"}
    )
    assert plan.mapping["features.0.weight"] == "module.features.0.weight"
    assert plan.mapping["classifier.6.bias"] is None
    assert plan.mapping["features.0.bias"] == "features.0.bias"


def test_rename_steps_order() -> None:
    steps = rename_steps(
        strip=("module.",), add=("model.",), replacements=(("a", "b"),), drops=("x",), keeps=("*",)
    )
    assert [s.description for s in steps] == [
        "drop 'x'",
        "keep only '*'",
        "strip prefix 'module.'",
        "replace 'a' with 'b'",
        "add prefix 'model.'",
    ]


DP = recs(
    {
        "module.features.0.weight": (8, 3, 3, 3),
        "module.features.0.bias": (8,),
        "module.features.2.weight": (8, 8, 3, 3),
        "module.features.2.bias": (8,),
        "module.fc.weight": (6, 8),
        "module.fc.bias": (6,),
    }
)


def test_render_plan_table_exact() -> None:
    plan = make_plan(DP, [drop("module.fc.*"), strip_prefix("module.")])
    assert render_plan(plan) == (
        "Plan: 6 tensors: 4 renamed, 0 unchanged, 2 dropped (drop 'module.fc.*'; strip prefix 'module.')\n"
        "\n"
        "renamed                              to\n"
        "-----------------------------------  ----------------------------\n"
        "module.features.{0,2}.{bias,weight}  features.{0,2}.{bias,weight}\n"
        "\n"
        "dropped           dtype    shape    reason\n"
        "----------------  -------  -------  ------------------\n"
        "module.fc.bias    float32  [6]      --drop module.fc.*\n"
        "module.fc.weight  float32  [6, 8]   --drop module.fc.*"
    )


def test_render_plan_markdown_and_verbose() -> None:
    plan = make_plan(DP, [strip_prefix("module.")])
    text = render_plan(plan, "markdown", verbose=True)
    assert "| module.features.0.weight | features.0.weight |" in text
    assert text.count("\n| module.") == 6


def test_plan_json_lists_everything() -> None:
    plan = make_plan(DP, [drop("module.fc.*"), strip_prefix("module.")])
    data = json.loads(render_plan(plan, "json"))
    assert data == plan_json(plan)
    assert data["summary"] == {"tensors": 6, "renamed": 4, "unchanged": 0, "dropped": 2}
    assert data["dropped"][0] == {
        "name": "module.fc.weight",
        "dtype": "float32",
        "shape": [6, 8],
        "reason": "--drop module.fc.*",
    }
    assert {"from": "module.features.0.bias", "to": "features.0.bias"} in data["renamed"]


def test_plan_is_a_value() -> None:
    plan = make_plan(["a"], [])
    assert isinstance(plan, Plan) and plan.is_identity and plan.steps == ()


def test_a_rename_that_empties_a_name_is_a_clear_error() -> None:
    from ckptsurgeon.errors import SurgeryError
    from ckptsurgeon.surgery.plan import make_plan, replace

    with pytest.raises(SurgeryError, match="leaves an empty name"):
        make_plan(["a.b"], [replace(r".*", "")])
