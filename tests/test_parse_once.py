"""One reading of each container: where zipfile, torch and ckptsurgeon could read a file
differently, ckptsurgeon refuses it; where ``scan`` says safe, the reference unpicklers agree.

The references: CPython's ``pickle.Unpickler`` with a ``find_class`` that only records (and
``pickletools.genops``), :mod:`zipfile`, :mod:`tarfile`, and torch's own zip reader
(``torch._C.PyTorchFileReader``, miniz) and ``torch.load``.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import io
import os
import pickle
import pickletools
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
from conftest import FIXTURES, REAL, REPO, run_cli
from corpus import (
    UNSAFE,
    VALID_PKL,
    build_corpus,
    call,
    glob,
    legacy_tar,
    n,
    payloads,
    raw_zip,
    s,
    state_dict_pickle,
    tensor_expr,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptsurgeon.errors import CkptError
from ckptsurgeon.formats.torchzip import data_pickle
from ckptsurgeon.pickling.safety import classify
from ckptsurgeon.pickling.scan import SAFE, scan

torch = pytest.importorskip("torch")

PLAIN = b"\x80\x02}" + s("a") + n(1) + b"s."
_HOSTILE = state_dict_pickle(
    ("a.weight", tensor_expr()), ("evil", payloads(Path("/nonexistent/m"))["os_system_global"][0])
)


# -- the references ---------------------------------------------------------------------------
class _Dummy:
    """What the recording unpickler returns for every global: callable, builds nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> _Dummy:
        return _Dummy()

    def __setstate__(self, state: object) -> None:
        pass


class _Recorder(pickle.Unpickler):
    def __init__(self, stream: io.BytesIO) -> None:
        super().__init__(stream)
        self.seen: list[str] = []

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # as pickle maps Python 2 names
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        self.seen.append(f"{module}.{name}")
        return _Dummy

    def persistent_load(self, pid: object) -> object:
        return _Dummy()


def recorded_globals(data: bytes, pickles: int = 1) -> list[str]:
    """Every global CPython's unpickler asks for, over ``pickles`` consecutive pickles (as a
    legacy loader reads them), plus every GLOBAL/INST name ``pickletools.genops`` lists."""
    stream = io.BytesIO(data)
    seen: list[str] = []
    for _ in range(pickles):
        start = stream.tell()
        recorder = _Recorder(stream)
        try:
            recorder.load()
        except Exception:  # the dummies may break later opcodes: what was asked for is recorded
            seen += recorder.seen
            break
        seen += recorder.seen
        try:
            for op, arg, _ in pickletools.genops(io.BytesIO(data[start:])):
                if op.name in ("GLOBAL", "INST"):
                    seen.append(str(arg).replace(" ", "."))
        except Exception:
            pass
    return seen


def unsafe_among(names: list[str]) -> list[str]:
    return [name for name in names if classify(name).kind == UNSAFE]


def canonical(name: str) -> str:
    """The reference spelling every reader could give a member name (independent of ours)."""
    name = name.split("\0")[0].replace("\\", "/")
    return "/".join(p for p in name.split("/") if p not in ("", ".")).lower()


def zip_candidates(path: Path, *, main_only: bool = False) -> list[bytes]:
    """Every data.pkl some reader could pick: each directory entry whose name is data.pkl to
    some reader (read at its local header, as miniz does), zipfile's choice for each such
    name, and torch's own record. ``main_only`` keeps the entries that are, to some reader,
    the data.pkl in the folder of the first member (the one torch reads); otherwise every
    data.pkl in any folder counts (what a scan must look at)."""
    found: list[bytes] = []
    raw = path.read_bytes()
    try:
        with zipfile.ZipFile(path) as zf:
            first = canonical(zf.infolist()[0].orig_filename)
            main = first.split("/")[0] + "/data.pkl"
            for info in zf.infolist():
                name = canonical(info.orig_filename)
                if not (name == main if main_only else name.endswith("data.pkl")):
                    continue
                at = info.header_offset
                if raw[at : at + 4] == b"PK\x03\x04":
                    name_len, extra_len = struct.unpack_from("<HH", raw, at + 26)
                    body = raw[at + 30 + name_len + extra_len :][: info.compress_size]
                    if info.compress_type == zipfile.ZIP_DEFLATED:
                        body = zlib.decompressobj(-15).decompress(body, 1 << 24)
                    found.append(body)
                for name in {info.filename, info.orig_filename}:
                    with contextlib.suppress(Exception):  # zipfile refuses: it picks nothing
                        found.append(zf.read(name))
    except Exception:
        pass
    torch_record = torch_data_pkl(path)
    if torch_record is not None:
        found.append(torch_record)
    return found


