"""Shared test helpers: paths to the bundled fixtures and a CLI runner that keeps stderr apart."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
REAL = FIXTURES / "real"  # copies of real GPU/Lightning/HF files (see fixtures/real/README.md)


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None


def run_cli(*args: str, input: str | None = None) -> CliResult:
    """Invoke ``ckpt`` in-process; stdout and stderr are captured separately."""
    from ckptsurgeon.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], input=input, prog_name="ckpt")
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return CliResult(result.exit_code, result.stdout, result.stderr, exc)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_one_line_error(result: CliResult, *fragments: str) -> None:
    """Exit 2, exactly one line on stderr, no traceback, not an internal error."""
    assert result.exception is None, f"unexpected exception: {result.exception!r}"
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "internal error" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def cli():
    return run_cli
