"""Crash safety: ``kill -9`` in the middle of writing a large file leaves no output and the input intact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

# Runs the CLI with a writer that announces (marker file) and then stalls once LIMIT bytes are out
# (counted over all the files it writes).
SLOW_WRITER = """
import sys, time
import ckptsurgeon.fileio.writing as writing
from ckptsurgeon.cli import main

marker, limit = sys.argv[1], int(sys.argv[2])
real_open = writing._open_temp

class Stalling:
    written = 0  # over every file the command writes (a sharded output is several)
    def __init__(self, fh):
        self._fh = fh
    def write(self, data):
        n = self._fh.write(data)
        Stalling.written += len(data)
        if Stalling.written >= limit:
            self._fh.flush()
            open(marker, "w").close()
            time.sleep(600)
        return n
    def __getattr__(self, name):
        return getattr(self._fh, name)

def stalling_open(parent, name):
    fh, tmp = real_open(parent, name)
    return Stalling(fh), tmp

writing._open_temp = stalling_open
main(sys.argv[3:])
"""

TENSOR_BYTES = 64 * 2**20  # four of them: a 256 MiB input


def make_large_safetensors(path: Path) -> None:
    """A 256 MiB safetensors file written directly (no torch): four float32 tensors of 64 MiB."""
    names = [f"module.layer{i}.weight" for i in range(4)]
    numel = TENSOR_BYTES // 4
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for i, name in enumerate(names):
        header[name] = {
            "dtype": "F32",
            "shape": [numel // 1024, 1024],
            "data_offsets": [i * TENSOR_BYTES, (i + 1) * TENSOR_BYTES],
        }
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    block = os.urandom(2**20)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(body)) + body)
        for i in range(4 * TENSOR_BYTES // len(block)):
            fh.write(bytes([i % 251]) + block[1:])


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def large_input(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("large")
    path = folder / "big.safetensors"
    make_large_safetensors(path)
    return path, digest(path)


def kill_mid_write(
    args: list[str], marker: Path, limit: int = 96 * 2**20, signum: int = signal.SIGKILL
) -> str:
    """Run ``ckpt ARGS`` with a writer that stalls after ``limit`` bytes, send ``signum`` there;
    return what it printed on stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(marker), str(limit), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the writer ended before the signal: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise AssertionError("the writer never reached the signal point")
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signum)
        proc.wait(timeout=30)
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    # SIGKILL ends the process where it is; SIGTERM unwinds it like Ctrl-C, exit 128 + 15
    assert proc.returncode == (-signum if signum == signal.SIGKILL else 128 + signum), err
    return err


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_kill_mid_write_leaves_no_output(tmp_path: Path, large_input: tuple[Path, str], suffix: str) -> None:
    src, before = large_input
    out = tmp_path / f"out{suffix}"
    marker = tmp_path / "marker"
    kill_mid_write(["rename", str(src), "-o", str(out), "--strip-prefix", "module."], marker)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker"]  # no half-written temporary file either
    assert digest(src) == before


def test_kill_mid_write_over_the_input_leaves_it_intact(
    tmp_path: Path, large_input: tuple[Path, str]
) -> None:
    src, before = large_input
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(src, copy)
    marker = tmp_path / "marker"
    kill_mid_write(["rename", str(copy), "-o", str(copy), "--force", "--strip-prefix", "module."], marker)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.safetensors", "marker"]
    assert digest(copy) == before


def test_two_writers_of_one_output_do_not_corrupt_it(tmp_path: Path) -> None:
    small = tmp_path / "small.pth"
    import torch

    torch.save({f"w{i}": torch.full((256, 256), float(i)) for i in range(8)}, small)
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ckptsurgeon", "convert", str(small), "-o", str(out), "--force"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
    from safetensors.torch import load_file

    loaded = load_file(str(out))
    assert all(torch.equal(loaded[f"w{i}"], torch.full((256, 256), float(i))) for i in range(8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "small.pth"]


@pytest.mark.parametrize("shards", [False, True])
def test_sigterm_mid_write_cleans_up_like_ctrl_c(
    tmp_path: Path, large_input: tuple[Path, str], shards: bool
) -> None:
    """A job scheduler's SIGTERM: the temporary file goes, and so do the shards already written."""
    src, before = large_input
    out = tmp_path / ("sharded" if shards else "out.pth")
    split = ["--max-shard-size", "80MB"] if shards else []
    marker = tmp_path / "marker"
    # the writer stalls 96 MiB into the output: in the second shard (64 MiB each), the first in place
    err = kill_mid_write(["convert", str(src), "-o", str(out), *split], marker, signum=signal.SIGTERM)
    assert err == "ckpt: interrupted; no output was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker"]
    assert digest(src) == before


def test_ctrl_c_while_the_command_line_loads_is_one_line() -> None:
    """Ctrl-C during the imports (the first tens of milliseconds) is caught by the entry point."""
    hook = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ckptsurgeon.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "sys.argv = ['ckpt', '--help']\n"
        "from ckptsurgeon.entry import run\n"
        "run()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", hook], env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr, done.stdout) == (
        130,
        "ckpt: interrupted; no output was written\n",
        "",
    )


def test_kill_mid_write_of_a_new_sharded_folder_leaves_no_folder_by_that_name(
    tmp_path: Path, large_input: tuple[Path, str]
) -> None:
    """A new folder is filled under a hidden name and renamed whole: kill -9 leaves at most that
    hidden folder (never a partial set under the output's name)."""
    src, before = large_input
    out = tmp_path / "sharded"
    marker = tmp_path / "marker"
    kill_mid_write(["convert", str(src), "-o", str(out), "--max-shard-size", "80MB"], marker)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "marker")
    assert len(left) == 1 and left[0].startswith(".sharded.") and left[0].endswith(".ckpt-tmp"), left
    assert not (tmp_path / left[0] / "model.safetensors.index.json").exists()
    assert digest(src) == before


def test_a_new_sharded_folder_gets_the_usual_permissions(tmp_path: Path) -> None:
    from conftest import FIXTURES, run_cli

    out = tmp_path / "sharded"
    assert run_cli("convert", FIXTURES / "vgg_1000.pth", "-o", out, "--max-shard-size", "20KB").exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_force_rewrite_of_a_sharded_folder_keeps_the_old_set(
    tmp_path: Path, large_input: tuple[Path, str], signum: int
) -> None:
    """--force into an existing set: the new one is staged beside it and moved in only when whole."""
    src, _ = large_input
    out = tmp_path / "sharded"
    first = ["rename", str(src), "-o", str(out), "--strip-prefix", "module.", "--max-shard-size", "80MB"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "ckptsurgeon", *first], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr
    before = {p.name: digest(p) for p in out.iterdir()}
    marker = tmp_path / "marker"
    args = ["convert", str(src), "-o", str(out), "--force", "--max-shard-size", "80MB"]
    kill_mid_write(args, marker, signum=signum)
    assert {p.name: digest(p) for p in out.iterdir()} == before
    left = sorted(p.name for p in tmp_path.iterdir())
    if signum == signal.SIGTERM:
        assert left == ["marker", "sharded"]
    else:  # kill -9: at most the hidden staging folder beside it
        assert [n for n in left if not n.endswith(".ckpt-tmp")] == ["marker", "sharded"]
