"""A generated corpus of malformed and hostile inputs, importable by tests.

:func:`build_corpus` writes 60-odd files and folders into a folder and returns one
:class:`Case` per input: what it is, whether ``ckpt scan`` must call it unsafe
(exit 1) or unreadable (exit 2), and whether only ``--check`` can notice the fault.
Hostile pickles are built by hand from pickle opcodes; each would create a marker
file under ``<root>/markers`` if it were ever executed, so a test can prove nothing ran.
"""

from __future__ import annotations

import json
import os
import random
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

UNSAFE = "unsafe"
MALFORMED = "malformed"
MAGIC = 0x1950A86A20F9469CFC6C  # the legacy torch.save magic number


@dataclass(frozen=True)
class Case:
    """One corpus input and what every command must do with it."""

    name: str
    path: Path
    category: str
    kind: str  # UNSAFE (scan exits 1) or MALFORMED (scan exits 2)
    needs_check: bool = False  # only ``--check`` (CRC / full offsets) can see the fault
    fragment: str = ""  # text the refusal must contain, e.g. the offending global
    scan_fragment: str | None = None  # what ``scan`` must say instead, when it differs
    may_hang: bool = False  # run it in a subprocess with a timeout


# -- pickle opcodes, by hand --------------------------------------------------------------
def s(text: str) -> bytes:
    """BINUNICODE: a str on the stack."""
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def n(value: int) -> bytes:
    """BININT: a signed 32-bit int on the stack."""
    return b"J" + struct.pack("<i", value)


def glob(module: str, name: str) -> bytes:
    """GLOBAL (protocol 0-3)."""
    return b"c" + f"{module}\n{name}\n".encode()


def stack_glob(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4+): module and name come from the stack."""
    return (
        b"\x8c"
        + bytes([len(module)])
        + module.encode()
        + b"\x8c"
        + bytes([len(name)])
        + name.encode()
        + b"\x93"
    )


def call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)`` via MARK ... TUPLE REDUCE."""
    return func + b"(" + b"".join(args) + b"tR"


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def state_dict_pickle(*entries: tuple[str, bytes], proto: int = 2) -> bytes:
    """A pickled dict {name: expression ...}."""
    body = b"".join(s(k) + v + b"s" for k, v in entries)
    return b"\x80" + bytes([proto]) + b"}" + body + b"."


def shared_containers_pickle(levels: int, leaf: bytes) -> bytes:
    """``x = {"t": leaf}``, then ``levels`` times ``x = {"a": x, "b": x}``: a few hundred bytes
    that hold 2**levels paths (each dict is memoized, popped, and fetched twice by the next)."""
    out = b"\x80\x02}" + s("t") + leaf + b"sq\x000"
    for i in range(levels):
        out += b"}(" + s("a") + b"h" + bytes([i]) + s("b") + b"h" + bytes([i]) + b"uq" + bytes([i + 1]) + b"0"
    return out + b"h" + bytes([levels]) + b"."


def tensor_expr(
    key: str = "0",
    numel: int = 4,
    offset: int = 0,
    shape: tuple[int, ...] = (2, 2),
    stride: tuple[int, ...] = (2, 1),
    storage: str = "FloatStorage",
) -> bytes:
    """``torch._utils._rebuild_tensor_v2`` with a persistent-id storage, as torch.save writes it."""
    persid = tup(s("storage"), glob("torch", storage), s(key), s("cpu"), n(numel)) + b"Q"
    hooks = call(glob("collections", "OrderedDict"))
    return call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        persid,
        n(offset),
        tup(*map(n, shape)),
        tup(*map(n, stride)),
        b"\x89",
        hooks,
    )


def payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Expressions that would create ``marker`` if unpickled, with the global each names."""
    m = str(marker)
    sh = f"touch {m}"
    imp = call(glob("builtins", "__import__"), s("os"))
    os_sys = stack_glob("os", "system")[:-1]  # the two strings, without the STACK_GLOBAL
    return {
        "os_system_global": (call(glob("os", "system"), s(sh)), "system"),
        "posix_system_global": (call(glob("posix", "system"), s(sh)), "system"),
        "os_system_stack_global": (call(stack_glob("os", "system"), s(sh)), "system"),
        "exec_global": (call(glob("builtins", "exec"), s(f"open({m!r}, 'w').close()")), "exec"),
        "exec_stack_global": (call(stack_glob("builtins", "exec"), s(f"open({m!r}, 'w').close()")), "exec"),
        "eval_py2_builtin": (
            call(glob("__builtin__", "eval"), s(f"__import__('os').system({sh!r})")),
            "eval",
        ),
        "subprocess_list": (
            call(glob("subprocess", "check_call"), b"](" + s("touch") + s(m) + b"e"),
            "subprocess",
        ),
        "getattr_import": (call(call(glob("builtins", "getattr"), imp, s("system")), s(sh)), "getattr"),
        "inst_opcode": (b"(" + s(sh) + b"ios\nsystem\n", "system"),
        # STACK_GLOBAL whose last two pushed strings are a harmless name, popped before it runs
        "stack_global_pop_trick": (
            call(os_sys + stack_glob("collections", "OrderedDict")[:-1] + b"00\x93", s(sh)),
            "system",
        ),
        "stack_global_mark_trick": (
            call(os_sys + b"(" + s("collections") + s("OrderedDict") + b"1\x93", s(sh)),
            "system",
        ),
        "obj_opcode": (b"(" + glob("os", "system") + s(sh) + b"o", "system"),
    }


# -- containers -----------------------------------------------------------------------------
VALID_PKL = state_dict_pickle(("a.weight", tensor_expr()))


def legacy_prefix(magic: bool = True) -> bytes:
    """The small pickles a legacy torch.save file starts with (magic number, protocol, sys info)."""
    import pickle

    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return b"".join(pickle.dumps(x, protocol=2) for x in ((MAGIC,) if magic else ()) + (1001, info))


def st_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def st_valid_header(**extra: object) -> dict:
    header: dict = {
        "a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "a.bias": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
        "__metadata__": {"format": "pt"},
    }
    header.update(extra)
    return header


def _entry(dtype: object = "F32", shape: object = (2,), offsets: object = (16, 24)) -> dict:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets,
    }


# -- the corpus -------------------------------------------------------------------------------
class _Builder:
    def __init__(self, root: Path, dry: bool = False) -> None:
        self.root = root
        self.dry = dry  # only list the cases (cheap: for test parametrization)
        self.inputs = root / "inputs"
        self.markers = root / "markers"
        if not dry:
            self.inputs.mkdir(parents=True, exist_ok=True)
            self.markers.mkdir(exist_ok=True)
        self.cases: list[Case] = []

    def add(
        self,
        name: str,
        data: bytes | Callable[[Path], object] | None,
        category: str,
        kind: str = MALFORMED,
        suffix: str = ".pth",
        **kw: object,
    ) -> Path:
        path = self.inputs / f"{name}{suffix}"
        if self.dry:
            pass
        elif isinstance(data, bytes):
            path.write_bytes(data)
        elif data is not None:
            data(path)
        self.cases.append(Case(name, path, category, kind, **kw))  # type: ignore[arg-type]
        return path

    def marker(self, name: str) -> Path:
        return self.markers / name


def build_corpus(root: Path, dry: bool = False) -> list[Case]:
    """Write every malformed and hostile input under ``root``; return the cases.

    Example:
        >>> cases = build_corpus(tmp_path)                  # doctest: +SKIP
        >>> sum(c.kind == "unsafe" for c in cases) > 10     # doctest: +SKIP
        True
    """
    b = _Builder(root, dry)
    for build in (
        _misc,
        _filesystem,
        _torch_zip,
        _hostile,
        _legacy,
        _safetensors,
        _sharded,
        _archives,
        _file_bounds,
        _parser_disagreements,
        _pickle_bounds,
    ):
        build(b)
    return b.cases


def _misc(b: _Builder) -> None:
    rng = random.Random(6)
    b.add("empty", b"", "misc")
    for size in (1, 7, 100, 4096, 65536):
        b.add(f"random_{size}", bytes(rng.getrandbits(8) for _ in range(size)), "misc", suffix=".bin")
    b.add("pickle_header_then_garbage", b"\x80\x02" + bytes(rng.getrandbits(8) for _ in range(300)), "misc")
    b.add("zip_magic_then_garbage", b"PK\x03\x04" + bytes(rng.getrandbits(8) for _ in range(300)), "misc")
    b.add(
        "git_lfs_pointer",
        b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 4404\n",
        "misc",
        fragment="git-lfs",
    )
    b.add(
        "html_page",
        b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>403</body></html>\n",
        "misc",
        fragment="HTML",
    )


def _filesystem(b: _Builder) -> None:
    def no_checkpoint(path: Path) -> None:
        path.mkdir()
        (path / "README.txt").write_text("weights were here\n")

    def loop(path: Path) -> None:
        os.symlink(path.with_name("symlink_loop_b.pth"), path)
        os.symlink(path, path.with_name("symlink_loop_b.pth"))

    b.add("dir_without_checkpoint", no_checkpoint, "filesystem", suffix="")
    b.add("dangling_symlink", lambda p: os.symlink(b.inputs / "does-not-exist.pth", p), "filesystem")
    b.add("symlink_loop", loop, "filesystem")
    b.add("fifo", os.mkfifo, "filesystem", may_hang=True)


def _valid_zip_bytes() -> bytes:
    storages = {"0": bytes(range(256)) * 16}  # 64x16 float32 = 4096 bytes
    pkl = state_dict_pickle(("a.weight", tensor_expr("0", 1024, 0, (64, 16), (16, 1))))
    return torch_zip_bytes(pkl, storages)


def _member_span(data: bytes, suffix: str) -> tuple[int, int]:
    """(offset, size) of a stored member's bytes inside zip ``data``."""
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _torch_zip(b: _Builder) -> None:
    good = _valid_zip_bytes()
    start, size = _member_span(good, "data/0")
    cd = good.find(b"PK\x01\x02")
    for name, cut in (
        ("header_only", 40),
        ("mid_data", start + size // 2),
        ("before_central_dir", cd),
        ("last_10_missing", len(good) - 10),
    ):
        b.add(f"zip_truncated_{name}", good[:cut], "torch-zip")
    flipped = bytearray(good)
    flipped[start + 100] ^= 0xFF
    b.add("zip_crc_flipped_data", bytes(flipped), "torch-zip", needs_check=True)
    zips = {
        "zip_pkl_bad_opcode": torch_zip_bytes(b"\x80\x02}\xff\xfe."),
        "zip_pkl_truncated": torch_zip_bytes(VALID_PKL[: len(VALID_PKL) // 2]),
        "zip_pkl_bad_utf8": torch_zip_bytes(
            b"\x80\x02}X\x04\x00\x00\x00\xff\xfe\xfd\xfc" + tensor_expr() + b"s."
        ),
        "zip_pkl_empty": torch_zip_bytes(b""),
        "zip_without_data_pkl": torch_zip_bytes(None),
        "zip_storage_smaller_than_tensor": torch_zip_bytes(VALID_PKL, {"0": bytes(8)}),
        "zip_storage_member_missing": torch_zip_bytes(state_dict_pickle(("a.weight", tensor_expr("7")))),
        "zip_storage_key_escapes": torch_zip_bytes(
            state_dict_pickle(("a.weight", tensor_expr("../../version")))
        ),
        "zip_tensor_offset_past_storage": torch_zip_bytes(
            state_dict_pickle(("a.weight", tensor_expr(offset=3)))
        ),
        "zip_tensor_negative_shape": torch_zip_bytes(
            state_dict_pickle(("a.weight", tensor_expr(shape=(-2, 2))))
        ),
        "zip_tensor_huge_shape": torch_zip_bytes(
            state_dict_pickle(("a.weight", tensor_expr(shape=(2**31 - 1, 2**31 - 1), stride=(2**31 - 1, 1))))
        ),
        "zip_persid_not_tuple": torch_zip_bytes(state_dict_pickle(("a.weight", s("storage") + b"Q"))),
    }
    for name, data in zips.items():
        b.add(name, data, "torch-zip")
    # a DAG: 2**40 paths to the same tensor, or to a plain value beside a real state dict (a walk
    # by paths would never end: run in a subprocess with a timeout)
    shared = shared_containers_pickle(40, n(1))[2:-1]
    metadata = b"\x80\x02}" + s("w") + tensor_expr() + b"s" + s("hparams") + shared + b"s."
    key = b"K\x01\x85q\x000"  # (1,), memoized, then 40 times (t, t): a 2**40-step hash as a dict key
    for i in range(40):
        key += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
    key_dag = b"\x80\x02" + key + b"}" + s("w") + tensor_expr() + b"sh" + bytes([40]) + n(1) + b"s."
    for name, data, fragment in (
        ("zip_pkl_shared_containers", torch_zip_bytes(shared_containers_pickle(40, tensor_expr())), "reuses"),
        ("zip_pkl_shared_metadata", torch_zip_bytes(metadata), "reuses the same containers"),
        ("zip_pkl_shared_tuple_key", torch_zip_bytes(key_dag), "a dict key or set member that nests"),
    ):
        b.add(name, data, "torch-zip", fragment=fragment, may_hang=True)
    for name, field, value in (
        ("version_needed_99", 6, 99),
        ("encrypted_flag", 8, 1),
        ("unknown_compression", 10, 99),
    ):
        b.add(f"zip_data_pkl_{name}", _patch_headers(good, "data.pkl", field, value), "torch-zip")
    b.add("zip_data_pkl_deflate_corrupt", _deflated_corrupt(), "torch-zip")
    b.add("zip_data_pkl_bomb", _deflate_bomb("data.pkl"), "torch-zip", fragment="zip bomb")
    b.add("zip_storage_bomb", _deflate_bomb("data/0"), "torch-zip", fragment="zip bomb")


def _patch_headers(data: bytes, member: str, cd_field: int, value: int) -> bytes:
    """Set a 2-byte field of ``member``'s central directory entry (and the same field of its local header)."""
    out = bytearray(data)
    cd = data.find(b"PK\x01\x02")
    while cd != -1:
        name_len = struct.unpack_from("<H", data, cd + 28)[0]
        if data[cd + 46 : cd + 46 + name_len].decode().endswith(member):
            struct.pack_into("<H", out, cd + cd_field, value)
            local = struct.unpack_from("<I", data, cd + 42)[0]
            struct.pack_into("<H", out, local + cd_field - 2, value)
        cd = data.find(b"PK\x01\x02", cd + 4)
    return bytes(out)


def _deflated_corrupt() -> bytes:
    """data.pkl stored deflated, its compressed bytes damaged (the CRC is right for the original)."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", VALID_PKL * 4, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("archive/data/0", bytes(16))
    data = bytearray(buf.getvalue())
    start = 30 + len("archive/data.pkl")
    data[start + 2 : start + 8] = b"\xff" * 6
    return bytes(data)


def _deflate_bomb(member: str) -> bytes:
    """A valid state dict whose ``member`` is deflated and inflates to 32 MiB (~32 KiB on disk).
    data.pkl: a pickle that stops after 5 bytes, then zeros; data/0: the storage, then zeros."""
    import io

    buf = io.BytesIO()
    padding = bytes(32 << 20)
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in (("data.pkl", VALID_PKL), ("data/0", bytes(16))):
            deflate = name == member
            zf.writestr(
                f"archive/{name}",
                data + padding if deflate else data,
                compress_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED,
            )
    return buf.getvalue()


def torch_zip_bytes(pickle_bytes: bytes | None, storages: dict[str, bytes] | None = None) -> bytes:
    """A torch.save-like zip in memory (``pickle_bytes=None`` leaves out data.pkl)."""
    import io

    buf = io.BytesIO()
    members = {"byteorder": b"little", "version": b"3\n"}
    if pickle_bytes is not None:
        members["data.pkl"] = pickle_bytes
    members.update(
        {f"data/{k}": v for k, v in (storages if storages is not None else {"0": bytes(16)}).items()}
    )
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(f"archive/{name}", data)
    return buf.getvalue()


def _hostile(b: _Builder) -> None:
    """Each payload inside a torch zip (beside a real tensor), and as a bare pickle."""
    for name, (expr, fragment) in payloads(b.marker("zip")).items():
        proto = 4 if "stack" in name else 2
        pkl = state_dict_pickle(("a.weight", tensor_expr()), ("evil", expr), proto=proto)
        # a static scan cannot name a global whose strings were shuffled on the stack: it says so
        scan_fragment = "<computed>" if "trick" in name else None
        b.add(
            f"zip_{name}",
            torch_zip_bytes(pkl),
            "hostile",
            UNSAFE,
            fragment=fragment,
            scan_fragment=scan_fragment,
        )
    for name in (
        "os_system_global",
        "os_system_stack_global",
        "exec_global",
        "subprocess_list",
        "inst_opcode",
    ):
        expr, fragment = payloads(b.marker("bare"))[name]
        b.add(
            f"bare_pickle_{name}",
            b"\x80\x04" + expr + b".",
            "hostile",
            UNSAFE,
            suffix=".pkl",
            fragment=fragment,
        )
    # globals a scanner could misread: an EXT code, an unknown storage class
    odd = {
        "ext_opcode": (b"\x82\x07", "extension"),
        "unknown_storage_type": (tensor_expr(storage="NoStorage"), "NoStorage"),
    }
    for name, (expr, fragment) in odd.items():
        pkl = state_dict_pickle(("a.weight", tensor_expr()), ("x", expr), proto=4)
        b.add(f"zip_{name}", torch_zip_bytes(pkl), "hostile", UNSAFE, fragment=fragment)
    expr, fragment = payloads(b.marker("dcp"))["os_system_stack_global"]
    b.add(
        "dcp_metadata_os_system",
        lambda p: _dcp_folder(p, b"\x80\x04" + expr + b"."),
        "hostile",
        UNSAFE,
        suffix="",
        fragment=fragment,
    )
    # 2,000 distinct globals: the refusal names 20 of them and counts the rest, on one line
    # (tests/test_pickle_bounds.py scans 200,000, which took time quadratic in their number)
    many = b"(" + b"".join(glob(f"m{i}", "x") + b"0" for i in range(2_000)) + b"N"
    b.add(
        "zip_many_distinct_globals",
        torch_zip_bytes(state_dict_pickle(("a.weight", tensor_expr()), ("x", many))),
        "hostile",
        UNSAFE,
        fragment="m19.x and 1,980 more",
        scan_fragment="m1999.x",
    )
    user = state_dict_pickle(
        ("a.weight", tensor_expr()), ("config", call(glob("mytrainer.config", "TrainConfig")))
    )
    b.add("zip_custom_user_class", torch_zip_bytes(user), "hostile", UNSAFE, fragment="mytrainer.config")
    b.add("zip_pickled_nn_module", _save_module, "hostile", UNSAFE, fragment="torch.nn")


def _dcp_folder(path: Path, metadata: bytes) -> None:
    """A DCP folder with a hostile ``.metadata`` (torch unpickles it with full trust)."""
    path.mkdir()
    (path / ".metadata").write_bytes(metadata)
    (path / "__0_0.distcp").write_bytes(torch_zip_bytes(VALID_PKL))


def _save_module(path: Path) -> None:
    import torch

    torch.manual_seed(0)
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 2)), path)


def _legacy(b: _Builder) -> None:
    data = bytes(1000) if b.dry else _legacy_bytes()
    b.add("legacy_truncated_mid_data", data[: len(data) - 100], "legacy")
    b.add("legacy_truncated_in_pickle", data[: len(legacy_prefix()) + 40], "legacy")
    b.add("legacy_truncated_after_magic", data[:14], "legacy")
    b.add("legacy_bad_magic", b"\x80\x02\x8a\x02\x39\x05." + data[14:], "legacy")
    expr, fragment = payloads(b.marker("legacy"))["os_system_global"]
    keys = b"\x80\x02]."  # the (empty) storage key list: the file is well formed, only hostile
    b.add(
        "legacy_os_system",
        legacy_prefix() + state_dict_pickle(("evil", expr)) + keys,
        "hostile",
        UNSAFE,
        suffix=".pt",
        fragment=fragment,
    )
    expr, fragment = payloads(b.marker("legacy_magic"))["exec_stack_global"]
    b.add(
        "legacy_exec_in_magic_pickle",
        b"\x80\x04" + expr + b"." + legacy_prefix(magic=False),
        "hostile",
        UNSAFE,
        suffix=".pt",
        fragment=fragment,
    )


def _safetensors(b: _Builder) -> None:
    data = bytes(24)
    bad = {
        "st_length_past_eof": st_bytes(st_valid_header(), data, length=10_000),
        "st_length_over_cap": st_bytes(st_valid_header(), data, length=200 * 1024 * 1024),
        "st_header_not_utf8": st_bytes(
            b'{"a.w\xff\xfeight": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}', bytes(4)
        ),
        "st_header_not_json": st_bytes(b'{"a.weight": {"dtype": "F32", "shape": [2, 2], ', data),
        "st_header_json_list": st_bytes(b"[1, 2, 3]", data),
        "st_entry_not_object": st_bytes({"a.weight": 5}, data),
        "st_duplicate_key": st_bytes(
            b'{"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, '
            b'"a.bias": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}, '
            b'"a.weight": {"dtype": "I32", "shape": [4], "data_offsets": [0, 16]}}',
            data,
        ),
        "st_unknown_dtype": st_bytes(st_valid_header(**{"a.bias": _entry(dtype="F33")}), data),
        "st_shape_offsets_mismatch": st_bytes(st_valid_header(**{"a.bias": _entry(shape=(3,))}), data),
        "st_offsets_out_of_bounds": st_bytes(
            st_valid_header(**{"a.bias": _entry(shape=(12,), offsets=(16, 64))}), data
        ),
        "st_offsets_overlap": st_bytes(
            st_valid_header(**{"a.bias": _entry(shape=(4,), offsets=(8, 24))}), data
        ),
        "st_offsets_gap": st_bytes(st_valid_header(**{"a.bias": _entry(offsets=(20, 28))}), bytes(28)),
        "st_data_not_covered": st_bytes(st_valid_header(), bytes(32)),
        "st_offsets_reversed": st_bytes(
            st_valid_header(**{"a.bias": _entry(shape=(0,), offsets=(24, 16))}), data
        ),
        "st_negative_shape": st_bytes(st_valid_header(**{"a.bias": _entry(shape=(-2,))}), data),
        "st_negative_offset": st_bytes(st_valid_header(**{"a.bias": _entry(offsets=(-8, 0))}), data),
        "st_shape_overflow": st_bytes(
            st_valid_header(**{"a.bias": _entry(shape=(2**62, 2**62, 2**62))}), data
        ),
        "st_shape_not_ints": st_bytes(st_valid_header(**{"a.bias": _entry(shape=["2"])}), data),
        "st_metadata_not_str": st_bytes(st_valid_header(__metadata__={"format": "pt", "epoch": 3}), data),
        "st_missing_data_offsets": st_bytes(
            st_valid_header(**{"a.bias": {"dtype": "F32", "shape": [2]}}), data
        ),
        "st_missing_dtype": st_bytes(
            st_valid_header(**{"a.bias": {"shape": [2], "data_offsets": [16, 24]}}), data
        ),
        "st_truncated_data": st_bytes(st_valid_header(), bytes(20)),
    }
    for name, raw in bad.items():
        b.add(name, raw, "safetensors", suffix=".safetensors")


def _sharded(b: _Builder) -> None:
    shard = st_bytes({"a.weight": _entry(shape=(2, 2), offsets=(0, 16))}, bytes(16))
    if not b.dry:  # a valid file outside every folder, that an escaping index would reach
        (b.root / "outside.safetensors").write_bytes(shard)

    def folder(
        name: str,
        weight_map: object,
        index: bytes | None = None,
        index_name: str = "model.safetensors.index.json",
    ) -> None:
        def make(path: Path) -> None:
            path.mkdir()
            (path / "model-00001-of-00002.safetensors").write_bytes(shard)
            raw = (
                index
                if index is not None
                else json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
            )
            (path / index_name).write_bytes(raw)

        b.add(name, make, "sharded", suffix="")

    first = "model-00001-of-00002.safetensors"
    folder("shard_missing", {"a.weight": first, "a.bias": "model-00002-of-00002.safetensors"})
    folder(
        "shard_escapes_folder",
        {"a.weight": first, "a.bias": "../../outside.safetensors"},
    )
    folder("shard_absolute_path", {"a.weight": first, "a.bias": str(b.root / "outside.safetensors")})
    folder("shard_index_not_json", {}, index=b'{"weight_map": {"a.weight": ')
    folder("shard_index_not_object", {}, index=b'["model-00001-of-00002.safetensors"]')
    folder("shard_weight_map_not_dict", ["a.weight"])
    folder("shard_name_not_in_shard", {"a.weight": first, "a.bias": first})
    folder("shard_name_too_long", {"a.weight": "x" * 5000 + ".safetensors"})
    folder(
        "shard_bin_missing",
        {"a.weight": "pytorch_model-00001-of-00002.bin"},
        index_name="pytorch_model.bin.index.json",
    )


def _file_bounds(b: _Builder) -> None:
    """Offsets, shapes and shard names that reach outside what they describe (issue 13)."""
    # a legacy storage view (the 6th persistent-id field) whose element offset is negative, or runs past
    # its storage: the view would read bytes before (the storage's length field) or after the storage
    for name, (offset, size) in {
        "legacy_view_negative_offset": (-2, 2),
        "legacy_view_past_storage": (3, 2),
    }.items():
        b.add(name, _legacy_view_bytes(offset, size), "legacy", fragment="storage")
    storages = {"0": bytes(16)}
    b.add(
        "zip_negative_storage_offset",
        torch_zip_bytes(state_dict_pickle(("a.weight", tensor_expr(offset=-4))), storages),
        "torch-zip",
    )
    b.add(
        "zip_negative_stride",
        torch_zip_bytes(state_dict_pickle(("a.weight", tensor_expr(stride=(-2, 1)))), storages),
        "torch-zip",
    )
    for name, shape in {
        "st_shape_zero_times_2_70": (0, 2**70),
        "st_shape_zero_times_2_63": (0, 2**63),
        "st_shape_overflow_before_zero": (2**40, 2**40, 0),
    }.items():
        header = {"a.weight": _entry(shape=shape, offsets=(0, 0))}
        b.add(name, st_bytes(header), "safetensors", suffix=".safetensors", fragment="shape")
    b.add(
        "st_negative_zero_dim",
        st_bytes(b'{"a.weight": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}'),
        "safetensors",
        suffix=".safetensors",
    )
    # 50,000 entries (3 MB of header), the last one leaving a gap: refused, in time linear in the header
    b.add(
        "st_many_entries_then_a_gap",
        None if b.dry else _many_entries(50_000),
        "safetensors",
        suffix=".safetensors",
        fragment="belong to no tensor",
        may_hang=True,
    )

    def spellings(path: Path) -> None:  # 300 spellings of one shard, and a name the shard lacks
        path.mkdir()
        shard = st_bytes({"a.weight": _entry(shape=(2, 2), offsets=(0, 16))}, bytes(16))
        (path / "model.safetensors").write_bytes(shard)
        weight_map = {
            f"t{i}": "./" * (i % 30) + "." + "/" * (1 + i // 30) + "model.safetensors" for i in range(300)
        }
        weight_map["a.weight"] = "model.safetensors"
        raw = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
        (path / "model.safetensors.index.json").write_bytes(raw)

    b.add(
        "shard_300_spellings_of_one_file",
        spellings,
        "sharded",
        suffix="",
        fragment="does not hold",
        may_hang=True,
    )


def _legacy_view_bytes(offset: int, size: int) -> bytes:
    """A legacy torch.save file: one tensor viewing ``size`` elements at ``offset`` of 4 floats."""
    view = tup(s("view0"), n(offset), n(size))
    persid = tup(s("storage"), glob("torch", "FloatStorage"), s("0"), s("cpu"), n(4), view) + b"Q"
    tensor = call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        persid,
        n(0),
        tup(n(size)),
        tup(n(1)),
        b"\x89",
        call(glob("collections", "OrderedDict")),
    )
    keys = b"\x80\x02]" + s("0") + b"a."
    return legacy_prefix() + state_dict_pickle(("a.weight", tensor)) + keys + struct.pack("<q", 4) + bytes(16)


def _many_entries(count: int) -> bytes:
    def entry(i: int) -> str:
        begin = 4 * i + (i == count - 1)
        return f'"w{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{begin},{begin + 4}]}}'

    entries = ",".join(entry(i) for i in range(count))
    return st_bytes(("{" + entries + "}").encode(), bytes(4 * count + 1))


def _archives(b: _Builder) -> None:
    b.add("torchscript_archive", _save_torchscript, "archive", fragment="TorchScript", suffix=".pt")
    b.add("torch_export_pt2", _save_exported, "archive", fragment="torch.export", suffix=".pt2")


def _save_torchscript(path: Path) -> None:
    import torch

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))


def _save_exported(path: Path) -> None:
    import torch

    torch.manual_seed(0)
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),)), str(path))


def _legacy_bytes() -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"a.weight": torch.arange(64.0).reshape(8, 8)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _parser_disagreements(b: _Builder) -> None:
    """Files two readers read differently: zip members that are one name to zipfile or torch,
    bytes before an archive, a miscounted directory, tar checkpoints (torch.load tries tar
    before pickles) and files that are two formats at once. Each hostile pickle sits where
    some loader would take it; a benign one where another would."""
    evil, fragment = payloads(b.marker("parsers"))["os_system_global"]
    hostile = state_dict_pickle(("a.weight", tensor_expr()), ("evil", evil))
    benign = VALID_PKL
    version, storage = ("archive/version", b"3\n"), ("archive/data/0", bytes(16))
    twins = {
        "nul": ("archive/data.pkl", "archive/data.pkl\0x"),
        "case": ("archive/data.pkl", "archive/DATA.PKL"),
        "dot_segment": ("archive/data.pkl", "archive/./data.pkl"),
        "backslash": ("archive/data.pkl", "archive\\data.pkl"),
        "duplicate": ("archive/data.pkl", "archive/data.pkl"),
        "two_folders": ("archive/data.pkl", "other/data.pkl"),
    }
    for name, (first, second) in twins.items():
        for order, (one, two) in (("hostile_first", (hostile, benign)), ("hostile_last", (benign, hostile))):
            members = [version, (first, one), (second, two), storage]
            # one of them through `python -m ckptsurgeon` in a subprocess too (the CLI's own start-up path)
            in_subprocess = name == "nul" and order == "hostile_first"
            b.add(
                f"zip_twin_{name}_{order}",
                raw_zip(members),
                "parsers",
                fragment="ambiguous",
                may_hang=in_subprocess,
            )
    members = [version, ("archive/data.pkl", hostile), storage]
    b.add(
        "zip_data_pkl_outside_first_folder",
        raw_zip([("other/version", b"3\n"), *members[1:]]),
        "parsers",
        fragment="ambiguous",
    )
    b.add("zip_count_short", raw_zip(members, count_delta=-1), "parsers", fragment="ambiguous")
    b.add(
        "zip_count_long",
        raw_zip(members, extra=[("archive/data.pkl\0y", hostile)]),
        "parsers",
        fragment="ambiguous",
    )
    benign_zip = raw_zip([version, ("archive/data.pkl", benign), storage])
    b.add("zip_after_another_zip", raw_zip(members) + benign_zip, "parsers", fragment="ambiguous")
    b.add(
        "zip_local_name_differs",
        raw_zip(members, local_names={"archive/data.pkl": "archive/data.pkX"}),
        "parsers",
    )
    b.add(
        "zip_storage_local_name_differs",
        raw_zip(
            [version, ("archive/data.pkl", benign), storage], local_names={"archive/data/0": "archive/data/X"}
        ),
        "parsers",
        fragment="ambiguous",
    )
    b.add("zip_and_tar", _zip_tar_polyglot(benign_zip), "parsers", fragment="ambiguous")
    plain = b"\x80\x02}" + s("a") + n(1) + b"s."
    b.add("pickle_then_zip", plain + benign_zip, "parsers", fragment="ambiguous")
    b.add(
        "pickle_then_zip_hostile_pickle",
        b"\x80\x02" + evil + b"." + benign_zip,
        "parsers",
        UNSAFE,
        fragment="ambiguous",
        scan_fragment=fragment,
    )
    tar_evil = call(glob("os", "system"), s(f"touch {b.marker('tar')}"))
    for member in ("storages", "tensors", "pickle", "sys_info"):
        b.add(
            f"tar_hostile_{member}",
            legacy_tar({member: tar_evil}),
            "parsers",
            UNSAFE,
            suffix=".tar",
            fragment="tar checkpoint",
            scan_fragment=fragment,
        )
    b.add(
        "tar_pickle_polyglot",
        legacy_tar({"storages": tar_evil}, header_pickle=plain),
        "parsers",
        UNSAFE,
        fragment="tar checkpoint",
        scan_fragment=fragment,
        may_hang=True,  # in a subprocess, as above
    )
    b.add("tar_pickle_polyglot_benign", legacy_tar({}, header_pickle=plain), "parsers", fragment="tar")
    b.add(
        "tar_duplicate_storages",
        legacy_tar({}, duplicate="storages"),
        "parsers",
        suffix=".tar",
        fragment="tar",
    )


def raw_zip(
    members: list[tuple[str, bytes]],
    *,
    count_delta: int = 0,
    extra: list[tuple[str, bytes]] | None = None,
    local_names: dict[str, str] | None = None,
) -> bytes:
    """A stored zip written byte by byte, so names may hold NUL bytes and repeat (zipfile cuts
    and warns). ``count_delta`` miscounts the end record; ``extra`` members are listed in the
    directory beyond the count; ``local_names`` gives a member's local header another name."""
    import zlib

    out, directory = bytearray(), bytearray()
    for name, data in [*members, *(extra or [])]:
        raw = name.encode()
        local = (local_names or {}).get(name, name).encode()
        flags = 0x800 if not name.isascii() else 0
        crc, offset = zlib.crc32(data), len(out)
        out += (
            struct.pack(
                "<4sHHHHHIIIHH",
                b"PK\x03\x04",
                20,
                flags,
                0,
                0,
                0x21,
                crc,
                len(data),
                len(data),
                len(local),
                0,
            )
            + local
            + data
        )
        directory += (
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                b"PK\x01\x02",
                20,
                20,
                flags,
                0,
                0,
                0x21,
                crc,
                len(data),
                len(data),
                len(raw),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + raw
        )
    count = len(members) + count_delta
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(directory), len(out), 0)
    return bytes(out + directory + end)


def _zip_tar_polyglot(zip_bytes: bytes) -> bytes:
    """A zip whose first local header is also a tar header: the first member's local extra
    field (which no zip reader interprets) holds the tar fields and their checksum."""
    name_len = struct.unpack_from("<H", zip_bytes, 26)[0]
    start = 30 + name_len
    pad = 512 - start
    header = bytearray(zip_bytes[:start] + b"\0" * pad)
    struct.pack_into("<H", header, 28, pad)  # the local extra field covers the rest of the block
    for at, value in (
        (100, b"0000644\0"),
        (108, b"0000000\0"),
        (116, b"0000000\0"),
        (124, b"00000000000\0"),
        (136, b"00000000000\0"),
        (156, b"0"),
        (257, b"ustar\x0000"),
    ):
        header[at : at + len(value)] = value
    _tar_checksum(header)
    shift = pad
    out = bytearray(bytes(header) + zip_bytes[start:])
    # every later offset moved by ``shift``: patch the directory's offsets and the end record
    cd = out.find(b"PK\x01\x02")
    end = out.rfind(b"PK\x05\x06")
    pos = cd
    while pos < end:
        offset = struct.unpack_from("<I", out, pos + 42)[0]
        struct.pack_into("<I", out, pos + 42, offset + (shift if offset else 0))
        lens = struct.unpack_from("<HHH", out, pos + 28)
        pos += 46 + sum(lens)
    struct.pack_into("<I", out, end + 16, struct.unpack_from("<I", out, end + 16)[0] + shift)
    return bytes(out)


def _tar_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header[:512]):06o}\0 ".encode()


