"""Issue 15, vocabulary and classes: keep learned weights when only the row count changed.

The reference is Hugging Face's ``resize_token_embeddings(n)`` on the source model (default
``mean_resizing=True``: kept rows copied, new rows drawn around the mean of the old rows with a
covariance scaled by 1e-9, or exactly the mean when that covariance is not positive definite), and
torch's ``load_state_dict`` for what the written file leaves missing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, assert_one_line_error, run_cli

import ckptsurgeon
from ckptsurgeon.core.record import TensorRecord
from ckptsurgeon.diffing.result import diff
from ckptsurgeon.errors import SurgeryError
from ckptsurgeon.surgery.resize import parse_class_indices, resize_rows, select_rows

transformers = pytest.importorskip("transformers")

SPECS = {
    "gpt2": "transformers.GPT2LMHeadModel(transformers.GPT2Config("
    "n_layer=1, n_embd=8, n_head=2, vocab_size={v}, n_positions=16))",
    "llama": "transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size={v}, hidden_size=8, "
    "intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, "
    "tie_word_embeddings=False))",
}
EMBEDDING = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight"}


def _spec(kind: str, vocab: int) -> str:
    return SPECS[kind].format(v=vocab)


def _model(kind: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=vocab, n_positions=16)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _save(model: torch.nn.Module, tmp_path: Path, layout: str) -> Path:
    if layout == "folder":  # safetensors: a tied head is stored once
        model.save_pretrained(tmp_path / "src")
        return tmp_path / "src" / "model.safetensors"
    path = tmp_path / "src.pth"  # torch.save keeps every name, tied ones too
    torch.save(model.state_dict(), path)
    return path


def _hf_plain_mean(weight: torch.Tensor) -> bool:
    """True when Hugging Face's mean resizing writes exactly the mean (its covariance check fails)."""
    w = weight.detach().to(torch.float32)
    centered = w - w.mean(0)
    covariance = centered.T @ centered / w.shape[0]
    return not bool(torch.distributions.constraints.positive_definite.check(1e-9 * covariance).all())


def _load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)


def _check_rows(got: torch.Tensor, ref: torch.Tensor, old: torch.Tensor, what: str) -> None:
    """Kept rows bit for bit (HF's and the source's); new rows as HF's mean initialisation."""
    kept = min(old.shape[0], ref.shape[0])
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    assert torch.equal(got[:kept], ref[:kept]) and torch.equal(got[:kept], old[:kept]), what
    if ref.shape[0] > kept:
        if _hf_plain_mean(old):
            assert torch.equal(got[kept:], ref[kept:]), what
        else:  # HF samples around the mean with 1e-9 x the covariance
            torch.testing.assert_close(got[kept:], ref[kept:], atol=1e-5, rtol=0)
        mean = old.to(torch.float32).mean(0).to(old.dtype)
        assert torch.equal(got[kept:], mean.expand_as(got[kept:])), what


