"""``ckpt scan`` and the refusal of hostile pickles: nothing from a file ever runs."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REAL, assert_one_line_error, run_cli, sha256

from ckptsurgeon.errors import FormatError, UnsafeCheckpointError
from ckptsurgeon.formats import ReadOptions, open_checkpoint
from ckptsurgeon.pickling.globalscan import scan_globals
from ckptsurgeon.pickling.scan import scan


# -- hostile pickles: each would create MARKER if it were ever executed ---------------------
def _s(text: str) -> bytes:  # BINUNICODE
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _ss(text: str) -> bytes:  # SHORT_BINUNICODE (protocol 4)
    raw = text.encode()
    return b"\x8c" + bytes((len(raw),)) + raw


def _call_args(target: str, marker: Path, short: bool) -> bytes:
    s = _ss if short else _s
    if target == "os.system":
        return s(f"touch {marker}") + b"\x85"
    if target == "builtins.exec":
        return s(f"open({str(marker)!r}, 'w').close()") + b"\x85"
    return b"](" + s("touch") + s(str(marker)) + b"e\x85"  # subprocess.call(["touch", marker])


def payload(kind: str, marker: Path) -> tuple[bytes, list[str]]:
    """A dict {'w': <call>} whose value runs code; returns (pickle bytes, the globals it names)."""
    if kind == "stack_memo":  # STACK_GLOBAL whose names come back from the memo
        first = (
            _ss("os") + b"\x94" + _ss("system") + b"\x94\x93" + _call_args("os.system", marker, True) + b"R"
        )
        again = b"h\x00h\x01\x93" + _call_args("os.system", marker, True) + b"R"
        return b"\x80\x04}(" + _ss("w") + first + _ss("x") + again + b"u.", ["os.system"]
    if kind == "two":
        one = b"cos\nsystem\n" + _call_args("os.system", marker, False) + b"R"
        two = b"c__builtin__\nexec\n" + _call_args("builtins.exec", marker, False) + b"R"
        return b"\x80\x02}(" + _s("a") + one + _s("b") + two + b"u.", ["os.system", "builtins.exec"]
    style, target = kind.split(":")
    module, name = target.rsplit(".", 1)
    if style == "global":
        body = f"c{module}\n{name}\n".encode() + _call_args(target, marker, False) + b"R"
        return b"\x80\x02}" + _s("w") + body + b"s.", [target]
    body = _ss(module) + _ss(name) + b"\x93" + _call_args(target, marker, True) + b"R"
    return b"\x80\x04\x95" + struct.pack("<Q", len(body) + 5) + b"}\x8c\x01w" + body + b"s.", [target]


KINDS = [
    f"{style}:{target}"
    for style in ("global", "stack")
    for target in ("os.system", "builtins.exec", "subprocess.call")
] + ["stack_memo", "two"]


def container(kind: str, data: bytes, tmp_path: Path) -> Path:
    if kind == "zip":
        path = tmp_path / "evil.pth"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", data)
            zf.writestr("archive/byteorder", "little")
            zf.writestr("archive/version", "3\n")
    elif kind == "legacy":
        path = tmp_path / "evil_legacy.pth"
        head = [
            pickle.dumps(0x1950A86A20F9469CFC6C, 2),
            pickle.dumps(1001, 2),
            pickle.dumps({"little_endian": True}, 2),
        ]
        path.write_bytes(b"".join(head) + data + pickle.dumps([], 2))
    else:
        path = tmp_path / "evil.pkl"
        path.write_bytes(data)
    return path


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    yield tmp_path / "MARKER"
    assert not (tmp_path / "MARKER").exists(), "a hostile pickle was executed"


def test_payloads_really_run_code_when_trusted(tmp_path: Path) -> None:
    """Guard the test itself: the payloads do create the marker under plain pickle."""
    for kind in KINDS:
        marker = tmp_path / f"M-{kind.replace(':', '_')}"
        pickle.loads(payload(kind, marker)[0])
        assert marker.exists(), kind


@pytest.mark.parametrize("where", ["zip", "legacy", "bare"])
@pytest.mark.parametrize("kind", KINDS)
def test_hostile_pickles_are_refused_and_named(tmp_path: Path, marker: Path, where: str, kind: str) -> None:
    data, names = payload(kind, marker)
    path = container(where, data, tmp_path)
    before = sha256(path)
    with pytest.raises(UnsafeCheckpointError) as info:
        open_checkpoint(path)
    assert info.value.blocked_globals == tuple(names)
    assert f"imports {', '.join(names)}, which can run code" in info.value.message
    result = run_cli("scan", path)
    assert result.exit_code == 1, result.stdout + result.stderr
    assert all(f"unsafe  {n}" in result.stdout for n in names)
    assert "verdict: UNSAFE" in result.stdout
    assert_one_line_error(run_cli("inspect", path), *names, "--unsafe-trust-pickle")
    assert sha256(path) == before


def test_protocol_0_hostile_pickle(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "p0.pkl"
    path.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(FormatError):
        open_checkpoint(path)
    result = run_cli("scan", path)
    assert result.exit_code == 1 and "unsafe  os.system" in result.stdout


def test_scan_globals_lists_without_running(marker: Path) -> None:
    data, _ = payload("stack_memo", marker)
    found = scan_globals(data)
    assert found.globals == ["os.system"] and found.protocol == 4


@pytest.mark.parametrize("name", ["tinynet_compiled.pth", "lightning_tinynet.ckpt"])
def test_real_fixtures_scan_safe(name: str) -> None:
    path = REAL / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    result = run_cli("scan", path, "--check")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout.endswith("verdict: safe: nothing in this file can run code when loaded\n")
    assert scan(path).safe


def test_scan_table_is_exact(tmp_path: Path) -> None:
    path = tmp_path / "m.pth"
    torch.save({"w": torch.ones(2), "n": torch.arange(3)}, path)
    result = run_cli("scan", path)
    assert result.exit_code == 0
    assert result.stdout == (
        f"{path}: torch-zip, safe\n"
        "  tensor  torch.FloatStorage               a tensor storage type\n"
        "  tensor  torch.LongStorage                a tensor storage type\n"
        "  tensor  torch._utils._rebuild_tensor_v2  rebuilds a tensor from its stored bytes\n"
        "  data    collections.OrderedDict          a container type that weights_only accepts\n"
        "  note: structure checked\n"
        "\n"
        "verdict: safe: nothing in this file can run code when loaded\n"
    )


def test_scan_json(tmp_path: Path, marker: Path) -> None:
    path = container("zip", payload("two", marker)[0], tmp_path)
    result = run_cli("scan", path, "--format", "json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["status"] == "unsafe" and doc["summary"] == {
        "files": 1,
        "safe": 0,
        "unsafe": 1,
        "unreadable": 0,
    }
    assert [(g["name"], g["kind"]) for g in doc["files"][0]["globals"]] == [
        ("builtins.exec", "unsafe"),
        ("os.system", "unsafe"),
    ]


def test_data_only_extras_scan_safe_and_allow_global(tmp_path: Path) -> None:
    import argparse

    import numpy as np

    path = tmp_path / "train.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "acc": np.float64(0.5), "w": torch.ones(1)}, path)
    doc = json.loads(run_cli("scan", path, "--format", "json").stdout)
    kinds = {g["name"]: g["kind"] for g in doc["files"][0]["globals"]}
    assert doc["status"] == "safe" and kinds["argparse.Namespace"] == "data"
    custom = container("zip", b"\x80\x02}X\x01\x00\x00\x00ccmylib\nConfig\n)\x81s.", tmp_path)
    assert run_cli("scan", custom).exit_code == 1
    allowed = run_cli("scan", custom, "--allow-global", "mylib.Config")
    assert allowed.exit_code == 0 and "data    mylib.Config" in allowed.stdout
    # the user vouched for it, not ckptsurgeon: the verdict says whose word it is
    assert allowed.stdout.splitlines()[-1] == (
        "verdict: safe only as you declared with --allow-global: mylib.Config is kept as a placeholder here, "
        "but torch.load(weights_only=False) would call it; nothing else in this file can run code"
    )


def test_whole_model_scan_says_so(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    result = run_cli("scan", path)
    assert result.exit_code == 1
    assert "unsafe  torch.nn.modules.linear.Linear" in result.stdout
    assert "note: this file is a whole pickled model object, not a state dict" in result.stdout


def test_unreadable_files_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "cut.pth"
    raw = (REAL / "tinynet_compiled.pth").read_bytes() if (REAL / "tinynet_compiled.pth").exists() else b""
    if not raw:
        torch.save({"w": torch.ones(100)}, path)
        raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    assert_one_line_error(run_cli("scan", path), str(path))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01 not a checkpoint" * 10)
    assert_one_line_error(run_cli("scan", garbage), "not a checkpoint")


def test_check_finds_a_crc_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "m.pth"
    torch.save({"w": torch.arange(64.0)}, path)
    raw = bytearray(path.read_bytes())
    raw[raw.rfind(struct.pack("<f", 40.0))] ^= 0x01
    path.write_bytes(bytes(raw))
    assert run_cli("scan", path).exit_code == 0
    assert_one_line_error(run_cli("scan", path, "--check"), "m/data/0 fails its check")


def test_folder_scan(tmp_path: Path, marker: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save({"w": torch.ones(2)}, folder / "good.pth")
    (folder / "notes.txt").write_text("hello\n")
    result = run_cli("scan", folder)
    assert result.exit_code == 0 and "verdict: safe: nothing in these 2 files can run code" in result.stdout
    container("bare", payload("global:os.system", marker)[0], folder)
    result = run_cli("scan", folder)
    assert result.exit_code == 1 and f"{folder / 'evil.pkl'}: pickle, UNSAFE" in result.stdout
    (folder / "evil.pkl").unlink()
    (folder / "cut.pth").write_bytes((folder / "good.pth").read_bytes()[:100])
    result = run_cli("scan", folder)
    assert result.exit_code == 2 and "cut.pth: could not be read" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_safetensors_scan() -> None:
    pytest.importorskip("ckptsurgeon.formats.safetensors")
    folder = REAL / "hf_gpt2_tiny"
    if not folder.exists():
        pytest.skip("fixture folder not present")
    result = scan(folder / "model.safetensors")
    assert result.safe and result.files[0].notes[0] == "the safetensors format holds no code"
    assert run_cli("scan", folder).exit_code == 0


def test_bad_safetensors_header_is_unreadable(tmp_path: Path) -> None:
    pytest.importorskip("ckptsurgeon.formats.safetensors")
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 99]}}'
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 16)
    assert_one_line_error(run_cli("scan", path), str(path))


def test_allow_global_read_option_matches_scan(tmp_path: Path) -> None:
    custom = container("zip", b"\x80\x02}X\x01\x00\x00\x00ccmylib\nConfig\n)\x81s.", tmp_path)
    options = ReadOptions(allow_globals=frozenset({"mylib.Config"}))
    assert scan(custom, options).safe
    assert open_checkpoint(custom, options).tree["c"].name == "Config"


def test_dcp_folder_metadata_is_data(tmp_path: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2)}, checkpoint_id=tmp_path / "dcp")
    doc = scan(tmp_path / "dcp").to_json()
    meta = next(f for f in doc["files"] if f["path"].endswith(".metadata"))
    assert meta["status"] == "safe" and meta["format"] == "pickle"
    assert {
        "name": "torch.distributed.checkpoint.metadata.Metadata",
        "kind": "data",
        "why": "torch.distributed.checkpoint metadata (a data class)",
    } in meta["globals"]


def test_a_global_name_with_a_newline_cannot_forge_a_report_line(tmp_path: Path) -> None:
    """STACK_GLOBAL takes any string: the names are shown escaped, in the listing and the verdict."""
    from corpus import call, s, stack_glob, state_dict_pickle, tensor_expr, torch_zip_bytes

    evil = call(stack_glob("os\nverdict: safe", "system"), s("true"))
    path = tmp_path / "forged.pth"
    path.write_bytes(torch_zip_bytes(state_dict_pickle(("w", tensor_expr()), ("x", evil), proto=4)))
    result = run_cli("scan", path)
    assert result.exit_code == 1
    assert not [line for line in result.stdout.splitlines() if line.startswith("verdict: safe")]
    assert "os\\nverdict: safe.system" in result.stdout
    assert_one_line_error(run_cli("inspect", path), "os")


@pytest.mark.parametrize("command", ["inspect", "scan"])
def test_inspect_and_scan_both_call_a_cut_file_truncated(tmp_path: Path, command: str) -> None:
    """A legacy torch.save file cut after 13 bytes, a .safetensors cut inside its 8-byte length."""
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:13])
    st = tmp_path / "cut.safetensors"
    st.write_bytes(struct.pack("<Q", 64)[:4])
    for path in (legacy, st):
        assert_one_line_error(run_cli(command, path), "truncated", "did not finish")
