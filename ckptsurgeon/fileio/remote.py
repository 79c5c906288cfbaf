"""Remote checkpoints (``https://``, ``s3://``, ``hf://``, any fsspec protocol) read through fsspec.

The readers work on local files, so a remote checkpoint is read through a local *mirror*:

- **Header mirror** (``inspect``, ``diff``): a temporary folder of sparse files as big as the
  remote ones, into which only the bytes the readers need are fetched with range requests:
  a safetensors header; a torch zip's end records, central directory, local headers and its
  small members (``data.pkl``, ``byteorder`` ...); a sharded index and its shards' headers; a
  DCP folder's ``.metadata``. Neighbouring ranges are coalesced into one request. A read of
  a span that was not fetched (tensor data) raises :class:`RemoteError` instead of seeing zeros
  (:func:`ckptsurgeon.fileio.spans.check_fetched`).
- **Download** (``convert``, ``rename``, ``adapt`` ...): the remote file (or every file of a
  remote folder) is streamed in 64 MiB ranges, with a progress bar of bytes fetched, into a
  temporary folder that is removed when the process ends (or when the fetch fails); the usual
  local pipeline (atomic, verified write) then runs on it.

A server that ignores ``Range`` (answers 200 with the whole body) is refused with one line, never
downloaded silently. Storage options (S3 endpoint, credentials) come from fsspec's usual places:
``AWS_ENDPOINT_URL``/``AWS_ACCESS_KEY_ID`` ... for s3fs (botocore reads them), ``HF_TOKEN`` for
``hf://``, and ``FSSPEC_<PROTOCOL>_<OPTION>`` environment variables for any protocol.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CkptError, InputError

INSTALL_HINT = "pip install 'ckptsurgeon[remote]'"
# Packages that provide a protocol (what to tell a user whose fsspec lacks it).
PROTOCOL_PACKAGES = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
}
PROTOCOL_PACKAGES.update({"hf": "huggingface_hub", "http": "aiohttp", "https": "aiohttp"})

HEAD_BYTES = 8 << 10  # the first read of a file: a small safetensors header fits in it
TAIL_BYTES = 22 + 0xFFFF + 20 + 56  # a zip's end record (with the longest comment) and zip64 records
MERGE_GAP = 16 << 10  # ranges closer than this are fetched in one request
DOWNLOAD_CHUNK = 64 << 20  # a download's sequential range size
SMALL_FILE = 16 << 20  # folder files fetched whole (index JSON, .metadata, configs) are at most this big
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
# Files of a remote folder a header-only read fetches whole (indexes, DCP .metadata, configs).
METADATA_SUFFIXES = (".json", ".metadata", ".txt", ".yaml", ".yml", ".md", ".model")
# HTTP(S): a server that stops sending for this long fails the read (aiohttp's default instead cuts
# every request at 5 minutes, however fast its bytes come, and waits that long on a silent server).
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 60.0

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")  # to the last @ of the authority


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it (``user:password@``) hidden.

    Example:
        >>> redact("https://me:s3cret@example.com/model.safetensors")
        'https://***@example.com/model.safetensors'
    """
    return _USERINFO.sub(r"\1***@", text)


