"""Shard paths in a sharded index are resolved and de-duplicated before any shard is opened.

An index may spell one shard file many ways (``a.safetensors``, ``./a.safetensors``,
``.//./a.safetensors``, a link to it inside the folder): each distinct file's header is parsed
once, however many spellings and tensors map to it (the red-team index mapped 1000 tensors to
1000 spellings of one path: 1000 header parses).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckptsurgeon.formats import open_checkpoint
from ckptsurgeon.formats import safetensors as st

N = 1000


def spelling(i: int) -> str:
    """The i-th of N distinct spellings of ``model.safetensors``."""
    return "./" * (i % 40) + "." + "/" * (1 + i // 40) + "model.safetensors"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {f"t{i}": torch.full((2,), float(i)) for i in range(N)}
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "link.safetensors").symlink_to("model.safetensors")
    weight_map = {f"t{i}": spelling(i) for i in range(N)} | {"t0": "link.safetensors"}
    assert len(set(weight_map.values())) == N
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return tmp_path


def test_each_shard_file_is_parsed_once(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[Path] = []
    real_read_header = st._read_header

    def spy(path: Path, size: int) -> tuple[int, bytes]:
        parsed.append(path)
        return real_read_header(path, size)

    monkeypatch.setattr(st, "_read_header", spy)
    ckpt = open_checkpoint(folder)
    assert len(parsed) == 1, f"{len(parsed)} header parses for one shard file"
    assert len(ckpt.files) == 1
    tensors = ckpt.weights().tensors
    assert sorted(tensors) == sorted(f"t{i}" for i in range(N))


def test_every_spelling_reads_the_right_tensor(folder: Path) -> None:
    """Against the reference: the bytes each name resolves to are what safetensors loads for it."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    reference = safetensors_torch.load_file(folder / "model.safetensors")
    tensors = open_checkpoint(folder).weights().tensors
    for name in ("t0", "t1", "t41", f"t{N - 1}"):
        assert tensors[name].storage.read() == reference[name].numpy().tobytes(), name


def test_a_spelling_that_leaves_the_folder_is_still_refused(folder: Path) -> None:
    from ckptsurgeon.errors import FormatError

    index = folder / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"]["t5"] = f"./../{folder.name}/model.safetensors"
    index.write_text(json.dumps(raw))
    with pytest.raises(FormatError, match="points outside the index's folder"):
        open_checkpoint(folder)
