"""Issue 12, items 1-3: ``adapt`` and ``load_into`` never write or bless a wrong result.

Checked against the reference a user trusts: Hugging Face's own loader
(``from_pretrained(dir, output_loading_info=True)``) for where a base model's tensors belong in a
task model, and torch's ``load_state_dict`` for what the written file leaves missing. Item 3 uses
two small implementations of one network with disjoint naming (torchvision vs timm in the issue).
"""

from __future__ import annotations

import inspect
import json
import shlex
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli

import ckptsurgeon
from ckptsurgeon.core.coverage import DEFAULT_MIN_COVERAGE, enough
from ckptsurgeon.diffing.diagnosis import diagnose, is_wrapper_prefix
from ckptsurgeon.diffing.result import as_records
from ckptsurgeon.errors import LoadError
from ckptsurgeon.surgery.adapting import checked_adaptation

REPO = Path(__file__).resolve().parent.parent
TINY = "vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37"


def _tiny(config_class: type) -> object:
    return config_class(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
    )


def _spec(task: str, config: str) -> str:
    return f"transformers.{task}(transformers.{config}({TINY}))"


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# -- item 1: a guessed rename is never applied; HF is the reference -------------------------------
HF_CASES = [
    # (base class saved, task class loaded into, config class)
    ("BertModel", "BertForMaskedLM", "BertConfig"),  # pooler.dense was written as cls.predictions...
    ("RobertaModel", "RobertaForSequenceClassification", "RobertaConfig"),  # pooler -> classifier.dense
    ("RobertaForSequenceClassification", "RobertaModel", "RobertaConfig"),  # classifier.dense -> pooler
]


