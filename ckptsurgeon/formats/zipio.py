"""Plain stored zip archives, read and written without :mod:`zipfile`'s per-member cost.

torch.save archives hold one member per storage, so a checkpoint of 20,000 small tensors
is a zip of 20,000 members; :mod:`zipfile` spends tens of microseconds on each (a
``ZipInfo`` per member, a seek and a header rewrite per written member). Here the central
directory is parsed with one ``struct`` call per entry, and members are written with
their headers computed up front (the CRC-32 is known before the data, or patched in for
big members).

:func:`read_directory` handles only the plain case -- one disk, no zip64 records, stored
or deflated members, no encryption, no data before the archive -- and returns None for
anything else, so the caller falls back to :mod:`zipfile` (which names the fault).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from ..fileio.spans import WritebackPieces, start_writeback

_EOCD = struct.Struct("<4sHHHHIIH")  # end of central directory, 22 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # central directory entry, 46 bytes
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # local file header, 30 bytes
_ZIP64_EXTRA = struct.Struct("<HHQQ")
_END64 = struct.Struct("<4sQHHIIQQQQ")  # zip64 end of central directory, 56 bytes
_LIMIT = 0xFFFFFFFF
_ZIP64_MEMBER = (1 << 31) - 1  # zipfile's ZIP64_LIMIT: larger members get zip64 fields
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, 00:00:00
_UTF8_FLAG = 0x800
_PLAIN_FLAGS = 0x2 | 0x4 | 0x8 | _UTF8_FLAG  # deflate options, data descriptor, UTF-8 names
_ATTRIBUTES = 0o600 << 16


class Member(NamedTuple):
    """One central directory entry (the fields of ``zipfile.ZipInfo`` the readers use)."""

    filename: str
    header_offset: int
    file_size: int
    compress_size: int
    compress_type: int
    CRC: int
    flag_bits: int


def read_directory(path: Path, size: int | None = None) -> dict[str, Member] | None:
    """The members of a plain zip archive by name, or None when it is not plain (or damaged).

    Example:
        >>> sorted(read_directory(Path("model.pth")))[:2]          # doctest: +SKIP
        ['model/.format_version', 'model/.storage_alignment']
    """
    size = os.path.getsize(path) if size is None else size
    if size < _EOCD.size:
        return None
    with open(path, "rb") as fh:
        tail_len = min(size, _EOCD.size + 0xFFFF)
        fh.seek(size - tail_len)
        tail = fh.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < _EOCD.size:
            return None
        _sig, disk, cd_disk, _n_here, count, cd_size, cd_offset, comment = _EOCD.unpack_from(tail, at)
        cd_end = size - tail_len + at
        if disk or cd_disk or at + _EOCD.size + comment != len(tail):
            return None  # several disks, or bytes after the archive
        if at >= 20 and tail[at - 20 : at - 16] == b"PK\x06\x07":  # zip64 end records (torch writes them)
            found = _zip64_end(fh, tail, at)
            if found is None or found[3] != cd_end - 56 - 20:
                return None  # the zip64 record must sit just before its locator, as zipfile takes it
            shorts = zip((count, cd_size, cd_offset), found[:3], (0xFFFF, _LIMIT, _LIMIT), strict=True)
            if any(short not in (full, sentinel) for short, full, sentinel in shorts):
                return None  # the two end records disagree: zipfile names it
            count, cd_size, cd_offset, cd_end = found
        if cd_offset + cd_size != cd_end:
            return None  # data before the archive, or a damaged directory
        fh.seek(cd_offset)
        directory = fh.read(cd_size)
    return _parse_central(directory, count, cd_offset)


def _zip64_end(fh: BinaryIO, tail: bytes, at: int) -> tuple[int, int, int, int] | None:
    """(count, directory size, directory offset, where the directory must end) from the zip64
    end record the locator before the end record points to; None unless plain."""
    _sig, disk, record_at, disks = struct.unpack_from("<4sIQI", tail, at - 20)
    if disk or disks != 1 or record_at > fh.seek(0, 2) - 56:  # past the end: seek() would refuse it
        return None
    fh.seek(record_at)
    record = fh.read(56)
    if len(record) != 56:
        return None
    sig, _size, _made, _need, disk, cd_disk, _here, count, cd_size, cd_offset = _END64.unpack(record)
    if sig != b"PK\x06\x06" or disk or cd_disk:
        return None
    return count, cd_size, cd_offset, record_at


def _parse_central(data: bytes, count: int, limit: int) -> dict[str, Member] | None:
    """The members a central directory lists, by name (None unless plain). The directory
    parsed last is kept by its bytes until it is read again, so the format detection and
    the reader right after it parse a 20,000-member directory once, not twice."""
    key = (count, limit)
    last = _PARSED[0] if _PARSED else None
    if last is not None and last[0] == key and last[1] == data:
        _PARSED.clear()  # the second reader takes it: nothing is kept any longer
        return last[2]
    members = _parse_entries(data, count, limit)
    _PARSED.clear()
    if members is None:
        return None
    _PARSED.append((key, data, members))
    return dict(members)


# The directory parsed last: (count, limit), its bytes, its members.
_PARSED: list[tuple[tuple[int, int], bytes, dict[str, Member]]] = []
# A central directory entry, only the fields read: signature, version needed (low byte),
# flags, method, CRC-32, sizes, name/extra/comment lengths, disk, local header offset.
_CENTRAL_READ = struct.Struct("<4s2xBxHH4xIIIHHHH6xI")
_new_tuple = tuple.__new__


def _parse_entries(data: bytes, count: int, limit: int) -> dict[str, Member] | None:
    members: dict[str, Member] = {}
    pos, end = 0, len(data)
    unpack = _CENTRAL_READ.unpack_from
    for _ in range(count):
        if pos + 46 > end:
            return None
        sig, need, flags, method, crc, csize, usize, nlen, elen, clen, disk, offset = unpack(data, pos)
        if sig != b"PK\x01\x02" or disk or flags & ~_PLAIN_FLAGS or method not in (0, 8) or need > 63:
            return None  # encrypted, patched, a newer zip version ...: zipfile says which
        if _LIMIT in (csize, usize, offset) or offset + 30 > limit:
            return None  # zip64 fields: zipfile reads those
        start = pos + 46
        try:
            name = str(data[start : start + nlen], "utf-8" if flags & _UTF8_FLAG else "ascii")
        except UnicodeDecodeError:
            return None
        if name in members:
            return None
        members[name] = _new_tuple(Member, (name, offset, usize, csize, method, crc, flags))
        pos = start + nlen + elen + clen
    return members if pos == end else None


# -- one reading of a zip for everybody ----------------------------------------------------
def canonical_name(name: str) -> str:
    """The one name a member has for every zip reader: cut at a NUL byte (where :mod:`zipfile`
    cuts it), ``\\`` as ``/`` (zipfile on Windows), no ``.`` or empty segments (unzip tools),
    in lower case (torch's miniz looks names up without regard to case), and no trailing
    ``/``: a folder entry ``data.pkl/`` is one name with the file ``data.pkl`` to an unzip tool
    that makes the folder and then cannot write the file, or writes it in its place.

    Example:
        >>> canonical_name("Archive/./data.pkl\\x00x"), canonical_name("archive\\\\DATA.pkl")
        ('archive/data.pkl', 'archive/data.pkl')
        >>> canonical_name("archive/data.pkl/")
        'archive/data.pkl'
    """
    name = name.split("\0", 1)[0].replace("\\", "/")
    kept = [part for part in name.split("/") if part not in ("", ".")]
    return "/".join(kept).lower()


def name_problem(names: list[str]) -> str | None:
    """Why member ``names`` (as the central directory spells them, in its order) could make
    zipfile, torch and ckptsurgeon read different members, or None: a name that a reader
    would spell differently (a NUL byte, a backslash, a ``.`` or empty segment), or two
    names that are one name to some reader.

    Example:
        >>> name_problem(["archive/data.pkl", "archive/data.pkl\\x00x"])
        "two members are one name to zipfile or torch: 'archive/data.pkl' and 'archive/data.pkl\\\\x00x'"
        >>> name_problem(["archive/data.pkl", "archive/data/0"]) is None
        True
    """
    if _plain_names(names):
        return None
    seen: dict[str, str] = {}
    for name in names:
        canonical = canonical_name(name)
        if canonical in seen:
            return (
                f"two members are one name to zipfile or torch: {_shown(seen[canonical])} and {_shown(name)}"
            )
        seen[canonical] = name
        body = name[:-1] if name.endswith("/") else name
        if "\0" in name or "\\" in name or any(part in ("", ".") for part in body.split("/")):
            what = (
                "a NUL byte" if "\0" in name else "a backslash" if "\\" in name else "an empty or '.' segment"
            )
            return f"member {_shown(name)} has {what} in its name, which zip readers spell differently"
    return None


# What no plain name holds, with the names joined by newlines: a NUL byte, a backslash, an
# empty or "." segment (a trailing "/" marks a folder entry and is fine).
_ODD_PARTS = ("\0", "\\", "//", "/./", "\n/", "\n./", "/.\n", "\n.\n", "\n\n")


def _plain_names(names: list[str]) -> bool:
    """The fast answer for the usual archive (20,000 names in a few milliseconds): no name
    holds anything :func:`canonical_name` would change but its case, and no two names are
    one in lower case."""
    joined = "\n" + "\n".join(names) + "\n"
    if joined.count("\n") != len(names) + 1 or any(part in joined for part in _ODD_PARTS):
        return False
    return len(set(joined.lower().replace("/\n", "\n").split("\n"))) == len(names) + 1  # and ""


def _shown(name: str) -> str:
    from ..core.report import printable

    return printable(repr(name[:80]))


def check_names(path: Path, names: list[str]) -> None:
    """Refuse an archive whose member names some zip reader could read differently
    (:func:`name_problem`), naming the ambiguity."""
    problem = name_problem(names)
    if problem:
        from ..errors import FormatError

        raise FormatError(f"{path}: an ambiguous zip archive: {problem}; refusing to read it")


class EndRecord(NamedTuple):
    """A zip's end of central directory record, as :mod:`zipfile` itself parsed it."""

    location: int  # file offset of the end record
    directory_size: int
    directory_offset: int  # as declared
    zip64: bool  # zipfile took the zip64 end record
    entries_total: int

    @property
    def bytes_before(self) -> int:
        """Bytes before the archive that its offsets do not count (zipfile's "concat"): where the
        record is, minus the directory's size and declared offset, minus any zip64 records between."""
        before = self.location - self.directory_size - self.directory_offset
        if self.zip64:
            before -= _ZIP64_RECORDS_SIZE
        return before


_ZIP64_RECORDS_SIZE = 56 + 20  # zip64 end record and its locator (zipfile.sizeEndCentDir64 + ...Locator)


def zipfile_end_record(fh: BinaryIO | io.RawIOBase) -> EndRecord | None:
    """The end record :mod:`zipfile` finds in ``fh`` (its own parser, so the two cannot disagree),
    or None when it finds none."""
    import zipfile

    # zipfile's end-record parser and its field indexes are private: typeshed does not declare them
    private: Any = zipfile
    end = private._EndRecData(fh)
    if not end:
        return None
    return EndRecord(
        location=end[private._ECD_LOCATION],
        directory_size=end[private._ECD_SIZE],
        directory_offset=end[private._ECD_OFFSET],
        zip64=end[private._ECD_SIGNATURE] == private.stringEndArchive64,
        entries_total=end[private._ECD_ENTRIES_TOTAL],
    )


def zipfile_problem(path: Path, zf: Any) -> str | None:
    """Why an archive :mod:`zipfile` opened could be read differently by torch (miniz), or None:
    bytes before the archive (zipfile shifts every offset past them, miniz does not), or a
    central directory holding more or fewer entries than its end record counts (zipfile
    reads them all, miniz the counted ones)."""
    with open(path, "rb") as fh:
        end = zipfile_end_record(fh)  # the record zipfile itself found, as zipfile parsed it
        if end is None:
            return "no end of central directory record"
        fh.seek(max(end.location - 76, 0))
        records = fh.read(76 + 22)
    problem = _zip64_problem(records, end.location)
    if problem:
        return problem
    if end.bytes_before:
        return f"{end.bytes_before} bytes before the archive that its offsets do not count"
    counted, listed = end.entries_total, len(zf.infolist())
    if counted != listed:
        return f"its end record counts {counted} members but its directory lists {listed}"
    return None


def _zip64_problem(records: bytes, end_at: int) -> str | None:
    """Why zipfile and torch (miniz) could take different zip64 end records, or None.

    ``records``: the 76 bytes before the end record at ``end_at`` (a zip64 end record and its
    locator, if any), then the end record. zipfile reads the zip64 record just before the
    locator; miniz where the locator points. Both must be one record, whose counts the
    32-bit end record repeats or marks as too large (0xFFFF...)."""
    if len(records) < 98 or records[56:60] != b"PK\x06\x07":
        return None
    record_at = struct.unpack_from("<Q", records, 64)[0]
    if record_at != end_at - 76 or records[:4] != b"PK\x06\x06":
        return "its zip64 end record is not where its locator points"
    count64, size64, offset64 = struct.unpack_from("<QQQ", records, 32)
    _sig, _disk, _cd_disk, _here, count, size, offset, _comment = _EOCD.unpack_from(records, 76)
    for short, full, sentinel in (
        (count, count64, 0xFFFF),
        (size, size64, _LIMIT),
        (offset, offset64, _LIMIT),
    ):
        if short not in (full, sentinel):
            return "its zip64 end record and its end record disagree"
    return None


def open_checked(path: Path) -> Any:
    """Open ``path`` with :mod:`zipfile`, refusing with one line an archive that is damaged or
    that another zip reader could read differently (:func:`zipfile_problem`, :func:`name_problem`).

    Example:
        >>> with open_checked(Path("model.pth")) as zf:        # doctest: +SKIP
        ...     zf.namelist()[0]
        'model/data.pkl'
    """
    import zipfile

    from ..errors import FormatError

    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise FormatError(
            f"{path}: a truncated or damaged zip archive (no readable central directory); "
            "the download or save did not finish, fetch or save it again"
        ) from None
    except (OSError, ValueError, EOFError, struct.error, NotImplementedError) as exc:
        raise FormatError(
            f"{path}: a damaged zip archive ({exc.__class__.__name__}); fetch or save it again"
        ) from None
    try:
        problem = zipfile_problem(path, zf) or name_problem([info.orig_filename for info in zf.infolist()])
    except BaseException:
        zf.close()
        raise
    if problem:
        zf.close()
        raise FormatError(f"{path}: an ambiguous zip archive: {problem}; refusing to read it")
    return zf


def data_offset(headers: Any, member: Member) -> int | None:
    """Where ``member``'s data starts (past its local header), or None without a valid header."""
    header = headers[member.header_offset : member.header_offset + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    return member.header_offset + 30 + name_len + extra_len


def read_stored(path: Path, headers: Any, member: Member) -> bytes | None:
    """A stored member's bytes when its CRC-32 matches, else None (zipfile then names the fault)."""
    start = data_offset(headers, member)
    if start is None or member.compress_type != 0 or member.compress_size != member.file_size:
        return None
    name = member.filename.encode("utf-8" if member.flag_bits & _UTF8_FLAG else "ascii")
    if headers[member.header_offset + 30 : member.header_offset + 30 + len(name)] != name:
        return None  # the local header names another file
    data = bytes(headers[start : start + member.file_size])
    if len(data) != member.file_size or zlib.crc32(data) != member.CRC:
        return None
    return data


class ZipWriter:
    """Write stored members to ``fh`` (positioned at the archive start), then the directory.

    ``add`` writes a member whose bytes are in memory; ``add_stream`` writes ``nbytes`` from
    an iterable of chunks, with the CRC-32 computed on the way and patched into the header
    (or taken from ``crc`` when the caller knows it, then written up front). Aligned members
    pad their local header so the data starts at a multiple of ``alignment``.

    Example:
        >>> zw = ZipWriter(fh)                                     # doctest: +SKIP
        >>> zw.add("archive/version", b"3\\n"); zw.close()          # doctest: +SKIP
    """

    def __init__(self, fh: BinaryIO, alignment: int = 64) -> None:
        self.fh = fh
        self.alignment = alignment
        self.pos = fh.tell()
        self.start = self.pos
        self.entries: list[tuple[bytes, int, int, int, int]] = []  # name, flags, crc, size, offset
        self.deferred: list[tuple[int, int, Callable[[], int]]] = []  # entry, header offset, its CRC

    def add(
        self, name: str, data: bytes | bytearray | memoryview, *, align: bool = False, crc: int | None = None
    ) -> None:
        """A member whose bytes are all in memory (``crc``: their CRC-32, if already computed)."""
        header = self._header(name, len(data), zlib.crc32(data) if crc is None else crc, align)
        if len(data) < 1 << 16:
            self.fh.write(header + data)  # one buffered write per small member
        else:
            self.fh.write(header)
            self.fh.write(data)
        self.pos += len(header) + len(data)

    def add_stream(self, name: str, nbytes: int, chunks: Iterable[Any], *, align: bool = True) -> int:
        """A member of ``nbytes`` from ``chunks``, its CRC-32 computed on the way and patched into
        the header written before it; returns the CRC."""
        header_at = self.pos
        header = self._header(name, nbytes, 0, align)
        self.fh.write(header)
        data_at = header_at + len(header)
        pieces = WritebackPieces(self.fh, data_at, nbytes)
        crc, written = 0, 0
        for chunk in chunks:
            self.fh.write(chunk)
            written += len(chunk)
            crc = zlib.crc32(chunk, crc)
            pieces.wrote(written)
        self._check_size(name, written, nbytes)
        self.pos += len(header) + nbytes
        self._set_crc(len(self.entries) - 1, header_at, crc)
        self.fh.seek(self.pos)
        start_writeback(self.fh, data_at, nbytes)  # the data span, as written
        return crc

    def add_copied(
        self, name: str, nbytes: int, crc: int, copy: Callable[[BinaryIO], Any], *, align: bool = True
    ) -> None:
        """A member whose CRC-32 is known before its bytes: the header, then ``copy(fh)`` writes
        exactly ``nbytes`` (a span the source's own CRC vouches for, say)."""
        header = self._header(name, nbytes, crc, align)
        self.fh.write(header)
        copy(self.fh)
        self.pos += len(header) + nbytes
        self._check_size(name, self.fh.tell() - self.pos + nbytes, nbytes)

    def add_deferred(self, name: str, nbytes: int, copy: Callable[[BinaryIO], Callable[[], int]]) -> None:
        """A member whose CRC-32 is known only later: the header, then ``copy(fh)`` writes exactly
        ``nbytes`` and returns a function giving their CRC, called at :meth:`close`, which patches
        the header (a span a helper thread checksums while it is copied, say)."""
        header_at = self.pos
        header = self._header(name, nbytes, 0, True)
        self.fh.write(header)
        crc_of = copy(self.fh)
        self.pos += len(header) + nbytes
        self._check_size(name, self.fh.tell() - self.pos + nbytes, nbytes)
        self.deferred.append((len(self.entries) - 1, header_at, crc_of))

    def _patch_deferred(self) -> None:
        for index, header_at, crc_of in self.deferred:
            self._set_crc(index, header_at, crc_of())
        if self.deferred:
            self.fh.seek(self.pos)
        self.deferred.clear()

    def _set_crc(self, index: int, header_at: int, crc: int) -> None:
        """Write ``crc`` into the local header at ``header_at`` and into entry ``index`` (the
        central directory's copy); the file position is left after the header's CRC field."""
        self.fh.seek(header_at + 14)
        self.fh.write(struct.pack("<I", crc))
        raw, flags, _zero, size, offset = self.entries[index]
        self.entries[index] = (raw, flags, crc, size, offset)

    def _check_size(self, name: str, written: int, nbytes: int) -> None:
        if written != nbytes:
            from ..errors import OutputError

            raise OutputError(f"{name}: wrote {written} bytes, expected {nbytes}")

    def _header(self, name: str, nbytes: int, crc: int, align: bool) -> bytes:
        raw, flags = _encode_name(name)
        zip64 = nbytes * 1.05 > _ZIP64_MEMBER  # as zipfile decides it
        extra = _ZIP64_EXTRA.pack(1, 16, nbytes, nbytes) if zip64 else b""
        if align:
            used = self.pos + 30 + len(raw) + len(extra) + 4
            pad = (-used) % self.alignment
            extra = struct.pack("<HH", 0x6B63, pad) + b"\0" * pad + extra  # "ck": padding only
        size = _LIMIT if zip64 else nbytes
        version = 45 if zip64 else 20
        header = _LOCAL.pack(
            b"PK\x03\x04", version, flags, 0, 0, _DOS_DATE, crc, size, size, len(raw), len(extra)
        )
        self.entries.append((raw, flags, crc, nbytes, self.pos - self.start))
        return header + raw + extra

    def close(self) -> None:
        """Patch the deferred CRCs; write the central directory and the end records (zip64 ones
        when needed)."""
        self._patch_deferred()
        parts: list[bytes] = []
        for raw, flags, crc, size, offset in self.entries:
            extra_values = ([size, size] if size > _ZIP64_MEMBER else []) + (
                [offset] if offset > _ZIP64_MEMBER else []
            )
            extra = (
                struct.pack("<HH" + "Q" * len(extra_values), 1, 8 * len(extra_values), *extra_values)
                if extra_values
                else b""
            )
            csize = _LIMIT if size > _ZIP64_MEMBER else size
            version = 45 if extra else 20
            parts.append(
                _CENTRAL.pack(
                    b"PK\x01\x02",
                    (3 << 8) | version,
                    version,
                    flags,
                    0,
                    0,
                    _DOS_DATE,
                    crc,
                    csize,
                    csize,
                    len(raw),
                    len(extra),
                    0,
                    0,
                    0,
                    _ATTRIBUTES,
                    min(offset, _LIMIT),
                )
                + raw
                + extra
            )
        directory = b"".join(parts)
        cd_offset, cd_size, count = self.pos - self.start, len(directory), len(self.entries)
        end = b""
        if count > 0xFFFF or cd_offset > _ZIP64_MEMBER or cd_size > _ZIP64_MEMBER:
            end_at = cd_offset + cd_size
            end += struct.pack(
                "<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, cd_size, cd_offset
            )
            end += struct.pack("<4sIQI", b"PK\x06\x07", 0, end_at, 1)
            count, cd_size, cd_offset = min(count, 0xFFFF), min(cd_size, _LIMIT), min(cd_offset, _LIMIT)
        end += _EOCD.pack(b"PK\x05\x06", 0, 0, count, count, cd_size, cd_offset, 0)
        self.fh.write(directory + end)
        self.pos += len(directory) + len(end)


def _encode_name(name: str) -> tuple[bytes, int]:
    try:
        return name.encode("ascii"), 0
    except UnicodeEncodeError:
        return name.encode("utf-8"), _UTF8_FLAG
