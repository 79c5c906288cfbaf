"""Bounded work on hostile pickles (issue 13 items 3 and 5), each command in a subprocess with a timeout.

Each ``pb_`` corpus case used to crash (SIGSEGV), hang deaf to SIGTERM, or end in an internal error.
Now every command exits 2 within seconds with one stderr line, writes nothing and leaves the input
unchanged; the bounds themselves are unit-tested below.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from corpus import build_corpus, fingerprint, torch_zip_bytes, write_valid

from ckptsurgeon.core.bounds import BoundError, bounded_repr, check_depth, check_key
from ckptsurgeon.formats import open_checkpoint

CASES = [c for c in build_corpus(Path("/corpus"), dry=True) if c.category == "bounds"]
TIMEOUT = 20  # seconds, generous for a shared 2-core machine; a fixed case takes well under one
COMMANDS = {
    "inspect": lambda src, out, target: ["inspect", src],
    "diff": lambda src, out, target: ["diff", src, target],
    "scan": lambda src, out, target: ["scan", src],
    "convert": lambda src, out, target: ["convert", src, "-o", out / "OUT.safetensors"],
    "rename": lambda src, out, target: ["rename", src, "--strip-prefix", "a.", "-o", out / "OUT.pth"],
    "strip-head": lambda src, out, target: ["strip-head", src, "-o", out / "OUT.pth"],
    "adapt": lambda src, out, target: ["adapt", src, target, "-o", out / "OUT.pth"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("bounds")
    return {c.name: c for c in build_corpus(root) if c.category == "bounds"}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_valid(tmp_path_factory.mktemp("target") / "target.pth", prefix="", classes=2)


def run_killable(args: list[object]) -> tuple[int, str, str, float]:
    """``python -m ckptsurgeon ARGS``; killed (SIGKILL: a hashing loop ignores SIGTERM) after TIMEOUT."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


def test_the_corpus_has_every_class() -> None:
    names = {c.name for c in CASES}
    for expected in (
        "pb_set_of_deep_tuple",
        "pb_dag_set",
        "pb_dag_frozenset",
        "pb_dag_ordereddict",
        "pb_dag_counter",
        "pb_dag_newobj_ex_kwargs",
        "pb_dag_persistent_id",
        "pb_dag_tensor_size",
        "pb_dag_torch_device",
        "pb_dag_error_message",
        "pb_int_5000_digits_size",
        "pb_deep_torch_device",
        "pb_build_shadows_items",
        "pb_build_on_class",
        "pb_dcp_metadata_build_on_path_class",
    ):
        assert expected in names


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_every_command_refuses_in_one_line_within_seconds(
    corpus: dict[str, object], target: Path, tmp_path: Path, name: str, command: str
) -> None:
    case = corpus[name]
    before = fingerprint(case.path)  # type: ignore[attr-defined]
    code, stdout, stderr, took = run_killable(COMMANDS[command](case.path, tmp_path, target))  # type: ignore[attr-defined]
    assert code == 2, (code, stdout, stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckpt: error: "), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    assert case.fragment.lower() in stderr.lower(), (case.fragment, stderr)  # type: ignore[attr-defined]
    assert stdout == "" or command == "scan"
    assert list(tmp_path.iterdir()) == [], "an output was left"
    assert fingerprint(case.path) == before, "the input changed"  # type: ignore[attr-defined]
    assert took < TIMEOUT


def test_a_5000_digit_value_is_data(tmp_path: Path, target: Path) -> None:
    """A huge int as a plain value is data torch loads: shown by its size, converted and verified."""
    from corpus import big_int, state_dict_pickle, tensor_expr, torch_zip_bytes

    src = tmp_path / "big.pth"
    src.write_bytes(torch_zip_bytes(state_dict_pickle(("a.weight", tensor_expr()), ("step", big_int()))))
    code, stdout, stderr, _ = run_killable(["inspect", src])
    assert code == 0 and "int of 16,607 bits" in stdout, (stdout, stderr)
    code, stdout, stderr, _ = run_killable(["rename", src, "--strip-prefix", "a.", "-o", tmp_path / "o.pth"])
    assert code == 0, stderr
    assert open_checkpoint(tmp_path / "o.pth").weights().tensors.keys() == {"weight"}


# -- the bounds themselves -----------------------------------------------------------------------
def test_keys() -> None:
    for ok in ("w", 3, -(2**59), ("layer", 3), frozenset({1, 2}), None, 1.5, -(2.0**59), float("nan"), b"x"):
        check_key(ok)
    bad_keys = (((1,),), (1,) * 65, 2**61, 2**2000, ("a", 2**70), 2.0**61, float("inf"), 1j, [1])
    for bad in bad_keys:
        with pytest.raises(BoundError):
            check_key(bad)


def test_keys_that_share_one_hash_are_refused_before_a_dict_is_built(tmp_path: Path) -> None:
    """Python hashes an int modulo 2**61 - 1, so k * (2**61 - 1) + 7 are all one hash (the reference,
    asked below), and a dict of 20,000 of them takes CPython's unpickler seconds, quadratic in their
    number; the restricted reader refuses the first such key in one line, before any dict is built."""
    keys = [k * ((1 << 61) - 1) + 7 for k in range(1, 20_001)]
    assert len({hash(k) for k in keys}) == 1
    parts = [b"\x80\x02}("]
    for value in keys:
        raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        parts.append(b"\x8a" + bytes([len(raw)]) + raw + b"N")
    path = tmp_path / "flood.pth"
    path.write_bytes(torch_zip_bytes(b"".join([*parts, b"u."])))
    for command in ("inspect", "scan"):
        result = run_cli(command, str(path))
        assert result.exit_code == 2 and "share one hash" in result.stderr, (command, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


def test_depth_is_linear_in_distinct_objects() -> None:
    x: object = ()
    for _ in range(60):
        x = (x, x)  # 2**60 paths, 61 objects
    check_depth([x])
    with pytest.raises(BoundError, match="more than 100 deep"):
        check_depth([(x, x)] * 1 + [deep(150)])
    loop: list = []
    loop.append(loop)
    with pytest.raises(BoundError, match="contains itself"):
        check_depth({"a": loop})


def deep(n: int) -> object:
    x: object = []
    for _ in range(n):
        x = [x]
    return x


def test_bounded_repr_never_builds_the_whole_string() -> None:
    x: object = ()
    for _ in range(60):
        x = (x, x)
    start = time.monotonic()
    text = bounded_repr(x, 40)
    assert len(text) <= 40 and time.monotonic() - start < 1
    assert bounded_repr(10**5000) == "an integer of 16,610 bits"
    assert bounded_repr(deep(100_000), 30).startswith("[[[[")
    assert bounded_repr("a" * 10**6, 10) == "'aaaaaaaa…"


def test_a_scan_of_many_distinct_globals_is_linear() -> None:
    """200,000 distinct globals (2.3 MB) were listed with a membership test on a list: about
    400 s here, time quadratic in their number. A set makes it linear (about 1 s); the
    subprocess's timeout is the bound, at sixty times that."""
    import subprocess
    import sys

    code = (
        "from ckptsurgeon.pickling.globalscan import scan_globals\n"
        "data = b'\\x80\\x02(' + b''.join(b'cm%d\\nx\\n0' % i for i in range(200_000)) + b'N.'\n"
        "assert len(scan_globals(data).globals) == 200_000\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)
