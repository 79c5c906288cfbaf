"""`ckpt average` / ckptsurgeon.average: the (weighted) mean of checkpoints, bit for bit as torch does it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, assert_one_line_error, run_cli
from safetensors.torch import load_file

import ckptsurgeon
from ckptsurgeon.errors import SurgeryError

SHAPES = {"conv.weight": (8, 3, 3, 3), "fc.weight": (10, 8), "fc.bias": (10,), "bn.weight": (8,)}


def _state(seed: int, dtype: torch.dtype = torch.float32, prefix: str = "") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {prefix + k: torch.randn(s, generator=gen).to(dtype) for k, s in SHAPES.items()}
    sd[prefix + "bn.num_batches_tracked"] = torch.tensor(100 + seed)
    sd[prefix + "mask"] = torch.tensor([True, seed % 2 == 0])
    return sd


def _inputs(tmp_path: Path, dtype: torch.dtype = torch.float32, n: int = 3) -> list[Path]:
    paths = []
    for i in range(n):
        path = tmp_path / f"in{i}.pth"
        torch.save(_state(i, dtype), path)
        paths.append(path)
    return paths


def _floats(sd: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in sd.items() if v.is_floating_point()]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    same_kind = a.dtype == b.dtype and a.shape == b.shape
    return same_kind and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform_mean_is_torch_stack_mean(tmp_path: Path, dtype: torch.dtype) -> None:
    paths = _inputs(tmp_path, dtype)
    out = tmp_path / "soup.pth"
    result = ckptsurgeon.average(paths, out)
    assert result.written is not None and result.written.verified
    got = torch.load(out, weights_only=True)
    sds = [torch.load(p, weights_only=True) for p in paths]
    assert list(got) == list(sds[0])
    for name in _floats(sds[0]):
        want = torch.stack([sd[name].float() for sd in sds]).mean(0).to(dtype)
        assert _bits_equal(got[name], want), name
    assert result.averaged == len(SHAPES) and result.taken == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_mean_is_the_weighted_sum_in_float32(tmp_path: Path, dtype: torch.dtype) -> None:
    paths = _inputs(tmp_path, dtype)
    out = tmp_path / "soup.safetensors"
    result = ckptsurgeon.average(paths, out, weights="2,3,5")
    assert result.weights == pytest.approx((0.2, 0.3, 0.5))
    got = load_file(out)
    sds = [torch.load(p, weights_only=True) for p in paths]
    weights = [2 / 10, 3 / 10, 5 / 10]
    for name in _floats(sds[0]):
        total = sds[0][name].float() * weights[0]
        for sd, w in zip(sds[1:], weights[1:], strict=True):
            total = total + sd[name].float() * w
        assert _bits_equal(got[name], total.to(dtype)), name


def test_equal_weights_are_the_plain_mean(tmp_path: Path) -> None:
    paths = _inputs(tmp_path)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ckptsurgeon.average(paths, a)
    ckptsurgeon.average(paths, b, weights=[1, 1, 1])
    assert a.read_bytes() == b.read_bytes()


def test_float64_accumulates_in_float64(tmp_path: Path) -> None:
    paths = _inputs(tmp_path, torch.float64, n=2)
    out = tmp_path / "soup.pth"
    ckptsurgeon.average(paths, out, weights=[1, 3])
    got = torch.load(out, weights_only=True)
    sds = [torch.load(p, weights_only=True) for p in paths]
    for name in _floats(sds[0]):
        want = sds[0][name] * 0.25 + sds[1][name] * 0.75
        assert _bits_equal(got[name], want), name


def test_integer_and_bool_buffers_come_from_the_first_input(tmp_path: Path) -> None:
    paths = _inputs(tmp_path)
    out = tmp_path / "soup.pth"
    result = run_cli("average", *paths, "-o", out)
    assert result.exit_code == 0, result.stderr
    got = torch.load(out, weights_only=True)
    first = torch.load(paths[0], weights_only=True)
    assert _bits_equal(got["bn.num_batches_tracked"], first["bn.num_batches_tracked"])
    assert _bits_equal(got["mask"], first["mask"])
    assert "2 integer/bool tensor(s) taken from the first input" in result.stderr
    assert "Average of 3 checkpoints (equal weights)" in result.stdout
    assert "verified bit for bit" in result.stdout


def _training(path: Path, seed: int, epoch: int) -> None:
    sd = _state(seed)
    torch.save({"epoch": epoch, "state_dict": sd, "optimizer": {"lr": 0.1 * epoch}}, path)


def test_keep_state_takes_the_first_inputs_entries(tmp_path: Path) -> None:
    paths = [tmp_path / f"epoch{i}.pth" for i in range(3)]
    for i, p in enumerate(paths):
        _training(p, i, epoch=i + 1)
    kept, bare = tmp_path / "kept.pth", tmp_path / "bare.pth"
    result = run_cli("average", *paths, "-o", kept, "--keep-state")
    assert result.exit_code == 0, result.stderr
    tree = torch.load(kept, weights_only=True)
    assert tree["epoch"] == 1 and tree["optimizer"] == {"lr": 0.1}
    sds = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
    want = torch.stack([sd["fc.weight"] for sd in sds]).mean(0)
    assert _bits_equal(tree["state_dict"]["fc.weight"], want)
    result = run_cli("average", *paths, "-o", bare)
    assert result.exit_code == 0, result.stderr
    weights = torch.load(bare, weights_only=True)
    assert set(weights) == set(sds[0])
    assert "(no --keep-state)" in result.stderr and "epoch" in result.stderr


def test_keep_state_needs_a_pth_output(tmp_path: Path) -> None:
    paths = _inputs(tmp_path, n=2)
    out = tmp_path / "soup.safetensors"
    result = run_cli("average", *paths, "-o", out, "--keep-state")
    assert_one_line_error(result, "--keep-state", ".pth")
    assert not out.exists()


def test_a_wrapper_prefix_is_aligned(tmp_path: Path) -> None:
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(_state(0), a)
    torch.save(_state(1, prefix="module."), b)
    out = tmp_path / "soup.safetensors"
    result = run_cli("average", a, b, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "names aligned" in result.stderr and "'module.'" in result.stderr
    got = load_file(out)
    want = torch.stack([_state(0)["fc.weight"], _state(1)["fc.weight"]]).mean(0)
    assert _bits_equal(got["fc.weight"], want)


def _refused(tmp_path: Path, *args: object, fragments: tuple[str, ...]) -> None:
    out = tmp_path / "never.pth"
    result = run_cli("average", *args, "-o", out)
    assert_one_line_error(result, *fragments)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_refuses_a_shape_mismatch(tmp_path: Path) -> None:
    paths = _inputs(tmp_path, n=2)
    sd = _state(5)
    sd["fc.weight"] = torch.zeros(12, 8)
    odd = tmp_path / "odd.pth"
    torch.save(sd, odd)
    _refused(tmp_path, *paths, odd, fragments=("'fc.weight'", "[12, 8]", "odd.pth"))


def test_refuses_different_names(tmp_path: Path) -> None:
    paths = _inputs(tmp_path, n=2)
    sd = _state(5)
    del sd["fc.bias"]
    odd = tmp_path / "odd.pth"
    torch.save(sd, odd)
    _refused(tmp_path, *paths, odd, fragments=("odd.pth has no tensor 'fc.bias'",))
    sd = _state(5)
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, odd)
    _refused(tmp_path, *paths, odd, fragments=("'extra.weight'",))


@pytest.mark.parametrize(
    ("weights", "fragment"),
    [
        ("0.5,0.5", "2 weight(s) for 3 inputs"),
        ("1,-1,1", "-1.0"),
        ("1,0,1", "0.0"),
        ("a,b,c", "numbers"),
        ("1,nan,1", "nan"),
    ],
)
def test_refuses_bad_weights(tmp_path: Path, weights: str, fragment: str) -> None:
    paths = _inputs(tmp_path)
    _refused(tmp_path, *paths, "--weights", weights, fragments=("--weights", fragment))


def test_huge_weights_are_normalised_without_overflow(tmp_path: Path) -> None:
    """Weights are relative: 1e308 and 1.7e308 are 10 and 17 (their float sum overflows)."""
    paths = _inputs(tmp_path, n=2)
    big = ckptsurgeon.average(paths, tmp_path / "big.safetensors", weights="1e308,1.7e308")
    small = ckptsurgeon.average(paths, tmp_path / "small.safetensors", weights="10,17")
    assert big.weights == pytest.approx(small.weights) and sum(big.weights) == pytest.approx(1)
    result = run_cli("average", *paths, "--weights", "1e308,1.7e308", "-o", tmp_path / "cli.safetensors")
    assert result.exit_code == 0, result.stderr


def test_refuses_one_input(tmp_path: Path) -> None:
    paths = _inputs(tmp_path, n=1)
    _refused(tmp_path, *paths, fragments=("at least two",))


def test_library_refusal_is_a_surgery_error(tmp_path: Path) -> None:
    paths = _inputs(tmp_path, n=2)
    with pytest.raises(SurgeryError, match="weight"):
        ckptsurgeon.average(paths, tmp_path / "x.pth", weights=[1])


def test_dry_run_json_and_fixture(tmp_path: Path) -> None:
    fixture = FIXTURES / "resnet_dp_6.pth"
    result = run_cli("average", fixture, fixture, "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["status"] == "dry-run" and data["averaged"] == 102 and data["taken"] == 20
    assert [i["weight"] for i in data["inputs"]] == [0.5, 0.5]
    # averaging a file with itself gives it back, bit for bit
    out = tmp_path / "same.safetensors"
    ckptsurgeon.average([fixture, fixture], out)
    got, want = load_file(out), torch.load(fixture, weights_only=True)
    assert all(_bits_equal(got[k], want[k].contiguous()) for k in want)


def _odd_inputs(tmp_path: Path, n: int, suffix: str) -> list[Path]:
    """``n`` inputs whose tensors span several pieces of a mean, with sizes no piece divides."""
    from safetensors.torch import save_file

    paths = []
    for i in range(n):
        gen = torch.Generator().manual_seed(10 + i)
        sd = {
            "wide": torch.randn(301, 333, generator=gen) * torch.logspace(-3, 3, 333),
            "odd": torch.randn(300_007, generator=gen),
            "scalar": torch.randn((), generator=gen),
            "half": torch.randn(70_001, generator=gen).bfloat16(),
            "zeros": -torch.zeros(1000),  # -0.0 everywhere: torch's sum starts from +0.0
        }
        path = tmp_path / f"odd{i}{suffix}"
        if suffix == ".pth":
            torch.save(sd, path)
        else:
            save_file(sd, str(path))
        paths.append(path)
    return paths


@pytest.mark.parametrize(
    ("n", "suffix", "weights"),
    [(3, ".pth", None), (5, ".safetensors", None), (17, ".pth", None), (4, ".safetensors", "1,2,3,4")],
)
def test_means_in_pieces_are_the_whole_tensor_means(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int, suffix: str, weights: str | None
) -> None:
    from ckptsurgeon.core.record import TensorRecord
    from ckptsurgeon.surgery import averaging

    monkeypatch.setattr(averaging, "MEAN_PIECE", 4096)  # many pieces per tensor, and a short last one
    paths = _odd_inputs(tmp_path, n, suffix)

    def whole(self: TensorRecord) -> torch.Tensor:
        raise AssertionError(f"{self.name} read whole")

    monkeypatch.setattr(TensorRecord, "to_torch", whole)  # every input is read a piece at a time
    out = tmp_path / "soup.safetensors"
    result = ckptsurgeon.average(paths, out, weights=weights)
    monkeypatch.undo()
    assert result.written is not None and result.written.verified
    got = load_file(out)
    sds = [load_file(p) if suffix == ".safetensors" else torch.load(p, weights_only=True) for p in paths]
    parts = [float(w) for w in weights.split(",")] if weights else None
    for name, first in sds[0].items():
        if parts is None:
            want = torch.stack([sd[name].float() for sd in sds]).mean(0).to(first.dtype)
        else:
            total = sds[0][name].float() * (parts[0] / sum(parts))
            for sd, w in zip(sds[1:], parts[1:], strict=True):
                total += sd[name].float() * (w / sum(parts))
            want = total.to(first.dtype)
        assert _bits_equal(got[name], want), name


def test_dtype_casts_each_mean_once_and_shards(tmp_path: Path) -> None:
    paths = _inputs(tmp_path, torch.float32)
    out = tmp_path / "soup"
    result = run_cli("average", *paths, "-o", out, "--dtype", "bf16", "--max-shard-size", "300B")
    assert result.exit_code == 0, result.stderr
    got: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        got |= load_file(shard)
    assert len(list(out.glob("*.safetensors"))) > 1
    sds = [torch.load(p, weights_only=True) for p in paths]
    for name in _floats(sds[0]):
        want = torch.stack([sd[name] for sd in sds]).mean(0).to(torch.bfloat16)
        assert _bits_equal(got[name], want), name
    assert got["bn.num_batches_tracked"].dtype == torch.int64


def test_bf16_inputs_to_fp32_skip_the_bf16_rounding(tmp_path: Path) -> None:
    paths = _inputs(tmp_path, torch.bfloat16, n=2)
    out = tmp_path / "soup.safetensors"
    ckptsurgeon.average(paths, out, dtype="fp32")
    got = load_file(out)
    sds = [torch.load(p, weights_only=True) for p in paths]
    for name in _floats(sds[0]):
        want = torch.stack([sd[name].float() for sd in sds]).mean(0)
        assert _bits_equal(got[name], want), name


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_tied_tensors_stay_tied(tmp_path: Path, suffix: str) -> None:
    paths = []
    for i in range(2):
        gen = torch.Generator().manual_seed(i)
        emb = torch.randn(7, 5, generator=gen)
        path = tmp_path / f"tied{i}.pth"
        torch.save(
            {"wte.weight": emb, "lm_head.weight": emb, "ln.weight": torch.randn(5, generator=gen)}, path
        )
        paths.append(path)
    out = tmp_path / f"soup{suffix}"
    result = ckptsurgeon.average(paths, out)
    assert result.written is not None and result.written.verified
    sds = [torch.load(p, weights_only=True) for p in paths]
    want = torch.stack([sd["wte.weight"] for sd in sds]).mean(0)
    if suffix == ".pth":
        got = torch.load(out, weights_only=True)
        assert (
            got["wte.weight"].untyped_storage().data_ptr()
            == got["lm_head.weight"].untyped_storage().data_ptr()
        )
    else:
        from safetensors import safe_open

        with safe_open(str(out), "pt") as fh:
            assert len(list(fh.keys())) == 2  # the tie written once, its alias in the metadata
        got = ckptsurgeon.open_checkpoint(out).weights("").tensors
        got = {k: r.to_torch() for k, r in got.items()}
    assert _bits_equal(got["wte.weight"], want) and _bits_equal(got["lm_head.weight"], want)
