"""Start-up of `ckpt inspect` on a .safetensors file: nothing beyond what the header needs is imported.

The probe compares ``sys.modules`` before and after the command in one process, so a module that
the interpreter's own start-up (``site``, ``.pth`` files) already imported never counts against us.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REAL, REPO

PROBE = """
import json, sys
before = set(sys.modules)
from ckptsurgeon.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("NEW:" + json.dumps(sorted(set(sys.modules) - before)), file=sys.stderr)
"""

# zipfile drags in shutil, bz2 and lzma; importlib.metadata (tabulate >= 0.10 imports it) drags in
# email, csv and zipfile; hashlib is only for --hash. None of them is needed for a header.
NOT_NEEDED = ("torch", "numpy", "safetensors", "tabulate", "importlib.metadata", "zipfile", "hashlib")


def new_modules(*args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    lines = [x for x in result.stderr.splitlines() if x.startswith("NEW:")]
    assert lines, result.stderr
    assert result.stdout.startswith("{"), result.stdout[:200]
    return json.loads(lines[-1].removeprefix("NEW:"))


def test_inspect_safetensors_json_imports_only_what_the_header_needs() -> None:
    new = new_modules("inspect", str(REAL / "hf_gpt2_tiny" / "model.safetensors"), "--format", "json")
    assert "ckptsurgeon.formats.safetensors" in new  # the probe did run the reader
    assert [m for m in NOT_NEEDED if m in new] == []


def test_inspect_sharded_folder_imports_no_writer(tmp_path) -> None:
    import safetensors.torch
    import torch

    from ckptsurgeon.core.record import TensorRecord
    from ckptsurgeon.formats import shardwriter

    tensors = {f"layer.{i}.weight": torch.full((64,), float(i)) for i in range(6)}
    shardwriter.write(
        {k: TensorRecord.from_torch(k, v) for k, v in tensors.items()}, tmp_path / "m", max_shard_bytes=600
    )
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 1
    new = new_modules("inspect", str(tmp_path / "m"), "--format", "json")
    assert "ckptsurgeon.formats.sharded" in new  # the probe did read the folder
    writer = ("ckptsurgeon.formats.shardwriter", "ckptsurgeon.fileio.writing", "tempfile", "decimal")
    assert [m for m in (*NOT_NEEDED, *writer) if m in new] == []
    assert safetensors.torch.load_file(next((tmp_path / "m").glob("*.safetensors")))  # a real shard
