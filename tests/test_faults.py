"""Fault safety: a full disk gives one clear line and leaves nothing; concurrent writers never mix.

A full disk is a 1 MiB tmpfs when this process may mount one (root), and always a
``RLIMIT_FSIZE`` limit in a subprocess (writes then fail with EFBIG). Kill -9 mid-write
is in tests/test_crash.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, run_cli, sha256

torch = pytest.importorskip("torch")

WRITES = {  # command -> (args after the source, output name)
    "convert": (["--no-verify"], "out.safetensors"),
    "rename": (["--add-prefix", "net."], "out.pth"),
}
SHARDED = (["--max-shard-size", "600KB"], "shards")


def require(command: str) -> None:
    from ckptsurgeon.cli import cli

    if command not in cli.commands:
        pytest.skip(f"`ckpt {command}` is not registered yet")


def make_source(path: Path, seed: int = 0, mib: int = 2) -> Path:
    """A state dict of about ``mib`` MiB in 8 tensors."""
    g = torch.Generator().manual_seed(seed)
    per = mib * (1 << 20) // 4 // 8
    torch.save({f"layer{i}.weight": torch.randn(per, generator=g) for i in range(8)}, path)
    return path


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A mounted 1 MiB tmpfs (skipped where mounting is not permitted)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?); the RLIMIT_FSIZE test covers a full disk")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def assert_clean_failure(code: int, stderr: str, folder: Path, *fragments: str) -> None:
    lines = stderr.splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("ckpt: error: "), stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert sorted(os.listdir(folder)) == [], "a partial output or temporary file was left"


@pytest.mark.parametrize("command", list(WRITES))
def test_full_disk_tmpfs(tmp_path: Path, small_disk: Path, command: str) -> None:
    require(command)
    src = make_source(tmp_path / "src.pth")
    before = sha256(src)
    extra, name = WRITES[command]
    result = run_cli(command, src, "-o", small_disk / name, *extra)
    assert_clean_failure(result.exit_code, result.stderr, small_disk, "no space left")
    assert sha256(src) == before


def test_full_disk_tmpfs_sharded(tmp_path: Path, small_disk: Path) -> None:
    """Shards that fit before the disk fills are removed too: no index and no orphan shards."""
    require("convert")
    src = make_source(tmp_path / "src.pth")
    extra, name = SHARDED
    out = small_disk / name
    result = run_cli("convert", src, "-o", out, "--to", "safetensors", *extra)
    assert_clean_failure(
        result.exit_code, result.stderr, out if out.exists() else small_disk, "no space left"
    )


def run_limited(args: list[str], limit: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``ckpt`` in a subprocess that may not write files larger than ``limit`` bytes."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from ckptsurgeon.cli import main\n"
        f"main({[str(a) for a in args]!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


@pytest.mark.parametrize("command", list(WRITES))
def test_file_size_limit(tmp_path: Path, command: str) -> None:
    require(command)
    src = make_source(tmp_path / "src.pth")
    before = sha256(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    extra, name = WRITES[command]
    proc = run_limited([command, src, "-o", out_dir / name, *extra], 1 << 20, tmp_path)
    assert_clean_failure(proc.returncode, proc.stderr, out_dir, "too large")
    assert sha256(src) == before


def load_any(path: Path) -> dict[str, object]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("command", list(WRITES))
def test_concurrent_writers_leave_one_complete_output(tmp_path: Path, command: str) -> None:
    """Two processes write different data to one output with --force: the result is one of them, whole."""
    require(command)
    extra, name = WRITES[command]
    sources = [make_source(tmp_path / f"src{i}.pth", seed=i, mib=4) for i in range(2)]
    out = tmp_path / "out" / name
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _round in range(3):
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "ckptsurgeon", command, str(src), "-o", str(out), "--force", *extra],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for src in sources
        ]
        results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
        for code, stderr in results:
            assert code in (0, 2), stderr
            assert "Traceback" not in stderr and len(stderr.splitlines()) <= 1, stderr
        assert any(code == 0 for code, _ in results), results
        assert sorted(os.listdir(out.parent)) == [name], "temporary files were left"
        got = load_any(out)
        expected = [_expected(src, command) for src in sources]
        assert any(_equal(got, want) for want in expected), "the output mixes the two writers"


def _expected(src: Path, command: str) -> dict[str, object]:
    sd = torch.load(src, weights_only=True)
    return {f"net.{k}": v for k, v in sd.items()} if command == "rename" else sd


def _equal(a: dict[str, object], b: dict[str, object]) -> bool:
    with contextlib.suppress(Exception):
        return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # type: ignore[arg-type]
    return False


@pytest.mark.parametrize("command", list(WRITES))
def test_force_never_replaces_a_pipe(tmp_path: Path, command: str) -> None:
    """``-o`` naming a FIFO (or a device, such as /dev/null) is refused even with --force."""
    require(command)
    src = make_source(tmp_path / "src.pth", mib=1)
    extra, name = WRITES[command]
    fifo = tmp_path / name
    os.mkfifo(fifo)
    result = run_cli(command, src, "-o", fifo, "--force", *extra)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "not a regular file" in result.stderr
    assert fifo.is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "src.pth"])