def torch_data_pkl(path: Path) -> bytes | None:
    """The data.pkl torch.load would unpickle (its zip reader, miniz), or None if it refuses."""
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        reader.get_all_records()  # torch.load asks for them first (is it TorchScript?)
        return bytes(reader.get_record("data.pkl"))
    except Exception:
        return None


def loadable_pickles(path: Path) -> list[tuple[str, bytes, int]]:
    """(what, bytes, how many consecutive pickles) for every pickle a loader could run."""
    raw = path.read_bytes()
    if raw[:4] == b"PK\x03\x04":
        return [("zip data.pkl", data, 1) for data in zip_candidates(path)]
    out: list[tuple[str, bytes, int]] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar.getmembers():
                fh = tar.extractfile(member)
                if fh is not None:
                    out.append((f"tar member {member.name}", fh.read(), 1))
    except Exception:
        pass
    out.append(("the file as pickles", raw, 5))  # magic, protocol, sys_info, object, keys
    return out


def assert_agrees_when_safe(path: Path) -> None:
    """(a): when ``scan`` says safe, no pickle any loader could take names an unsafe global."""
    try:
        result = scan(path)
    except CkptError:
        return
    if result.status != SAFE or path.is_dir():
        return
    for what, data, count in loadable_pickles(path):
        bad = unsafe_among(recorded_globals(data, count))
        assert not bad, f"scan said safe, but the {what} imports {bad}"


# -- the reference behaviours the rules are built on ------------------------------------------
def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_zipfile_and_torch_pick_different_twins(tmp_path: Path) -> None:
    """Why NUL and case twins are refused: zipfile takes the last twin, miniz the exact or case-folded one."""
    a, b = state_dict_pickle(("x", n(1))), state_dict_pickle(("x", n(2)))
    nul = _write(
        tmp_path, "nul.pth", raw_zip([("m/version", b"3\n"), ("m/data.pkl", a), ("m/data.pkl\0x", b)])
    )
    with zipfile.ZipFile(nul) as zf:
        assert zf.read("m/data.pkl") == b
    assert torch_data_pkl(nul) == a
    case = _write(
        tmp_path, "case.pth", raw_zip([("m/version", b"3\n"), ("m/data.pkl", b), ("m/DATA.PKL", a)])
    )
    with zipfile.ZipFile(case) as zf:
        assert zf.read("m/data.pkl") == b
    assert torch_data_pkl(case) == a


def test_torch_reads_the_folder_of_the_first_member(tmp_path: Path) -> None:
    members = [("m/version", b"3\n"), ("m/data.pkl", PLAIN), ("other/data.pkl", PLAIN)]
    assert torch_data_pkl(_write(tmp_path, "two.pth", raw_zip(members))) is None  # torch refuses it too


@pytest.mark.parametrize(
    ("members", "torch_reads", "why"),
    [
        # a folder entry with the data.pkl name and a payload: one name with the file to unzip tools
        ([("archive/data.pkl", PLAIN), ("archive/data.pkl/", _HOSTILE)], True, "'archive/data.pkl/'"),
        # a data.pkl in no folder beside the folder torch reads: torch refuses, and so do we
        ([("archive/DATA.PKL", PLAIN), ("data.pkl", _HOSTILE)], False, "in no folder"),
        # torch finds DATA.PKL without regard to case; zipfile and unzip tools do not
        ([("archive/DATA.PKL", PLAIN)], True, "spelled 'archive/DATA.PKL'"),
    ],
)
def test_names_some_reader_folds_are_refused_by_scan_and_inspect(
    tmp_path: Path, members: list[tuple[str, bytes]], torch_reads: bool, why: str
) -> None:
    """Found by an attacker run and by the generated zips below: ``scan`` said safe on the first."""
    body = [("archive/version", b"3\n"), *members, ("archive/data/0", bytes(16))]
    path = _write(tmp_path, "folded.pth", raw_zip(body))
    assert (torch_data_pkl(path) is not None) is torch_reads  # the reference, as built
    before = path.read_bytes()
    for command in ("scan", "inspect"):
        result = run_cli(command, str(path))
        assert result.exit_code == 2, (command, result.stdout)
        assert len(result.stderr.splitlines()) == 1 and why in result.stderr, result.stderr
    assert path.read_bytes() == before


