"""The structural proposal (diffing/proposal.py) on real module definitions: Hugging Face's own models
from transformers, torchvision's and timm's Vision Transformers and Meta's Llama re-implemented with
their exact names and order (tests/reimplementations.py). Every expected pair below is what the real
libraries' conversion code does (timm's ``_convert_openai_clip``/torchvision's MultiheadAttention
packing, nanoGPT's ``from_pretrained`` transposes, Hugging Face's Llama conversion); the end-to-end
tests (test_proposal_e2e.py) prove them by outputs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from reimplementations import MetaLlama, NanoGPT, TimmViT, TorchvisionViT  # noqa: E402

from ckptsurgeon.diffing.proposal import AMBIGUOUS, CERTAIN, Proposal, propose  # noqa: E402


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def rules_by_target(proposal: Proposal) -> dict[tuple[str, ...], tuple[str, tuple[str, ...], str]]:
    return {r.targets: (r.op, r.sources, r.status) for r in proposal.rules}


def test_torchvision_vit_to_timm_is_certain_and_generalised_to_templates() -> None:
    p = propose(shapes(TorchvisionViT(num_layers=3)), shapes(TimmViT(depth=3)))
    got = rules_by_target(p)
    assert p.covered == p.target_count == 4 + 12 * 3 + 4
    assert p.unfilled == () and p.unused == () and p.ambiguous == ()
    assert got[("blocks.{n}.attn.qkv.weight",)] == (
        "rename",
        ("encoder.layers.encoder_layer_{n}.self_attention.in_proj_weight",),
        CERTAIN,
    )
    assert got[("blocks.{n}.mlp.fc2.bias",)][1] == ("encoder.layers.encoder_layer_{n}.mlp.3.bias",)
    assert got[("cls_token",)][1] == ("class_token",)
    assert got[("pos_embed",)][1] == ("encoder.pos_embedding",)
    assert got[("norm.weight",)][1] == ("encoder.ln.weight",)
    assert got[("patch_embed.proj.bias",)][1] == ("conv_proj.bias",)
    assert all(r.blocks == ((0, 0), (1, 1), (2, 2)) for r in p.rules if "{n}" in r.targets[0])


def test_timm_vit_to_torchvision_is_the_reverse() -> None:
    forward = propose(shapes(TorchvisionViT()), shapes(TimmViT()))
    back = propose(shapes(TimmViT()), shapes(TorchvisionViT()))
    assert {(r.sources, r.targets) for r in forward.rules} == {(r.targets, r.sources) for r in back.rules}
    assert back.ambiguous == ()


def test_pooler_is_never_paired_with_a_classifier_as_certain() -> None:
    transformers = pytest.importorskip("transformers")
    kw = {
        "vocab_size": 60,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 20,
        "num_labels": 3,
    }
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(**kw))
    roberta = transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(**kw, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    )
    p = propose(shapes(bert), shapes(roberta))
    got = rules_by_target(p)
    # same shape [16, 16] and the same suffix dense.weight, but a pooler is not a classifier
    assert got[("classifier.dense.weight",)] == ("rename", ("bert.pooler.dense.weight",), AMBIGUOUS)
    assert got[("classifier.dense.bias",)][2] == AMBIGUOUS
    assert "pooler vs head" in next(r.reason for r in p.rules if r.targets == ("classifier.dense.weight",))


def test_same_shape_same_suffix_different_roles_is_ambiguous() -> None:
    src = {"pooler.dense.weight": (8, 8), "pooler.dense.bias": (8,), "body.w": (3, 8)}
    tgt = {"classifier.dense.weight": (8, 8), "classifier.dense.bias": (8,), "trunk.w": (3, 8)}
    p = propose(src, tgt)
    assert {r.targets[0]: r.status for r in p.rules} == {
        "classifier.dense.weight": AMBIGUOUS,
        "classifier.dense.bias": AMBIGUOUS,
        "trunk.w": CERTAIN,
    }


def test_two_same_shape_tensors_order_cannot_decide_are_ambiguous() -> None:
    # two [8, 8] on one side, one on the other: which one is it?
    p = propose({"a.weight": (8, 8), "b.weight": (8, 8)}, {"c.weight": (8, 8)})
    assert [r.status for r in p.rules] == [AMBIGUOUS]
    assert len(p.unused) == 1


def test_hf_vit_separate_qkv_concatenate_into_timm_qkv_and_split_back() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    hf = shapes(transformers.ViTForImageClassification(config))
    projections = [n for n in hf if n.startswith("vit.layers.0.attention.") and n.endswith("_proj.weight")]
    assert tuple(projections[:3]) == tuple(f"vit.layers.0.attention.{x}_proj.weight" for x in "qkv")
    into_timm = rules_by_target(propose(hf, shapes(TimmViT())))
    assert into_timm[("blocks.{n}.attn.qkv.weight",)] == (
        "concat",
        tuple(f"vit.layers.{{n}}.attention.{x}_proj.weight" for x in "qkv"),
        CERTAIN,
    )
    assert into_timm[("blocks.{n}.attn.qkv.bias",)][0:2] == (
        "concat",
        tuple(f"vit.layers.{{n}}.attention.{x}_proj.bias" for x in "qkv"),
    )
    back = propose(shapes(TimmViT()), hf)
    split = next(r for r in back.rules if r.op == "split" and r.sources == ("blocks.{n}.attn.qkv.weight",))
    assert split.dim == 0 and split.status == CERTAIN and len(split.targets) == 3
    assert back.unfilled == () and back.unused == ()


def test_gpt2_conv1d_against_linear_is_transposes_and_the_square_one_is_to_confirm() -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
        )
    )
    p = propose(shapes(hf), shapes(NanoGPT(50, 16, 16, 2, 2)))
    ops = {r.targets[0]: (r.op, r.status) for r in p.rules}
    # nanoGPT's from_pretrained transposes exactly these four Conv1D weights
    for name in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"):
        assert ops[f"transformer.h.{{n}}.{name}.weight"] == ("transpose", CERTAIN)
    # square [16, 16]: its shape cannot say it is transposed; the proposal says so and asks
    assert ops["transformer.h.{n}.attn.c_proj.weight"] == ("transpose", AMBIGUOUS)
    assert all(op == "rename" for t, (op, _) in ops.items() if not t.endswith("weight") or "ln" in t)
    assert p.unfilled == () and p.unused == ()


def test_hf_llama_to_meta_pairs_names_and_flags_rotary_and_order_only_pairs() -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    p = propose(shapes(hf), shapes(MetaLlama(50, 16, 2, 4, 2, 40)))
    got = {r.targets[0]: (r.sources[0], r.status) for r in p.rules}
    assert got["tok_embeddings.weight"] == ("model.embed_tokens.weight", CERTAIN)
    assert got["output.weight"] == ("lm_head.weight", CERTAIN)
    assert got["layers.{n}.attention.wv.weight"] == ("model.layers.{n}.self_attn.v_proj.weight", CERTAIN)
    assert got["layers.{n}.feed_forward.w2.weight"] == ("model.layers.{n}.mlp.down_proj.weight", CERTAIN)
    # right pairs, but only order supports them (or the rotary layout may differ): a person confirms
    assert got["layers.{n}.feed_forward.w1.weight"] == ("model.layers.{n}.mlp.gate_proj.weight", AMBIGUOUS)
    assert got["layers.{n}.feed_forward.w3.weight"] == ("model.layers.{n}.mlp.up_proj.weight", AMBIGUOUS)
    assert got["layers.{n}.attention.wq.weight"] == ("model.layers.{n}.self_attn.q_proj.weight", AMBIGUOUS)
    assert "rotary" in next(r.reason for r in p.rules if r.targets[0] == "layers.{n}.attention.wk.weight")
    assert p.covered == p.target_count and p.unused == ()


def test_a_1x1_conv_against_a_linear_layer_is_a_reshape() -> None:
    conv = torch.nn.Sequential()
    conv.add_module("proj", torch.nn.Conv2d(8, 4, kernel_size=1))
    linear = torch.nn.Sequential()
    linear.add_module("fc", torch.nn.Linear(8, 4))
    p = propose(shapes(conv), shapes(linear))
    assert [(r.op, r.sources, r.targets, r.status) for r in p.rules] == [
        ("reshape", ("proj.weight",), ("fc.weight",), CERTAIN),
        ("rename", ("proj.bias",), ("fc.bias",), CERTAIN),
    ]


def test_blocks_numbered_differently_and_unaligned_counts() -> None:
    src = {f"layers.{i}.w": (4, 4) for i in range(3)}
    assert propose(src, {f"blocks.{i}.w": (4, 4) for i in range(3)}).rules[0].sources == ("layers.{n}.w",)
    p = propose(src, {f"blocks.{i}.w": (4, 4) for i in range(2)})  # 3 blocks vs 2: no block template
    assert all("{n}" not in r.sources[0] for r in p.rules) and p.ambiguous


def test_summary_counts() -> None:
    p = propose({"a.w": (2, 2), "x.w": (5,)}, {"b.w": (2, 2), "y.w": (7,)})
    assert p.summary() == (
        "1/2 target tensors covered by 1 rules; 0 ambiguous (to confirm), 1 target tensors unfilled, "
        "1 source tensors unused"
    )


def test_a_fused_tensor_whose_parts_names_do_not_say_qkv_is_to_confirm() -> None:
    src = {"enc.fused.weight": (12, 4)}
    p = propose(src, {"dec.a.weight": (4, 4), "dec.b.weight": (4, 4), "dec.c.weight": (4, 4)})
    assert [(r.op, r.status) for r in p.rules] == [("split", AMBIGUOUS)]
    assert "order is assumed" in p.rules[0].reason
    # several ways to cut it and no names to choose: no guess at all
    many = {f"dec.{x}.weight": (4, 4) for x in "abcd"}
    assert propose(src, many).rules == ()


def test_names_holding_braces_are_left_out_never_written_as_templates() -> None:
    """A template has no escape for a brace: 'enc.{*r}' written as a rule would rename every 'enc.'
    tensor, and 'enc.{x}' made the whole proposal fail. Such names are left out, and said so."""
    from ckptsurgeon.diffing.proposal import to_mapping

    src = {"enc.{*r}": (4, 2), "enc.{x}": (5, 2), "a.w": (3,)}
    tgt = {"dec.{*r}": (4, 2), "b.w": (5, 2), "c.w": (3,)}
    proposal = propose(src, tgt)
    assert [(r.sources, r.targets) for r in proposal.rules] == [(("a.w",), ("c.w",))]
    assert set(proposal.unused) == {"enc.{*r}", "enc.{x}"} and set(proposal.unfilled) == {"dec.{*r}", "b.w"}
    assert any("brace" in note for note in proposal.notes)
    assert [(r.source, r.target) for r in to_mapping(proposal).renames] == [("a.w", "c.w")]