def legacy_tar(
    evil: dict[str, bytes], *, header_pickle: bytes | None = None, duplicate: str | None = None
) -> bytes:
    """A tar checkpoint as PyTorch before 0.4 wrote it (members sys_info, pickle, storages,
    tensors), with the expressions of ``evil`` in place of a member's first pickle value.
    ``header_pickle``: the first header's name field holds this pickle (a file that is also a
    bare pickle); ``duplicate``: that member is stored twice."""
    import io
    import pickle
    import tarfile

    def value(member: str, plain: bytes) -> bytes:
        return b"\x80\x02" + evil[member] + b"." if member in evil else plain

    count = pickle.dumps(1, protocol=2)
    args = b"\x80\x02" + tup(s("0"), s("cpu"), glob("torch", "FloatStorage")) + b"."
    members = {
        "sys_info": value(
            "sys_info", pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2)
        ),
        "storages": value("storages", count)
        + args
        + struct.pack("<q", 4)
        + bytes(16)
        + pickle.dumps([], protocol=2),
        "tensors": value("tensors", pickle.dumps(0, protocol=2)),
        "pickle": value("pickle", pickle.dumps({"a": 1}, protocol=2)),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        names = list(members) + ([duplicate] if duplicate else [])
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    data = bytearray(buf.getvalue())
    if header_pickle is not None:  # the first header's name field becomes a pickle, then NULs
        assert len(header_pickle) < 100
        data[:100] = header_pickle + b"\0" * (100 - len(header_pickle))
        header = bytearray(data[:512])
        _tar_checksum(header)
        data[:512] = header
    return bytes(data)


