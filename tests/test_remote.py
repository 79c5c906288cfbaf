"""Remote checkpoints: header-only inspect/diff over loopback HTTP and S3 (moto), counted bytes,
results equal to the local ones, a Range-ignoring server refused, remote sources written locally."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES, REAL, assert_one_line_error, run_cli

sys.path.insert(0, str(Path(__file__).parent))
from rangeserver import serve

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

GIB = 1 << 30
MIB = 1 << 20


def run(*args: str) -> Any:
    return run_cli(*args)


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], sparse: bool = True) -> None:
    """A safetensors file of zeros (a sparse file: its data is a hole), from (dtype, shape)."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        if sparse:
            fh.truncate(8 + len(raw) + offset)
        else:
            fh.write(bytes(offset))


def _strip(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k not in ("path", "files", "remote")}


def _inspect_json(path: str) -> dict[str, Any]:
    result = run("inspect", path, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def served(tmp_path: Path) -> Any:
    folder = tmp_path / "srv"
    folder.mkdir()
    server, counters = serve(str(folder))
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield folder, base, counters
    server.shutdown()
    server.server_close()


def test_inspect_1gib_safetensors_reads_headers_only(served: Any) -> None:
    folder, base, counters = served
    tensors = {f"layers.{i}.weight": ("F32", [4096, 4096]) for i in range(16)}
    _safetensors(folder / "big.safetensors", tensors)
    assert (folder / "big.safetensors").stat().st_size >= GIB
    remote = _inspect_json(f"{base}/big.safetensors")
    assert counters.bytes_sent < MIB
    assert remote["remote"]["bytes_read"] < MIB and remote["remote"]["headers_only"] is True
    assert remote["remote"]["bytes_read"] <= counters.bytes_sent
    assert remote["path"] == f"{base}/big.safetensors"
    assert _strip(remote) == _strip(_inspect_json(str(folder / "big.safetensors")))


@pytest.mark.slow
def test_inspect_1gib_pth_reads_directory_and_pickle_only(served: Any) -> None:
    torch = pytest.importorskip("torch")
    folder, base, counters = served
    torch.save({"a": torch.zeros(GIB // 4 - MIB), "b": torch.zeros(MIB), "n": 3}, folder / "big.pth")
    remote = _inspect_json(f"{base}/big.pth")
    assert counters.bytes_sent < MIB
    assert remote["remote"]["bytes_read"] < MIB
    assert _strip(remote) == _strip(_inspect_json(str(folder / "big.pth")))


def test_inspect_and_diff_of_fixture_pth_equal_local(served: Any) -> None:
    folder, base, _ = served
    src = FIXTURES / "resnet_dp_6.pth"
    (folder / src.name).write_bytes(src.read_bytes())
    assert _strip(_inspect_json(f"{base}/{src.name}")) == _strip(_inspect_json(str(src)))
    target = f"{FIXTURES}/models.py:resnet_like(num_classes=2)"
    remote = run("diff", f"{base}/{src.name}", target, "--format", "json")
    local = run("diff", str(src), target, "--format", "json")
    assert remote.exit_code == local.exit_code == 1
    remote_doc, local_doc = json.loads(remote.stdout), json.loads(local.stdout)
    assert remote_doc.pop("remote")["requests"] >= 1
    assert json.dumps(remote_doc).replace(f"{base}/{src.name}", str(src)) == json.dumps(local_doc)
    text = run("diff", f"{base}/{src.name}", target)
    assert "range requests (headers only)" in text.stdout


def test_range_ignoring_server_is_refused(tmp_path: Path) -> None:
    _safetensors(tmp_path / "m.safetensors", {"w": ("F32", [4096, 1024])}, sparse=False)
    server, counters = serve(str(tmp_path), honour_range=False)
    try:
        result = run("inspect", f"http://127.0.0.1:{server.server_address[1]}/m.safetensors")
    finally:
        server.shutdown()
        server.server_close()
    assert_one_line_error(result, "ignores HTTP Range")
    assert counters.bytes_sent < 16 * MIB  # stopped early, never the whole 16 MiB


def _shards(folder: Path, count: int = 10) -> None:
    weight_map = {}
    for i in range(count):
        name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        _safetensors(folder / name, {f"{i}.weight": ("F32", [256, 256]), f"{i}.bias": ("F32", [256])})
        weight_map.update({f"{i}.weight": name, f"{i}.bias": name})
    index = {"metadata": {"total_size": count * (256 * 256 + 256) * 4}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "models.py").write_text(
        "import torch\n\n\ndef stack(n):\n"
        "    return torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(n)])\n"
    )


def test_diff_of_remote_ten_shards_reads_headers_only(served: Any) -> None:
    pytest.importorskip("torch")
    folder, base, _ = served
    _shards(folder)
    target = f"{folder / 'models.py'}:stack(10)"
    result = run("diff", f"{base}/model.safetensors.index.json", target, "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    headers = sum(8 + struct.unpack("<Q", p.read_bytes()[:8])[0] for p in folder.glob("*.safetensors"))
    index = (folder / "model.safetensors.index.json").stat().st_size
    # each shard: its header (plus, at most, the rest of a first 8 KiB read); never a tensor whole
    assert doc["remote"]["bytes_read"] <= index + 10 * max(8 << 10, headers // 10) + 10
    assert doc["remote"]["bytes_read"] < 10 * 256 * 256 * 4 // 4
    assert doc["status"] == "ok"
    local = json.loads(
        run("diff", str(folder / "model.safetensors.index.json"), target, "--format", "json").stdout
    )
    assert doc["matched"] == local["matched"] and doc["summary"] == local["summary"]
    remote_inspect = _inspect_json(f"{base}/model.safetensors.index.json")
    assert _strip(remote_inspect) == _strip(_inspect_json(str(folder / "model.safetensors.index.json")))


def test_remote_convert_streams_and_verifies(served: Any, tmp_path: Path) -> None:
    folder, base, _ = served
    src = REAL / "hf_gpt2_tiny" / "model.safetensors"
    (folder / "m.safetensors").write_bytes(src.read_bytes())
    out_remote, out_local = tmp_path / "remote.safetensors", tmp_path / "local.safetensors"
    result = run("convert", f"{base}/m.safetensors", "-o", str(out_remote), "--dtype", "bf16")
    assert result.exit_code == 0, result.stderr
    assert run("convert", str(src), "-o", str(out_local), "--dtype", "bf16").exit_code == 0
    assert out_remote.read_bytes() == out_local.read_bytes()


def test_dropped_connection_leaves_no_output(served: Any, tmp_path: Path) -> None:
    folder, base, counters = served
    src = FIXTURES / "resnet_dp_6.pth"
    (folder / src.name).write_bytes(src.read_bytes())
    counters.drop_after = 50_000
    out = tmp_path / "out.safetensors"
    result = run("convert", f"{base}/{src.name}", "-o", str(out))
    assert_one_line_error(result, "connection failed", "nothing was written")
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_header_only_mirror_refuses_tensor_reads(served: Any) -> None:
    from ckptsurgeon.errors import CkptError
    from ckptsurgeon.formats import ReadOptions, open_checkpoint

    folder, base, _ = served
    _safetensors(folder / "m.safetensors", {"w": ("F32", [64, 64])}, sparse=False)
    ckpt = open_checkpoint(f"{base}/m.safetensors", ReadOptions(headers_only=True))
    record = ckpt.weights().tensors["w"]
    with pytest.raises(CkptError, match="header-only"):
        record.read_bytes()


def test_without_fsspec_one_line_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)
    result = run("inspect", "https://example.invalid/model.safetensors")
    assert_one_line_error(result, "pip install 'ckptsurgeon[remote]'")


# -- S3 through moto's standalone server ------------------------------------------------------------
@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    import fsspec
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint})
    if not fs.exists("ckpts"):  # moto's backend outlives one server in this process
        fs.mkdir("ckpts")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_s3_inspect_safetensors_pth_and_sharded_prefix(s3: Any, tmp_path: Path) -> None:
    big = tmp_path / "big.safetensors"
    _safetensors(big, {f"l.{i}": ("BF16", [2048, 2048]) for i in range(4)}, sparse=False)
    s3.put(str(big), "ckpts/big.safetensors")
    s3.put(str(FIXTURES / "resnet_dp_6.pth"), "ckpts/resnet.pth")
    remote = _inspect_json("s3://ckpts/big.safetensors")
    assert remote["remote"]["bytes_read"] < MIB
    assert _strip(remote) == _strip(_inspect_json(str(big)))
    assert _strip(_inspect_json("s3://ckpts/resnet.pth")) == _strip(
        _inspect_json(str(FIXTURES / "resnet_dp_6.pth"))
    )
    shards = tmp_path / "shards"
    shards.mkdir()
    _shards(shards, 3)
    for p in shards.iterdir():
        s3.put(str(p), f"ckpts/sharded/{p.name}")
    folder = _inspect_json("s3://ckpts/sharded")
    assert folder["remote"]["bytes_read"] < 3 * (16 << 10) + 4096
    assert _strip(folder) == _strip(_inspect_json(str(shards)))


def test_s3_dcp_folder_reads_metadata_only(s3: Any, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step_1"
    state = {"model": {"w": torch.zeros(512, 512), "b": torch.ones(512)}, "step": 3}
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    for p in folder.iterdir():
        s3.put(str(p), f"ckpts/step_1/{p.name}")
    remote = _inspect_json("s3://ckpts/step_1")
    metadata = (folder / ".metadata").stat().st_size
    assert remote["remote"]["bytes_read"] == metadata
    assert _strip(remote) == _strip(_inspect_json(str(folder)))
    target = json.dumps(_inspect_json(str(folder)))
    (tmp_path / "target.json").write_text(target)
    result = run("diff", "s3://ckpts/step_1", str(tmp_path / "target.json"), "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["remote"]["bytes_read"] == metadata


def test_remote_rename_and_remote_diff_target(served: Any, tmp_path: Path) -> None:
    folder, base, _ = served
    src = FIXTURES / "resnet_dp_6.pth"
    (folder / src.name).write_bytes(src.read_bytes())
    (tmp_path / "r").mkdir()
    (tmp_path / "l").mkdir()
    out_remote, out_local = tmp_path / "r" / "m.pth", tmp_path / "l" / "m.pth"  # the archive names its file
    result = run("rename", f"{base}/{src.name}", "--strip-prefix", "module.", "-o", str(out_remote))
    assert result.exit_code == 0, result.stderr
    assert run("rename", str(src), "--strip-prefix", "module.", "-o", str(out_local)).exit_code == 0
    assert out_remote.read_bytes() == out_local.read_bytes()
    remote = run("diff", str(out_local), f"{base}/{src.name}", "--format", "json")
    local = run("diff", str(out_local), str(src), "--format", "json")
    assert remote.exit_code == local.exit_code
    remote_doc, local_doc = json.loads(remote.stdout), json.loads(local.stdout)
    assert remote_doc["summary"] == local_doc["summary"] and remote_doc["matched"] == local_doc["matched"]


def test_scan_of_a_url_says_to_download_first() -> None:
    result = run("scan", "http://127.0.0.1:9/model.pth")
    assert_one_line_error(result, "http://127.0.0.1:9/model.pth", "download it first")


def test_an_http_folder_url_says_http_cannot_list(served: Any) -> None:
    folder, base, counters = served
    _safetensors(folder / "m.safetensors", {"w": ("F32", [4])}, sparse=False)
    result = run("inspect", f"{base}/")
    assert_one_line_error(result, "cannot list a folder", "index.json")
    assert counters.gets == 0


def test_a_safetensors_header_length_over_the_cap_is_refused_before_it_is_fetched(served: Any) -> None:
    """A header claiming 150 MB (over the 100 MB cap) in a 200 MB file: refused from its 8 bytes,
    never fetched (it was: 150 MB downloaded, then refused)."""
    folder, base, counters = served
    with open(folder / "liar.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", 150_000_000) + b'{"a": 1}')
        fh.truncate(200_000_000)
    result = run("inspect", f"{base}/liar.safetensors")
    assert_one_line_error(result, "exceeds the 100000000-byte limit")
    assert counters.bytes_sent < MIB


def test_credentials_in_a_url_are_never_printed(served: Any) -> None:
    folder, base, _ = served
    src = FIXTURES / "resnet_dp_6.pth"
    (folder / src.name).write_bytes(src.read_bytes())
    (folder / "bad.safetensors").write_bytes(struct.pack("<Q", 2) + b"{x")
    secret = base.replace("http://", "http://someone:s3cret@")
    for name in ("missing.safetensors", "bad.safetensors"):
        result = run("inspect", f"{secret}/{name}")
        assert_one_line_error(result, name)
        assert "s3cret" not in result.stderr
    from ckptsurgeon.fileio.remote import redact

    assert (
        redact("see https://u:p@ss@host/a@b and s3://k:s@bucket/x")
        == "see https://***@host/a@b and s3://***@bucket/x"
    )
    shown = run("inspect", f"{secret}/{src.name}", "--format", "json")
    assert shown.exit_code == 0 and "s3cret" not in shown.stdout + shown.stderr


def test_a_server_that_never_answers_times_out_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts the connection and then says nothing: aiohttp's default waits 5 minutes
    (and cuts any request longer than that, a 64 MiB range on a slow link too); a read that stalls
    for READ_TIMEOUT seconds is what fails."""
    import socket
    import threading
    import time

    from ckptsurgeon.fileio import remote

    monkeypatch.setattr(remote, "READ_TIMEOUT", 1.0)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        started = time.monotonic()
        result = run("inspect", f"http://127.0.0.1:{listener.getsockname()[1]}/m.safetensors")
        assert time.monotonic() - started < 30
    finally:
        listener.close()
        for conn in held:
            conn.close()
    assert_one_line_error(result, "m.safetensors", "cannot be reached")


def test_an_unreachable_server_is_not_called_a_missing_file(served: Any) -> None:
    """fsspec's HTTP info() raises FileNotFoundError for every failure; only a 404 is a missing file."""
    import socket

    _, base, _ = served
    assert_one_line_error(run("inspect", f"{base}/none.safetensors"), "no such remote file")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    assert_one_line_error(run("inspect", f"http://127.0.0.1:{port}/m.safetensors"), "cannot be reached")