class RemoteError(InputError):
    """A remote checkpoint that cannot be read: fsspec or a protocol missing, a server ignoring
    Range, a dropped connection, or a header-only read reaching for tensor data."""


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a URL fsspec reads (any ``protocol://`` except ``file://``).

    Example:
        >>> is_remote("https://example.com/model.safetensors"), is_remote("model.pth")
        (True, False)
    """
    text = os.fspath(path)
    return isinstance(text, str) and bool(_URL.match(text)) and not text.lower().startswith("file://")


@dataclass
class Traffic:
    """Bytes fetched and range requests made for one remote checkpoint."""

    bytes_read: int = 0
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int, requests: int = 1) -> None:
        with self.lock:
            self.bytes_read += nbytes
            self.requests += requests


@dataclass
class Mirror:
    """A remote checkpoint's local stand-in: ``local`` (what the readers open) for ``url``."""

    url: str
    local: Path
    root: Path  # the temporary folder holding it
    traffic: Traffic
    headers_only: bool

    def to_json(self) -> dict[str, Any]:
        """What reports add under ``"remote"``."""
        return {
            "url": self.url,
            "headers_only": self.headers_only,
            "bytes_read": self.traffic.bytes_read,
            "requests": self.traffic.requests,
        }

    def describe(self) -> str:
        """One line for a text report: ``12.3 KiB in 3 range requests (headers only)``."""
        from ..core.report import human_bytes

        how = "headers only" if self.headers_only else "downloaded"
        return f"{human_bytes(self.traffic.bytes_read)} in {self.traffic.requests} range requests ({how})"

    def display(self, path: Path | str) -> str:
        """The URL a local mirror path stands for."""
        text = os.fspath(path)
        base = os.fspath(self.local)
        if text == base:
            return self.url
        if text.startswith(base + os.sep):
            return self.url.rstrip("/") + "/" + text[len(base) + 1 :].replace(os.sep, "/")
        parent = os.path.dirname(base)
        if self.url.endswith(".index.json") and text.startswith(parent + os.sep):  # a shard beside its index
            return self.url.rsplit("/", 1)[0] + "/" + text[len(parent) + 1 :].replace(os.sep, "/")
        root = os.fspath(self.root)
        return text.replace(root + os.sep, "").replace(root, "") if root in text else text


# Local mirror paths -> their mirror (inspect and diff name the URL and the traffic).
MIRRORS: dict[str, Mirror] = {}


def mirror_of(path: Path | str) -> Mirror | None:
    """The mirror a local path belongs to, or None (a local checkpoint).

    Example:
        >>> mirror_of("model.pth") is None
        True
    """
    text = os.fspath(path)
    found = MIRRORS.get(text)
    if found is not None:
        return found
    return next((m for m in MIRRORS.values() if text.startswith(os.fspath(m.root) + os.sep)), None)


def open_mirror(url: str, headers_only: bool) -> Mirror:
    """Mirror ``url`` locally: its headers only, or the whole checkpoint (see the module doc).

    Example:
        >>> open_mirror("http://127.0.0.1:8000/model.safetensors", True).traffic  # doctest: +SKIP
        Traffic(bytes_read=1208, requests=2)
    """
    import atexit
    import shutil
    import tempfile  # here, not at import: inspect of a local file never needs it

    remote = Remote(url)
    root = Path(tempfile.mkdtemp(prefix="ckpt-remote-"))
    atexit.register(shutil.rmtree, root, True)
    try:
        local = remote.mirror_into(root, headers_only)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    mirror = Mirror(redact(url), local, root, remote.traffic, headers_only)
    MIRRORS[os.fspath(local)] = mirror
    return mirror


def _import_fsspec(url: str) -> Any:
    try:
        import fsspec  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise RemoteError(f"{redact(url)}: reading remote checkpoints needs fsspec; {INSTALL_HINT}") from None
    return fsspec


class Remote:
    """One remote checkpoint's file system, its range reads and their traffic."""

    def __init__(self, url: str) -> None:
        fsspec = _import_fsspec(url)
        self.url = url
        self.traffic = Traffic()
        self.protocol = url.split("://", 1)[0].lower()
        try:
            self.fs, self.path = fsspec.core.url_to_fs(url, **self._options())
        except (ImportError, ValueError) as exc:
            package = PROTOCOL_PACKAGES.get(self.protocol)
            hint = f"pip install {package}" if package else INSTALL_HINT
            raise RemoteError(
                f"{redact(url)}: fsspec cannot read {self.protocol}:// here ({_short(exc)}); {hint}"
            ) from None
        self.ranges_checked = False

    def _options(self) -> dict[str, Any]:
        if self.protocol not in ("http", "https"):
            return {}
        import aiohttp  # type: ignore[import-not-found,unused-ignore]

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
        return {"client_kwargs": {"timeout": timeout}}

    # -- metadata ---------------------------------------------------------------------------
    def info(self, path: str) -> dict[str, Any]:
        try:
            return dict(self.fs.info(path))
        except FileNotFoundError as exc:
            cause = exc.__cause__  # fsspec's HTTP info() says FileNotFoundError for any failure
            if cause is not None and getattr(cause, "status", None) not in (404, 410):
                raise RemoteError(f"{self._url(path)}: cannot be reached ({_short(cause)})") from None
            raise RemoteError(f"{self._url(path)}: no such remote file or folder") from None
        except Exception as exc:
            raise RemoteError(f"{self._url(path)}: cannot be reached ({_short(exc)})") from None

    def listing(self, path: str) -> list[dict[str, Any]]:
        try:
            return [dict(e) for e in self.fs.ls(path, detail=True)]
        except Exception as exc:
            raise RemoteError(f"{self._url(path)}: cannot list the remote folder ({_short(exc)})") from None

    def _url(self, path: str) -> str:
        """How messages name ``path``: its URL, credentials hidden."""
        if path == self.path:
            return redact(self.url)
        return redact(self.fs.unstrip_protocol(path) if hasattr(self.fs, "unstrip_protocol") else path)

    # -- range reads --------------------------------------------------------------------------
    def check_ranges(self, path: str, size: int) -> None:
        """Refuse a server that ignores Range: one 1-byte read at the end of the file, which an
        honest server answers with 206 and one byte (fsspec's HTTP file stops reading a 200)."""
        if self.ranges_checked or size < 2 or self.protocol not in ("http", "https"):
            return
        try:
            with self.fs.open(path, "rb", cache_type="none", size=size) as fh:
                fh.seek(size - 1)
                got = fh.read(1)
        except ValueError:
            got = b""
        except Exception as exc:
            raise RemoteError(f"{self._url(path)}: cannot be read ({_short(exc)})") from None
        self.traffic.add(len(got))
        if len(got) != 1:
            raise RemoteError(
                f"{self._url(path)}: the server ignores HTTP Range requests (it would send the whole file); "
                "refusing to download it silently: download it yourself, then run ckpt on the local file"
            )
        self.ranges_checked = True

    def fetch(self, path: str, ranges: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
        """The bytes of ``ranges`` (start, end) of ``path``, neighbours coalesced: (start, data) pairs."""
        merged = coalesce(ranges)
        if not merged:
            return []
        starts = [s for s, _ in merged]
        ends = [e for _, e in merged]
        try:
            if len(merged) == 1:
                datas = [self.fs.cat_file(path, start=starts[0], end=ends[0])]
            else:
                datas = self.fs.cat_ranges([path] * len(merged), starts, ends, on_error="raise")
        except Exception as exc:
            raise RemoteError(f"{self._url(path)}: a range read failed ({_short(exc)})") from None
        out = []
        for (start, end), data in zip(merged, datas, strict=True):
            if isinstance(data, BaseException):
                raise RemoteError(f"{self._url(path)}: a range read failed ({_short(data)})")
            self.traffic.add(len(data))
            if len(data) != end - start:
                raise RemoteError(
                    f"{self._url(path)}: asked for bytes {start}-{end - 1} and got {len(data)} bytes: the "
                    "server ignores Range requests (or the file changed); refusing to go on"
                )
            out.append((start, data))
        return out

    # -- mirrors ------------------------------------------------------------------------------
    def mirror_into(self, root: Path, headers_only: bool) -> Path:
        if self.protocol in ("http", "https") and self.url.endswith("/"):
            raise RemoteError(
                f"{redact(self.url)}: an HTTP server cannot list a folder; give a file's URL, or a sharded "
                "set's *.index.json URL"
            )
        info = self.info(self.path)
        name = self.path.rstrip("/").rsplit("/", 1)[-1] or "checkpoint"
        if info.get("type") == "directory":
            folder = root / name
            folder.mkdir()
            files = [e for e in self.listing(self.path) if e.get("type") == "file"]
            for entry in files:
                self._mirror_file(
                    entry["name"], folder / entry["name"].rsplit("/", 1)[-1], entry, headers_only
                )
            return folder
        if name.endswith(".index.json"):
            return self._mirror_index(root, info, headers_only)
        local = root / name
        self._mirror_file(self.path, local, info, headers_only)
        return local

    def _mirror_index(self, root: Path, info: dict[str, Any], headers_only: bool) -> Path:
        """An index URL (an HTTP "folder"): the index, and the shards it names beside it."""
        import json

        folder = root / "model"
        folder.mkdir()
        local = folder / self.path.rsplit("/", 1)[-1]
        self._mirror_file(self.path, local, info, False)
        try:
            weight_map = json.loads(local.read_text(encoding="utf-8")).get("weight_map", {})
        except (ValueError, AttributeError):
            return local  # the sharded reader names what is wrong
        base = self.path.rsplit("/", 1)[0]
        for shard in sorted(set(weight_map.values()) if isinstance(weight_map, dict) else ()):
            if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
                continue
            remote_path = f"{base}/{shard}"
            try:
                shard_info = dict(self.fs.info(remote_path))
            except FileNotFoundError:
                continue  # the sharded reader names the missing shard
            except Exception as exc:
                raise RemoteError(f"{self._url(remote_path)}: cannot be reached ({_short(exc)})") from None
            self._mirror_file(remote_path, folder / shard, shard_info, headers_only)
        return local

    def _mirror_file(self, path: str, local: Path, info: dict[str, Any], headers_only: bool) -> None:
        size = int(info.get("size") or 0)
        if not headers_only or (size <= SMALL_FILE and local.name.endswith(METADATA_SUFFIXES)):
            self.download(path, local, size)
            return
        with open(local, "wb") as fh:
            fh.truncate(size)  # sparse: holes read as zeros, and check_fetched refuses to read them
        if local.name.endswith(WEIGHT_SUFFIXES):
            HeaderPlan(self, path, local, size).run()
        else:  # DCP data files, big files of other kinds: their size only
            register_fetched(local, [])

    def download(self, path: str, local: Path, size: int) -> None:
        """Stream ``path`` into ``local`` in 64 MiB ranges, with a progress bar of bytes fetched."""
        from .progress import progress_bar

        self.check_ranges(path, size)
        done = 0
        try:
            with open(local, "wb") as fh, progress_bar(size, None, f"fetching {local.name}") as bar:
                while done < size:
                    end = min(size, done + DOWNLOAD_CHUNK)
                    data = self.fs.cat_file(path, start=done, end=end)
                    if len(data) != end - done:
                        raise OSError(f"got {len(data)} of {end - done} bytes")
                    fh.write(data)
                    self.traffic.add(len(data))
                    done = end
                    if bar is not None:
                        bar.update(len(data))
        except Exception as exc:
            raise RemoteError(
                f"{self._url(path)}: the connection failed after {done:,} of {size:,} bytes ({_short(exc)}); "
                "nothing was written, run the command again"
            ) from None


def _short(exc: BaseException) -> str:
    text = redact(" ".join(str(exc).split()))[:120]
    return text or exc.__class__.__name__


def coalesce(ranges: list[tuple[int, int]], gap: int = MERGE_GAP) -> list[tuple[int, int]]:
    """Sorted, merged ranges: neighbours closer than ``gap`` bytes become one.

    Example:
        >>> coalesce([(100, 200), (0, 10), (210, 300), (1 << 20, (1 << 20) + 8)], gap=16)
        [(0, 10), (100, 300), (1048576, 1048584)]
    """
    out: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1] + gap:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


# -- what reads of a header mirror may touch -------------------------------------------------------
_FETCHED: dict[str, list[tuple[int, int]]] = {}


def register_fetched(local: Path, ranges: list[tuple[int, int]]) -> None:
    """Record the spans of the sparse file ``local`` that hold fetched bytes."""
    from . import spans

    _FETCHED[os.path.abspath(local)] = coalesce(ranges, gap=0)
    spans.FETCH_GUARD = check_fetched


def check_fetched(path: Path | str, offset: int, length: int) -> None:
    """Refuse a read of a header mirror's bytes that were never fetched (tensor data)."""
    fetched = _FETCHED.get(os.path.abspath(path))
    if fetched is None or length <= 0:
        return
    if any(s <= offset and offset + length <= e for s, e in fetched):
        return
    for mirror in MIRRORS.values():
        if os.fspath(path).startswith(os.fspath(mirror.root)):
            where = mirror.display(path)
            break
    else:
        where = os.fspath(path)
    raise RemoteError(
        f"{where}: this step reads tensor data, which a header-only remote read does not fetch; "
        "run it on a downloaded copy"
    )


class HeaderPlan:
    """Fetch into a sparse local file the bytes its reader needs, by format (see the module doc)."""

    def __init__(self, remote: Remote, path: str, local: Path, size: int) -> None:
        self.remote, self.path, self.local, self.size = remote, path, local, size
        self.have: list[tuple[int, int]] = []

    def get(self, ranges: list[tuple[int, int]]) -> None:
        want = [(max(0, s), min(self.size, e)) for s, e in ranges]
        want = [r for r in want if r[1] > r[0] and not self._covered(*r)]
        fetched = self.remote.fetch(self.path, want)
        with open(self.local, "r+b") as fh:
            for start, data in fetched:
                fh.seek(start)
                fh.write(data)
                self.have = coalesce([*self.have, (start, start + len(data))], gap=0)

    def _covered(self, start: int, end: int) -> bool:
        return any(s <= start and end <= e for s, e in self.have)

    def read(self, start: int, end: int) -> bytes:
        with open(self.local, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)

    def run(self) -> None:
        if self.size == 0:
            register_fetched(self.local, [])
            return
        self.remote.check_ranges(self.path, self.size)
        self.get([(0, HEAD_BYTES)])
        head = self.read(0, 16)
        if head.startswith(b"PK\x03\x04"):
            self._zip()
        elif len(head) >= 9 and head[8:].lstrip(b" \t\r\n")[:1] == b"{":
            from ..formats.safetensors import MAX_HEADER_BYTES

            header_len = int.from_bytes(head[:8], "little")
            if header_len <= MAX_HEADER_BYTES:  # a longer one is refused by the reader from its 8 bytes
                self.get([(0, 8 + header_len)])
        else:
            raise RemoteError(
                f"{self.remote._url(self.path)}: header-only remote reads take safetensors files, torch zip "
                "archives, sharded sets and DCP folders; this file is none of them: download it first"
            )
        register_fetched(self.local, self.have)

    def _zip(self) -> None:
        import struct

        from ..formats.zipio import read_directory

        self.get([(self.size - TAIL_BYTES, self.size)])
        tail_start = max(0, self.size - TAIL_BYTES)
        tail = self.read(tail_start, self.size)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return  # the zip reader names the damage
        cd_size = int.from_bytes(tail[at + 12 : at + 16], "little")
        cd_end = tail_start + at
        if at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":
            z64 = int.from_bytes(tail[at - 12 : at - 4], "little")
            self.get([(z64, z64 + 56)])
            record = self.read(z64, z64 + 56)
            if record[:4] == b"PK\x06\x06":
                cd_size, cd_end = struct.unpack_from("<Q", record, 40)[0], z64
        self.get([(cd_end - cd_size, cd_end)])
        members = read_directory(self.local, self.size)
        if members is None:
            return
        self._members(list(members.values()))

    def _members(self, members: list[Any]) -> None:
        import struct

        ranges = []
        for m in members:
            name_len = len(m.filename.encode("utf-8"))
            data = m.filename.split("/", 1)[-1].startswith("data/")
            ranges.append(
                (m.header_offset, m.header_offset + 30 + name_len + 128 + (0 if data else m.compress_size))
            )
        self.get(ranges)
        more = []  # local headers with longer extra fields than guessed
        for m in members:
            header = self.read(m.header_offset, m.header_offset + 30)
            if len(header) < 30 or header[:4] != b"PK\x03\x04":
                continue
            name_len, extra_len = struct.unpack_from("<HH", header, 26)
            data = m.filename.split("/", 1)[-1].startswith("data/")
            end = m.header_offset + 30 + name_len + extra_len + (0 if data else m.compress_size)
            if not self._covered(m.header_offset, min(end, self.size)):
                more.append((m.header_offset, end))
        self.get(more)


def map_error(exc: CkptError, mirror: Mirror) -> CkptError:
    """``exc`` with the mirror's local paths replaced by the URL they stand for."""
    text = exc.message.replace(os.fspath(mirror.local), mirror.url)
    text = text.replace(os.fspath(mirror.root) + os.sep, "").replace(os.fspath(mirror.root), "")
    if text == exc.message:
        return exc
    clone = exc.__class__.__new__(exc.__class__)
    CkptError.__init__(clone, text)
    clone.__dict__.update({k: v for k, v in exc.__dict__.items() if k not in clone.__dict__})
    return clone
