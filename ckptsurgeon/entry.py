"""The ``ckpt`` and ``ckptsurgeon`` scripts' entry point.

Importing the command line (click, the readers) takes a few tens of milliseconds; a Ctrl-C in that
window would otherwise print a Python traceback. Only the package's ``__init__`` (no imports) runs
before this module's guard.
"""

from __future__ import annotations

import sys


def run() -> None:
    """Import the command line and run it; Ctrl-C while it loads ends as one line, exit 130.

    Example:
        >>> run()  # doctest: +SKIP
    """
    try:
        from .cli import main
    except KeyboardInterrupt:
        sys.stderr.write("ckpt: interrupted; no output was written\n")
        raise SystemExit(130) from None
    main()
