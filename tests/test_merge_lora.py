"""``ckpt merge-lora`` / ``ckptsurgeon.merge_lora`` against peft's own ``merge_and_unload()``.

Tiny GPT-2 (Conv1D, fan_in_fan_out) and Llama (nn.Linear) models are wrapped by peft, their LoRA B
factors randomised (peft starts them at zero, which would make every merge a no-op), and saved: the
base state dict as safetensors, the adapter with ``save_pretrained``. Our merged file must equal
peft's merged state dict and load into the base architecture strictly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_one_line_error, run_cli, sha256

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")


def _gpt2() -> Any:
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def _llama() -> Any:
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
    )
    return transformers.LlamaForCausalLM(config)


BUILDERS = {"gpt2": _gpt2, "llama": _llama}


def _make(root: Path, arch: str, seed: int = 0, **lora: Any) -> dict[str, Any]:
    """Save the base weights and a peft adapter with random factors; return peft's merged state dict."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = BUILDERS[arch]()
    model.name_or_path = str(root / f"{arch}-base")  # peft records it; no Hub look-up without a config
    model.config.save_pretrained(root / f"{arch}-base")
    base = root / f"{arch}.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, base)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(**lora))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.normal_(0, 0.5)
    adapter = root / f"{arch}-adapter"
    wrapped.save_pretrained(adapter)
    merged = {k: v.detach().clone() for k, v in wrapped.merge_and_unload().state_dict().items()}
    return {"base": base, "adapter": adapter, "merged": merged, "arch": arch}