# -- valid companions -------------------------------------------------------------------------
def write_valid(path: Path, prefix: str = "a.", classes: int = 10) -> Path:
    """A small valid state dict (conv features + ``fc`` head) saved with torch.save.

    Example:
        >>> write_valid(tmp_path / "src.pth")               # doctest: +SKIP
    """
    import torch

    g = torch.Generator().manual_seed(0)
    sd = {
        "features.0.weight": torch.randn(4, 3, 3, 3, generator=g),
        "features.0.bias": torch.randn(4, generator=g),
        "fc.weight": torch.randn(classes, 4, generator=g),
        "fc.bias": torch.randn(classes, generator=g),
    }
    torch.save({prefix + k: v for k, v in sd.items()}, path)
    return path


def fingerprint(path: Path) -> object:
    """What an input is, byte for byte: file hashes, link targets, folder contents."""
    import hashlib

    if os.path.islink(path):
        return ("link", os.readlink(path))
    if path.is_dir():
        return ("dir", sorted((p.name, fingerprint(p)) for p in path.iterdir()))
    if path.is_fifo():
        return ("fifo",)
    return ("file", hashlib.sha256(path.read_bytes()).hexdigest())


# -- bounded work: pickles whose hashing, printing or walking would never end (issue 13) ---------
def deep_tuple(depth: int) -> bytes:
    """A tuple nested ``depth`` deep: ``((((),),),)`` (one TUPLE1 per level)."""
    return b")" + b"\x85" * depth


