"""``--allow-global`` through the write commands (issue 12, item 10): a checkpoint holding an
instance of a user's data-only class is written, verified with the same allow-list, and loads
in torch as it was saved; where the object cannot be written, the error says ``--weights-only``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from ckptsurgeon.formats import ReadOptions, open_checkpoint

MYLIB = """
from dataclasses import dataclass, field


@dataclass
class Config:
    name: str = "net"
    layers: int = 2
    extra: dict = field(default_factory=dict)
"""

SAVE = """
import sys, torch, mylib
gen = torch.Generator().manual_seed(0)
state = {
    "body.weight": torch.randn(4, 4, generator=gen),
    "fc.weight": torch.randn(2, 4, generator=gen),
    "fc.bias": torch.zeros(2),
}
torch.save({"config": mylib.Config("tiny", 3, {"lr": [0.1, 0.01]}), "state_dict": state}, sys.argv[1])
"""

# what torch.load makes of a file, with mylib importable: the config's fields and the tensors
DESCRIBE = """
import dataclasses, json, sys, torch
obj = torch.load(sys.argv[1], weights_only=False)
tensors = {k: v.tolist() for k, v in obj["state_dict"].items()}
print(json.dumps({"config": type(obj["config"]).__qualname__, "fields": dataclasses.asdict(obj["config"]),
                  "tensors": tensors}))
"""


def in_mylib_env(tmp_path: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(tmp_path)}


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``mylib.py`` and ``f.pth``: weights under ``state_dict`` beside ``config``, a
    ``mylib.Config`` instance, saved by torch in a subprocess that can import ``mylib`` (this
    process cannot). Made once: each test writes into its own ``tmp_path``."""
    folder = tmp_path_factory.mktemp("lib")
    (folder / "mylib.py").write_text(MYLIB)
    subprocess.run([sys.executable, "-c", SAVE, str(folder / "f.pth")], check=True, env=in_mylib_env(folder))
    return folder


@pytest.fixture
def with_config(lib: Path) -> Path:
    return lib / "f.pth"


def config_state(path: Path) -> dict:
    """The config's state as ckpt reads it back (a placeholder: mylib is never imported)."""
    tree = open_checkpoint(path, ReadOptions(allow_globals=frozenset({"mylib.Config"}))).tree
    return tree["config"].state


def described(path: Path, lib: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", DESCRIBE, str(path)],
        env=in_mylib_env(lib),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


def test_convert_writes_verifies_and_loads_the_same_object(
    tmp_path: Path, lib: Path, with_config: Path
) -> None:
    out = tmp_path / "g.pth"
    result = run_cli("convert", with_config, "-o", out, "--allow-global", "mylib.Config")
    assert result.exit_code == 0, result.stderr
    assert "verified bit for bit" in result.stdout
    assert "mylib" not in sys.modules  # nothing was imported to write or verify it
    inspected = run_cli("inspect", out, "--allow-global", "mylib.Config", "--format", "json")
    assert inspected.exit_code == 0, inspected.stderr
    entries = {e["key"]: e for e in json.loads(inspected.stdout)["entries"]}
    assert entries["config"]["kind"] == "value" and entries["state_dict"]["kind"] == "weights"
    got, want = described(out, lib), described(with_config, lib)
    assert got == want
    assert got["fields"] == {"name": "tiny", "layers": 3, "extra": {"lr": [0.1, 0.01]}}


def test_the_output_still_needs_the_allow_list(tmp_path: Path, with_config: Path) -> None:
    out = tmp_path / "g.pth"
    assert run_cli("convert", with_config, "-o", out, "--allow-global", "mylib.Config").exit_code == 0
    refused = run_cli("inspect", out)
    assert refused.exit_code == 2 and "mylib.Config" in refused.stderr and "--allow-global" in refused.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["convert"],
        ["convert", "--dtype", "bf16"],
        ["rename", "--add-prefix", "net."],
        ["strip-head", "--head", "fc"],
        ["adapt", "TARGET"],
    ],
)
def test_every_write_command_verifies_with_the_allow_list(
    tmp_path: Path, with_config: Path, command: list[str]
) -> None:
    target = tmp_path / "target.pth"
    torch.save(
        {"body.weight": torch.zeros(4, 4), "fc.weight": torch.zeros(2, 4), "fc.bias": torch.zeros(2)}, target
    )
    args = [target if a == "TARGET" else a for a in command]
    out = tmp_path / "out.pth"
    result = run_cli(args[0], with_config, *args[1:], "-o", out, "--allow-global", "mylib.Config")
    assert result.exit_code == 0, result.stderr
    assert "verified bit for bit" in result.stdout
    assert (
        config_state(out)
        == config_state(with_config)
        == {
            "name": "tiny",
            "layers": 3,
            "extra": {"lr": [0.1, 0.01]},
        }
    )


def test_safetensors_leaves_the_object_out_and_says_so(tmp_path: Path, with_config: Path) -> None:
    out = tmp_path / "g.safetensors"
    result = run_cli("convert", with_config, "-o", out, "--allow-global", "mylib.Config")
    assert result.exit_code == 0, result.stderr
    assert "left out 1 non-weight entry (safetensors holds the weights only): config" in result.stderr


def test_a_live_object_cannot_be_written_and_the_error_says_weights_only(
    tmp_path: Path, lib: Path, with_config: Path
) -> None:
    """Read with full trust, the config is a live mylib.Config, which the writer cannot emit
    (it writes only what it read as data): one line naming the entry and --weights-only."""
    out = tmp_path / "h.pth"
    command = [sys.executable, "-m", "ckptsurgeon", "convert", str(with_config), "-o", str(out)]
    done = subprocess.run(
        [*command, "--unsafe-trust-pickle"], env=in_mylib_env(lib), capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    error = done.stderr.splitlines()[-1]
    assert error.startswith("ckpt: error: cannot write entry 'config' to a .pth"), error
    assert "mylib.Config" in error and "--weights-only" in error
    assert "Traceback" not in done.stderr and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".h.pth", "h.pth"))]  # no temporary left
    done = subprocess.run(
        [*command, "--unsafe-trust-pickle", "--weights-only"],
        env=in_mylib_env(lib),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert set(torch.load(out, weights_only=True)) == {"body.weight", "fc.weight", "fc.bias"}
