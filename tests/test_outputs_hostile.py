"""Hostile ``-o`` targets: every writing command, the real CLI in a subprocess.

``--force`` replaces only a regular file: never a device, a pipe or a link (whatever it points to),
never a file in /proc or /sys. A failure to create the temporary file (full disk, no inode left,
read-only file system, permission) is one line and leaves nothing. A file name that is not UTF-8
works, and is printed escaped. Nothing here writes to /dev or /proc: the links point there, and the
tests check that the link and what it points to are untouched.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from corpus import write_valid

WRITERS = {  # command: (extra arguments, output suffix)
    "convert": ([], ".safetensors"),
    "rename": (["--strip-prefix", "a."], ".pth"),
    "strip-head": ([], ".pth"),
}


def ckpt(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """The real CLI; arguments may be bytes (a file name that is not UTF-8)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LC_ALL": "C.UTF-8"}
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.run(
        [sys.executable, "-m", "ckptsurgeon", *argv],
        capture_output=True,
        timeout=120,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(proc: subprocess.CompletedProcess[bytes], *fragments: str) -> str:
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, (proc.returncode, proc.stdout, err)
    assert len(err.splitlines()) == 1 and err.startswith("ckpt: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    assert proc.stdout == b"", proc.stdout
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_valid(tmp_path_factory.mktemp("src") / "src.pth")


def link_targets(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    regular = tmp_path / "regular.pth"
    regular.write_bytes(b"keep me")
    return {
        "dev_null": Path("/dev/null"),
        "fifo": fifo,
        "regular": regular,
        "missing": tmp_path / "missing.pth",
    }


def snapshot(path: Path) -> tuple[int, int, bytes | None]:
    st = os.lstat(path) if os.path.lexists(path) else None
    if st is None:
        return (0, 0, None)
    content = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
    return (st.st_mode, st.st_rdev, content)


@pytest.mark.parametrize("command", list(WRITERS))
@pytest.mark.parametrize("target", ["dev_null", "fifo", "regular", "missing"])
def test_force_never_writes_over_or_through_a_link(
    src: Path, tmp_path: Path, command: str, target: str
) -> None:
    """``-o LINK --force``: refused whatever LINK points to; the link and its target are untouched."""
    extra, suffix = WRITERS[command]
    pointee = link_targets(tmp_path)[target]
    link = tmp_path / f"link{suffix}"
    link.symlink_to(pointee)
    before = (snapshot(pointee), os.readlink(link), sorted(os.listdir(tmp_path)))

    proc = ckpt(command, src, "-o", link, "--force", *extra)

    one_line_error(proc, "is a symbolic link")
    assert (
        link.is_symlink() and (snapshot(pointee), os.readlink(link), sorted(os.listdir(tmp_path))) == before
    )


@pytest.mark.parametrize("command", list(WRITERS))
def test_dev_stdout_style_link_is_refused(src: Path, tmp_path: Path, command: str) -> None:
    """A link into /proc/self/fd (what /dev/stdout is) is a link to a pipe here: refused."""
    extra, suffix = WRITERS[command]
    link = tmp_path / f"stdout{suffix}"
    link.symlink_to("/proc/self/fd/1")
    one_line_error(ckpt(command, src, "-o", link, "--force", *extra), "is a symbolic link")
    assert os.readlink(link) == "/proc/self/fd/1"


def test_link_to_a_folder_is_named_a_folder(src: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    link = tmp_path / "link.pth"
    link.symlink_to(folder)
    one_line_error(ckpt("strip-head", src, "-o", link, "--force"), "is a folder")
    assert link.is_symlink() and list(folder.iterdir()) == []


@pytest.mark.parametrize("where", ["/proc/self/ckpt-out.pth", "/proc/ckpt-out.pth", "/sys/ckpt-out.pth"])
def test_output_in_proc_or_sys_is_one_line(src: Path, where: str) -> None:
    if not os.path.isdir(os.path.dirname(where)):
        pytest.skip(f"no {os.path.dirname(where)} here")
    one_line_error(ckpt("strip-head", src, "-o", where), "kernel interface")
    assert not os.path.lexists(where)


def test_link_into_proc_folder_is_refused(src: Path, tmp_path: Path) -> None:
    """A folder link leading into /proc counts as /proc."""
    (tmp_path / "p").symlink_to("/proc/self")
    one_line_error(ckpt("strip-head", src, "-o", tmp_path / "p" / "out.pth"), "kernel interface")


def test_a_plain_regular_file_is_still_replaced_with_force(src: Path, tmp_path: Path) -> None:
    """The control: --force does replace a regular file (so the refusals above are about links)."""
    out = tmp_path / "out.pth"
    out.write_bytes(b"old")
    proc = ckpt("strip-head", src, "-o", out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() != b"old" and not out.is_symlink()


def test_non_utf8_output_name_works_and_is_printed_escaped(src: Path, tmp_path: Path) -> None:
    name = b"out\xff\x1b[2J.safetensors"
    proc = ckpt("convert", src, "-o", os.fsencode(tmp_path) + b"/" + name)
    assert proc.returncode == 0, proc.stderr
    assert name in os.listdir(os.fsencode(tmp_path))
    assert b"\x1b" not in proc.stdout and b"\xff" not in proc.stdout
    assert b"out\\xff\\x1b[2J.safetensors" in proc.stdout, proc.stdout
    assert run_cli("inspect", os.fsdecode(os.fsencode(tmp_path) + b"/" + name)).exit_code == 0


def test_non_utf8_output_name_in_an_error_is_escaped(src: Path, tmp_path: Path) -> None:
    missing = os.fsencode(tmp_path) + b"/no-such-folder/out\xff.pth"
    err = one_line_error(ckpt("strip-head", src, "-o", missing), "does not exist")
    assert "out\\xff.pth" in err


def test_non_utf8_existing_output_with_force_is_replaced(src: Path, tmp_path: Path) -> None:
    target = os.fsencode(tmp_path) + b"/old\xfe.pth"
    with open(target, "wb") as fh:
        fh.write(b"old")
    proc = ckpt("strip-head", src, "-o", target, "--force")
    assert proc.returncode == 0, proc.stderr
    with open(target, "rb") as fh:
        assert fh.read() != b"old"


# -- the temporary file cannot be created: in-process, with os.open / mkstemp failing ------------
@pytest.mark.parametrize(
    "code",
    [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EMFILE],
    ids=["ENOSPC", "EDQUOT", "EROFS", "EACCES", "EMFILE"],
)
@pytest.mark.parametrize("command", list(WRITERS))
def test_temporary_file_creation_failure_is_one_line(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, code: int
) -> None:
    """A full disk, a tmpfs out of inodes (also ENOSPC), a quota, a read-only file system, a
    permission or descriptor limit, met when the temporary file is created: one line, nothing left."""
    real_open = os.open

    def failing_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & (getattr(os, "O_TMPFILE", 0) or os.O_CREAT) and os.fspath(path).startswith(  # type: ignore[arg-type]
            str(tmp_path)
        ):
            raise OSError(code, os.strerror(code))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    def failing_mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "open", failing_open)
    monkeypatch.setattr(tempfile, "mkstemp", failing_mkstemp)
    extra, suffix = WRITERS[command]
    out = tmp_path / f"out{suffix}"

    result = run_cli(command, src, "-o", out, *extra)

    assert result.exception is None, repr(result.exception)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "internal error" not in lines[0] and str(out) in lines[0], result.stderr
    assert "nothing was written" in lines[0] or "nothing written" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []
