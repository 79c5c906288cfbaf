"""The README documents every command, and its shown output is what the commands really print."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

from ckptsurgeon.cli import cli

README = (REPO / "README.md").read_text()


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_is_documented(name: str) -> None:
    assert f"<!-- run: ckpt {name} --help -->" in README
    assert f"### `ckpt {name}`" in README


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_help_has_an_example(name: str) -> None:
    assert "Example" in (cli.commands[name].help or "")


def test_readme_output_is_current() -> None:
    result = subprocess.run(
        [sys.executable, "docs/readme.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
