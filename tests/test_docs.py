"""The README documents every command, and its shown output is what the commands really print."""

from __future__ import annotations

import re
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


def _python_blocks() -> list[str]:
    blocks = README.split("```python\n")[1:]
    return [block.split("```", 1)[0] for block in blocks]


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_examples_run(index: int, tmp_path) -> None:
    """Every ```python block of the README runs from the repository root, and its printed
    results are the ones written in its comments (`print(x)  # value`)."""
    code = _python_blocks()[index]
    if "vgg19_imagenet.pth" in code:
        pytest.skip("the story's hand-written idiom, not runnable without that file")
    lines = []
    for line in code.splitlines():  # each `print(x)  # value` becomes a check, in place
        printed = re.fullmatch(r"print\((.*)\)\s+#\s*(.*)", line)
        lines.append(f"assert str({printed[1]}) == {printed[2]!r}, str({printed[1]})" if printed else line)
    assert "print(" not in "\n".join(lines), "a print() without its expected value in a comment"
    script = tmp_path / "example.py"
    script.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