CASES = {
    "gpt2": dict(arch="gpt2", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    "gpt2-patterns": dict(
        arch="gpt2",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
        rank_pattern={"h.1.attn.c_attn": 2},
        alpha_pattern={"c_proj": 3},
        modules_to_save=["lm_head"],
    ),
    "llama": dict(arch="llama", r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "llama-rslora": dict(
        arch="llama",
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "o_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 2},
        alpha_pattern={"o_proj": 4},
        modules_to_save=["lm_head"],
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def made(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    case = dict(CASES[request.param])
    return _make(tmp_path_factory.mktemp(request.param), case.pop("arch"), **case)


def _load(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(path)


def test_merge_equals_peft_merge_and_unload(made: dict[str, Any], tmp_path: Path) -> None:
    import ckptsurgeon

    out = tmp_path / "merged.safetensors"
    result = ckptsurgeon.merge_lora(made["base"], made["adapter"], out)
    assert result.written is not None and result.written.verified
    ours = _load(out)
    theirs = made["merged"]
    assert sorted(ours) == sorted(theirs)
    base = _load(made["base"])
    changed = 0
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=1e-5, msg=name)
        changed += not torch.equal(base[name], tensor)
    assert changed == len(result.plan.transformed) > 0
    model = BUILDERS[made["arch"]]()
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected
    assert not [m for m in missing if m != "lm_head.weight"]  # tied to the embedding when it is missing


def test_merge_cli_writes_pth_that_loads_strictly(made: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "merged.pth"
    result = run_cli("merge-lora", made["base"], made["adapter"], "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "merge LoRA" in result.stdout
    state = torch.load(out, weights_only=True)
    model = BUILDERS[made["arch"]]()
    model.load_state_dict(state, strict=True)
    for name, tensor in made["merged"].items():
        torch.testing.assert_close(state[name], tensor, atol=1e-5, rtol=1e-5, msg=name)


def test_bf16_base_is_merged_in_float32_and_cast_back(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    import ckptsurgeon

    made = _make(tmp_path, "llama", r=4, lora_alpha=8, target_modules=["q_proj"])
    base = load_file(made["base"])
    bf16 = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in base.items()}, bf16)
    out = tmp_path / "out.safetensors"
    ckptsurgeon.merge_lora(bf16, made["adapter"], out)
    ours = load_file(out)
    adapter = load_file(made["adapter"] / "adapter_model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    a = adapter[f"base_model.model.{name}.lora_A.weight"]
    b = adapter[f"base_model.model.{name}.lora_B.weight"]
    expected = (base[f"{name}.weight"].to(torch.bfloat16).float() + (b @ a) * 2).to(torch.bfloat16)
    assert ours[f"{name}.weight"].dtype == torch.bfloat16
    assert torch.equal(ours[f"{name}.weight"], expected)


def test_dry_run_lists_the_merges_and_writes_nothing(tmp_path: Path) -> None:
    made = _make(tmp_path, "gpt2", r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    result = run_cli("merge-lora", made["base"], made["adapter"], "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)["plan"]
    assert {t["name"] for t in plan["transformed"]} == {
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.attn.c_attn.weight",
    }
    assert plan["transformed"][0]["transform"] == "merge LoRA: W + (B @ A)^T * 2"
    assert not list(tmp_path.glob("*merged*"))


# -- refusals ---------------------------------------------------------------------------------
def _refused(tmp_path: Path, made: dict[str, Any], *fragments: str) -> None:
    out = tmp_path / "never.safetensors"
    before = sha256(made["base"])
    assert_one_line_error(run_cli("merge-lora", made["base"], made["adapter"], "-o", out), *fragments)
    assert not out.exists()
    assert sha256(made["base"]) == before


def test_dora_is_refused(tmp_path: Path) -> None:
    made = _make(tmp_path, "llama", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    _refused(tmp_path, made, "DoRA (use_dora)", "merge_and_unload")


def test_another_peft_type_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _llama()
    model.name_or_path = str(tmp_path / "base")
    model.config.save_pretrained(tmp_path / "base")
    from safetensors.torch import save_file

    base = tmp_path / "base.safetensors"
    save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, base)
    wrapped = peft.get_peft_model(model, peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    wrapped.save_pretrained(tmp_path / "ia3")
    _refused(tmp_path, {"base": base, "adapter": tmp_path / "ia3"}, "an IA3 adapter", "LoRA adapters only")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"bias": "all"}, 'bias="all"'),
        ({"lora_bias": True}, "lora_bias"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"r": 3}, "has rank 2, its config says r=3"),
    ],
)
def test_hand_written_configs_are_refused(tmp_path: Path, change: dict[str, Any], fragment: str) -> None:
    made = _make(tmp_path, "llama", r=2, lora_alpha=4, target_modules=["v_proj"])
    config_path = made["adapter"] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, **change}))
    _refused(tmp_path, made, fragment)


def test_another_base_model_is_refused(tmp_path: Path) -> None:
    gpt2 = _make(tmp_path, "gpt2", r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    llama = _make(tmp_path, "llama", r=2, lora_alpha=4, target_modules=["q_proj"])
    _refused(tmp_path, {"base": gpt2["base"], "adapter": llama["adapter"]}, "has no tensor in the base")


def test_shape_mismatch_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    made = _make(tmp_path, "llama", r=2, lora_alpha=4, target_modules=["q_proj"])
    base = load_file(made["base"])
    base["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(16, 8)
    save_file(base, made["base"])
    _refused(tmp_path, made, "'model.layers.1.self_attn.q_proj.weight'", "would be [16, 16]")


def test_not_an_adapter_folder_is_refused(tmp_path: Path) -> None:
    made = _make(tmp_path, "llama", r=2, lora_alpha=4, target_modules=["q_proj"])
    _refused(tmp_path, {"base": made["base"], "adapter": tmp_path}, "not a PEFT adapter folder")


def test_base_saved_without_the_model_prefix_is_matched(tmp_path: Path) -> None:
    """A GPT-2 base saved as GPT2Model (no ``transformer.``): the adapter's names are matched by the
    prefix search diff uses."""
    from safetensors.torch import load_file, save_file

    import ckptsurgeon

    made = _make(tmp_path, "gpt2", r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    base = load_file(made["base"])
    bare = tmp_path / "bare.safetensors"
    save_file({k.removeprefix("transformer."): v for k, v in base.items() if k != "lm_head.weight"}, bare)
    out = tmp_path / "out.safetensors"
    result = ckptsurgeon.merge_lora(bare, made["adapter"], out)
    assert any("strip 'transformer.'" in step for step in result.plan.steps)
    ours = load_file(out)
    for name in ("h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"):
        torch.testing.assert_close(ours[name], made["merged"][f"transformer.{name}"], atol=1e-5, rtol=1e-5)


def test_bundled_fixture_merge_equals_peft(tmp_path: Path) -> None:
    """The README's example: fixtures/lora_gpt2_tiny merged into fixtures/real/hf_gpt2_tiny."""
    from conftest import FIXTURES

    import ckptsurgeon

    base, adapter = FIXTURES / "real" / "hf_gpt2_tiny", FIXTURES / "lora_gpt2_tiny"
    model = transformers.GPT2LMHeadModel.from_pretrained(base)
    expected = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    out = tmp_path / "merged.pth"
    ckptsurgeon.merge_lora(base, adapter, out)
    ours = torch.load(out, weights_only=True)
    assert sorted(ours) == sorted(k for k in expected if k != "lm_head.weight")  # tied, not stored
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-5, msg=name)


def test_diff_of_a_lora_adapter_names_merge_lora() -> None:
    from conftest import FIXTURES

    result = run_cli("diff", FIXTURES / "lora_gpt2_tiny", FIXTURES / "real" / "hf_gpt2_tiny")
    assert result.exit_code == 1, result.stderr
    assert "ckpt merge-lora BASE " in result.stdout


def test_trained_head_of_a_tied_base_is_written_untied_as_peft_saves_it(tmp_path: Path) -> None:
    import ckptsurgeon

    torch.manual_seed(3)
    model = _gpt2()
    model.save_pretrained(tmp_path / "base")  # lm_head.weight is tied to wte: not stored
    base = tmp_path / "base" / "model.safetensors"
    assert "lm_head.weight" not in _load(base)
    model.name_or_path = str(tmp_path / "base")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["lm_head"]
    )
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.normal_(0, 0.5)
    wrapped.save_pretrained(tmp_path / "adapter")
    wrapped.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    theirs = _load(tmp_path / "peft-merged" / "model.safetensors")
    saved_config = json.loads((tmp_path / "peft-merged" / "config.json").read_text())
    assert saved_config["tie_word_embeddings"] is False  # peft's merge unties them; save_pretrained says so

    out = tmp_path / "merged.safetensors"
    result = ckptsurgeon.merge_lora(base, tmp_path / "adapter", out)
    ours = _load(out)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=1e-5, msg=name)
    assert not torch.equal(ours["lm_head.weight"], ours["transformer.wte.weight"])
    assert any("tie_word_embeddings" in step for step in result.plan.steps)
