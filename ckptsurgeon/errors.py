"""The one family of exceptions ckptsurgeon raises for expected failures.

Every message is one line that names the file or key, says what is wrong, and
what to do. The CLI turns any :class:`CkptError` into that line on stderr and
exit code 2; nothing else in the program catches them.
"""

from __future__ import annotations


class CkptError(Exception):
    """Base class: an expected failure with a one-line, user-facing message.

    Example:
        >>> raise CkptError("model.pth: not found")
        Traceback (most recent call last):
        ...
        ckptsurgeon.errors.CkptError: model.pth: not found
    """

    def __init__(self, message: str) -> None:
        # Keep it to one line: the CLI prints exactly this.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self.args[0])


class InputError(CkptError):
    """The input path is missing, a directory where a file was expected, unreadable, a FIFO..."""


class FormatError(CkptError):
    """The file is not a checkpoint we can read, or it is malformed or truncated."""


class NotAStateDictError(FormatError):
    """The file is a known kind of thing that is not a state dict (TorchScript, HTML, git-lfs pointer...)."""


class UnsafeCheckpointError(CkptError):
    """Loading the file would require importing globals that can execute code."""

    def __init__(self, message: str, blocked_globals: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.blocked_globals = tuple(blocked_globals)


class KeySelectionError(CkptError):
    """``--key`` names an entry that is not there or holds no tensors."""


class TargetError(CkptError):
    """A diff/adapt target could not be parsed, imported or built."""


class SurgeryError(CkptError):
    """A rename/drop plan is invalid (for example two keys collide after a rename)."""


class OutputError(CkptError):
    """The output exists (without ``--force``), cannot be written, or failed verification."""


class LoadError(CkptError):
    """``load_into`` refused to load because too little of the checkpoint fits the model."""
