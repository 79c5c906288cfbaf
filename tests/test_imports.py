"""`ckpt --help` and inspecting safetensors or torch zip files must not import torch (start-up cost)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REAL, REPO

PROBE = """
import sys
from ckptsurgeon.cli import cli
try:
    cli.main(args=sys.argv[1:], prog_name="ckpt", standalone_mode=False)
finally:
    heavy = sorted(m for m in ("torch", "numpy", "safetensors", "tabulate") if m in sys.modules)
    print("HEAVY:" + ",".join(heavy), file=sys.stderr)
"""


def heavy_modules(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    line = [x for x in result.stderr.splitlines() if x.startswith("HEAVY:")]
    assert line, result.stderr
    return [m for m in line[-1].removeprefix("HEAVY:").split(",") if m]


def test_help_imports_nothing_heavy() -> None:
    assert heavy_modules("--help") == []


@pytest.mark.parametrize(
    "path",
    [REAL / "hf_gpt2_tiny" / "model.safetensors", REAL / "hf_gpt2_tiny", REAL / "tinynet_compiled.pth"],
)
def test_inspect_does_not_import_torch(path: Path) -> None:
    heavy = heavy_modules("inspect", str(path))
    assert "torch" not in heavy and "numpy" not in heavy
