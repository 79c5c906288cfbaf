"""Benchmark ``ckpt`` against the plain torch/safetensors recipes, side by side, as whole processes.

Generates transformer-shaped fp32 checkpoints (``.safetensors``, ``.pth``, a sharded folder,
a file of many small tensors) in a temporary folder, runs each ckptsurgeon command, its plain
recipe, ``cp`` of the same bytes and ``cp`` + ``sync`` of the copy alternately (``sync`` before
each, the input read through into the page cache before each, outputs removed after),
and prints medians of wall time and peak RSS, the ratios, whether the outputs are identical,
and each target from issue 5 with PASS/FAIL.

Example:
    .venv/bin/python benchmarks/bench.py          # defaults: 16 MiB, 2,000 small tensors, ~1 min
    .venv/bin/python benchmarks/bench.py --size 2GiB --many 20000 --repeat 3 --markdown benchmarks/table.md
    .venv/bin/python benchmarks/bench.py --size 10GiB --no-baseline --repeat 1 --ops rename,convert-st
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import recipes
import synth
from table import Row, render_markdown, render_text

TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
PY = sys.executable
HEAVY = ("torch", "numpy", "tabulate")
# a durable copy, as our writers make (they fsync): cp, then fsync the copy (coreutils sync FILE)
CP_SYNC = 'cp --reflink=never "$1" "$2" && sync "$2"'


@dataclass
class Op:
    """One row: our command, the plain recipe, and what to compare and check."""

    name: str
    ours: list[str]
    baseline: list[str] | None
    target: str  # "help" | "instant" | "listing" | "stream" | "cast" | "average" | "values" | "meta" | "many"
    # | "dcp" | "parallel"
    cp_src: Path | None = None
    outputs: tuple[Path, Path] | None = None  # (ours, baseline) to compare
    startup: list[str] | None = None  # "many": the same command on a one-tensor file


@dataclass
class Sample:
    walls: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)

    def add(self, wall: float, rss: float) -> None:
        self.walls.append(wall)
        self.rss.append(rss)

    @property
    def wall(self) -> float | None:
        return statistics.median(self.walls) if self.walls else None

    @property
    def best(self) -> float | None:
        return min(self.walls) if self.walls else None

    @property
    def mib(self) -> float | None:
        return statistics.median(self.rss) if self.rss else None


# -- running ---------------------------------------------------------------------------------
def measure(
    cmd: list[str], ok_codes: tuple[int, ...] = (0,), warm: Path | None = None
) -> tuple[float, float]:
    """Run ``cmd`` as a child process; return (wall seconds, peak RSS MiB).

    ``warm``: read this input through first (not timed), so every command starts with it in the
    page cache; this VM's memory reclaimer drops idle page cache within seconds, and a cold
    2 GiB read costs 1-3 s more, whoever runs first.
    """
    os.sync()  # every run starts with no dirty pages of earlier runs to write back
    if warm is not None:
        warm_up(warm)
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        full = [TIME, "-v", "-o", report.name, *cmd] if TIME else [PY, "-c", _RUSAGE, *cmd]
        start = time.perf_counter()
        proc = subprocess.run(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        text = report.read() if TIME else proc.stderr
    if proc.returncode not in ok_codes:
        raise SystemExit(f"bench: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    for line in text.splitlines():
        if "Maximum resident set size" in line or line.startswith("maxrss "):
            return wall, int(line.split()[-1]) / 1024
    raise SystemExit(f"bench: no peak RSS reported for {' '.join(cmd)}")


def warm_up(path: Path) -> None:
    """Read ``path`` through once (into the page cache), a block at a time."""
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


_RUSAGE = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print("maxrss", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def heavy_imports(cmd: list[str]) -> list[str]:
    """Which of torch / numpy / tabulate ``python -X importtime`` sees ``cmd`` import."""
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True)
    names = {
        line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")
    }
    return [m for m in HEAVY if m in names]


def compare(ours: Path, theirs: Path) -> str:
    """ "byte-identical" when the two files are; else load both outputs and compare every tensor
    bit for bit (a separate process). A .pth never is byte-identical: torch.save writes a random
    serialization id into each file."""
    if ours.is_file() and theirs.is_file() and filecmp.cmp(ours, theirs, shallow=False):
        return "byte-identical"
    if ours.is_dir() and theirs.is_dir() and not (ours / ".metadata").exists():  # two sharded sets
        names = sorted(p.name for p in ours.iterdir())
        same = names == sorted(p.name for p in theirs.iterdir()) and all(
            filecmp.cmp(ours / n, theirs / n, shallow=False) for n in names
        )
        return f"byte-identical ({len(names)} files)" if same else "DIFFERENT files"
    proc = subprocess.run([PY, "-c", recipes.COMPARE, str(ours), str(theirs)], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else f"DIFFERENT: {proc.stderr.strip()[-200:]}"


def remove(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_op(op: Op, repeat: int, with_baseline: bool) -> Row:
    """Measure one operation: ours, baseline and cp alternately, ``repeat`` times each."""
    ours, base, cp, cp_sync, startup = Sample(), Sample(), Sample(), Sample(), Sample()
    same = "-"
    ok = (0, 1) if op.target in ("meta", "values") else (0,)  # a diff exits 1 on a difference
    ours_out, base_out = op.outputs if op.outputs else (None, None)
    warm = op.cp_src
    for i in range(repeat):
        ours.add(*measure(op.ours, ok, warm))
        if with_baseline and op.baseline:
            base.add(*measure(op.baseline, warm=warm))
            if i == 0 and ours_out is not None and base_out is not None:
                same = compare(ours_out, base_out)
        remove(*(p for p in (ours_out, base_out) if p is not None))
        if op.cp_src is not None:
            copy = op.cp_src.with_name("cp-copy.bin")
            cp.add(*measure(["cp", "--reflink=never", str(op.cp_src), str(copy)], warm=warm))
            remove(copy)
            cp_sync.add(*measure(["sh", "-c", CP_SYNC, "cp", str(op.cp_src), str(copy)], warm=warm))
            remove(copy)
        if op.startup is not None:
            startup.add(*measure(op.startup))
            remove(*(p for p in (ours_out,) if p is not None))
    imports = heavy_imports(op.ours) if op.target in ("help", "instant", "listing", "remote") else None
    return Row(
        op.name,
        op.target,
        ours,
        base if base.walls else None,
        cp if cp.walls else None,
        cp_sync if cp_sync.walls else None,
        startup if startup.walls else None,
        same,
        imports,
    )


def serve_remote(files: Files) -> subprocess.Popen[str]:
    """Serve the work folder on loopback with Range (tests/rangeserver.py); set ``files.url``."""
    server_py = Path(__file__).resolve().parent.parent / "tests" / "rangeserver.py"
    proc = subprocess.Popen([PY, str(server_py), str(files.work), "0"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    base = proc.stdout.readline().split(" on ", 1)[1].strip()
    files.url = base + files.st.name
    return proc


def report_remote_bytes(op: Op, files: Files) -> None:
    """Print what ``ckpt inspect`` of the served file fetched, against the file's size."""
    out = subprocess.run(op.ours, capture_output=True, text=True, check=False).stdout
    remote = json.loads(out)["remote"]
    print(
        f"inspect-remote: fetched {remote['bytes_read']:,} bytes in {remote['requests']} range requests "
        f"of a {files.st.stat().st_size:,}-byte file (the recipe downloads all of it)",
        file=sys.stderr,
    )


