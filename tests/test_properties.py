"""Property-based tests (Hypothesis, bounded): round trips are bit-exact, plans compose and invert,
and a state dict never differs from itself."""

from __future__ import annotations

import importlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, assume, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ckptsurgeon.core.record import TensorRecord  # noqa: E402
from ckptsurgeon.errors import SurgeryError  # noqa: E402
from ckptsurgeon.formats import open_checkpoint  # noqa: E402

BOUNDED = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = ("float32", "float16", "bfloat16", "int64", "int8", "uint8", "bool")
SEGMENT = st.text(alphabet="abcxyz_019éñ中ΩΔ", min_size=1, max_size=5)
NAME = st.lists(SEGMENT, min_size=1, max_size=4).map(".".join).filter(lambda n: n != "__metadata__")


def module_or_skip(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        pytest.skip(f"{name} is not there yet")


@st.composite
def tensors(draw: st.DrawFn) -> Any:
    """A tensor of any listed dtype and a shape with 0 to 3 dims (0-dim and empty included), random bits."""
    dtype = getattr(torch, draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    count = int(torch.Size(shape).numel())
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = draw(st.binary(min_size=count * itemsize, max_size=count * itemsize))
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    if dtype == torch.bool:
        return (flat % 2).bool().reshape(shape)
    return flat.view(dtype).reshape(shape).clone()


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Unique unicode dotted names; some entries are views sharing another entry's storage."""
    names = draw(st.lists(NAME, min_size=1, max_size=6, unique=True))
    sd: dict[str, Any] = {}
    for name in names:
        bases = [t for t in sd.values() if t.dim() >= 1 and t.shape[0] >= 2]
        if bases and draw(st.booleans()):
            base = draw(st.sampled_from(bases))
            view = draw(st.sampled_from(("slice", "same", "transpose", "flat")))
            sd[name] = {
                "slice": lambda b: b[1:],
                "same": lambda b: b,
                "flat": lambda b: b.reshape(-1),
                "transpose": lambda b: b.transpose(0, -1),
            }[view](base)
        else:
            sd[name] = draw(tensors())
    return sd


def as_bytes(t: Any) -> Any:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(path: Path, expected: dict[str, Any]) -> None:
    got = open_checkpoint(path).weights().tensors
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        have = got[name].to_torch()
        assert (have.dtype, tuple(have.shape)) == (want.dtype, tuple(want.shape)), name
        assert torch.equal(as_bytes(have), as_bytes(want)), name


def records(sd: dict[str, Any]) -> dict[str, TensorRecord]:
    return {name: TensorRecord.from_torch(name, t) for name, t in sd.items()}


def file_records(sd: dict[str, Any], folder: Path) -> dict[str, TensorRecord]:
    """Records backed by a torch.save file (raw spans, shared storages, views)."""
    torch.save(sd, folder / "src.pth")
    return dict(open_checkpoint(folder / "src.pth").weights().tensors)


def write_safetensors(recs: dict[str, TensorRecord], folder: Path) -> Path:
    from ckptsurgeon.formats import safetensors

    with open(folder / "out.safetensors", "wb") as fh:
        safetensors.write(recs, fh)
    return folder / "out.safetensors"


def write_torchzip(recs: dict[str, TensorRecord], folder: Path) -> Path:
    torchwriter = module_or_skip("ckptsurgeon.formats._torchwriter")
    with open(folder / "out.pth", "wb") as fh:
        torchwriter.write(recs, fh)
    return folder / "out.pth"


def write_sharded(fmt: str) -> Callable[[dict[str, TensorRecord], Path], Path]:
    def write(recs: dict[str, TensorRecord], folder: Path) -> Path:
        shardwriter = module_or_skip("ckptsurgeon.formats.shardwriter")
        shardwriter.write(recs, folder / "shards", max_shard_bytes=24, fmt=fmt)
        return folder / "shards"

    return write


WRITERS = {
    "safetensors": write_safetensors,
    "torchzip": write_torchzip,
    "sharded-safetensors": write_sharded("safetensors"),
    "sharded-pth": write_sharded("pth"),
}


@pytest.mark.parametrize("writer", list(WRITERS))
@BOUNDED
@given(sd=state_dicts())
def test_live_records_round_trip_bit_exact(writer: str, sd: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        assert_same(WRITERS[writer](records(sd), Path(tmp)), sd)


@pytest.mark.parametrize("writer", list(WRITERS))
@BOUNDED
@given(sd=state_dicts())
def test_file_records_round_trip_bit_exact(writer: str, sd: dict[str, Any]) -> None:
    """torch.save -> our reader -> each writer -> our reader: views and shared storages stream correctly."""
    module_or_skip("ckptsurgeon.formats.torchzip")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        assert_same(WRITERS[writer](file_records(sd, folder), folder), sd)


# -- rename plans -------------------------------------------------------------------------------
PREFIX = st.lists(SEGMENT, min_size=1, max_size=2).map(lambda parts: ".".join(parts) + ".")


@BOUNDED
@given(names=st.lists(NAME, min_size=1, max_size=8, unique=True), prefix=PREFIX, other=PREFIX)
def test_rename_plans_compose_and_invert(names: list[str], prefix: str, other: str) -> None:
    surgery = module_or_skip("ckptsurgeon.surgery.plan")
    src = [prefix + n for n in names]
    steps = [surgery.strip_prefix(prefix), surgery.add_prefix(other)]
    whole = surgery.make_plan(src, steps)
    first = surgery.make_plan(src, steps[:1])
    composed = first.then(surgery.make_plan(first.output_names, steps[1:]))
    assert composed.mapping == whole.mapping == {prefix + n: other + n for n in names}
    assert whole.then(whole.inverse()).mapping == {n: n for n in src}
    assert whole.inverse().then(whole).mapping == {n: n for n in whole.output_names}


@BOUNDED
@given(names=st.lists(NAME, min_size=2, max_size=8, unique=True), prefix=PREFIX)
def test_strip_prefix_inverts_on_mixed_names(names: list[str], prefix: str) -> None:
    """As documented: the inverse is of the plan, so names without the prefix round-trip too."""
    surgery = module_or_skip("ckptsurgeon.surgery.plan")
    src = [prefix + n for n in names[: len(names) // 2]] + names[len(names) // 2 :]
    assume(len(set(src)) == len(src))
    try:
        plan = surgery.make_plan(src, [surgery.strip_prefix(prefix)])
    except SurgeryError:  # a stripped name collides with a kept one: refused, as documented
        return
    assert plan.then(plan.inverse()).mapping == {n: n for n in src}
    recs = {n: TensorRecord(n, "float32", (1,)) for n in src}
    assert list(plan.apply(recs)) == plan.output_names


@BOUNDED
@given(names=st.lists(NAME, min_size=2, max_size=8, unique=True))
def test_a_plan_that_drops_has_no_inverse(names: list[str]) -> None:
    surgery = module_or_skip("ckptsurgeon.surgery.plan")
    plan = surgery.make_plan(names, [surgery.drop_names({names[0]: "test"})])
    assert plan.dropped_names == [names[0]]
    with pytest.raises(SurgeryError):
        plan.inverse()


# -- diff against itself ------------------------------------------------------------------------
@BOUNDED
@given(sd=state_dicts())
def test_diff_of_a_state_dict_with_itself_is_ok(sd: dict[str, Any]) -> None:
    match = module_or_skip("ckptsurgeon.diffing.result")
    recs = records(sd)
    result = match.diff(recs, dict(recs))
    assert result.ok
    assert result.comparison.ok


# -- mutated files never crash ------------------------------------------------------------------
def valid_files(folder: Path) -> dict[str, Path]:
    """One small valid file per format, the seeds the mutations start from."""
    from corpus import st_bytes, st_valid_header

    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g)}
    torch.save(sd, folder / "zip.pth")
    torch.save(sd, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    (folder / "st.safetensors").write_bytes(st_bytes(st_valid_header(), bytes(24)))
    return {p.stem: p for p in folder.iterdir()}


MUTATION = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
)


def mutate(data: bytes, mutation: tuple[Any, ...]) -> bytes:
    pos = int(mutation[1] * (len(data) - 1))
    if mutation[0] == "truncate":
        return data[:pos]
    if mutation[0] == "flip":
        return data[:pos] + bytes([data[pos] ^ mutation[2]]) + data[pos + 1 :]
    return data[:pos] + mutation[2] + data[pos:]


@pytest.mark.parametrize("seed", ["zip", "legacy", "st"])
@pytest.mark.parametrize("command", ["inspect", "scan"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation=MUTATION)
@example(mutation=("flip", 0.9859748655323535, 1))  # a zip64 locator past the end: seek() raised EINVAL
def test_mutated_files_never_crash(seed: str, command: str, mutation: tuple[Any, ...]) -> None:
    """A truncated, flipped or padded file gives a report or one error line: never a traceback."""
    from conftest import run_cli

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        src = valid_files(folder / "seeds" if (folder / "seeds").mkdir() is None else folder)[seed]
        bad = folder / f"bad{src.suffix}"
        bad.write_bytes(mutate(src.read_bytes(), mutation))
        result = run_cli(command, bad, "--check")
        assert result.exception is None, repr(result.exception)
        assert result.exit_code in (0, 1, 2) and "internal error" not in result.stderr, result.stderr
        if result.exit_code == 2:
            assert len(result.stderr.splitlines()) == 1, result.stderr


# -- our safetensors reader is at least as strict as the reference ------------------------------
ODD = st.sampled_from([None, "2", 2.5, -1, [], {}])
ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F33"]), ODD),
        "shape": st.one_of(st.lists(st.integers(-1, 4), max_size=3), ODD),
        "data_offsets": st.one_of(st.lists(st.integers(-1, 40), min_size=2, max_size=2), ODD),
    }
)
RANDOM_HEADER = st.dictionaries(
    st.sampled_from(["a", "b", "c.d", "__metadata__"]), ENTRY, min_size=1, max_size=3
)
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I8": 1, "U8": 1, "BOOL": 1}


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[dict[str, Any], int]:
    """A valid header and data length, then (usually) one small fault: the edge the checks must hold."""
    names = draw(st.lists(st.sampled_from(["a", "b", "c.d", "e"]), min_size=1, max_size=4, unique=True))
    header: dict[str, Any] = {}
    pos = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(ITEMSIZE)))
        shape = draw(st.lists(st.integers(0, 3), max_size=2))
        size = ITEMSIZE[dtype] * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
        pos += size
    fault = draw(st.sampled_from(["none", "start", "end", "dtype", "shape", "data", "meta"]))
    entry = header[draw(st.sampled_from(names))]
    delta = draw(st.sampled_from([-2, -1, 1, 2]))
    if fault in ("start", "end"):
        entry["data_offsets"][0 if fault == "start" else 1] += delta
    elif fault == "dtype":
        entry["dtype"] = draw(st.sampled_from(sorted(ITEMSIZE)))
    elif fault == "shape":
        entry["shape"] = [*entry["shape"], 2]
    elif fault == "meta":
        header["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {"format": 1}, {"n": None}, []]))
    return header, max(0, pos + (delta if fault == "data" else 0))


HEADER = st.one_of(st.tuples(RANDOM_HEADER, st.integers(0, 48)), near_valid())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=HEADER)
def test_safetensors_reader_is_at_least_as_strict_as_the_reference(case: tuple[dict[str, Any], int]) -> None:
    """Whatever our header reader accepts, safetensors accepts too; what it refuses is one CkptError."""
    import json
    import struct

    header, data_len = case

    safetensors = pytest.importorskip("safetensors")
    from ckptsurgeon.errors import CkptError

    raw = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_len))
        try:
            open_checkpoint(path).candidates()
        except CkptError:
            return
        with safetensors.safe_open(str(path), "pt") as fh:  # must not raise: we accepted the file
            [fh.get_tensor(k) for k in fh.keys()]  # noqa: SIM118 (safe_open is not a dict)
