"""Every command over a corpus of malformed and hostile inputs (see tests/corpus.py).

For each case and command: exit 2 (``scan``: 1 for unsafe files), one line on stderr naming
the problem, no traceback, the input unchanged, no output or temporary file left, and the
code-execution marker never created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FIXTURES, REAL, REPO, CliResult, run_cli
from corpus import MALFORMED, UNSAFE, Case, build_corpus, fingerprint, payloads, s, write_valid

CASES = build_corpus(Path("/corpus"), dry=True)  # names only; the files are built once per module below
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"

Args = Callable[[Path, Path, Path], list[str]]
COMMANDS: dict[str, Args] = {
    "inspect": lambda src, out, target: ["inspect", src],
    "diff": lambda src, out, target: ["diff", src, target],
    "convert": lambda src, out, target: ["convert", src, "-o", out / "OUT.safetensors"],
    "rename": lambda src, out, target: ["rename", src, "--strip-prefix", "a.", "-o", out / "OUT.pth"],
    "strip-head": lambda src, out, target: ["strip-head", src, "-o", out / "OUT.pth"],
    "adapt": lambda src, out, target: ["adapt", src, target, "-o", out / "OUT.pth"],
    "scan": lambda src, out, target: ["scan", src],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Case]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, {c.name: c for c in build_corpus(root)}


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid 2-class model without the corpus's ``a.`` prefix: the diff/adapt target."""
    return write_valid(tmp_path_factory.mktemp("target") / "target.pth", prefix="", classes=2)


def command_or_skip(name: str) -> object:
    from ckptsurgeon.cli import cli

    if name not in cli.commands:
        pytest.skip(f"`ckpt {name}` is not registered yet")
    return cli.commands[name]


def has_option(command: object, option: str) -> bool:
    return any(option in getattr(p, "opts", ()) for p in getattr(command, "params", ()))


def run_guarded(args: list[str], may_hang: bool) -> CliResult:
    """In-process, or in a subprocess with a timeout for inputs that could block (a FIFO)."""
    if not may_hang:
        return run_cli(*args)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr, None)


WRITERS = ("convert", "rename", "strip-head", "adapt")


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_corpus_case(
    corpus: tuple[Path, dict[str, Case]], target: Path, tmp_path: Path, name: str, command: str
) -> None:
    click_command = command_or_skip(command)
    root, cases = corpus
    case = cases[name]
    args = COMMANDS[command](case.path, tmp_path, target)
    if case.needs_check:
        if command in WRITERS:
            pass  # writing streams every tensor byte, and checks each member's CRC on the way
        elif not has_option(click_command, "--check"):
            pytest.skip(f"`ckpt {command}` reads no tensor data; CRC faults are for --check")
        else:
            args.append("--check")
    before = fingerprint(case.path)

    result = run_guarded(args, case.may_hang)

    expected = 1 if command == "scan" and case.kind == UNSAFE else 2
    assert result.exception is None, f"unexpected exception: {result.exception!r}"
    assert result.exit_code == expected, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert "internal error" not in result.stderr
    lines = result.stderr.splitlines()
    if expected == 2:
        assert len(lines) == 1 and lines[0].startswith("ckpt: error: "), result.stderr
    fragment = case.scan_fragment if command == "scan" and case.scan_fragment is not None else case.fragment
    assert fragment.lower() in (result.stderr + result.stdout).lower(), (
        fragment,
        result.stdout,
        result.stderr,
    )
    assert fingerprint(case.path) == before, "the input was modified"
    assert list(tmp_path.iterdir()) == [], "an output or temporary file was left behind"
    assert list((root / "markers").iterdir()) == [], "a payload ran"


@pytest.mark.parametrize("name", [c.name for c in CASES if c.kind == UNSAFE])
def test_allow_global_never_runs_code(
    corpus: tuple[Path, dict[str, Case]], tmp_path: Path, name: str
) -> None:
    """Allowing every global a hostile file names still imports and calls nothing (placeholders only)."""
    command_or_skip("scan")
    root, cases = corpus
    report = json.loads(run_cli("scan", cases[name].path, "--format", "json").stdout)
    names = {g["name"] for f in report["files"] for g in f["globals"] if g["kind"] == "unsafe"}
    allow = [arg for n in sorted(names) for arg in ("--allow-global", n)]
    for args in (
        ["inspect", cases[name].path],
        ["convert", cases[name].path, "-o", tmp_path / "o.safetensors"],
    ):
        result = run_cli(*args, *allow)
        assert result.exception is None, repr(result.exception)
        assert "internal error" not in result.stderr, result.stderr
        assert result.exit_code in (0, 2) and len(result.stderr.splitlines()) <= 1, result.stderr
        assert list((root / "markers").iterdir()) == [], "a payload ran"