def test_torch_load_tries_tar_before_pickle(tmp_path: Path) -> None:
    """The reference: torch.load(weights_only=False) runs a tar member's pickle in a file that
    plain pickle reads as a harmless dict (the marker, in tmp_path, proves it ran)."""
    marker = tmp_path / "MARKER"
    evil = call(glob("os", "system"), s(f"touch {marker}"))
    path = _write(tmp_path, "poly.pth", legacy_tar({"storages": evil}, header_pickle=PLAIN))
    assert pickle.loads(path.read_bytes()) == {"a": 1}
    with tarfile.open(path, "r:") as tar:
        assert "storages" in tar.getnames()
    with contextlib.suppress(Exception):  # the payload's result is no storage count: torch fails after it ran
        torch.load(path, weights_only=False)  # runs `touch MARKER` in tmp_path: the payload is live
    assert marker.exists()


def test_zip_tar_polyglot_is_both(tmp_path: Path) -> None:
    from corpus import _zip_tar_polyglot

    path = _write(tmp_path, "zt.pth", _zip_tar_polyglot(raw_zip([("archive/version", b"3\n")])))
    with tarfile.open(path, "r:"):
        pass
    with zipfile.ZipFile(path) as zf:
        assert zf.read("archive/version") == b"3\n"
    result = run_cli("scan", path)
    assert result.exit_code == 2 and "ambiguous" in result.stderr, result.stderr


# -- tar checkpoints ----------------------------------------------------------------------------
def test_scan_reports_a_benign_tar_checkpoint(tmp_path: Path) -> None:
    path = _write(tmp_path, "old.tar", legacy_tar({}))
    result = run_cli("scan", path)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "torch.FloatStorage" in result.stdout and "tar checkpoint" in result.stdout
    inspect = run_cli("inspect", path)
    assert inspect.exit_code == 2 and len(inspect.stderr.splitlines()) == 1
    assert "ckpt scan" in inspect.stderr


@pytest.mark.parametrize("member", ["storages", "tensors", "pickle", "sys_info"])
def test_scan_finds_a_payload_in_every_tar_member(tmp_path: Path, member: str) -> None:
    path = _write(tmp_path, "evil.tar", legacy_tar({member: call(glob("os", "system"), s("true"))}))
    result = run_cli("scan", path)
    assert result.exit_code == 1 and "os.system" in result.stdout, (result.stdout, result.stderr)


def test_tar_advice_never_says_load_it(tmp_path: Path) -> None:
    """No message about a tar file recommends loading it with an old PyTorch."""
    for name, data in (
        ("evil.tar", legacy_tar({"storages": call(glob("os", "system"), s("true"))})),
        ("dup.tar", legacy_tar({}, duplicate="storages")),
        ("old.tar", legacy_tar({})),
    ):
        path = _write(tmp_path, name, data)
        for command in ("scan", "inspect"):
            result = run_cli(command, path)
            text = (result.stdout + result.stderr).lower()
            assert "old pytorch" not in text and "load it with" not in text, text


def test_a_tar_storage_payload_after_a_walk(tmp_path: Path) -> None:
    """The second storage record's pickle is reached only by skipping the first one's bytes."""
    args = lambda key, storage: b"\x80\x02" + b"(" + s(key) + s("cpu") + storage + b"t."  # noqa: E731
    evil = b"\x80\x02" + call(glob("os", "system"), s("true")) + b"."
    storages = pickle.dumps(2, protocol=2) + args("0", glob("torch", "FloatStorage")) + struct.pack("<q", 4)
    storages += b"\x80" * 16 + evil  # the bytes of storage 0 look like pickle opcodes; then record 2
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("storages", storages), ("tensors", pickle.dumps(0)), ("pickle", PLAIN)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = run_cli("scan", _write(tmp_path, "walk.tar", buf.getvalue()))
    assert result.exit_code == 1 and "os.system" in result.stdout, (result.stdout, result.stderr)