# -- the workload ----------------------------------------------------------------------------
@dataclass
class Files:
    work: Path
    arch: synth.Arch
    st: Path
    pth: Path
    shards: Path
    many: Path
    one: Path
    models: Path
    soup: tuple[Path, ...] = ()
    lora: Path | None = None
    url: str = ""  # model.safetensors served on loopback with Range (inspect-remote)


def generate(work: Path, size: int, many: int, names: set[str]) -> Files:
    """Write the inputs the selected operations need."""
    arch = synth.transformer_arch(size)
    shapes = synth.transformer_shapes(arch)
    f = Files(
        work,
        arch,
        work / "model.safetensors",
        work / "model.pth",
        work / "shards",
        work / "many.pth",
        work / "one.pth",
        work / "models.py",
    )
    f.models.write_text(synth.MODELS_PY)
    synth.write_safetensors(f.st, shapes)
    if names & NEEDS_PTH:
        synth.write_pth(f.st, f.pth)
    if "inspect-sharded" in names:
        synth.write_shards(f.shards, shapes, max(size // 4, 1))
    if "merge-lora" in names:  # a rank-8 LoRA adapter on every q and v projection of model.safetensors
        f.lora = work / "lora"
        f.lora.mkdir()
        config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q", "v"], "bias": "none"}
        (f.lora / "adapter_config.json").write_text(json.dumps(config))
        factors = []
        for i in range(f.arch.layers):
            for q in ("q", "v"):
                stem = f"base_model.model.layers.{i}.attn.{q}"
                factors += [
                    (f"{stem}.lora_A.weight", (8, f.arch.dim)),
                    (f"{stem}.lora_B.weight", (f.arch.dim, 8)),
                ]
        synth.write_safetensors(f.lora / "adapter_model.safetensors", factors, seed=7)
    if names & {"average", "diff-values"}:  # model.pth and two more of the same shapes, other values
        f.soup = (f.pth, work / "model-2.pth", work / "model-3.pth")
        for seed, path in enumerate(f.soup[1:], 2):
            tmp = path.with_suffix(".safetensors")
            synth.write_safetensors(tmp, shapes, seed=seed)
            synth.write_pth(tmp, path)
            remove(tmp)
    for path, count in ((f.many, many), (f.one, 1)):
        if names & {"many-convert", "many-rename"}:
            tmp = path.with_suffix(".safetensors")
            synth.write_safetensors(tmp, synth.many_shapes(count))
            synth.write_pth(tmp, path)
            remove(tmp)
    return f


def operations(f: Files) -> list[Op]:
    """Every row of the table, ours vs the plain recipe."""
    ckpt = [PY, "-m", "ckptsurgeon"]
    w = f.work
    o_st, b_st, o_pth, b_pth = w / "ours.safetensors", w / "base.safetensors", w / "ours.pth", w / "base.pth"
    py = [PY, "-c"]
    spec = f.arch.call(f.models, head=1000)
    build = [str(w), str(f.arch.dim), str(f.arch.layers), str(f.arch.vocab), "1000"]
    o_dcp, b_dcp, o_shards, b_shards = w / "ours-dcp", w / "base-dcp", w / "ours-shards", w / "serial-shards"
    eighth = str(max(f.st.stat().st_size // 8, 1))  # an 8-shard set
    shard = [*ckpt, "convert", str(f.st), "--max-shard-size", eighth]
    return [
        Op("help", [*ckpt, "--help"], [*py, recipes.IMPORT_TORCH], "help"),
        Op(
            "inspect-st", [*ckpt, "inspect", str(f.st)], [*py, recipes.LIST_SAFETENSORS, str(f.st)], "instant"
        ),
        Op(
            "inspect-remote",
            [*ckpt, "inspect", f.url, "--format", "json"],
            [*py, recipes.DOWNLOAD_AND_LIST, f.url],
            "remote",
        ),
        Op(
            "inspect-sharded",
            [*ckpt, "inspect", str(f.shards)],
            [*py, recipes.LIST_SHARDED, str(f.shards)],
            "instant",
        ),
        Op(
            "inspect-pth-mmap",
            [*ckpt, "inspect", str(f.pth)],
            [*py, recipes.LIST_PTH, str(f.pth), "mmap"],
            "listing",
        ),
        Op(
            "inspect-pth-full",
            [*ckpt, "inspect", str(f.pth)],
            [*py, recipes.LIST_PTH, str(f.pth), "full"],
            "listing",
        ),
        Op(
            "convert-pth",
            [*ckpt, "convert", str(f.pth), "-o", str(o_st)],
            [*py, recipes.PTH_TO_SAFETENSORS, str(f.pth), str(b_st)],
            "stream",
            f.pth,
            (o_st, b_st),
        ),
        Op(
            "convert-pth-noverify",
            [*ckpt, "convert", str(f.pth), "-o", str(o_st), "--no-verify"],
            [*py, recipes.PTH_TO_SAFETENSORS, str(f.pth), str(b_st)],
            "stream",
            f.pth,
            (o_st, b_st),
        ),
        Op(
            "convert-st",
            [*ckpt, "convert", str(f.st), "-o", str(o_pth)],
            [*py, recipes.SAFETENSORS_TO_PTH, str(f.st), str(b_pth)],
            "stream",
            f.st,
            (o_pth, b_pth),
        ),
        Op(
            "convert-cast",
            [*ckpt, "convert", str(f.pth), "-o", str(o_pth), "--dtype", "bf16"],
            [*py, recipes.CAST_BF16, str(f.pth), str(b_pth)],
            "cast",
            f.pth,
            (o_pth, b_pth),
        ),
        Op(
            "rename",
            [*ckpt, "rename", str(f.pth), "-o", str(o_pth), "--strip-prefix", "module."],
            [*py, recipes.RENAME, str(f.pth), str(b_pth)],
            "stream",
            f.pth,
            (o_pth, b_pth),
        ),
        Op(
            "strip-head",
            [*ckpt, "strip-head", str(f.pth), "-o", str(o_pth)],
            [*py, recipes.STRIP_HEAD, str(f.pth), str(b_pth)],
            "stream",
            f.pth,
            (o_pth, b_pth),
        ),
        Op(
            "adapt",
            [*ckpt, "adapt", str(f.pth), spec, "-o", str(o_pth)],
            [*py, recipes.ADAPT, str(f.pth), str(b_pth), *build],
            "stream",
            f.pth,
            (o_pth, b_pth),
        ),
        Op(
            "average",
            [*ckpt, "average", *map(str, f.soup), "-o", str(o_pth)],
            [*py, recipes.AVERAGE, *map(str, f.soup), str(b_pth)],
            "average",
            f.pth,
            (o_pth, b_pth),
        ),
        Op("diff", [*ckpt, "diff", str(f.pth), spec], [*py, recipes.DIFF, str(f.pth), "-", *build], "meta"),
        Op(
            "merge-lora",
            [*ckpt, "merge-lora", str(f.st), str(f.lora), "-o", str(o_st)],
            [*py, recipes.MERGE_LORA, str(f.st), str(f.lora), str(b_st)],
            "values",
            f.st,
            (o_st, b_st),
        ),
        Op(
            "diff-values",
            [*ckpt, "diff", "--values", *map(str, f.soup[:2]), "--format", "json"],
            [*py, recipes.VALUES, *map(str, f.soup[:2])],
            "values",
            f.pth,
        ),
        Op(
            "convert-dcp",
            [*ckpt, "convert", str(f.st), "-o", str(o_dcp), "--to", "dcp"],
            [*py, recipes.DCP_SAVE, str(f.st), str(b_dcp)],
            "dcp",
            f.st,
            (o_dcp, b_dcp),
        ),
        Op(  # the "recipe" is our own serial write (--jobs 1): the parallel gain, same bytes
            "shards-parallel",
            [*shard, "-o", str(o_shards)],
            [*shard, "-o", str(b_shards), "--jobs", "1"],
            "parallel",
            f.st,
            (o_shards, b_shards),
        ),
        Op(
            "many-convert",
            [*ckpt, "convert", str(f.many), "-o", str(o_st)],
            [*py, recipes.PTH_TO_SAFETENSORS, str(f.many), str(b_st)],
            "many",
            None,
            (o_st, b_st),
            [*ckpt, "convert", str(f.one), "-o", str(o_st)],
        ),
        Op(
            "many-rename",
            [*ckpt, "rename", str(f.many), "-o", str(o_pth), "--strip-prefix", "module."],
            [*py, recipes.RENAME, str(f.many), str(b_pth)],
            "many",
            None,
            (o_pth, b_pth),
            [*ckpt, "rename", str(f.one), "-o", str(o_pth), "--strip-prefix", "module."],
        ),
    ]


NEEDS_PTH = {
    "inspect-remote",
    "inspect-pth-mmap",
    "inspect-pth-full",
    "convert-pth",
    "convert-pth-noverify",
    "convert-cast",
    "rename",
    "strip-head",
    "adapt",
    "average",
    "diff-values",
    "diff",
}
OP_NAMES = (
    "help",
    "inspect-st",
    "inspect-remote",
    "inspect-sharded",
    "inspect-pth-mmap",
    "inspect-pth-full",
    "convert-pth",
    "convert-pth-noverify",
    "convert-st",
    "convert-cast",
    "rename",
    "strip-head",
    "adapt",
    "average",
    "diff",
    "merge-lora",
    "diff-values",
    "convert-dcp",
    "shards-parallel",
    "many-convert",
    "many-rename",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="16MiB", help="bytes of fp32 parameters (e.g. 16MiB, 2GiB, 10GiB)")
    p.add_argument("--many", type=int, default=2000, help="tensors in the many-small-tensors file")
    p.add_argument("--repeat", type=int, default=3, help="runs per command; the median is shown")
    p.add_argument(
        "--ops", default=",".join(OP_NAMES), help="comma-separated subset of: " + ", ".join(OP_NAMES)
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the plain recipes (e.g. at 10GiB)")
    p.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table as markdown here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = {n.strip() for n in args.ops.split(",") if n.strip()}
    unknown = names - set(OP_NAMES)
    if unknown:
        raise SystemExit(f"bench: unknown operation(s) {', '.join(sorted(unknown))}; choose from {OP_NAMES}")
    size = synth.parse_size(args.size)
    # byte-compiled, as a pip install leaves it (PYTHONDONTWRITEBYTECODE=1 would recompile every run)
    package = Path(__file__).resolve().parent.parent / "ckptsurgeon"
    subprocess.run([PY, "-m", "compileall", "-q", str(package)], check=False)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.workdir))
    try:
        started = time.perf_counter()
        files = generate(work, size, args.many, names)
        print(
            f"generated {args.size} ({files.arch}) and {args.many} small tensors in {work} "
            f"in {time.perf_counter() - started:.1f} s; load: {os.getloadavg()[0]:.2f}",
            file=sys.stderr,
        )
        server = serve_remote(files) if "inspect-remote" in names else None
        rows = []
        for op in operations(files):
            if op.name in names:
                print(f"running {op.name} ...", file=sys.stderr)
                rows.append(run_op(op, args.repeat, not args.no_baseline))
                if op.name == "inspect-remote":
                    report_remote_bytes(op, files)
        if server is not None:
            server.kill()
            server.wait()
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    title = f"{args.size} fp32 ({files.arch.layers} layers, dim {files.arch.dim}), {args.many} small tensors"
    print(render_text(rows, title))
    if args.markdown is not None:
        args.markdown.write_text(render_markdown(rows, title) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