# -- end to end: ckpt adapt --resize-vocab on tied and untied causal LMs ------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("layout", ["folder", "pth"])
@pytest.mark.parametrize(("old", "new"), [(99, 120), (99, 80), (6, 10)])
def test_adapt_resize_vocab_matches_resize_token_embeddings(
    tmp_path: Path, kind: str, layout: str, old: int, new: int
) -> None:
    source = _model(kind, old)
    path = _save(source, tmp_path, layout)
    out = tmp_path / f"out{path.suffix}"
    result = run_cli("adapt", path, _spec(kind, new), "--resize-vocab", "-o", out, "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    report = doc["report"]

    target = _model(kind, new, seed=1)
    missing, unexpected = target.load_state_dict(_load(out), strict=False)
    assert not unexpected
    assert set(missing) == set(report["missing"]) | set(report["tied"])
    assert not report["missing"] and not report["skipped"] and report["status"] == "ok"

    reference = copy.deepcopy(source)
    reference.resize_token_embeddings(new)  # Hugging Face's default: mean_resizing=True
    state = source.state_dict()
    embedding = EMBEDDING[kind]
    _check_rows(
        target.get_input_embeddings().weight,
        reference.get_input_embeddings().weight,
        state[embedding],
        embedding,
    )
    _check_rows(
        target.get_output_embeddings().weight,
        reference.get_output_embeddings().weight,
        state["lm_head.weight"],
        "lm_head.weight",
    )

    resized = {t["name"] for t in report["transformed"]}
    written = _load(out)
    if kind == "gpt2":  # tied: the head follows the embedding
        assert target.lm_head.weight is target.transformer.wte.weight
        if layout == "pth":
            assert torch.equal(written["lm_head.weight"], written[embedding])
            assert "from its tied transformer.wte.weight" in json.dumps(doc["plan"]["transformed"])
    expected = {embedding} | ({"lm_head.weight"} if "lm_head.weight" in _load(path) else set())
    assert resized == expected and resized <= set(report["loaded"])
    steps = " ".join(doc["plan"]["steps"])
    assert f"resize the vocabulary {old} -> {new} tokens (new rows: mean)" in steps
    assert {e["name"] for e in doc["plan"]["transformed"]} == expected


def test_new_rows_zeros_and_the_table_report(tmp_path: Path) -> None:
    source = _model("llama", 99)
    path = _save(source, tmp_path, "pth")
    out = tmp_path / "out.safetensors"
    result = run_cli("adapt", path, _spec("llama", 120), "--resize-vocab", "--new-rows", "zeros", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "resize 99 -> 120 rows (21 new of zeros)" in result.stdout
    assert "loaded, transformed" in result.stdout
    written = _load(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(written[name][:99], source.state_dict()[name])
        assert torch.equal(written[name][99:], torch.zeros(21, 8))


def test_resize_with_a_cast_and_a_dry_run(tmp_path: Path) -> None:
    path = _save(_model("gpt2", 99), tmp_path, "folder")
    dry = ckptsurgeon.adapt(path, _spec("gpt2", 120), resize_vocab=True, dry_run=True)
    assert dry.written is None and dry.report.ok
    assert {name for name, _old, _what in dry.report.transformed} == {"transformer.wte.weight"}
    out = tmp_path / "bf16.safetensors"
    written = ckptsurgeon.adapt(path, _spec("gpt2", 120), out, resize_vocab=True, dtype="bf16")
    assert written.written is not None and written.written.verified
    wte = _load(out)["transformer.wte.weight"]
    src = _load(path)["transformer.wte.weight"]
    assert wte.dtype == torch.bfloat16 and torch.equal(wte[:99], src.to(torch.bfloat16))


def test_without_the_option_the_vocabulary_is_dropped(tmp_path: Path) -> None:
    path = _save(_model("llama", 99), tmp_path, "pth")
    r = ckptsurgeon.adapt(path, _spec("llama", 120), dry_run=True)
    assert set(r.report.missing) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert not r.report.transformed and not r.plan.transformed


def test_load_into_resizes_like_hugging_face(tmp_path: Path) -> None:
    source = _model("gpt2", 99)
    path = _save(source, tmp_path, "folder")
    target = _model("gpt2", 120, seed=3)
    report = ckptsurgeon.load_into(target, path, resize_vocab=True)
    assert report.ok and "transformer.wte.weight" in report.loaded
    reference = copy.deepcopy(source)
    reference.resize_token_embeddings(120)
    _check_rows(
        target.transformer.wte.weight, reference.transformer.wte.weight, source.transformer.wte.weight, "wte"
    )
    assert target.lm_head.weight is target.transformer.wte.weight
    assert "loaded, transformed" in report.render()
    assert report.to_json()["transformed"][0]["name"] == "transformer.wte.weight"


# -- the diagnosis says it ---------------------------------------------------------------------------
def test_diff_says_what_resizing_keeps(tmp_path: Path) -> None:
    path = _save(_model("llama", 99), tmp_path, "pth")
    grow = diff(path, _spec("llama", 120)).explanation.message
    assert (
        "model.embed_tokens / lm_head: 99 -> 120 tokens: ckpt adapt --resize-vocab keeps the 99 trained "
        "rows, 21 new rows from their mean"
    ) in grow
    shrink = diff(path, _spec("llama", 80)).explanation.message
    assert "99 -> 80 tokens: ckpt adapt --resize-vocab keeps the first 80 trained rows" in shrink
    assert "and drops the other 19" in shrink


# -- classes ---------------------------------------------------------------------------------------
def _fixture_models():
    spec = importlib.util.spec_from_file_location("resize_models", FIXTURES / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


VGG_10 = f"{FIXTURES / 'models.py'}:vgg_like(num_classes=10)"
CLASSES = [3, 17, 42, 999, 0, 5, 500, 7, 8, 9]


@pytest.fixture
def vgg_1000(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = _fixture_models().vgg_like(num_classes=1000).state_dict()
    path = tmp_path / "vgg_1000.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("how", ["list", "file", "@file"])
def test_keep_classes_rows_equal_the_source_rows(
    tmp_path: Path, vgg_1000: tuple[Path, dict[str, torch.Tensor]], how: str
) -> None:
    path, state = vgg_1000
    listing = tmp_path / "classes.txt"
    listing.write_text("# chosen\n" + "\n".join(str(i) for i in CLASSES) + "\n")
    option = {"list": ",".join(map(str, CLASSES)), "file": str(listing), "@file": f"@{listing}"}[how]
    out = tmp_path / "vgg_10.safetensors"
    result = run_cli("adapt", path, VGG_10, "--keep-classes", option, "-o", out, "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    assert report["status"] == "ok" and not report["missing"]
    assert {t["name"] for t in report["transformed"]} == {"classifier.6.weight", "classifier.6.bias"}
    model = _fixture_models().vgg_like(num_classes=10)
    model.load_state_dict(_load(out), strict=True)
    index = torch.tensor(CLASSES)
    assert torch.equal(model.classifier[6].weight.detach(), state["classifier.6.weight"][index])
    assert torch.equal(model.classifier[6].bias.detach(), state["classifier.6.bias"][index])


def test_load_into_keep_classes(vgg_1000: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, state = vgg_1000
    model = _fixture_models().vgg_like(num_classes=3)
    report = ckptsurgeon.load_into(model, path, keep_classes=[42, 3, 17])
    assert report.ok
    assert torch.equal(model.classifier[6].bias.detach(), state["classifier.6.bias"][[42, 3, 17]])


def test_diff_names_keep_classes_for_a_shrinking_head(vgg_1000: tuple[Path, dict[str, torch.Tensor]]) -> None:
    message = diff(vgg_1000[0], VGG_10).explanation.message
    assert "ckpt adapt --keep-classes I,J,... (or @FILE" in message


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        ("3,17,42", "3 class indices given, the target's head has 10 classes"),
        ("0,1,2,3,4,5,6,7,8,1000", "1000 out of range"),
        ("0,1,2,3,4,5,6,7,8,8", "class 8 given more than once"),
        ("0,1,x", "'x' is not a class index"),
        ("@/nonexistent/classes.txt", "cannot read"),
    ],
)
def test_keep_classes_refusals_are_one_line(
    tmp_path: Path, vgg_1000: tuple[Path, dict[str, torch.Tensor]], option: str, fragment: str
) -> None:
    out = tmp_path / "o.pth"
    result = run_cli("adapt", vgg_1000[0], VGG_10, "--keep-classes", option, "-o", out)
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_impossible_requests_are_one_line(
    tmp_path: Path, vgg_1000: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path = vgg_1000[0]
    out = tmp_path / "o.pth"
    same = f"{FIXTURES / 'models.py'}:vgg_like(num_classes=1000)"
    bigger = f"{FIXTURES / 'models.py'}:vgg_like(num_classes=2000)"
    for target, flags, fragment in [
        (VGG_10, ["--resize-vocab"], "--resize-vocab: no embedding or LM head changes size"),
        (same, ["--keep-classes", "1,2"], "--keep-classes: no classifier head changes"),
        (bigger, ["--keep-classes", "1"], "more than the file's 1000"),
        (VGG_10, ["--resize-vocab", "--new-rows", "ones"], "ones"),
    ]:
        result = run_cli("adapt", path, target, *flags, "-o", out)
        if "ones" in flags:  # click refuses a choice it does not know (its own usage error)
            assert result.exit_code == 2 and "'ones' is not one of" in result.stderr
            continue
        assert_one_line_error(result, fragment)
    assert not out.exists()


# -- the transforms alone -----------------------------------------------------------------------------
def test_resize_rows_of_a_bias_and_along_another_dimension() -> None:
    bias = TensorRecord.from_torch("b", torch.tensor([1.0, 2.0, 6.0]))
    t = resize_rows({"b": bias}, "b", 5)
    assert t.value((bias,), 0).tolist() == [1.0, 2.0, 6.0, 3.0, 3.0]
    logits = TensorRecord.from_torch("f", torch.tensor([[1.0, 3.0]]))
    t = resize_rows({"f": logits}, "f", 3, dim=1, new_rows="zeros")
    assert t.value((logits,), 0).tolist() == [[1.0, 3.0, 0.0]]
    assert resize_rows({"f": logits}, "f", 1, dim=1).value((logits,), 0).tolist() == [[1.0]]
    ints = TensorRecord("i", "int64", (3,))
    with pytest.raises(SurgeryError, match="only floating rows can be averaged"):
        resize_rows({"i": ints}, "i", 4)
    assert resize_rows({"i": ints}, "i", 4, new_rows="zeros").outputs[0].shape == (4,)


def test_select_rows_and_index_parsing(tmp_path: Path) -> None:
    w = TensorRecord.from_torch("w", torch.arange(12.0).reshape(4, 3))
    assert select_rows({"w": w}, "w", [2, 0]).value((w,), 0).tolist() == [[6.0, 7.0, 8.0], [0.0, 1.0, 2.0]]
    with pytest.raises(SurgeryError, match="out of range"):
        select_rows({"w": w}, "w", [4])
    with pytest.raises(SurgeryError, match="-1 out of range"):
        select_rows({"w": w}, "w", [-1])
    listing = tmp_path / "c.txt"
    listing.write_text("3\n\n17 # a comment\n42\n")
    assert parse_class_indices(f"@{listing}") == parse_class_indices(str(listing)) == (3, 17, 42)
    assert parse_class_indices([1, 2]) == (1, 2)


def test_a_tied_head_follows_the_embedding(tmp_path: Path) -> None:
    """An untied file into a tied target: the head's rows are the resized embedding's."""
    source = _model("llama", 99)
    path = _save(source, tmp_path, "pth")
    tied = _spec("llama", 120).replace("tie_word_embeddings=False", "tie_word_embeddings=True")
    out = tmp_path / "tied.safetensors"
    result = ckptsurgeon.adapt(path, tied, out, resize_vocab=True)
    assert result.report.ok
    written = _load(out)
    assert torch.equal(written["lm_head.weight"], written["model.embed_tokens.weight"])
    assert torch.equal(written["lm_head.weight"][:99], source.state_dict()["model.embed_tokens.weight"])
