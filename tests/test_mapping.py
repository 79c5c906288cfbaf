"""Mapping files (ckptsurgeon/surgery/mapping.py, mappingplan.py): each op against torch computing the
same, the TOML round trip through tomllib, reverse(forward(x)) bit for bit, an end-to-end conversion
through `ckpt rename --map` checked by load_state_dict(strict=True) and a model's outputs, and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from torch import nn

try:
    import tomllib
except ImportError:  # Python 3.10: the package depends on tomli there
    import tomli as tomllib

from ckptsurgeon.surgery.mapping import (
    Drop,
    Mapping,
    MappingError,
    Rename,
    TensorTransform,
    load_mapping,
    parse_mapping,
)


def _one(op: str, source: str | tuple[str, ...], target: str | tuple[str, ...], **fields) -> Mapping:
    sources = (source,) if isinstance(source, str) else source
    targets = (target,) if isinstance(target, str) else target
    return Mapping(transforms=(TensorTransform(op, sources, targets, **fields),))


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# -- each op against torch ----------------------------------------------------------------------
def test_split_equal_and_sized_parts_match_torch_split() -> None:
    w = torch.randn(12, 5)
    out = _one("split", "a.qkv", ("a.q", "a.k", "a.v")).apply({"a.qkv": w})
    assert all(_equal(out[n], t) for n, t in zip(("a.q", "a.k", "a.v"), torch.split(w, 4), strict=True))
    out = _one("split", "qkv", ("q", "k", "v"), dim=1, sizes=(1, 2, 2)).apply({"qkv": w[:, :5]})
    assert all(_equal(out[n], t) for n, t in zip("qkv", torch.split(w[:, :5], [1, 2, 2], dim=1), strict=True))


def test_concat_matches_torch_cat() -> None:
    parts = {"q": torch.randn(4, 3), "k": torch.randn(2, 3), "v": torch.randn(2, 3)}
    out = _one("concat", ("q", "k", "v"), "qkv", sizes=(4, 2, 2)).apply(parts)
    assert list(out) == ["qkv"] and _equal(out["qkv"], torch.cat(list(parts.values())))


def test_transpose_permute_reshape_match_torch() -> None:
    w = torch.randn(2, 3, 4, 5)
    assert _equal(
        _one("transpose", "w", "w", dims=(1, 3)).apply({"w": w})["w"], w.transpose(1, 3).contiguous()
    )
    permuted = _one("permute", "w", "w", dims=(0, 2, 3, 1)).apply({"w": w})["w"]
    assert _equal(permuted, w.permute(0, 2, 3, 1).contiguous())
    conv = torch.randn(6, 4, 1, 1)  # a 1x1 conv as a linear layer: [0, -1] keeps dim 0, infers the rest
    assert _equal(_one("reshape", "c", "l", shape=(0, -1)).apply({"c": conv})["l"], conv.reshape(6, 4))


def test_conv1d_transposed_weight_computes_what_linear_computes() -> None:
    """GPT-2's Conv1D stores weight as [in, out], nn.Linear as [out, in]: a transpose maps one to another."""
    x, weight, bias = torch.randn(3, 4), torch.randn(4, 6), torch.randn(6)
    conv1d_out = torch.addmm(bias, x, weight)  # transformers.pytorch_utils.Conv1D.forward
    linear = nn.Linear(4, 6)
    mapped = _one("transpose", "c.weight", "c.weight", dims=(0, 1)).apply(
        {"c.weight": weight, "c.bias": bias}
    )
    linear.load_state_dict({"weight": mapped["c.weight"], "bias": mapped["c.bias"]}, strict=True)
    torch.testing.assert_close(linear(x), conv1d_out)


