"""The README documents every command, and its shown output is what the commands really print."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

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


# docs/readme.py itself: it refuses to write crashes into the README, and concurrent runs do not race.

VGG_DIFF = "ckpt diff fixtures/vgg_1000.pth 'fixtures/models.py:vgg_like(num_classes=2)'"


def _readme_with(tmp_path, *commands: str) -> Path:
    path = tmp_path / "README.md"
    path.write_text("".join(f"<!-- run: {command} -->\n```\nold\n```\n\n" for command in commands))
    return path


def _run_readme_script(prelude: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run docs/readme.py's main() in a fresh Python after ``prelude`` (which may block imports)."""
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('readme', 'docs/readme.py')\n"
        "readme = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(readme)\n"
        f"{prelude}\n"
        f"sys.exit(readme.main({list(args)!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_readme_script_without_torch_says_which_python_to_use(tmp_path) -> None:
    path = _readme_with(tmp_path, "ckpt --version")
    result = _run_readme_script("sys.modules['torch'] = None", "--readme", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "cannot import torch" in result.stderr
    assert "run it with .venv/bin/python docs/readme.py" in result.stderr
    assert path.read_text().count("old") == 1  # nothing written


def test_readme_script_refuses_to_write_an_internal_error(tmp_path) -> None:
    """The newcomer's case: the CLI cannot import torch, so a block would show `internal error`."""
    path = _readme_with(tmp_path, "ckpt --version", VGG_DIFF)
    before = path.read_text()
    prelude = "readme.require_environment = lambda: None\nsys.modules['torch'] = None"
    result = _run_readme_script(prelude, "--readme", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "1 block(s) show a crash, not real output; README.md was not written" in result.stderr
    assert "internal error (ModuleNotFoundError" in result.stderr
    assert path.read_text() == before


def test_broken_blocks_names_the_command() -> None:
    spec = importlib.util.spec_from_file_location("readme_script", REPO / "docs" / "readme.py")
    readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme)
    text = "<!-- run: ckpt a -->\n```\nfine\n```\n<!-- run: ckpt b -->\n```\nx\nModuleNotFoundError: y\n```\n"
    assert readme.broken_blocks(text) == ["ckpt b: ModuleNotFoundError: y"]
    scratch = Path(readme.make_scratch())
    try:
        assert len(str(scratch)) == len("/tmp/ckpt-readme") and scratch.is_dir()
        assert scratch.stat().st_mode & 0o777 == 0o700
    finally:
        scratch.rmdir()


def test_concurrent_readme_runs_each_get_their_own_scratch(tmp_path) -> None:
    """Two runs at once write the same /tmp/ckpt-readme names without racing, and show that path."""
    commands = (
        "ckpt convert fixtures/xception_dp_6.pth -o /tmp/ckpt-readme/x.safetensors",
        "ckpt inspect /tmp/ckpt-readme/x.safetensors --format json",
    )
    paths = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        paths.append(_readme_with(tmp_path / name, *commands))
    runs = [
        subprocess.Popen(
            [sys.executable, "docs/readme.py", "--readme", str(path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in paths
    ]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    first, second = (path.read_text() for path in paths)
    assert first == second
    assert "wrote /tmp/ckpt-readme/x.safetensors (safetensors, 109 tensors" in first
    assert '"path": "/tmp/ckpt-readme/x.safetensors"' in first
    assert "[exit code" not in first


def test_the_architecture_map_names_every_module() -> None:
    """docs/architecture.md draws the package tree: a module it does not name is a map gone stale."""
    text = (REPO / "docs" / "architecture.md").read_text()
    package = REPO / "ckptsurgeon"
    modules = [p for p in package.rglob("*.py") if p.stem not in ("__init__", "__main__")]
    modules = [p for p in modules if p.parent.name != "commands"]  # one per command, named in cli.py
    missing = [str(p.relative_to(package)) for p in modules if p.stem not in text]
    assert not missing, f"docs/architecture.md does not name {missing}"