def dag(levels: int = 40) -> bytes:
    """``x = ()``, then ``levels`` times ``x = (x, x)``: 6 bytes a level, 2**levels paths. Uses memo
    slots 0..levels; leaves x on the stack."""
    out = b")q\x000"
    for i in range(levels):
        out += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
    return out + b"h" + bytes([levels])


def big_int(digits: int = 5000) -> bytes:
    """LONG4: an integer of ``digits`` decimal digits (beyond Python's int-to-str limit)."""
    value = 10 ** (digits - 1)
    raw = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
    return b"\x8b" + struct.pack("<i", len(raw)) + raw


def _tensor_with_size(size: bytes) -> bytes:
    persid = tup(s("storage"), glob("torch", "FloatStorage"), s("0"), s("cpu"), n(4)) + b"Q"
    hooks = call(glob("collections", "OrderedDict"))
    return call(glob("torch._utils", "_rebuild_tensor_v2"), persid, n(0), size, tup(n(1)), b"\x89", hooks)


def bounds_payloads() -> dict[str, tuple[bytes, str]]:
    """Expressions (inside a state dict beside a real tensor) that each used to crash, hang or end in
    an internal error; with the text the refusal must hold."""
    ordered = glob("collections", "OrderedDict")
    return {
        "set_of_deep_tuple": (call(glob("builtins", "set"), b"]" + deep_tuple(1_000_000) + b"a"), "nests"),
        "dag_set": (call(glob("builtins", "set"), b"]" + dag() + b"a"), "nests"),
        "dag_frozenset": (call(glob("builtins", "frozenset"), b"]" + dag() + b"a"), "nests"),
        "dag_frozenset_opcode": (b"(" + dag() + b"\x91", "nests"),
        "dag_ordereddict": (call(ordered, b"](" + dag() + n(1) + b"ta"), "nests"),
        "dag_counter": (call(glob("collections", "Counter"), b"]" + dag() + b"a"), "nests"),
        "dag_newobj_ex_kwargs": (ordered + b")](" + dag() + n(1) + b"ta\x92", "keyword"),
        "dag_persistent_id": (dag() + b"Q", "persistent id"),
        "dag_tensor_size": (_tensor_with_size(dag()), "size"),
        "dag_torch_device": (call(glob("torch", "device"), dag()), "torch.device"),
        "dag_error_message": (dag() + b")R", "call to"),
        "int_5000_digits_size": (_tensor_with_size(b"(" + big_int() + b"t"), "size"),
        "int_5000_digits_key": (b"}" + big_int() + n(1) + b"s", "integer of"),
        "deep_torch_device": (call(glob("torch", "device"), deep_tuple(100_000)), "torch.device"),
        "deep_list": (_deep_list(100_000), "nested more than"),
        "build_shadows_items": (call(ordered) + b"}" + s("items") + n(1) + b"sb", "items"),
        "build_on_class": (
            glob("pathlib", "Path")
            + b"N}"
            + s("is_relative_to")
            + glob("pathlib", "PurePosixPath")
            + b"s\x86b",
            "class",
        ),
    }


def _deep_list(depth: int) -> bytes:
    """A list nested ``depth`` deep, built inside out with APPEND."""
    return b"]" + b"]" * (depth - 1) + b"a" * (depth - 1)


def _pickle_bounds(b: _Builder) -> None:
    for name, (expr, fragment) in bounds_payloads().items():
        pkl = state_dict_pickle(("a.weight", tensor_expr()), ("x", expr), proto=4)
        b.add(f"pb_{name}", None if b.dry else torch_zip_bytes(pkl), "bounds", fragment=fragment)
    attack = (
        glob("pathlib", "Path") + b"N}" + s("is_relative_to") + glob("pathlib", "PurePosixPath") + b"s\x86b0"
    )
    b.add(
        "pb_dcp_metadata_build_on_path_class",
        lambda p: _dcp_folder(p, b"\x80\x02" + attack + b"}."),
        "bounds",
        suffix="",
        fragment="class",
    )
    b.add(
        "pb_dcp_metadata_dag_set",
        lambda p: _dcp_folder(p, b"\x80\x02" + call(glob("builtins", "set"), b"]" + dag() + b"a") + b"."),
        "bounds",
        suffix="",
        fragment="nests",
    )