def _hf_permute(w: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
    """`permute` of transformers/models/llama/convert_llama_weights_to_hf.py (Meta -> Hugging Face),
    written out here: that script is not in transformers 5's wheel."""
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def test_rotary_permute_is_hugging_faces_conversion_permute() -> None:
    w = torch.randn(32, 16)
    out = _one("rotary_permute", "wq", "q_proj", n_heads=4, direction="meta_to_hf").apply({"wq": w})
    assert _equal(out["q_proj"], _hf_permute(w, 4, 32, 16))


def test_rotary_permute_gives_the_same_attention_scores_under_each_layouts_rotary() -> None:
    """Meta's rotary (complex pairs, llama/model.py apply_rotary_emb) on Meta's weights gives the
    same q.k scores as transformers' apply_rotary_pos_emb (halves) on the permuted weights."""
    modeling = pytest.importorskip("transformers.models.llama.modeling_llama")
    heads, head_dim, dim, seq = 2, 8, 16, 5
    x = torch.randn(seq, dim, dtype=torch.float64)
    wq, wk = (
        torch.randn(heads * head_dim, dim, dtype=torch.float64),
        torch.randn(heads * head_dim, dim, dtype=torch.float64),
    )
    freqs = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), freqs)  # [seq, head_dim/2]

    def meta(w: torch.Tensor) -> torch.Tensor:
        y = (x @ w.T).view(seq, heads, head_dim // 2, 2)
        rotated = (
            torch.view_as_complex(y.contiguous()) * torch.polar(torch.ones_like(angles), angles)[:, None]
        )
        return torch.view_as_real(rotated).reshape(seq, heads, head_dim).transpose(0, 1)

    mapping = Mapping(
        transforms=tuple(
            TensorTransform("rotary_permute", (m,), (h,), n_heads=heads, direction="meta_to_hf")
            for m, h in (("wq", "q_proj"), ("wk", "k_proj"))
        )
    )
    hf = mapping.apply({"wq": wq, "wk": wk})
    emb = torch.cat((angles, angles), dim=-1)
    q = (x @ hf["q_proj"].T).view(seq, heads, head_dim).transpose(0, 1)[None]
    k = (x @ hf["k_proj"].T).view(seq, heads, head_dim).transpose(0, 1)[None]
    q, k = modeling.apply_rotary_pos_emb(q, k, emb.cos()[None], emb.sin()[None])
    torch.testing.assert_close(q[0] @ k[0].transpose(-1, -2), meta(wq) @ meta(wk).transpose(-1, -2))


LLAMA_MAP = """\
# Hugging Face Llama -> Meta's layout: q/k rows in Meta's rotary order, some of llama/model.py's names
version = 1

[[rename]]
regex = '^model\\.'
replace = ''
reverse_regex = '^(layers|embed_tokens|norm)\\.'
reverse_replace = 'model.\\1.'

[[rename]]
from = "embed_tokens.weight"
to = "tok_embeddings.weight"

[[rename]]
from = "lm_head.weight"
to = "output.weight"

[[rename]]
from = "layers.{n}.{m:part}.{p:part}_proj.weight"
to = "layers.{n}.{m:part}.{p:part}.weight"

[[rename]]
from = "layers.{n}.input_layernorm.weight"
to = "layers.{n}.attention_norm.weight"

[[rename]]
from = "layers.{n}.post_attention_layernorm.weight"
to = "layers.{n}.ffn_norm.weight"

[[transform]]
op = "rotary_permute"
from = "layers.{n}.self_attn.q.weight"
to = "layers.{n}.attention.wq.weight"
n_heads = 4
direction = "hf_to_meta"

[[transform]]
op = "rotary_permute"
from = "layers.{n}.self_attn.k.weight"
to = "layers.{n}.attention.wk.weight"
n_heads = 2                        # the key/value heads (grouped-query attention)
direction = "hf_to_meta"
"""


def test_hugging_face_llama_to_meta_layout_and_back(tmp_path: Path) -> None:
    """A tiny transformers Llama (GQA) through a mapping file to Meta's layout and back with --reverse:
    Meta's q/k rows are what Hugging Face's conversion `permute` turns into the model's, and the
    model rebuilt from the round trip loads strictly and gives the same logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    hf = {k: v.contiguous() for k, v in model.state_dict().items()}
    _save(hf, tmp_path / "hf.safetensors")
    (tmp_path / "llama.toml").write_text(LLAMA_MAP)
    meta_file, back_file = tmp_path / "meta.safetensors", tmp_path / "back.safetensors"
    result = run_cli("rename", tmp_path / "hf.safetensors", "-o", meta_file, "--map", tmp_path / "llama.toml")
    assert result.exit_code == 0, result.stderr
    meta = _load(meta_file)
    assert {"tok_embeddings.weight", "output.weight", "layers.1.attention.wq.weight"} <= set(meta)
    assert _equal(
        _hf_permute(meta["layers.0.attention.wq.weight"], 4, 16, 16),
        hf["model.layers.0.self_attn.q_proj.weight"],
    )
    assert _equal(
        _hf_permute(meta["layers.1.attention.wk.weight"], 2, 8, 16),
        hf["model.layers.1.self_attn.k_proj.weight"],
    )

    result = run_cli("rename", meta_file, "-o", back_file, "--map", tmp_path / "llama.toml", "--reverse")
    assert result.exit_code == 0, result.stderr
    back = _load(back_file)
    assert sorted(back) == sorted(hf) and all(_equal(back[n], hf[n]) for n in hf)
    rebuilt = transformers.LlamaForCausalLM(config).eval()
    rebuilt.load_state_dict(back, strict=True)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits)


# -- reverse(forward(x)) == x --------------------------------------------------------------------
ROUND_TRIPS = [
    _one("split", "{*p}.qkv", ("{*p}.q", "{*p}.k", "{*p}.v"), sizes=(4, 2, 2)),
    _one("concat", ("{*p}.a", "{*p}.b"), "{*p}.ab", dim=1, sizes=(2, 4)),
    _one("transpose", "{*p}.qkv", "{*p}.t", dims=(0, 1)),
    _one("permute", "{*p}.qkv", "{*p}.t", dims=(1, 0)),
    _one("reshape", "{*p}.qkv", "{*p}.flat", shape=(-1,), reverse_shape=(8, 6)),
    _one("rotary_permute", "{*p}.qkv", "{*p}.r", n_heads=2, direction="hf_to_meta"),
]


@pytest.mark.parametrize("mapping", ROUND_TRIPS, ids=lambda m: m.transforms[0].op)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reverse_of_forward_is_the_identity_bit_for_bit(mapping: Mapping, dtype: torch.dtype) -> None:
    state = {
        "l.0.qkv": torch.randn(8, 6).to(dtype),
        "l.0.a": torch.randn(8, 2).to(dtype),
        "l.0.b": torch.randn(8, 4).to(dtype),
        "other": torch.arange(3),
    }
    forward = mapping.apply(state)
    assert forward.keys() != state.keys()
    back = mapping.reversed().apply(forward)
    assert sorted(back) == sorted(state)
    assert all(_equal(back[n], state[n]) for n in state)


def test_reverse_undoes_transforms_before_renames() -> None:
    """The forward renames first and splits the renamed names; the reverse must concat the split
    names first and rename after (order = "transforms-first"), or its templates would not match."""
    mapping = Mapping(
        renames=(Rename("enc.layer_{n}.{*r}", "blocks.{n}.{*r}"),),
        transforms=(_one("split", "blocks.{n}.qkv", ("blocks.{n}.q", "blocks.{n}.k")).transforms[0],),
    )
    state = {
        "enc.layer_0.qkv": torch.randn(4, 3),
        "enc.layer_1.qkv": torch.randn(4, 3),
        "enc.layer_1.w": torch.ones(2),
    }
    forward = mapping.apply(state)
    assert sorted(forward) == ["blocks.0.k", "blocks.0.q", "blocks.1.k", "blocks.1.q", "blocks.1.w"]
    reverse = parse_mapping(mapping.reversed().to_toml())
    assert reverse.transforms_first and reverse == mapping.reversed()
    back = reverse.apply(forward)
    assert sorted(back) == sorted(state) and all(_equal(back[n], state[n]) for n in state)
    assert reverse.reversed() == mapping


def test_template_renames_reverse_and_regex_renames_need_their_pair() -> None:
    m = Mapping(
        renames=(
            Rename(
                r"^module\.(.*)$", r"\1", regex=True, reverse_regex=r"^(.*)$", reverse_replace=r"module.\1"
            ),
            Rename("encoder.layer_{n}.{*rest}", "blocks.{n}.{*rest}"),
        )
    )
    state = {"module.encoder.layer_3.w": torch.ones(1), "module.head": torch.zeros(1)}
    forward = m.apply(state)
    assert list(forward) == ["blocks.3.w", "head"]
    assert list(m.reversed().apply(forward)) == list(state)
    with pytest.raises(MappingError, match=r"rename regex '\^a' -> 'b': not reversible"):
        Mapping(renames=(Rename("^a", "b", regex=True),)).reversed()
    with pytest.raises(MappingError, match="drop 'x': a drop cannot be reversed"):
        Mapping(drops=(Drop("x"),)).reversed()
    with pytest.raises(
        MappingError, match=r"a concat without sizes joins equal parts .* add sizes = \[1, 2\]"
    ):
        _one("concat", ("a", "b"), "ab").apply(
            {"a": torch.ones(1), "b": torch.ones(2)}
        )  # its reverse would guess
    with pytest.raises(MappingError, match="not reversible; add reverse_shape"):
        _one("reshape", "a", "b", shape=(-1,)).reversed()


# -- the file format ----------------------------------------------------------------------------
TRICKY = 'a "quoted" \\ back\\slash\ttab\nnewline é \x7f'


def _everything() -> Mapping:
    return Mapping(
        drops=(
            Drop("heads.{*rest}", "classifier " + TRICKY),
            Drop(r"^aux\.", regex=True, status="ambiguous"),
        ),
        renames=(
            Rename("enc.layers.encoder_layer_{n}.ln_1.{*rest}", "blocks.{n}.norm1.{*rest}", note=TRICKY),
            Rename(
                r"^module\.(.*)$", r"\1", regex=True, reverse_regex="^(.*)$", reverse_replace=r"module.\1"
            ),
            Rename("{x:part}.w", "{x:part}.weight", status="ambiguous"),
        ),
        transforms=(
            *(t for m in ROUND_TRIPS for t in m.transforms),
            _one("concat", ("{*p}.q", "{*p}.k"), "{*p}.qk", dim=-1, sizes=(3, 3)).transforms[0],
        ),
    )


def test_to_toml_round_trips_through_tomllib() -> None:
    mapping = _everything()
    text = mapping.to_toml()
    document = tomllib.loads(text)  # the standard library reads what our emitter writes
    assert document["version"] == 1
    assert document["rename"][0]["note"] == TRICKY
    assert document["drop"][1]["regex"] == r"^aux\."
    assert parse_mapping(text) == mapping
    assert parse_mapping(mapping.reversed().to_toml() if not mapping.drops else text) == mapping


def test_load_mapping_reads_a_hand_written_file_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(
        "# torchvision -> timm, reviewed\nversion = 1\n\n[[rename]]  # the blocks\n"
        "from = 'encoder.layers.encoder_layer_{n}.{*rest}'\nto = 'blocks.{n}.{*rest}'\n"
        "[[transform]]\nop = 'split'\nfrom = 'qkv'\nto = ['q', 'k', 'v']\n"
    )
    mapping = load_mapping(path)
    assert mapping.renames[0].target == "blocks.{n}.{*rest}"
    assert mapping.transforms[0].targets == ("q", "k", "v") and mapping.transforms[0].dim == 0


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("version = 1\n[[rename]\n", "not valid TOML"),
        ("version = 2\n", "version = 2"),
        ("[[rename]]\nfrom='a'\nto='b'\n", "no version: start the file with 'version = 1'"),
        ("version = 1\n[[transform]]\nop = 'rotate'\nfrom = 'a'\nto = 'b'\n", "op 'rotate': unknown"),
        ("version = true\n", "version = True"),
        ("version = 1\n[[transform]]\nop = 'concat'\nfrom = ['{*p}', '{*p}']\nto = '{*p}.c'\n", "twice"),
        ("version = 1\n[[transform]]\nop = 'split'\nfrom = '{*p}'\nto = ['{*p}.a', '{*p}.a']\n", "twice"),
        ("version = 1.0\n", "version = 1.0"),
        ("version = 1\n[[rename]]\nfrom = 'a.{n'\nto = 'b'\n", "a brace that is not a placeholder"),
        ("version = 1\n[[rename]]\nfrom = 'a.{n}'\nto = 'b.{m}'\n", "every template of a rule"),
        ("version = 1\n[[rename]]\nfrom = '{*a}{*b}.zz'\nto = '{*a}.{*b}'\n", "side by side"),
        ("version = 1\n[[rename]]\nfrom = '{*a}.{*b}.{*c}.z'\nto = 'x.{*a}.{*b}.{*c}'\n", "at most 2"),
        ("version = 1\n[[rename]]\nfrom = 'a.{x:part}'\nto = 'b.{x}'\n", "every template of a rule"),
        (
            "version = 1\n[[drop]]\npattern = 'a'\n[[rename]]\nfrom = 'a.{*x}'\nto = 'b.{x:part}'\n",
            "{x:part}",
        ),
        ("version = 1\n[[rename]]\nfrom = 'a'\nto = 'b'\ncolour = 1\n", "unknown key 'colour'"),
        ("version = 1\n[[rename]]\nregex = '('\nreplace = 'b'\n", "not a valid regular expression"),
        ("version = 1\n[[rename]]\nregex = 'a{4294967296}'\nreplace = 'b'\n", "not a valid regular"),
        ("version = 1\n[[drop]]\nregex = '" + "(" * 5000 + ")" * 5000 + "'\n", "not a valid regular"),
        ("version = 1\n[[transform]]\nop = 'split'\nfrom = 'a'\nto = 'b'\n", "'to' must be a list"),
        ("version = 1\n[[transform]]\nop = 'permute'\nfrom = 'a'\nto = 'b'\ndims = [0, 0]\n", "permutation"),
        ("version = 1\n[[drop]]\npattern = 'a'\nstatus = 'maybe'\n", "status 'maybe'"),
        ("version = 1\nrename = 3\n", "[[rename]] table"),
    ],
)
def test_bad_mapping_files_are_refused_in_one_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    assert fragment in info.value.message and "\n" not in info.value.message
    assert info.value.message.startswith(str(path))


def test_reverse_without_a_mapping_says_what_it_needs(tmp_path: Path) -> None:
    from conftest import FIXTURES

    for command in (["rename"], ["adapt", FIXTURES / "vit_28.pth"]):
        out = tmp_path / "out.pth"
        result = run_cli(command[0], FIXTURES / "vit_28.pth", *command[1:], "-o", out, "--reverse")
        assert_one_line_error(result, "--reverse", "--map")
        assert not out.exists()


def test_the_readme_shows_the_fixture_mapping() -> None:
    from conftest import FIXTURES, REPO

    readme = (REPO / "README.md").read_text()
    block = readme.split("```toml\n# fixtures/mappings/vit_qkv.toml\n", 1)[1].split("```", 1)[0]
    assert parse_mapping(block) == load_mapping(FIXTURES / "mappings" / "vit_qkv.toml")


def test_applying_refuses_collisions_missing_inputs_misfits_and_ambiguous_rules() -> None:
    state = {"a.w": torch.ones(4, 2), "b.w": torch.ones(4, 2), "c": torch.ones(3)}
    with pytest.raises(MappingError, match=r"renames both 'a\.w' and 'b\.w' to 'x\.w'"):
        Mapping(renames=(Rename("a.{*r}", "x.{*r}"), Rename("b.{*r}", "x.{*r}"))).apply(state)
    with pytest.raises(MappingError, match=r"'a\.w' matched, but its input 'a\.v' is missing"):
        _one("concat", ("{x:part}.w", "{x:part}.v"), "{x:part}.wv").apply(state)
    with pytest.raises(
        MappingError, match=r"transform split 'c' -> \['c1', 'c2'\]: 'c' has 3 along dimension 0"
    ):
        _one("split", "c", ("c1", "c2")).apply(state)
    with pytest.raises(MappingError, match='marked status = "ambiguous"'):
        Mapping(renames=(Rename("c", "d", status="ambiguous"),)).apply(state)
    assert list(
        Mapping(renames=(Rename("c", "d", status="ambiguous"),)).apply(state, allow_ambiguous=True)
    ) == [
        "a.w",
        "b.w",
        "d",
    ]
    with pytest.raises(MappingError, match="no rule of the mapping matches any tensor"):
        Mapping(renames=(Rename("zzz", "d"),)).apply(state)


def test_reshape_to_a_shape_whose_element_count_overflows_is_refused() -> None:
    """torch multiplies sizes left to right in int64: [2**62, 2**62, 0] holds no element but torch.load
    refuses it ("integer multiplication overflow"), so the rule must not write it."""
    big = 1 << 62
    for shape in ((big, big, -1), (4, big, -1)):
        with pytest.raises(MappingError, match="overflows"):
            _one("reshape", "z", "z", shape=shape).apply({"z": torch.zeros(0)})
    assert _one("reshape", "z", "z", shape=(0, big)).apply({"z": torch.zeros(0)})["z"].shape == (0, big)


def test_the_plan_declares_transform_outputs_and_reports_what_no_rule_touched() -> None:
    from ckptsurgeon.core.record import TensorRecord

    records = {
        n: TensorRecord(n, "float16", s) for n, s in {"qkv": (9, 2), "keep": (1,), "x": (2, 3)}.items()
    }
    mapping = Mapping(
        renames=(Rename("nothing.{*r}", "else.{*r}"),),
        transforms=(
            _one("split", "qkv", ("q", "k", "v")).transforms[0],
            _one("transpose", "x", "y", dims=(0, 1)).transforms[0],
        ),
    )
    matched = mapping.match(records)
    assert matched.plan.output_names == ["q", "k", "v", "keep", "y"]
    assert [o.shape for e in matched.plan.transformed for o in e.transform.outputs] == [(3, 2)] * 3 + [(3, 2)]
    assert matched.untouched == ("keep",)
    assert matched.unmatched_rules == ("rename 'nothing.{*r}' -> 'else.{*r}'",)


# -- end to end: fused qkv <-> separate q/k/v through `ckpt rename --map` ---------------------------
class FusedAttention(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attend(q, k, v, self.heads))


class SplitAttention(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(_attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, d = q.shape
    q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, t, d)


def _net(block: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(block(), block())


QKV_MAP = """\
# fused qkv (FusedAttention) -> separate q/k/v (SplitAttention)
version = 1

[[rename]]
from = "{n}.proj.{p:part}"
to = "{n}.out_proj.{p:part}"

[[transform]]
op = "split"
from = "{n}.qkv.{p:part}"
to = ["{n}.q_proj.{p:part}", "{n}.k_proj.{p:part}", "{n}.v_proj.{p:part}"]
"""


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_fused_qkv_converts_with_a_mapping_file_and_back(tmp_path: Path, suffix: str) -> None:
    fused = _net(FusedAttention)
    src, out, back = tmp_path / f"fused{suffix}", tmp_path / f"split{suffix}", tmp_path / f"back{suffix}"
    _save(fused.state_dict(), src)
    (tmp_path / "qkv.toml").write_text(QKV_MAP)

    result = run_cli("rename", src, "-o", out, "--map", tmp_path / "qkv.toml", "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)["mapping"]
    assert [r["tensors"] for r in report["rules"]] == [4, 4] and report["untouched"] == []

    split = _net(SplitAttention)
    split.load_state_dict(_load(out), strict=True)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(split(x), fused(x))

    result = run_cli("rename", out, "-o", back, "--map", tmp_path / "qkv.toml", "--reverse")
    assert result.exit_code == 0, result.stderr
    original, returned = fused.state_dict(), _load(back)
    assert sorted(returned) == sorted(original)
    assert all(_equal(returned[n], original[n]) for n in original)


def test_dry_run_shows_the_transforms_and_lists_untouched_tensors(tmp_path: Path) -> None:
    state = dict(_net(FusedAttention).state_dict())
    state["extra.scale"] = torch.ones(1)
    _save(state, tmp_path / "f.pth")
    (tmp_path / "qkv.toml").write_text(QKV_MAP + '\n[[rename]]\nfrom = "nowhere.{*r}"\nto = "x.{*r}"\n')
    result = run_cli("rename", tmp_path / "f.pth", "--map", tmp_path / "qkv.toml", "--dry-run", "-v")
    assert result.exit_code == 0, result.stderr
    assert "split" in result.stdout and "0.q_proj.weight" in result.stdout
    assert "Dry run" in result.stdout
    assert "rename 'nowhere.{*r}' -> 'x.{*r}' matched no tensor" in result.stderr
    assert "1 tensor(s) no mapping rule touched, kept as they are: 'extra.scale'" in result.stderr
    assert not (tmp_path / "out.pth").exists()


def test_adapt_with_a_mapping_names_unfilled_target_tensors(tmp_path: Path) -> None:
    fused = _net(FusedAttention)
    state = {k: v for k, v in fused.state_dict().items() if not k.startswith("1.proj")}
    _save(state, tmp_path / "f.pth")
    _save(_net(SplitAttention).state_dict(), tmp_path / "target.pth")
    (tmp_path / "qkv.toml").write_text(QKV_MAP)
    out = tmp_path / "adapted.pth"
    result = run_cli(
        "adapt", tmp_path / "f.pth", tmp_path / "target.pth", "--map", tmp_path / "qkv.toml", "-o", out
    )
    assert result.exit_code == 0, result.stderr
    assert "2 target tensor(s) left unfilled: '1.out_proj.weight', '1.out_proj.bias'" in result.stderr
    model = _net(SplitAttention)
    missing, unexpected = model.load_state_dict(_load(out), strict=False)
    assert sorted(missing) == ["1.out_proj.bias", "1.out_proj.weight"] and unexpected == []
    reference = _net(SplitAttention)
    reference.load_state_dict(_split_reference(fused), strict=True)
    assert _equal(model.state_dict()["0.q_proj.weight"], reference.state_dict()["0.q_proj.weight"])


def test_adapt_leaves_out_transform_outputs_the_target_has_no_place_for(tmp_path: Path) -> None:
    fused = _net(FusedAttention)
    _save(fused.state_dict(), tmp_path / "f.pth")
    target = {k: v for k, v in _net(SplitAttention).state_dict().items() if ".v_proj." not in k}
    _save(target, tmp_path / "target.pth")
    (tmp_path / "qkv.toml").write_text(QKV_MAP)
    out = tmp_path / "adapted.safetensors"
    args = ("adapt", tmp_path / "f.pth", tmp_path / "target.pth", "--map", tmp_path / "qkv.toml")
    result = run_cli(*args, "-o", out, "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["mapping"]["rules"][1]["tensors"] == 4
    assert "4 source tensor(s) unused: '0.v_proj.weight'" in result.stderr
    written, reference = _load(out), _split_reference(fused)
    assert sorted(written) == sorted(target)
    assert all(_equal(written[n], reference[n].contiguous()) for n in target)


def _split_reference(fused: nn.Module) -> dict[str, torch.Tensor]:
    """SplitAttention's state dict made by hand with torch.chunk: the reference for the mapping."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in fused.state_dict().items():
        block, module, param = name.split(".")
        if module == "qkv":
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3), strict=True):
                out[f"{block}.{part}.{param}"] = chunk
        else:
            out[f"{block}.out_proj.{param}"] = tensor
    return out


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("version = 1\n[[rename]\n", "not valid TOML"),
        ("version = 1\n[[transform]]\nop = 'fold'\nfrom = 'a'\nto = 'b'\n", "op 'fold': unknown"),
        ("version = 1\n[[rename]]\nfrom = '{n}.qkv.{p'\nto = 'b'\n", "a brace"),
        (
            "version = 1\n[[rename]]\nfrom = '0.{*r}'\nto = 'x.{*r}'\n"
            "[[rename]]\nfrom = '1.{*r}'\nto = 'x.{*r}'\n",
            "renames both",
        ),
        (
            "version = 1\n[[rename]]\nfrom = '0.{*r}'\nto = '1.{*r}'\n"
            "[[rename]]\nfrom = '1.{*r}'\nto = '0.{*r}'\n",
            "renames both '0.qkv.weight' and '1.qkv.weight' to '0.qkv.weight'",
        ),
        (
            "version = 1\n[[transform]]\nop = 'split'\nfrom = '{n}.qkv.weight'\n"
            "to = ['a{n}', 'b{n}', 'c{n}', 'd{n}', 'e{n}']\n",
            "not divisible into 5",
        ),
        (
            "version = 1\n[[transform]]\nop = 'concat'\nfrom = ['{n}.qkv.weight', '{n}.none']\nto = 'x{n}'\n",
            "its input '0.none' is missing",
        ),
        ("version = 1\n[[drop]]\npattern = '{n}.qkv.{*r}'\n", "a drop cannot be reversed"),
    ],
)
def test_cli_refuses_bad_mappings_in_one_line_and_writes_nothing(
    tmp_path: Path, text: str, fragment: str
) -> None:
    _save(_net(FusedAttention).state_dict(), tmp_path / "f.pth")
    (tmp_path / "m.toml").write_text(text)
    out = tmp_path / "out.pth"
    extra = ["--reverse"] if "drop" in text else []
    result = run_cli("rename", tmp_path / "f.pth", "-o", out, "--map", tmp_path / "m.toml", *extra)
    assert_one_line_error(result, fragment)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["f.pth", "m.toml"]


def test_cli_refuses_a_missing_mapping_file(tmp_path: Path) -> None:
    _save({"w": torch.ones(1)}, tmp_path / "f.pth")
    result = run_cli("rename", tmp_path / "f.pth", "-o", tmp_path / "o.pth", "--map", tmp_path / "none.toml")
    assert_one_line_error(result, "cannot read the mapping file")


# -- helpers --------------------------------------------------------------------------------------
def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)