# -- (a) and (b) over the corpus and real files ---------------------------------------------------
@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("corpus")
    cases = build_corpus(root)
    files = [c.path for c in cases if c.path.is_file() and not c.path.is_symlink()]
    files += sorted(FIXTURES.glob("*.pth")) + sorted(
        p for p in REAL.iterdir() if p.is_file() and p.name != "README.md"
    )
    return root, files


def test_scan_safe_means_no_reference_unpickler_imports_anything_unsafe(
    corpus_files: tuple[Path, list[Path]],
) -> None:
    root, files = corpus_files
    for path in files:
        assert_agrees_when_safe(path)
    assert not list((root / "markers").iterdir())


def test_our_data_pkl_is_zipfiles_and_torchs(corpus_files: tuple[Path, list[Path]]) -> None:
    """(b) over the corpus and the real files: whenever we read a zip, we read the data.pkl
    torch reads, and no name zipfile knows gives another one."""
    read = 0
    for path in corpus_files[1]:
        if path.read_bytes()[:4] != b"PK\x03\x04":
            continue
        try:
            ours = data_pickle(path)
        except CkptError:
            continue
        theirs = torch_data_pkl(path)  # None: torch.load refuses the archive (no version record ...)
        assert theirs is None or theirs == ours, path.name
        assert all(c == ours for c in zip_candidates(path)), path.name
        read += theirs is not None
    assert read >= 5


# -- (a) and (b) over generated zips ---------------------------------------------------------------
_NAMES = [
    "archive/data.pkl",
    "archive/data.pkl\0x",
    "archive/DATA.PKL",
    "Archive/data.pkl",
    "archive/./data.pkl",
    "archive\\data.pkl",
    "archive//data.pkl",
    "other/data.pkl",
    "archive/data.pkl/",
    "archive/sub/data.pkl",
    "data.pkl",
]
_members = st.lists(
    st.tuples(st.sampled_from(_NAMES), st.sampled_from([VALID_PKL, _HOSTILE])), min_size=1, max_size=3
)


@settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    first=st.sampled_from(["archive/version", "other/version", "version"]),
    members=_members,
    order=st.randoms(use_true_random=False),
    junk_before=st.sampled_from([b"", b"", b"PK\x03\x04junk"]),
    junk_after=st.sampled_from([b"", b"", b"trailing"]),
    count_delta=st.sampled_from([0, 0, 0, -1]),
)
def test_generated_zips(
    tmp_path: Path,
    first: str,
    members: list[tuple[str, bytes]],
    order: object,
    junk_before: bytes,
    junk_after: bytes,
    count_delta: int,
) -> None:
    body = [*members, ("archive/data/0", bytes(16)), ("archive/byteorder", b"little")]
    order.shuffle(body)  # type: ignore[attr-defined]
    data = junk_before + raw_zip([(first, b"3\n"), *body], count_delta=count_delta) + junk_after
    path = _write(tmp_path, f"gen{os.getpid()}.pth", data)
    assert_agrees_when_safe(path)  # (a)
    try:
        ours = data_pickle(path)
    except CkptError:
        return  # refused: fine whatever the others read
    theirs = torch_data_pkl(path)
    assert theirs is None or theirs == ours  # (b): what torch.load unpickles, if it reads any
    assert all(c == ours for c in zip_candidates(path, main_only=True))  # nor any zipfile could pick


def test_a_clean_torch_save_is_still_read(tmp_path: Path) -> None:
    """The control: torch.save's own archives pass every rule, under any archive name."""
    for name in ("model.pth", "weird name.pt", "UPPER.bin"):
        path = tmp_path / name
        torch.save({"w": torch.ones(2)}, path)
        assert data_pickle(path) == torch_data_pkl(path)
        assert run_cli("scan", path).exit_code == 0
    assert REPO.is_dir()


