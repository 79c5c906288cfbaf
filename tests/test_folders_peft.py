"""Folders, PEFT adapters and training checkpoints in ``inspect`` (issue 12, items 7 and 8).

Checked against the references a user would trust: peft's own ``PeftConfig.from_pretrained`` and
its LoRA layers, the safetensors library's ``safe_open``, ``torch.load(weights_only=True)``,
``torch.optim.swa_utils.AveragedModel`` (what Lightning's WeightAveraging saves) and
``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import REAL, assert_one_line_error, run_cli

from ckptsurgeon.formats import open_checkpoint
from ckptsurgeon.inspection import inspect

torch = pytest.importorskip("torch")

GPT2_CONFIG = "n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0"
GPT2_TARGET = f"transformers.GPT2LMHeadModel(transformers.GPT2Config({GPT2_CONFIG}))"


# -- folders holding several checkpoints -----------------------------------------------------------
def _save_tiny(path: Path) -> None:
    torch.save({"fc.weight": torch.zeros(2, 3)}, path)


def test_folder_with_two_pt_files_lists_them_and_says_how_to_pick(tmp_path: Path) -> None:
    for name in ("last.pt", "epoch10.pt", "epoch2.pt"):
        _save_tiny(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    result = run_cli("inspect", tmp_path)
    assert_one_line_error(result, "3 checkpoint candidates (epoch2.pt, epoch10.pt, last.pt)")
    assert f"pass the path of the one you mean, e.g. {tmp_path / 'epoch2.pt'}" in result.stderr
    assert "notes.txt" not in result.stderr
    chosen = run_cli("inspect", tmp_path / "epoch2.pt")  # what the line says to do works
    assert chosen.exit_code == 0 and "fc.weight" in chosen.stdout


def test_folder_candidates_are_capped_and_include_checkpoint_subfolders(tmp_path: Path) -> None:
    for i in range(1, 8):
        _save_tiny(tmp_path / f"ckpt-{i}.pth")
    (tmp_path / "checkpoint-500").mkdir()
    (tmp_path / "checkpoint-500" / "model.safetensors").write_bytes(b"")
    (tmp_path / "logs").mkdir()  # a folder without a checkpoint is not a candidate
    result = run_cli("diff", tmp_path, tmp_path / "ckpt-1.pth")
    assert_one_line_error(
        result,
        "8 checkpoint candidates (checkpoint-500, ckpt-1.pth, ckpt-2.pth, ckpt-3.pth, ckpt-4.pth and 3 more)",
    )


def test_folder_with_one_candidate_names_its_path(tmp_path: Path) -> None:
    _save_tiny(tmp_path / "last.ckpt")
    assert_one_line_error(
        run_cli("inspect", tmp_path),
        f"a folder, not a checkpoint; it holds one candidate: pass its path, {tmp_path / 'last.ckpt'}",
    )


def test_empty_folder_still_says_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("x")
    assert_one_line_error(
        run_cli("inspect", tmp_path), "a folder without a checkpoint", "adapter_config.json"
    )


def test_hugging_face_model_folder_opens_as_before_beside_other_files(tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "gpt2"
    shutil.copytree(REAL / "hf_gpt2_tiny", folder)
    _save_tiny(folder / "training_args.bin")  # what a Trainer leaves beside the weights
    report = inspect(folder)
    assert report.format == "safetensors"
    assert report.files == [folder / "model.safetensors"]
    assert report.notes[0] == f"{folder}: a model folder; opened model.safetensors"


# -- PEFT adapters, made by peft itself --------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A LoRA adapter on a tiny GPT-2 (fan_in_fan_out, modules_to_save) and a DoRA/rsLoRA one on a
    tiny Llama (rank and alpha patterns, a .bin copy), saved by peft; and peft's own LoRA layers."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("adapters")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(**_kwargs(GPT2_CONFIG)))
    gpt2.name_or_path = _local_base(root / "tiny-gpt2", gpt2)  # what from_pretrained sets; peft records it
    gpt2_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
        modules_to_save=["lm_head"],
    )
    gpt2_peft = peft.get_peft_model(gpt2, gpt2_config)
    gpt2_peft.save_pretrained(root / "gpt2")
    llama_kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_kwargs))
    llama.name_or_path = _local_base(root / "tiny-llama", llama)
    llama_config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        use_dora=True,
        use_rslora=True,
        rank_pattern={"layers.0.self_attn.q_proj": 2},
        alpha_pattern={"layers.1.self_attn.v_proj": 4},
    )
    llama_peft = peft.get_peft_model(llama, llama_config)
    llama_peft.save_pretrained(root / "llama")
    llama_peft.save_pretrained(root / "llama-bin", safe_serialization=False)
    return {
        "root": root,
        "peft": peft,
        "lora_modules": {
            name: sorted(n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
            for name, model in (("gpt2", gpt2_peft), ("llama", llama_peft))
        },
    }


def _local_base(folder: Path, model: Any) -> str:
    """A base model folder holding the config: peft looks a base model's config.json up on the Hub
    when it is not on disk, and the tests run without a network."""
    model.config.save_pretrained(folder)
    return str(folder)


def _kwargs(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (part.split("=") for part in text.split(", "))}


@pytest.mark.parametrize("name", ["gpt2", "llama", "llama-bin"])
def test_inspect_reports_peft_config_as_peft_reads_it(adapters: dict[str, Any], name: str) -> None:
    folder = adapters["root"] / name
    reference = adapters["peft"].PeftConfig.from_pretrained(folder)
    shown = json.loads(run_cli("inspect", folder, "--format", "json").stdout)
    assert shown["format"] == "peft"
    adapter = shown["adapter"]
    assert adapter["peft_type"] == reference.peft_type.value
    for field in ("r", "lora_alpha", "base_model_name_or_path", "use_rslora", "use_dora", "fan_in_fan_out"):
        assert adapter[field] == getattr(reference, field), field
    assert set(adapter["target_modules"]) == set(reference.target_modules)
    assert (adapter["modules_to_save"] or None) == (
        list(reference.modules_to_save) if reference.modules_to_save else None
    )
    assert adapter["rank_pattern"] == reference.rank_pattern
    assert adapter["alpha_pattern"] == reference.alpha_pattern


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_adapter_tensors_are_what_safe_open_reads(adapters: dict[str, Any], name: str) -> None:
    from safetensors import safe_open

    folder = adapters["root"] / name
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        expected = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    shown = json.loads(run_cli("inspect", folder, "--format", "json").stdout)
    assert {t["name"]: t["shape"] for t in shown["tensors"]} == expected


def test_adapter_bin_opens_through_the_restricted_reader(adapters: dict[str, Any]) -> None:
    folder = adapters["root"] / "llama-bin"
    expected = torch.load(folder / "adapter_model.bin", weights_only=True)
    ckpt = open_checkpoint(folder)
    assert ckpt.files == (folder / "adapter_model.bin",)
    tensors = ckpt.weights().tensors
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    for name, rec in tensors.items():
        assert torch.equal(rec.to_torch(), expected[name])


def test_inspect_table_and_markdown_show_the_adapter(adapters: dict[str, Any]) -> None:
    table = run_cli("inspect", adapters["root"] / "llama").stdout
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "PEFT adapter folder" in lines["format"]
    assert lines["adapter"].endswith("LoRA, r=8, lora_alpha=16, use_rslora, use_dora")
    assert lines["base model"].endswith(str(adapters["root"] / "tiny-llama"))
    assert lines["targets"].endswith("q_proj, v_proj")
    assert lines["rank pattern"].endswith('{"layers.0.self_attn.q_proj": 2}')
    assert lines["prefix"].endswith(
        "base_model.model.model.layers.  (shared by all keys; not a known wrapper)"
    )
    markdown = run_cli("inspect", adapters["root"] / "gpt2", "--format", "markdown").stdout
    rows = {
        cells[0]: cells[1] for cells in (_cells(line) for line in markdown.splitlines()) if len(cells) == 2
    }
    assert rows["adapter"] == "LoRA, r=4, lora_alpha=8, fan_in_fan_out"
    assert rows["base model"] == str(adapters["root"] / "tiny-gpt2")
    assert rows["targets"] == "c_attn, c_proj"
    assert rows["modules to save"] == "lm_head  (stored whole)"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []


def test_diff_of_an_adapter_against_its_base_says_what_it_is(adapters: dict[str, Any]) -> None:
    folder = adapters["root"] / "gpt2"
    result = run_cli("diff", folder, GPT2_TARGET)
    assert result.exit_code == 1, result.stderr  # it does not load as a full checkpoint
    assert "NOTHING WOULD LOAD" not in result.stdout
    modules = adapters["lora_modules"]["gpt2"]  # peft's own LoRA layers: 2 layers x (c_attn, 2 c_proj)
    assert len(modules) == 6
    base = adapters["root"] / "tiny-gpt2"
    assert (
        f"!! This is a LoRA adapter for {base}, not a full checkpoint: its 13 tensors update "
        f"{len(modules)} modules of the base model, {len(modules)} of which are in the target"
    ) in result.stdout
    assert "(matched by stripping `base_model.model.` and `.lora_A`, `.lora_B`)" in result.stdout
    assert "store 1 whole (lm_head.weight)" in result.stdout
    assert "ckpt merge-lora" in result.stdout and "PeftModel.from_pretrained" in result.stdout
    assert "Fix:" not in result.stdout  # adapt or rename cannot make an adapter a checkpoint
    report = json.loads(run_cli("diff", folder, GPT2_TARGET, "--format", "json").stdout)
    assert report["status"] == "mismatch"
    assert report["diagnosis"]["alarm"].startswith(
        f"This is a LoRA adapter for {base}, not a full checkpoint"
    )
    assert report["diagnosis"]["fix_commands"] == []


def test_diff_counts_target_modules_by_peft_names(adapters: dict[str, Any]) -> None:
    from ckptsurgeon.diffing.adapters import matched_modules
    from ckptsurgeon.formats.peft import adapter_modules

    records = open_checkpoint(adapters["root"] / "llama").weights().tensors
    modules, whole = adapter_modules(records)
    peft_modules = [m.removeprefix("base_model.model.") for m in adapters["lora_modules"]["llama"]]
    assert sorted(modules) == sorted(peft_modules) and whole == []
    base_names = [f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "k_proj")]
    assert matched_modules(modules, base_names) == [m for m in modules if m.endswith("q_proj")]


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ("{not json", "adapter_config.json: not valid JSON (Expecting property name"),
        ("[1, 2]", "a JSON list, not an object"),
        ('{"peft_type": "LORA", "r": "8"}', "'r' must be a positive integer, not \"8\""),
        ('{"peft_type": "LORA", "r": 0}', "'r' must be a positive integer, not 0"),
        ('{"peft_type": "LORA", "target_modules": 3}', "'target_modules' must be a module name list"),
        ('{"peft_type": "LORA", "lora_alpha": true}', "'lora_alpha' must be a number"),
        ('{"peft_type": "LORA", "use_dora": "yes"}', "'use_dora' must be true or false"),
        ('{"peft_type": "LORA", "rank_pattern": {"q": 1.5}}', "'rank_pattern' must be an object mapping"),
        ('{"peft_type": 3}', "'peft_type' must be a string"),
        ('{"r": 8}', 'no "peft_type": not a PEFT adapter config'),
        ('{"peft_type": "LORA", "peft_type": "IA3"}', "'peft_type' appears twice"),
    ],
)
def test_malformed_adapter_config_is_one_line(
    adapters: dict[str, Any], tmp_path: Path, config: str, fragment: str
) -> None:
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(adapters["root"] / "gpt2", folder)
    (folder / "adapter_config.json").write_text(config)
    assert_one_line_error(run_cli("inspect", folder), str(folder / "adapter_config.json"), fragment)


def test_adapter_config_without_weights_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    assert_one_line_error(
        run_cli("inspect", tmp_path), "a PEFT adapter folder (adapter_config.json) without its weights"
    )


def test_a_config_without_peft_type_and_no_weights_is_not_an_adapter(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text('{"something": "else"}')
    assert_one_line_error(run_cli("inspect", tmp_path), "a folder without a checkpoint")


# -- training checkpoints: which entry is the EMA ------------------------------------------------------
def _tiny_net() -> Any:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())


def test_timm_checkpoint_saver_layout_names_the_ema_and_its_key(tmp_path: Path) -> None:
    model, ema = _tiny_net(), _tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(1, 3, 5, 5)).sum().backward()
    optimizer.step()
    path = tmp_path / "last.pth.tar"
    torch.save(  # the entries timm's CheckpointSaver._save writes
        {
            "epoch": 3,
            "arch": "tiny",
            "optimizer": optimizer.state_dict(),
            "version": 2,
            "state_dict": model.state_dict(),
            "state_dict_ema": ema.state_dict(),
            "metric": 0.5,
        },
        path,
    )
    result = run_cli("inspect", path)
    assert result.exit_code == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("averaged"))
    assert "'state_dict_ema' is the EMA copy (timm's CheckpointSaver" in line
    assert line.endswith("--key state_dict_ema")
    assert "'state_dict' (chosen by default)" in result.stdout
    selected = json.loads(run_cli("inspect", path, "--key", "state_dict_ema", "--format", "json").stdout)
    reference = torch.load(path, weights_only=True)["state_dict_ema"]
    assert [t["name"] for t in selected["tensors"]] == list(reference)
    shown = json.loads(run_cli("inspect", path, "--format", "json").stdout)
    assert shown["averaged"] == [
        {
            "key": "state_dict_ema",
            "saved_by": line.split(" is ", 1)[1].split(": --key")[0],
            "training_key": None,
        }
    ]


def test_lightning_weight_averaging_layout_names_the_averaged_and_training_copies(tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    class Module(torch.nn.Module):  # a LightningModule holding its network as self.model
        def __init__(self) -> None:
            super().__init__()
            self.model = _tiny_net()

    module = Module()
    average = AveragedModel(module, multi_avg_fn=None, avg_fn=get_ema_avg_fn(0.9), use_buffers=True)
    average.update_parameters(module)
    averaged = average.state_dict()
    checkpoint = {"epoch": 1, "global_step": 2, "state_dict": module.state_dict(), "callbacks": {}}
    # what WeightAveraging.on_save_checkpoint does with the trainer's checkpoint dict
    checkpoint["current_model_state"] = checkpoint["state_dict"]
    checkpoint["state_dict"] = {k[7:]: v for k, v in averaged.items() if k.startswith("module.")}
    checkpoint["averaging_state"] = {k: v for k, v in averaged.items() if not k.startswith("module.")}
    path = tmp_path / "ema.ckpt"
    torch.save(checkpoint, path)
    report = inspect(path)
    assert report.weights.key == "state_dict"
    [copy] = report.averaged
    assert (copy.key, copy.training_key) == ("state_dict", "current_model_state")
    line = next(x for x in report.render().splitlines() if x.startswith("averaged"))
    assert line.endswith(
        "'state_dict' is the averaged copy (Lightning's WeightAveraging, EMA or SWA): --key state_dict; "
        "the training weights are 'current_model_state': --key current_model_state"
    )
    training = inspect(path, key="current_model_state").weights.tensors
    assert list(training) == list(module.state_dict())
    target = Module()
    target.load_state_dict({k: v.to_torch() for k, v in inspect(path).weights.tensors.items()}, strict=True)


def test_no_averaged_copy_in_a_plain_lightning_checkpoint() -> None:
    report = inspect(REAL / "lightning_tinynet.ckpt")
    assert report.averaged == []
    assert "averaged" not in report.render()


# -- a shared prefix that is not a wrapper ------------------------------------------------------------
def test_a_shared_non_wrapper_prefix_is_shown(tmp_path: Path) -> None:
    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _tiny_net()

    path = tmp_path / "net.pth"
    torch.save(Holder().state_dict(), path)
    shown = json.loads(run_cli("inspect", path, "--format", "json").stdout)
    assert shown["summary"]["wrapper_prefix"] == ""
    assert shown["summary"]["shared_prefix"] == "net."
    table = run_cli("inspect", path).stdout
    assert "prefix       net.  (shared by all keys; not a known wrapper)" in table
    # the prefix is what separates the keys from the inner module's: stripped, they load strictly
    state = torch.load(path, weights_only=True)
    _tiny_net().load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, strict=True)


def test_wrapper_prefix_and_a_longer_shared_prefix(tmp_path: Path) -> None:
    path = tmp_path / "dp.pth"
    torch.save({f"module.net.{k}": v for k, v in _tiny_net().state_dict().items()}, path)
    line = next(x for x in run_cli("inspect", path).stdout.splitlines() if x.startswith("prefix"))
    assert line.endswith("module.  (every key starts with it; all keys share module.net.)")


def test_one_module_alone_has_no_prefix(tmp_path: Path) -> None:
    path = tmp_path / "fc.pth"
    torch.save(torch.nn.Linear(2, 3).state_dict(), path)
    assert "prefix       none" in run_cli("inspect", path).stdout


def test_adapter_names_with_control_characters_are_escaped(adapters: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "adapter"
    shutil.copytree(adapters["root"] / "gpt2", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "evil\x1b[2K\nFix: rm -rf ~"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    shown = run_cli("inspect", folder).stdout
    assert "base model       evil\\x1b[2K\\nFix: rm -rf ~" in shown and "\x1b" not in shown
    diffed = run_cli("diff", folder, GPT2_TARGET).stdout
    assert "adapter for evil\\x1b[2K\\nFix: rm -rf ~, not a full checkpoint" in diffed
    assert "\x1b" not in diffed and "\nFix:" not in diffed
