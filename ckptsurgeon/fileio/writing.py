"""Atomic, verified output: never a half-written file, never an input overwritten by accident.

Data goes to an anonymous temporary file in the destination folder (``O_TMPFILE``
on Linux, so a crash or ``kill -9`` leaves nothing behind; a hidden named temporary
file elsewhere), is flushed and fsynced, then renamed over the destination.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import OutputError

# Outputs renamed into place by this process, in order (what an interrupted command did write).
COMMITTED: list[Path] = []


def check_output_path(path: Path, *, force: bool) -> None:
    """Refuse an existing output without ``force``, a directory, anything that is not a regular file
    (through a link or not), a missing parent folder, or a folder in /proc or /sys."""
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; name an output file")
    refuse_special_file(path)
    if os.path.lexists(path) and not force:
        raise OutputError(f"{path}: already exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{path}: the folder {parent} does not exist")
    refuse_pseudo_filesystem(path)
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: the folder {parent} is not writable")


def refuse_special_file(path: Path) -> None:
    """Refuse an existing output that is not a regular file, whatever else is asked: a device, a pipe,
    a socket, or a symbolic link (to anything but a folder). ``--force`` must never rename a file over
    one: ``-o /dev/null`` or ``-o /dev/stdout`` (a link) as root would replace a system file.

    A link to a regular file is refused too, rather than replaced by a file (which would silently
    cut the link) or written through (which would change a file under another name, such as a
    blob shared by a Hugging Face cache): name the file itself.

    Example:
        >>> refuse_special_file(Path("/dev/null"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ckptsurgeon.errors.OutputError: /dev/null: exists and is not a regular file ...
    """
    try:
        mode = os.lstat(path).st_mode
    except (OSError, ValueError):  # absent, or unreachable: the folder checks say why
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    if not stat.S_ISLNK(mode):
        raise OutputError(f"{path}: exists and is not a regular file (a device or a pipe); name a file")
    try:
        target = os.stat(path).st_mode
    except (OSError, ValueError):
        target = None
    if target is not None and stat.S_ISDIR(target):
        return  # a folder: a sharded output's, or refused as a folder by the caller
    what = (
        "a missing file"
        if target is None
        else "a regular file"
        if stat.S_ISREG(target)
        else "a device or a pipe, not a regular file"
    )
    raise OutputError(
        f"{path}: is a symbolic link to {what}; outputs are never written through a link: "
        "name the file itself, or remove the link"
    )


_PSEUDO_FILESYSTEMS = ("/proc", "/sys")


def refuse_pseudo_filesystem(path: Path) -> None:
    """Refuse an output in /proc or /sys (kernel interfaces, not storage), links resolved.

    Example:
        >>> try:
        ...     refuse_pseudo_filesystem(Path("/sys/out.pth"))
        ... except OutputError as exc:
        ...     print(exc)
        /sys/out.pth: /sys is a kernel interface, not a place for files; name a file on a disk
    """
    parent = path.parent if str(path.parent) else Path(".")
    try:
        real = os.path.realpath(parent)
    except (OSError, ValueError):
        return
    for top in _PSEUDO_FILESYSTEMS:
        if real == top or real.startswith(top + "/"):
            raise OutputError(
                f"{path}: {top} is a kernel interface, not a place for files; name a file on a disk"
            )


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success fsync and rename it into place.

    On any exception the temporary file is removed and ``path`` is untouched.

    Example:
        >>> with atomic_output(tmp / "out.bin") as fh:      # doctest: +SKIP
        ...     fh.write(b"data")
    """
    path = Path(path)
    check_output_path(path, force=force)
    parent = path.parent if str(path.parent) else Path(".")
    fh: BinaryIO | None = None
    tmp_name: str | None = None
    try:
        fh, tmp_name = _open_temp(parent, path.name)  # inside: a full disk or no inode left is one line
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
        if tmp_name is None:  # anonymous: give it a name, then rename over the target
            tmp_name = _link_anonymous(fh, parent, path.name)
        fh.close()
        if os.path.lexists(path) and not force:  # appeared while we wrote
            raise OutputError(f"{path}: appeared while writing; pass --force to overwrite it")
        refuse_special_file(path)  # and what is there now is still a file (not a link put in meanwhile)
        os.replace(tmp_name, path)
        tmp_name = None
        COMMITTED.append(path)
        fsync_dir(parent)
    except OSError as exc:
        raise OutputError(_os_error_message(path, exc)) from None
    finally:
        if fh is not None and not fh.closed:  # after a failed write, closing flushes the rest and fails again
            with contextlib.suppress(OSError):
                fh.close()
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def _open_temp(parent: Path, name: str) -> tuple[BinaryIO, str | None]:
    flag = getattr(os, "O_TMPFILE", 0)
    if flag and os.path.isdir("/proc/self/fd"):
        try:
            fd = os.open(parent, flag | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o644)
            return os.fdopen(fd, "w+b"), None
        except OSError:
            pass  # the filesystem does not support O_TMPFILE
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{name}.", suffix=".ckpt-tmp")
    try:
        os.fchmod(fd, 0o644)
        return os.fdopen(fd, "w+b"), tmp_name
    except BaseException:
        os.close(fd)
        os.unlink(tmp_name)
        raise


def _link_anonymous(fh: BinaryIO, parent: Path, name: str) -> str:
    """Give an O_TMPFILE file a (hidden) name so it can be renamed over the target."""
    for attempt in range(100):
        candidate = parent / f".{name}.{os.getpid()}.{attempt}.ckpt-tmp"
        err = _linkat_follow(f"/proc/self/fd/{fh.fileno()}", os.fspath(candidate))
        if err == 0:
            return os.fspath(candidate)
        if err != errno.EEXIST:
            raise OSError(err, os.strerror(err))
    raise OutputError(f"{parent / name}: could not create a temporary name beside it")


def _linkat_follow(src: str, dst: str) -> int:
    """linkat(2) with AT_SYMLINK_FOLLOW (os.link does not follow /proc/self/fd links here)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_symlink_follow = -100, 0x400
    result = libc.linkat(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), at_symlink_follow)
    return 0 if result == 0 else ctypes.get_errno()


def fsync_dir(parent: Path) -> None:
    """Make a rename in ``parent`` durable (fsync the folder); errors are ignored (some filesystems refuse).

    Example:
        >>> fsync_dir(Path("."))
    """
    with contextlib.suppress(OSError):
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _os_error_message(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return f"{path}: no space left on the device; nothing was written, free space and retry"
    if exc.errno == errno.EFBIG:
        return f"{path}: file too large for the file system or the size limit (ulimit -f); nothing written"
    if exc.errno == errno.EDQUOT:
        return f"{path}: disk quota exceeded; nothing was written"
    if exc.errno == errno.EROFS:
        return f"{path}: the file system is read-only; nothing was written"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{path}: permission denied; nothing was written"
    return f"{path}: could not be written ({exc.strerror or exc}); nothing was written"
