"""End to end (issue 17, "What it must show"): propose a mapping with `ckpt diff --propose-map`, confirm
what the proposal asks a person to confirm by editing the file as a user would, apply it, load the
result with strict ``load_state_dict`` and compare the outputs with the original model's on a fixed
input; then the reverse direction with the same file.

The models: torchvision's and timm's Vision Transformers and Meta's Llama re-implemented with their
exact names, order and math (tests/reimplementations.py: torchvision and timm cannot be installed
here); Hugging Face's GPT-2 and Llama from transformers itself; GPT-2 with ``nn.Linear`` in nanoGPT's
layout. The reference for each conversion is the real network's output, not our numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import run_cli  # noqa: E402
from reimplementations import MetaLlama, NanoGPT, TimmViT, TorchvisionViT  # noqa: E402

ATOL = 1e-5


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn anew (std 0.3): no zero-initialised token or bias hides a wrong pair."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def save(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def propose(src: Path, target: Path, tmp_path: Path, name: str = "map.toml") -> tuple[Path, str, int]:
    out = tmp_path / name
    result = run_cli("diff", src, target, "--propose-map", out)
    assert result.exception is None, result.exception
    assert out.is_file(), result.stdout + result.stderr
    return out, result.stdout, result.exit_code


def outputs_equal(
    a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, call: Callable | None = None
) -> float:
    call = call or (lambda m, inp: m(inp))
    with torch.no_grad():
        diff = (call(a, x) - call(b, x)).abs().max().item()
    return float(diff)


def load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def apply_map(src: Path, mapping: Path, out: Path, *extra: str) -> None:
    """``ckpt rename SRC -o OUT --map MAP`` (what a user runs; it verifies what it wrote)."""
    result = run_cli("rename", src, "-o", out, "--map", mapping, *extra)
    assert result.exception is None, result.exception
    assert result.exit_code == 0, result.stdout + result.stderr


def confirm(mapping: Path, targets: list[str], added: str = "", replaced: tuple[str, ...] = ()) -> None:
    """What a reviewer does: check the ambiguous rules are these, mark them certain, replace the rules
    whose target is in ``replaced`` with ``added``."""
    text = mapping.read_text()
    rules = text.split("\n\n")
    ambiguous = sorted(
        _to(rule) for rule in rules if rule.startswith("[[") and 'status = "ambiguous"' in rule
    )
    assert ambiguous == sorted(targets)
    kept = [rule for rule in rules if not (rule.startswith("[[") and _to(rule) in replaced)]
    assert len(kept) == len(rules) - len(replaced)
    text = "\n\n".join(kept).replace('\nstatus = "ambiguous"', '\nstatus = "certain"')
    mapping.write_text(text + added)


def _to(rule: str) -> str:
    return next(line.split(" = ", 1)[1].strip('"') for line in rule.splitlines() if line.startswith("to = "))


def round_trip(
    tmp_path: Path,
    original: torch.nn.Module,
    other: torch.nn.Module,
    x: torch.Tensor,
    ambiguous: list[str],
    added: str = "",
    replaced: tuple[str, ...] = (),
    call: Callable | None = None,
    exit_code: int | None = None,
) -> str:
    """Propose original -> other, confirm, convert, load strictly, compare outputs; then convert back."""
    src = save(original, tmp_path / "src.pth")
    tgt = save(other, tmp_path / "tgt.pth")
    mapping, printed, code = propose(src, tgt, tmp_path)
    assert code == (exit_code if exit_code is not None else (1 if ambiguous else 0)), printed
    confirm(mapping, ambiguous, added, replaced)
    out = tmp_path / "converted.pth"
    apply_map(src, mapping, out)
    other.load_state_dict(load(out), strict=True)  # nothing missing, nothing unexpected
    assert outputs_equal(original, other.eval(), x, call) < ATOL
    back = tmp_path / "back.pth"
    apply_map(out, mapping, back, "--reverse")
    before, after = load(src), load(back)
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    return mapping.read_text()


def test_torchvision_vit_b_16_layout_to_timm_vit_base_patch16_224_layout(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = round_trip(tmp_path, randomized(TorchvisionViT(num_layers=3), 1), TimmViT(depth=3), x, [])
    assert 'from = "encoder.layers.encoder_layer_{n}.self_attention.in_proj_weight"' in text
    assert 'to = "blocks.{n}.attn.qkv.weight"' in text


def test_timm_vit_layout_to_torchvision(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    round_trip(tmp_path, randomized(TimmViT(depth=2), 2), TorchvisionViT(num_layers=2), x, [])


def test_hf_vit_separate_qkv_into_timm_fused_qkv(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        num_labels=5,
        layer_norm_eps=1e-6,  # timm's
    )
    hf = randomized(transformers.ViTForImageClassification(config), 3)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ambiguous = [f"blocks.{{n}}.{norm}.{p}" for norm in ("norm1", "norm2") for p in ("weight", "bias")]
    text = round_trip(
        tmp_path,
        hf,
        TimmViT(),
        x,
        ambiguous,
        call=lambda m, inp: m(inp) if isinstance(m, TimmViT) else m(pixel_values=inp).logits,
    )
    assert 'op = "concat"' in text


def test_gpt2_conv1d_to_linear(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    hf = randomized(transformers.GPT2LMHeadModel(config), 4)
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(4))
    text = round_trip(
        tmp_path,
        hf,
        NanoGPT(50, 16, 16, 2, 2),
        ids,
        ["transformer.h.{n}.attn.c_proj.weight"],  # square: transposed, but its shape cannot say so
        call=lambda m, inp: m(inp) if isinstance(m, NanoGPT) else m(inp).logits,
    )
    assert text.count('op = "transpose"') == 4


LLAMA = {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 40, "num_hidden_layers": 2}


def test_hf_llama_to_meta_layout_with_the_rotary_permutation(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        **LLAMA,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    hf = randomized(transformers.LlamaForCausalLM(config), 5)
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(5))
    ambiguous = [
        "layers.{n}.attention.wq.weight",  # rotary row order: the reviewer adds rotary_permute below
        "layers.{n}.attention.wk.weight",
        "layers.{n}.feed_forward.w1.weight",  # gate/up against w1/w3: by order only; Meta's w1 is the gate
        "layers.{n}.feed_forward.w3.weight",
        "layers.{n}.attention_norm.weight",  # the two norms: by order only
        "layers.{n}.ffn_norm.weight",
    ]
    # the reviewer turns the q/k renames into rotary_permute transforms (heads: 4 for q, 2 kv heads for k),
    # as transformers' convert_llama_weights_to_hf permutes them (here the other way)
    rotary = "".join(
        f'\n\n[[transform]]\nop = "rotary_permute"\nfrom = "model.layers.{{n}}.self_attn.{x}_proj.weight"\n'
        f'to = "layers.{{n}}.attention.w{x}.weight"\nn_heads = {heads}\ndirection = "hf_to_meta"\n'
        for x, heads in (("q", 4), ("k", 2))
    )
    round_trip(
        tmp_path,
        hf,
        MetaLlama(50, 16, 2, 4, 2, 40),
        ids,
        ambiguous,
        rotary,
        ("layers.{n}.attention.wq.weight", "layers.{n}.attention.wk.weight"),
        call=lambda m, inp: m(inp) if isinstance(m, MetaLlama) else m(inp).logits,
    )


def test_propose_map_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    from conftest import assert_one_line_error

    src = save(TimmViT(), tmp_path / "a.pth")
    tgt = save(TorchvisionViT(), tmp_path / "b.pth")
    mapping, printed, code = propose(src, tgt, tmp_path)
    assert code == 0
    assert "32/32 target tensors covered by 20 rules; 0 ambiguous" in printed
    mapping.write_text("# my reviewed copy\n")
    again = run_cli("diff", src, tgt, "--propose-map", mapping)
    assert_one_line_error(again, "already exists", "--force")
    assert mapping.read_text() == "# my reviewed copy\n"
    forced = run_cli("diff", src, tgt, "--propose-map", mapping, "--force")
    assert forced.exit_code == 0 and "version = 1" in mapping.read_text()


def test_propose_map_is_a_mapping_file_that_reads_back(tmp_path: Path) -> None:
    from ckptsurgeon.surgery.mapping import load_mapping

    src = save(TorchvisionViT(), tmp_path / "a.pth")
    mapping, _, _ = propose(src, save(TimmViT(), tmp_path / "b.pth"), tmp_path)
    loaded = load_mapping(mapping)
    assert len(loaded.renames) == 20 and not loaded.ambiguous
    assert all(rule.note for rule in loaded.renames)


def test_propose_map_options_that_do_not_combine(tmp_path: Path) -> None:
    src = save(TimmViT(), tmp_path / "a.pth")
    assert run_cli("diff", src, src, "--force").exit_code == 2
    assert run_cli("diff", src, src, "--values", "--propose-map", tmp_path / "m.toml").exit_code == 2
    assert not (tmp_path / "m.toml").exists()


def test_the_library_applies_the_proposal_as_the_cli_does(tmp_path: Path) -> None:
    from ckptsurgeon import propose_mapping
    from ckptsurgeon.diffing.proposal import to_mapping

    original, other = randomized(TorchvisionViT(), 6), TimmViT()
    mapping = to_mapping(propose_mapping(original, other))
    other.load_state_dict(mapping.apply(original.state_dict()), strict=True)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    assert outputs_equal(original, other.eval(), x) < ATOL
    back = mapping.reversed().apply(other.state_dict())
    assert all(torch.equal(back[k], v) for k, v in original.state_dict().items())


def test_llama_reverse_with_the_rotary_transform_on_the_renamed_names(tmp_path: Path) -> None:
    """The other way a reviewer may write the permutation: a transform on the renamed (Meta) names,
    after the proposal's renames; ``--reverse`` undoes it before renaming back."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        **LLAMA, num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    hf = randomized(transformers.LlamaForCausalLM(config), 7)
    src = save(hf, tmp_path / "src.pth")
    mapping, _, _ = propose(src, save(MetaLlama(50, 16, 2, 4, 2, 40), tmp_path / "tgt.pth"), tmp_path)
    text = mapping.read_text().replace('\nstatus = "ambiguous"', '\nstatus = "certain"')
    for w, heads in (("wq", 4), ("wk", 2)):  # the other way a reviewer may write it: after the rename
        text += (
            f'\n[[transform]]\nop = "rotary_permute"\nfrom = "layers.{{n}}.attention.{w}.weight"\n'
            f'to = "layers.{{n}}.attention.{w}.weight"\nn_heads = {heads}\ndirection = "hf_to_meta"\n'
        )
    mapping.write_text(text)
    apply_map(src, mapping, tmp_path / "meta.pth")
    apply_map(tmp_path / "meta.pth", mapping, tmp_path / "back.pth", "--reverse")
    before, after = load(src), load(tmp_path / "back.pth")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_separate_qkv_stored_sorted_are_proposed_as_one_concat(tmp_path: Path) -> None:
    """A safetensors file lists its names sorted (k_proj, out_proj, q_proj, v_proj): the parts named
    q/k/v are still found as one concat, and the round trip gives the original back bit for bit."""
    from conftest import FIXTURES

    split = tmp_path / "split.safetensors"
    rename = run_cli(
        "rename", FIXTURES / "vit_28.pth", "--map", FIXTURES / "mappings" / "vit_qkv.toml", "-o", split
    )
    assert rename.exit_code == 0, rename.stderr
    mapping, printed, code = propose(split, FIXTURES / "vit_28.pth", tmp_path)
    assert code == 0 and "32/32 target tensors covered" in printed and "0 ambiguous" in printed
    assert 'op = "concat"' in mapping.read_text()
    back = tmp_path / "back.pth"
    assert run_cli("rename", split, "--map", mapping, "-o", back).exit_code == 0
    original = torch.load(FIXTURES / "vit_28.pth", weights_only=True)
    converted = torch.load(back, weights_only=True)
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], v) for k, v in original.items())


