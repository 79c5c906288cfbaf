"""Synthetic checkpoints for the benchmark: transformer-shaped fp32 state dicts of any size.

The ``.safetensors`` file is written directly (header + data streamed from one random block,
so generating 10 GiB needs no 10 GiB of memory); the ``.pth`` is then made by the plain
``torch.save`` of tensors memory-mapped from it, so it is exactly what users' files look like.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

BLOCK_BYTES = 16 * 2**20
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
}

MODELS_PY = '''"""The benchmark's architecture: state_dict names are the synthetic file's, minus module."""
from torch import nn


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.ModuleDict({p: nn.Linear(dim, dim) for p in ("q", "k", "v", "o")})
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim)})


class Net(nn.Module):
    def __init__(self, dim, layers, vocab, head):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, head, bias=False)


def build(dim=256, layers=2, vocab=4096, head=4096):
    return Net(dim, layers, vocab, head)
'''


@dataclass(frozen=True)
class Arch:
    """The transformer behind a synthetic checkpoint."""

    dim: int
    layers: int
    vocab: int

    def call(self, models_py: Path, head: int) -> str:
        """The architecture spec ``ckpt diff``/``adapt`` take, with another head size."""
        return f"{models_py}:build(dim={self.dim}, layers={self.layers}, vocab={self.vocab}, head={head})"


def parse_size(text: str) -> int:
    """``2GiB`` -> 2147483648.

    Example:
        >>> parse_size("16MiB")
        16777216
    """
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"size {text!r}: use e.g. 16MiB, 2GiB, 500MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def transformer_arch(total_bytes: int) -> Arch:
    """Width, depth and vocabulary giving about ``total_bytes`` of fp32 parameters.

    Example:
        >>> transformer_arch(2 * 2**30)
        Arch(dim=2048, layers=8, vocab=32768)
    """
    dim = 128
    while dim < 4096 and 12 * (2 * dim) ** 2 * 4 * 4 <= total_bytes:
        dim *= 2
    vocab = 16 * dim
    layer = 12 * dim * dim * 4
    layers = max(1, round((total_bytes - 2 * vocab * dim * 4) / layer))
    return Arch(dim, layers, vocab)


def transformer_shapes(arch: Arch) -> list[tuple[str, tuple[int, ...]]]:
    """``module.``-prefixed names (saved from DataParallel) and shapes, in module order."""
    d = arch.dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("module.embed.weight", (arch.vocab, d))]
    for i in range(arch.layers):
        p = f"module.layers.{i}."
        shapes += [(p + "ln1.weight", (d,)), (p + "ln1.bias", (d,))]
        for q in ("q", "k", "v", "o"):
            shapes += [(f"{p}attn.{q}.weight", (d, d)), (f"{p}attn.{q}.bias", (d,))]
        shapes += [(p + "ln2.weight", (d,)), (p + "ln2.bias", (d,))]
        shapes += [(p + "mlp.fc1.weight", (4 * d, d)), (p + "mlp.fc1.bias", (4 * d,))]
        shapes += [(p + "mlp.fc2.weight", (d, 4 * d)), (p + "mlp.fc2.bias", (d,))]
    shapes += [("module.norm.weight", (d,)), ("module.norm.bias", (d,))]
    shapes.append(("module.lm_head.weight", (arch.vocab, d)))
    return shapes


def many_shapes(count: int) -> list[tuple[str, tuple[int, ...]]]:
    """``count`` small tensors (a weight and a bias per module), ``module.``-prefixed."""
    return [
        (f"module.blocks.{i // 2}.{'weight' if i % 2 == 0 else 'bias'}", (16, 8) if i % 2 == 0 else (16,))
        for i in range(count)
    ]


def _nbytes(shape: tuple[int, ...]) -> int:
    n = 4
    for dim in shape:
        n *= dim
    return n


def write_safetensors(path: Path, shapes: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> None:
    """Stream an fp32 safetensors file of normal(0, 0.02) data (no whole tensor in memory)."""
    import numpy as np

    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in shapes:
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + _nbytes(shape)]}
        pos += _nbytes(shape)
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    block = memoryview((np.random.default_rng(seed).standard_normal(BLOCK_BYTES // 4) * 0.02).astype("<f4"))
    block = block.cast("B")
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(body)) + body)
        for index, (_name, shape) in enumerate(shapes):
            remaining, start = _nbytes(shape), (index * 4096 * 7) % BLOCK_BYTES
            while remaining:
                chunk = block[start : start + remaining]
                fh.write(chunk)
                remaining -= len(chunk)
                start = 0


def mapped_state_dict(st_path: Path) -> dict[str, object]:
    """The tensors of a safetensors file as torch tensors mapped from it (copy-on-write)."""
    import numpy as np
    import torch

    mm = np.memmap(st_path, dtype=np.uint8, mode="c")
    (n,) = struct.unpack("<Q", bytes(mm[:8]))
    header = json.loads(bytes(mm[8 : 8 + n]))
    header.pop("__metadata__", None)
    base = 8 + n
    out: dict[str, object] = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        array = mm[base + begin : base + end].view(np.float32).reshape(entry["shape"])
        out[name] = torch.from_numpy(array)
    return out


def write_pth(st_path: Path, pth_path: Path) -> None:
    """``torch.save`` the tensors of ``st_path`` (the plain recipe's own file format)."""
    import torch

    torch.save(mapped_state_dict(st_path), pth_path)


def write_shards(folder: Path, shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> None:
    """A Hugging Face-style sharded folder: ``model-0000i-of-0000n.safetensors`` + index."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for item in shapes:
        if groups[-1] and size + _nbytes(item[1]) > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += _nbytes(item[1])
    folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(folder / name, group, seed=i)
        weight_map.update((tensor, name) for tensor, _ in group)
    index = {"metadata": {"total_size": sum(_nbytes(s) for _, s in shapes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