@pytest.mark.parametrize(("saved", "task", "config"), HF_CASES)
def test_adapt_puts_no_tensor_where_hugging_face_would_not(
    tmp_path: Path, saved: str, task: str, config: str
) -> None:
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config_class = getattr(transformers, config)
    getattr(transformers, saved)(_tiny(config_class)).save_pretrained(tmp_path / "saved")
    task_class = getattr(transformers, task)
    hf_model, info = task_class.from_pretrained(tmp_path / "saved", output_loading_info=True)
    hf_state = hf_model.state_dict()
    hf_loaded = set(hf_state) - set(info["missing_keys"])

    out = tmp_path / "adapted.safetensors"
    result = run_cli(
        "adapt", tmp_path / "saved" / "model.safetensors", _spec(task, config), "-o", out, "--format", "json"
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    report = doc["report"]
    written = load_file(str(out))

    # every tensor adapt wrote is one Hugging Face loads, under the same name, with the same values
    assert set(written) <= hf_loaded, set(written) - hf_loaded
    for name, tensor in written.items():
        assert _bit_equal(tensor, hf_state[name]), name
    # and every tensor Hugging Face loads, adapt wrote (a tied alias is filled by its tie)
    assert hf_loaded - set(written) <= set(report["tied"]), hf_loaded - set(written)
    # what HF calls unexpected, adapt left out as having no place
    assert sorted(report["unused"]) == sorted(info["unexpected_keys"])

    # the file loads with torch's strict=False leaving exactly what the report says missing
    model = task_class(_tiny(config_class))
    loaded = model.load_state_dict(written, strict=False)
    assert loaded.unexpected_keys == []
    assert sorted(loaded.missing_keys) == sorted([*report["missing"], *report["tied"]])

    # the guess (if any) is reported, not applied, and never pairs a pooler with a head
    for pair in doc["proposed_mapping"]:
        assert pair["target"] not in written
        assert ("pooler" in pair["source"]) == ("pooler" in pair["target"])


def test_bert_base_into_masked_lm_pooler_is_left_out(tmp_path: Path) -> None:
    """The issue's first case, as the user reads it: pooler.dense is left out, not renamed."""
    transformers = pytest.importorskip("transformers")
    transformers.BertModel(_tiny(transformers.BertConfig)).save_pretrained(tmp_path / "bert")
    src = tmp_path / "bert" / "model.safetensors"
    result = ckptsurgeon.adapt(src, _spec("BertForMaskedLM", "BertConfig"), dry_run=True)
    assert result.plan.mapping["pooler.dense.weight"] is None
    assert result.plan.mapping["pooler.dense.bias"] is None
    assert "cls.predictions.transform.dense.weight" in result.report.missing
    assert result.plan.steps == (
        "key transform: add prefix 'bert.'",
        "drop 2 tensor(s) with no place in the target",
    )
    assert result.proposal == ()  # a pooler is not the masked-LM head: not even proposed
    first = result.render().splitlines()[0]
    assert "key transform: add prefix 'bert.'; drop 2 tensor(s) with no place in the target" in first


# -- item 1: what a suffix proposal is, and the command that applies it ----------------------------
def _blocks(names: dict[str, int]) -> torch.nn.Module:
    """A module whose state dict has exactly ``name.conv.weight`` of shape (n, n) per entry."""
    root = torch.nn.Module()
    for dotted, n in names.items():
        parent = root
        for part in dotted.split("."):
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module("conv", torch.nn.Linear(n, n, bias=False))
    return root


MODELS = """
import torch

def _blocks(names):
    root = torch.nn.Module()
    for dotted, n in names.items():
        parent = root
        for part in dotted.split("."):
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module("conv", torch.nn.Linear(n, n, bias=False))
    return root

def trunk_and_neck(wrap=""):
    names = {f"trunk.s{i}": i + 2 for i in range(4)}
    names = {wrap + k: v for k, v in names.items()}
    names["neck.blk"] = 9
    return _blocks(names)
"""

SOURCE_BLOCKS = {**{f"trunk.s{i}": i + 2 for i in range(4)}, "extra.blk": 9}


@pytest.mark.parametrize("wrap", ["", "model."])
def test_suffix_proposal_is_shown_with_an_exact_command_never_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wrap: str
) -> None:
    (tmp_path / "nets.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    source = _blocks(SOURCE_BLOCKS).state_dict()
    torch.save(source, "src.pth")
    target = f"nets.py:trunk_and_neck(wrap={wrap!r})"

    result = run_cli("adapt", "src.pth", target, "-o", "out.pth", "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    written = torch.load("out.pth", weights_only=True)
    assert sorted(written) == sorted(f"{wrap}trunk.s{i}.conv.weight" for i in range(4))  # the guess is not
    assert doc["proposed_mapping"] == [{"source": "extra.blk.conv.weight", "target": "neck.blk.conv.weight"}]
    dropped = {d["name"]: d["reason"] for d in doc["plan"]["dropped"]}
    assert dropped == {"extra.blk.conv.weight": "no place in the target"}
    assert doc["report"]["missing"] == ["neck.blk.conv.weight"]

    table = run_cli("adapt", "src.pth", target, "--dry-run").stdout
    assert "Not applied: 1 key of the file pair with target keys only by their dotted suffix" in table
    assert "  ckpt rename src.pth " in table and "--replace" in table

    # the commands apply the proposal exactly: the result loads strictly into the target
    for command in doc["proposal_commands"]:
        args = shlex.split(command)
        assert args[0] == "ckpt"
        ran = run_cli(*args[1:])
        assert ran.exit_code == 0, (command, ran.stderr)
    final = torch.load("src.adapted.pth", weights_only=True)
    model = _blocks({**{wrap + f"trunk.s{i}": i + 2 for i in range(4)}, "neck.blk": 9})
    model.load_state_dict(final, strict=True)
    assert _bit_equal(final["neck.blk.conv.weight"], source["extra.blk.conv.weight"])

    diff = json.loads(run_cli("diff", "src.pth", target, "--format", "json").stdout)
    assert diff["diagnosis"]["proposal_commands"] == doc["proposal_commands"]
    assert "ckpt adapt does not apply" in diff["diagnosis"]["message"]


def test_load_into_does_not_apply_the_proposal_either() -> None:
    torch.manual_seed(0)
    source = _blocks(SOURCE_BLOCKS).state_dict()
    model = _blocks({**{f"trunk.s{i}": i + 2 for i in range(4)}, "neck.blk": 9})
    before = model.neck.blk.conv.weight.detach().clone()
    report = ckptsurgeon.load_into(model, source)
    assert report.missing == ("neck.blk.conv.weight",)
    assert torch.equal(model.neck.blk.conv.weight, before)


# -- item 2: a whole key is not a prefix ----------------------------------------------------------
def test_llama_into_bert_classifier_is_refused_not_renamed(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    transformers.LlamaModel(config).save_pretrained(tmp_path / "llama")
    src = tmp_path / "llama" / "model.safetensors"
    target = _spec("BertForSequenceClassification", "BertConfig")

    result = ckptsurgeon.diff(src, target)
    assert result.diagnosis.transform.is_identity  # not strip 'norm.', add 'bert.embeddings.LayerNorm.'
    assert result.diagnosis.mapping == {}
    assert result.explanation.fix_commands == ()
    assert result.explanation.alarm is not None and result.explanation.alarm.startswith("NOTHING WOULD LOAD")

    out = tmp_path / "out.safetensors"
    refused = run_cli("adapt", src, target, "-o", out)
    assert_one_line_error(refused, "nothing would load into", "nothing was written")
    assert not out.exists()


def test_a_prefix_must_be_shared_by_a_real_share_of_keys() -> None:
    names = [f"backbone.layer{i}.conv.weight" for i in range(8)] + ["norm.weight", "head.fc.weight"]
    assert is_wrapper_prefix("backbone.", names)
    assert not is_wrapper_prefix("norm.", names)  # one tensor's own name
    assert not is_wrapper_prefix("head.", names)  # one key of ten
    # a prefix on every key is a wrapper even when it leaves only leaves (DataParallel(nn.Linear))
    assert is_wrapper_prefix("module.", ["module.weight", "module.bias"])
    # a layer's own parameters are not a wrapper, however many keys share it
    layer = [f"blocks.{i}.w" for i in range(3)] + ["emb.weight", "emb.bias"]
    assert not is_wrapper_prefix("emb.", layer)
    linear = torch.nn.Linear(3, 2)
    wrapped = {f"module.{k}": v for k, v in linear.state_dict().items()}
    assert diagnose(as_records(wrapped), as_records(linear.state_dict())).transform.strip == "module."


# -- item 3: one coverage rule --------------------------------------------------------------------
IMPLEMENTATIONS = """
import torch

class ImplA(torch.nn.Module):  # torchvision-like naming
    def __init__(self, layers=4, width=8, classes=5):
        super().__init__()
        self.conv_proj = torch.nn.Conv2d(3, width, 2)
        self.encoder = torch.nn.Module()
        self.encoder.layers = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.Module()
            block.ln_1 = torch.nn.LayerNorm(width)
            block.mlp = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                            torch.nn.Linear(2 * width, width))
            self.encoder.layers.append(block)
        self.encoder.ln = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, classes)

class ImplB(torch.nn.Module):  # timm-like naming
    def __init__(self, layers=4, width=8, classes=5):
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(3, width, 2)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.Module()
            block.norm1 = torch.nn.LayerNorm(width)
            block.fc1 = torch.nn.Linear(width, 2 * width)
            block.fc2 = torch.nn.Linear(2 * width, width)
            self.blocks.append(block)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, classes)

def impl_a(**kw):
    return ImplA(**kw)

def impl_b(**kw):
    return ImplB(**kw)
"""


@pytest.fixture
def two_implementations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str, object]:
    (tmp_path / "impls.py").write_text(IMPLEMENTATIONS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    impls = importlib.import_module("impls")
    monkeypatch.delitem(__import__("sys").modules, "impls")
    torch.manual_seed(0)
    torch.save(impls.impl_a().state_dict(), tmp_path / "a.pth")
    return tmp_path / "a.pth", "impls.py:impl_b()", impls


def test_near_empty_adapt_is_refused_in_one_line(two_implementations: tuple[Path, str, object]) -> None:
    src, target, impls = two_implementations
    total = len(impls.impl_b().state_dict())  # type: ignore[attr-defined]
    refused = run_cli("adapt", src, target, "-o", "out.pth")
    assert_one_line_error(
        refused,
        f"only 2 of {total} target tensors would load",
        "below --min-coverage 50%; nothing was written",
        "a lower --min-coverage accepts it",
    )
    assert not Path("out.pth").exists()

    dry = run_cli("adapt", src, target, "--dry-run", "--format", "json")
    assert dry.exit_code == 1 and json.loads(dry.stdout)["status"] == "refused"

    accepted = run_cli("adapt", src, target, "-o", "out.pth", "--min-coverage", "1", "--format", "json")
    assert accepted.exit_code == 0, accepted.stderr
    doc = json.loads(accepted.stdout)
    assert doc["status"] == "ok" and doc["min_coverage"] == 1 and doc["alarm"] is None
    written = torch.load("out.pth", weights_only=True)
    assert sorted(written) == ["head.bias", "head.weight"]
    loaded = impls.impl_b().load_state_dict(written, strict=False)  # type: ignore[attr-defined]
    assert sorted(loaded.missing_keys) == sorted(doc["report"]["missing"]) and loaded.unexpected_keys == []


def test_load_into_and_library_adapt_use_the_same_rule(two_implementations: tuple[Path, str, object]) -> None:
    src, target, impls = two_implementations
    model = impls.impl_b()  # type: ignore[attr-defined]
    with pytest.raises(LoadError, match=r"only 2 of \d+ target tensors would load .* below min_coverage=50%"):
        ckptsurgeon.load_into(model, src)
    assert len(ckptsurgeon.load_into(model, src, min_coverage=1).loaded) == 2
    with pytest.raises(LoadError, match=r"below --min-coverage 50%"):
        ckptsurgeon.adapt(src, target, "x.pth")
    defaults = {
        func.__name__: inspect.signature(func).parameters["min_coverage"].default
        for func in (ckptsurgeon.load_into, ckptsurgeon.adapt, checked_adaptation)
    }
    assert set(defaults.values()) == {DEFAULT_MIN_COVERAGE} and DEFAULT_MIN_COVERAGE == 50.0, defaults


def test_diff_alarm_and_exit_status_follow_the_same_rule(
    two_implementations: tuple[Path, str, object],
) -> None:
    src, target, _ = two_implementations
    plain = run_cli("diff", src, target, "--format", "json")
    doc = json.loads(plain.stdout)
    assert plain.exit_code == 1 and doc["passes"] is False and doc["min_coverage"] == DEFAULT_MIN_COVERAGE
    assert doc["diagnosis"]["alarm"].startswith("ONLY ")
    assert doc["diagnosis"]["fix_commands"] == []  # adapt would refuse: it is not the fix
    assert (
        "is below the 50% minimum coverage: ckpt adapt and load_into refuse it" in doc["diagnosis"]["message"]
    )
    coverage = doc["summary"]["coverage_percent"]
    for bar in (0, 1, coverage, coverage + 0.5, 50, 100):
        result = run_cli("diff", src, target, "--min-coverage", str(bar), "--format", "json")
        data = json.loads(result.stdout)
        assert (result.exit_code == 0) == data["passes"] == (data["diagnosis"]["alarm"] is None), bar
        assert data["passes"] == enough(2, data["summary"]["target_tensors"], bar), bar


def test_nothing_loading_never_passes_even_at_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"x.weight": torch.zeros(2)}, "x.pth")
    torch.save({"y.weight": torch.zeros(3)}, "y.pth")
    result = run_cli("diff", "x.pth", "y.pth", "--min-coverage", "0")
    assert result.exit_code == 1 and "NOTHING WOULD LOAD" in result.stdout
    assert_one_line_error(run_cli("adapt", "x.pth", "y.pth", "-o", "o.pth", "--min-coverage", "0"), "nothing")


# -- the docs say the same ---------------------------------------------------------------------------
def _documented_fields(markdown: str, after: str) -> list[str]:
    """The backticked names in the first column of the first table after the line ``after``."""
    lines = markdown[markdown.index(after) :].splitlines()
    rows = [line for line in lines if line.startswith("| `")]
    first = lines.index(rows[0])
    fields = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        fields.append(line.split("`")[1])
    return fields


def test_docs_state_the_rule(two_implementations: tuple[Path, str, object]) -> None:
    diff_json = (REPO / "docs" / "diff-json.md").read_text()
    readme = (REPO / "README.md").read_text()
    body = diff_json[diff_json.index("One JSON object") :]
    assert body in readme  # the README carries the same JSON reference
    src, target, _ = two_implementations
    doc = json.loads(run_cli("diff", src, target, "--format", "json").stdout)
    assert _documented_fields(diff_json, "One JSON object") == list(doc)
    assert _documented_fields(diff_json, "`diagnosis`:") == list(doc["diagnosis"])
    assert f"or the default {DEFAULT_MIN_COVERAGE:g}" in diff_json
    assert "ckptsurgeon/core/coverage.py" in readme and f"(default {DEFAULT_MIN_COVERAGE:g}," in readme
    assert f"The bar is {DEFAULT_MIN_COVERAGE:g}% by default" in readme