def test_propose_map_names_with_newlines_cannot_forge_rules_or_report_lines(tmp_path: Path) -> None:
    """A hostile tensor name holding a newline is written escaped in the file's comments and in the
    printed report: it must not become a TOML line (here a drop of every tensor) or a report line."""
    import tomllib

    forged = 'junk\ndrop = [{regex = ".", reason = "pwned"}]'
    torch.save({"a.w": torch.ones(4, 2), forged: torch.zeros(7, 7, 7)}, tmp_path / "s.pth")
    torch.save({"b.w": torch.ones(4, 2)}, tmp_path / "t.pth")
    mapping = tmp_path / "m.toml"
    result = run_cli("diff", tmp_path / "s.pth", tmp_path / "t.pth", "--propose-map", mapping)
    assert result.exit_code == 0, result.stderr
    assert "drop" not in tomllib.loads(mapping.read_text())
    assert all(
        line.startswith("#") or not line.startswith("drop") for line in mapping.read_text().splitlines()
    )
    assert not any(line.startswith("drop") for line in result.stdout.splitlines())
    assert "junk\\ndrop" in result.stdout and "junk\\ndrop" in mapping.read_text()


def test_propose_map_never_overwrites_its_source_or_target_even_with_force(tmp_path: Path) -> None:
    from conftest import assert_one_line_error, sha256

    torch.save({"a.w": torch.ones(4, 2)}, tmp_path / "s.pth")
    torch.save({"b.w": torch.ones(4, 2)}, tmp_path / "t.pth")
    (tmp_path / "models.py").write_text("import torch\n\ndef net():\n    return torch.nn.Linear(2, 4)\n")
    before = {p.name: sha256(p) for p in tmp_path.iterdir()}
    for target, onto in (("t.pth", "s.pth"), ("t.pth", "t.pth"), ("models.py:net()", "models.py")):
        result = run_cli(
            "diff", tmp_path / "s.pth", f"{tmp_path}/{target}", "--propose-map", tmp_path / onto, "--force"
        )
        assert_one_line_error(result, "--propose-map", onto)
    assert {p.name: sha256(p) for p in tmp_path.iterdir()} == before
