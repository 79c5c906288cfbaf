#!/usr/bin/env python3
"""Keep README.md true: regenerate the blocks that show `--help` and real command output.

In README.md, a block

    <!-- run: ckpt inspect fixtures/vgg_1000.pth -->
    ```
    ...output...
    ```

is replaced with the command's real output (run in-process from the repository root,
stdout then stderr). ``--check`` exits 1 if README.md is not up to date (tests run it).
Paths under the scratch folder are written as ``/tmp/ckpt-readme``.

    python docs/readme.py          # rewrite README.md
    python docs/readme.py --check  # fail if it is stale
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SCRATCH = Path("/tmp/ckpt-readme")
BLOCK = re.compile(r"(<!-- run: (?P<cmd>.+?) -->\n```[a-z]*\n)(?P<body>.*?)(```)", re.S)


def run_command(command: str) -> str:
    """Run one `ckpt ...` command line in-process and return what it printed."""
    from click.testing import CliRunner

    from ckptsurgeon.cli import cli

    args = shlex.split(command)
    assert args[0] == "ckpt", command
    result = CliRunner().invoke(cli, args[1:], prog_name="ckpt", terminal_width=100)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise RuntimeError(f"{command!r} raised {result.exception!r}") from result.exception
    text = result.stdout + result.stderr
    text = "\n".join(line.rstrip() for line in text.splitlines())
    if result.exit_code:
        text += f"\n[exit code {result.exit_code}]"
    return text.strip("\n") + "\n"


def render(readme: str) -> str:
    if SCRATCH.exists():
        shutil.rmtree(SCRATCH)
    SCRATCH.mkdir(parents=True)

    def replace(match: re.Match[str]) -> str:
        return match.group(1) + run_command(match.group("cmd")) + match.group(4)

    return BLOCK.sub(replace, readme)


def main() -> int:
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("COLUMNS", "100")
    current = README.read_text()
    fresh = render(current)
    if "--check" in sys.argv[1:]:
        if fresh != current:
            import difflib

            diff = difflib.unified_diff(
                current.splitlines(), fresh.splitlines(), "README.md", "fresh", lineterm=""
            )
            print("\n".join(list(diff)[:80]))
            print("README.md is stale: run `python docs/readme.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
