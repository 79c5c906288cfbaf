"""The benchmark script runs end to end on tiny inputs and prints every row (timings not checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
sys.path.insert(0, str(BENCH.parent))

from bench import OP_NAMES  # noqa: E402
from table import HEADERS  # noqa: E402


def test_bench_prints_every_operation(tmp_path: Path) -> None:
    markdown = tmp_path / "table.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--size",
            "2MiB",
            "--many",
            "40",
            "--repeat",
            "1",
            "--workdir",
            str(tmp_path),
            "--markdown",
            str(markdown),
        ],
        capture_output=True,
        text=True,
        timeout=600,  # a 2 MiB smoke run takes ~40 s; a loaded CI box can take several times that
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("2MiB fp32 (")
    assert lines[1].split() == " ".join(HEADERS).split()
    rows = {line.split()[0]: line for line in lines[3:]}
    assert list(rows) == list(OP_NAMES)
    for name, line in rows.items():
        assert line.rstrip().endswith(("PASS", "FAIL")), name
    for name in ("convert-pth", "convert-pth-noverify", "many-convert"):  # safetensors: same bytes
        assert "byte-identical" in rows[name], rows[name]
    for name in (
        "convert-st",
        "convert-cast",
        "rename",
        "strip-head",
        "adapt",
        "average",
        "merge-lora",
        "many-rename",
    ):
        assert "tensors equal" in rows[name], rows[name]
    assert "tensors equal" in rows["convert-dcp"], rows["convert-dcp"]
    assert "byte-identical (" in rows["shards-parallel"], rows["shards-parallel"]
    assert "imports none of torch/numpy/tabulate" in rows["help"]
    table = markdown.read_text().splitlines()
    assert len([line for line in table if line.startswith("| ")]) == len(OP_NAMES) + 1
    assert list(tmp_path.iterdir()) == [markdown]  # the generated files are deleted


def test_bench_only_ours(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--size",
            "1MiB",
            "--repeat",
            "1",
            "--no-baseline",
            "--ops",
            "convert-st,inspect-st",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[3:]}
    assert list(rows) == ["inspect-st", "convert-st"]
    assert rows["convert-st"][3:6] == ["-", "-", "-"]  # no recipe, no speed-up
    assert list(tmp_path.iterdir()) == []


def test_bench_refuses_unknown_operation() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--ops", "teleport"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "unknown operation(s) teleport" in proc.stderr