@pytest.mark.parametrize("command", ["diff", "adapt"])
@pytest.mark.parametrize("name", [c.name for c in CASES if c.kind == UNSAFE])
def test_hostile_targets_are_refused(
    corpus: tuple[Path, dict[str, Case]], tmp_path: Path, name: str, command: str
) -> None:
    """A hostile file given as the diff/adapt TARGET is refused the same way, and runs nothing."""
    command_or_skip(command)
    root, cases = corpus
    src = write_valid(tmp_path / "src.pth")
    out = tmp_path / "out"
    out.mkdir()
    args = (
        ["diff", src, cases[name].path]
        if command == "diff"
        else ["adapt", src, cases[name].path, "-o", out / "o.pth"]
    )
    result = run_cli(*args)
    assert result.exception is None, repr(result.exception)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert len(result.stderr.splitlines()) == 1 and "internal error" not in result.stderr, result.stderr
    assert list(out.iterdir()) == []
    assert list((root / "markers").iterdir()) == [], "a payload ran"


def test_corpus_covers_every_category() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) >= 40
    assert {c.category for c in CASES} >= {
        "misc",
        "filesystem",
        "torch-zip",
        "hostile",
        "legacy",
        "safetensors",
        "sharded",
        "archive",
    }
    assert sum(c.kind == UNSAFE for c in CASES) >= 10
    assert all(c.kind in (UNSAFE, MALFORMED) for c in CASES)


def test_corpus_files_exist(corpus: tuple[Path, dict[str, Case]]) -> None:
    _, cases = corpus
    assert sorted(cases) == sorted(c.name for c in CASES)
    for case in cases.values():
        assert os.path.lexists(case.path), case.name


@pytest.mark.parametrize("payload", list(payloads(Path("/m"))))
def test_payloads_really_run_under_plain_pickle(tmp_path: Path, payload: str) -> None:
    """The payloads are live: plain ``pickle.loads`` creates the marker (so the corpus tests can fail)."""
    marker = tmp_path / "MARKER"
    expr, _ = payloads(marker)[payload]
    proto = b"\x04" if "stack" in payload else b"\x02"
    blob = b"\x80" + proto + b"}" + s("evil") + expr + b"s."
    code = f"import pickle; pickle.loads({blob!r})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)
    assert marker.exists()


def test_reference_safetensors_accepts_only_the_duplicate_key(corpus: tuple[Path, dict[str, Case]]) -> None:
    """Our safetensors faults are real faults; the duplicate key is the one the reference lets through."""
    safetensors = pytest.importorskip("safetensors")
    accepted = []
    for case in corpus[1].values():
        if case.category != "safetensors":
            continue
        try:
            with safetensors.safe_open(str(case.path), "np") as fh:
                [fh.get_tensor(k) for k in fh.keys()]  # noqa: SIM118 (safe_open is not a dict)
        except Exception:  # any refusal will do
            continue
        accepted.append(case.name)
    assert accepted == ["st_duplicate_key"]


def test_torch_load_misses_the_flipped_crc(corpus: tuple[Path, dict[str, Case]]) -> None:
    """Plain torch.load loads corrupted tensor bytes silently: why ``--check`` exists."""
    torch = pytest.importorskip("torch")
    case = corpus[1]["zip_crc_flipped_data"]
    assert case.needs_check
    assert torch.load(case.path, weights_only=True)["a.weight"].shape == (64, 16)


def test_crc_flip_is_found_by_inspect_check(corpus: tuple[Path, dict[str, Case]]) -> None:
    command = command_or_skip("inspect")
    if not has_option(command, "--check"):
        pytest.skip("`ckpt inspect` has no --check yet")
    path = corpus[1]["zip_crc_flipped_data"].path
    assert run_cli("inspect", path).exit_code == 0  # structure is fine: only the check sees it
    result = run_cli("inspect", path, "--check")
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "crc" in result.stderr.lower()


def real_checkpoints() -> list[Path]:
    paths = sorted(FIXTURES.glob("*.pth")) + sorted(p for p in REAL.iterdir() if p.name != "README.md")
    if SHARED_FIXTURES.is_dir():
        paths += sorted(p for p in SHARED_FIXTURES.iterdir() if p.name != "README.md")
    return paths


@pytest.mark.parametrize("path", real_checkpoints(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scan_calls_real_checkpoints_safe(path: Path) -> None:
    command_or_skip("scan")
    result = run_cli("scan", path)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stderr == ""


def test_scan_calls_a_dcp_folder_safe(tmp_path: Path) -> None:
    """DCP's .metadata is a pickle of DCP dataclasses: data, not code."""
    command_or_skip("scan")
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():  # torch.distributed is not initialised: it warns, saving in one process
        warnings.simplefilter("ignore")
        dcp.save({"model": {"a.weight": torch.ones(2, 2)}}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    result = run_cli("scan", tmp_path / "dcp")
    assert result.exit_code == 0, (result.stdout, result.stderr)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_commands_accept_a_valid_input(tmp_path: Path, target: Path, command: str) -> None:
    """The control: the same arguments succeed on a valid file, so corpus failures are the inputs' fault."""
    command_or_skip(command)
    src = write_valid(tmp_path / "src.pth")
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(*COMMANDS[command](src, out, target))
    assert result.exception is None, repr(result.exception)
    assert result.exit_code in ((0, 1) if command == "diff" else (0,)), (result.stdout, result.stderr)
    if command in ("convert", "rename", "strip-head", "adapt"):
        assert [p.name for p in out.iterdir()] == [f"OUT{'.safetensors' if command == 'convert' else '.pth'}"]
