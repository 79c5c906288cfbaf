#!/usr/bin/env python3
"""Keep README.md true: regenerate the blocks that show `--help` and real command output.

In README.md, a block

    <!-- run: ckpt inspect fixtures/vgg_1000.pth -->
    ```
    ...output...
    ```

is replaced with the command's real output (run in-process from the repository root,
stdout then stderr). ``--check`` exits 1 if README.md is not up to date (tests run it).

It needs the project's environment (torch, click, tabulate): run it with the venv's Python.
A block whose output holds an internal error or a missing module stops it, and nothing is
written. The README's commands write under ``/tmp/ckpt-readme``; each run uses a private
folder of the same path length instead (so concurrent runs never race and no column width
changes) and writes its path as ``/tmp/ckpt-readme`` in the captured text.

    .venv/bin/python docs/readme.py                  # rewrite README.md
    .venv/bin/python docs/readme.py --check          # fail if it is stale
    .venv/bin/python docs/readme.py --readme X.md    # rewrite (or --check) another file
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import secrets
import shlex
import shutil
import string
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SHOWN_SCRATCH = "/tmp/ckpt-readme"
BLOCK = re.compile(r"(<!-- run: (?P<cmd>.+?) -->\n```[a-z]*\n)(?P<body>.*?)(```)", re.S)
REQUIRED = ("torch", "click", "tabulate", "ckptsurgeon.cli")
BROKEN = ("internal error", "ModuleNotFoundError", "Traceback (most recent call last)")
VENV_HINT = "run it with .venv/bin/python docs/readme.py (python3 dev.py test creates .venv)"


class ReadmeError(Exception):
    """README.md cannot be regenerated; the message says why and what to do."""


def require_environment() -> None:
    """Stop unless this Python can import what the README's commands need.

    Example:
        >>> require_environment()  # doctest: +SKIP
    """
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ReadmeError(f"{sys.executable} cannot import {name} ({exc}); {VENV_HINT}") from exc


def run_command(command: str, scratch: str) -> str:
    """Run one `ckpt ...` command line in-process and return what it printed.

    ``/tmp/ckpt-readme`` in the command means ``scratch``; ``scratch`` in the output is
    written back as ``/tmp/ckpt-readme``.

    Example:
        >>> run_command("ckpt --version", "/tmp/ckpt-ab12cd")  # doctest: +SKIP
        'ckpt, version 0.1.0\\n'
    """
    from click.testing import CliRunner

    from ckptsurgeon.cli import cli

    args = shlex.split(command.replace(SHOWN_SCRATCH, scratch))
    if not args or args[0] != "ckpt":
        raise ReadmeError(f"README.md: block command {command!r} does not start with `ckpt`")
    result = CliRunner().invoke(cli, args[1:], prog_name="ckpt", terminal_width=100)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise ReadmeError(f"README.md: {command!r} raised {result.exception!r}") from result.exception
    text = (result.stdout + result.stderr).replace(scratch, SHOWN_SCRATCH)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    if result.exit_code:
        text += f"\n[exit code {result.exit_code}]"
    return text.strip("\n") + "\n"


def broken_blocks(readme: str) -> list[str]:
    """``command: line`` for every block whose output shows a crash rather than real output.

    Example:
        >>> broken_blocks("<!-- run: ckpt x -->\\n```\\nckpt: error: internal error (E)\\n```\\n")
        ['ckpt x: ckpt: error: internal error (E)']
    """
    found = []
    for match in BLOCK.finditer(readme):
        for line in match.group("body").splitlines():
            if any(marker in line for marker in BROKEN):
                found.append(f"{match.group('cmd')}: {line}")
                break
    return found


def make_scratch() -> str:
    """A new private folder whose path is as long as ``/tmp/ckpt-readme`` (so tables keep their widths).

    Example:
        >>> len(make_scratch()) == len("/tmp/ckpt-readme")  # doctest: +SKIP
        True
    """
    parent = Path(SHOWN_SCRATCH).parent
    alphabet = string.ascii_lowercase + string.digits
    width = len(Path(SHOWN_SCRATCH).name) - len("ckpt-")
    for _ in range(100):
        path = parent / ("ckpt-" + "".join(secrets.choice(alphabet) for _ in range(width)))
        if str(path) == SHOWN_SCRATCH:
            continue
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return str(path)
    raise ReadmeError(f"could not create a scratch folder in {parent}")


def render(readme: str) -> str:
    """README text with every `<!-- run: ... -->` block's output regenerated.

    Example:
        >>> render("<!-- run: ckpt --version -->\\n```\\nold\\n```\\n")  # doctest: +SKIP
        '<!-- run: ckpt --version -->\\n```\\nckpt, version 0.1.0\\n```\\n'
    """
    scratch = make_scratch()
    try:

        def replace(match: re.Match[str]) -> str:
            return match.group(1) + run_command(match.group("cmd"), scratch) + match.group(4)

        return BLOCK.sub(replace, readme)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename (a concurrent reader sees old or new, whole)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def report_stale(current: str, fresh: str, path: Path) -> None:
    """Print the first lines of the difference between the file and its fresh rendering."""
    import difflib

    diff = difflib.unified_diff(current.splitlines(), fresh.splitlines(), path.name, "fresh", lineterm="")
    print("\n".join(list(diff)[:80]))
    print(f"{path.name} is stale: run `.venv/bin/python docs/readme.py`", file=sys.stderr)


def regenerate(path: Path, check: bool) -> int:
    """Check or rewrite ``path``; 0 when it is (now) current, 1 when ``check`` finds it stale."""
    require_environment()
    current = path.read_text()
    fresh = render(current)
    broken = broken_blocks(fresh)
    if broken:
        raise ReadmeError(
            f"{len(broken)} block(s) show a crash, not real output; {path.name} was not written "
            f"(is this the project's Python? {VENV_HINT}): " + " | ".join(broken)
        )
    if check:
        if fresh != current:
            report_stale(current, fresh, path)
            return 1
        return 0
    if fresh != current:
        write_atomically(path, fresh)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate (or --check) README.md's command output.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale; write nothing")
    parser.add_argument("--readme", type=Path, default=README, help="the file to regenerate (README.md)")
    args = parser.parse_args(argv)
    path = args.readme.resolve()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("COLUMNS", "100")
    try:
        return regenerate(path, args.check)
    except ReadmeError as exc:
        print(f"docs/readme.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
