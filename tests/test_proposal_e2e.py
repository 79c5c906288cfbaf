"""End to end (issue 17, "What it must show"): propose a mapping with `ckpt diff --propose-map`, confirm
what the proposal asks a person to confirm by editing the file as a user would, apply it, load the
result with strict ``load_state_dict`` and compare the outputs with the original model's on a fixed
input; then the reverse direction with the same file.

The models: torchvision's and timm's Vision Transformers and Meta's Llama re-implemented with their
exact names, order and math (tests/reimplementations.py: torchvision and timm cannot be installed
here); Hugging Face's GPT-2 and Llama from transformers itself; GPT-2 with ``nn.Linear`` in nanoGPT's
layout. The reference for each conversion is the real network's output, not our numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import run_cli  # noqa: E402
from reimplementations import MetaLlama, NanoGPT, TimmViT, TorchvisionViT  # noqa: E402

ATOL = 1e-5


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn anew (std 0.3): no zero-initialised token or bias hides a wrong pair."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def save(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def propose(src: Path, target: Path, tmp_path: Path, name: str = "map.toml") -> tuple[Path, str, int]:
    out = tmp_path / name
    result = run_cli("diff", src, target, "--propose-map", out)
    assert result.exception is None, result.exception
    assert out.is_file(), result.stdout + result.stderr
    return out, result.stdout, result.exit_code


def ambiguous_targets(text: str) -> list[str]:
    """The target of every rule the file marks ambiguous (what a reviewer reads)."""
    return AMBIGUOUS_RULE.findall(text)


AMBIGUOUS_RULE = re.compile(r"status = \"ambiguous\"")


def outputs_equal(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, call: Callable | None = None) -> float:
    call = call or (lambda m, inp: m(inp))
    with torch.no_grad():
        diff = (call(a, x) - call(b, x)).abs().max().item()
    return float(diff)
