#!/usr/bin/env python3
"""Set up and run ckptsurgeon with nothing but Python 3.10+.

    python3 dev.py demo    # create .venv, install, run the story on the bundled fixtures
    python3 dev.py test    # create .venv, install, lint, type-check, run the whole test suite (what CI runs)

The virtual environment lives in .venv next to this file and is reused while
pyproject.toml and constraints.txt are unchanged. constraints.txt pins torch==2.13.0, which
does not by itself choose the CPU build: from PyPI alone, that pin installs the multi-GB CUDA
build on Linux. Set-up gets the CPU wheel on the project's machines only because pip finds
torch 2.13.0+cpu in their local wheel folder (find-links); elsewhere, point pip at PyTorch's
CPU index first, as README.md ("Two commands") says:
    export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("CKPT_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".ckptsurgeon-installed"


def _requirements_digest() -> str:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def ensure_environment() -> None:
    """Create .venv and install the package with its test extras, once."""
    if sys.version_info < (3, 10):  # noqa: UP036 - dev.py runs before anything checks the version
        sys.exit(f"ckptsurgeon needs Python 3.10 or newer; this is {sys.version.split()[0]}")
    wanted = _requirements_digest()
    if STAMP.exists() and STAMP.read_text() == wanted and PYTHON.exists():
        _compile_bytecode()
        return
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("dev.py: installing ckptsurgeon and its test dependencies (pinned torch)", flush=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(wanted)
    _compile_bytecode()


def _compile_bytecode() -> None:
    """Byte-compile the package, as pip does for a normal install: an editable install under
    PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module on every run (~14 ms a command)."""
    subprocess.run([str(PYTHON), "-m", "compileall", "-q", str(ROOT / "ckptsurgeon")], check=True)


def run(*args: str) -> int:
    shown = [Path(args[0]).name if Path(args[0]).parent == BIN else args[0], *args[1:]]
    print("$ " + shlex.join(shown), flush=True)
    return subprocess.run(list(args), cwd=ROOT).returncode


def demo() -> int:
    """The story: three checkpoints that do not fit their 2-class targets, diagnosed and fixed."""
    ckpt = str(BIN / "ckpt")
    out = Path(tempfile.mkdtemp(prefix="ckpt-demo-"))
    vgg_target = "torch.nn.DataParallel(fixtures/models.py:vgg_like(num_classes=2))"
    steps = [
        [ckpt, "inspect", "fixtures/real/lightning_tinynet.ckpt"],
        [ckpt, "diff", "fixtures/vgg_1000.pth", vgg_target],
        [ckpt, "adapt", "fixtures/vgg_1000.pth", vgg_target, "-o", str(out / "vgg_2.pth")],
        [ckpt, "diff", str(out / "vgg_2.pth"), vgg_target, "--min-coverage", "90"],
        [ckpt, "diff", "fixtures/resnet_dp_6.pth", "fixtures/models.py:resnet_like(num_classes=2)"],
        [
            ckpt,
            "adapt",
            "fixtures/resnet_dp_6.pth",
            "fixtures/models.py:resnet_like(num_classes=2)",
            "-o",
            str(out / "resnet_2.safetensors"),
        ],
        [ckpt, "convert", "fixtures/xception_dp_6.pth", "-o", str(out / "xception.safetensors")],
        [ckpt, "inspect", str(out / "xception.safetensors")],
    ]
    # diff exits 1 when the checkpoint does not fit as saved: that is the point of the demo
    expected = {1: {0, 1}, 4: {0, 1}}
    for index, step in enumerate(steps):
        code = run(*step)
        print(flush=True)
        if code not in expected.get(index, {0}):
            print(f"dev.py: step failed with exit code {code}", file=sys.stderr)
            return code
    print(f"dev.py: demo outputs are in {out}")
    return 0


def test() -> int:
    """Lint, type-check the package (mypy, configured in pyproject.toml), then the whole test suite."""
    sources = ("ckptsurgeon", "tests", "fixtures", "benchmarks", "docs", "dev.py")
    code = (
        run(str(PYTHON), "-m", "ruff", "check", *sources)
        or run(str(PYTHON), "-m", "ruff", "format", "--check", *sources)
        or run(str(PYTHON), "-m", "mypy")
    )
    if code:
        return code
    return run(str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", *sys.argv[2:])


def main() -> int:
    commands = {"demo": demo, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__.strip())
        return 2
    ensure_environment()
    return commands[sys.argv[1]]()


if __name__ == "__main__":
    sys.exit(main())