def _zip64_ended(members: list[tuple[str, bytes]], *, locator_off: int = 0) -> bytes:
    """``raw_zip(members)`` closed by zip64 end records (the 32-bit end record marks every
    field too large); ``locator_off`` moves where the locator says the zip64 record is."""
    plain = raw_zip(members)
    cd_at, end_at = plain.find(b"PK\x01\x02"), plain.rfind(b"PK\x05\x06")
    out = bytearray(plain[:end_at])
    count, size = len(members), end_at - cd_at
    record_at = len(out)
    out += struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, size, cd_at)
    out += struct.pack("<4sIQI", b"PK\x06\x07", 0, record_at + locator_off, 1)
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return bytes(out)


def test_zip64_end_records_are_read_once(tmp_path: Path) -> None:
    """zipfile takes the zip64 record just before its locator, miniz the one the locator names:
    a locator that points elsewhere is refused; a well-placed one is read as torch reads it."""
    members = [("archive/version", b"3\n"), ("archive/data.pkl", PLAIN)]
    good = _write(tmp_path, "z64.pth", _zip64_ended(members))
    assert data_pickle(good) == torch_data_pkl(good) == PLAIN
    with zipfile.ZipFile(good) as zf:
        assert zf.read("archive/data.pkl") == PLAIN
    moved = _write(tmp_path, "z64_moved.pth", _zip64_ended(members, locator_off=-8))
    with pytest.raises(CkptError, match="zip64 end record is not where its locator points"):
        data_pickle(moved)
    result = run_cli("scan", moved)
    assert result.exit_code == 2 and "ambiguous" in result.stderr, result.stderr


_EVIL_SHORT = call(glob("os", "system"), s("true"))  # short enough for a tar header's name field


@settings(
    max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    evil=st.sets(st.sampled_from(["storages", "tensors", "pickle", "sys_info"]), max_size=2),
    header=st.sampled_from([None, PLAIN, b"\x80\x02" + _EVIL_SHORT + b"."]),
    duplicate=st.sampled_from([None, None, "storages", "pickle"]),
)
def test_generated_tar_checkpoints(
    tmp_path: Path, evil: set[str], header: bytes | None, duplicate: str | None
) -> None:
    """(a) for tar checkpoints and tar/pickle polyglots: a safe verdict only when no member
    pickle, nor the file read as pickles, imports anything unsafe; never read as a checkpoint."""
    data = legacy_tar({m: _EVIL_SHORT for m in evil}, header_pickle=header, duplicate=duplicate)
    path = _write(tmp_path, f"gen{os.getpid()}.tar", data)
    assert_agrees_when_safe(path)
    with pytest.raises(CkptError):
        data_pickle(path)
    result = run_cli("inspect", path)
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    verdict = run_cli("scan", path)
    if evil or header not in (None, PLAIN):
        assert verdict.exit_code in (1, 2), verdict.stdout  # never safe


def test_protocol_0_and_tar_zip_polyglots(tmp_path: Path) -> None:
    """A pickle needs no PROTO opcode: a protocol-0 pickle in a tar header, or before a zip
    directory, is scanned too; a tar that ends with a zip directory is both."""
    p0 = b"cos\nsystem\n(S'true'\ntR."
    tar = _write(tmp_path, "p0.tar", legacy_tar({}, header_pickle=p0))
    result = run_cli("scan", tar)
    assert result.exit_code == 1 and "os.system" in result.stdout, (result.stdout, result.stderr)
    zipped = raw_zip([("archive/data.pkl", VALID_PKL)])
    for name, data in (
        ("p0zip.pkl", b"(dp0\nS'a'\nI1\ns." + zipped),
        ("tarzip.tar", legacy_tar({}) + zipped),
    ):
        with zipfile.ZipFile(_write(tmp_path, name, data)) as zf:
            assert zf.namelist() == ["archive/data.pkl"]
        result = run_cli("scan", tmp_path / name)
        assert result.exit_code == 2 and "ambiguous" in result.stderr, (result.stdout, result.stderr)
