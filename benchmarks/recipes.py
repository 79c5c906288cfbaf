"""The plain recipes ckptsurgeon is measured against, as ``python -c`` scripts (one process each).

Each is what a user writes without the tool: ``torch.load`` the whole file, change the dict,
``torch.save`` / ``save_file``. ``COMPARE`` checks two outputs tensor by tensor, bit for bit.
"""

from __future__ import annotations

IMPORT_TORCH = "import torch"

LIST_SAFETENSORS = """
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], framework="pt") as f:
    for k in f.keys():
        s = f.get_slice(k)
        print(k, s.get_dtype(), s.get_shape())
"""

# the plain way to look into a remote file: download it, then list it
DOWNLOAD_AND_LIST = """
import sys, tempfile, urllib.request
from safetensors import safe_open
with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
    with urllib.request.urlopen(sys.argv[1]) as r:
        while chunk := r.read(1 << 20):
            tmp.write(chunk)
    tmp.flush()
    with safe_open(tmp.name, framework="pt") as f:
        for k in f.keys():
            s = f.get_slice(k)
            print(k, s.get_dtype(), s.get_shape())
"""

LIST_SHARDED = """
import sys, pathlib
from safetensors import safe_open
for shard in sorted(pathlib.Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(shard, framework="pt") as f:
        for k in f.keys():
            s = f.get_slice(k)
            print(k, s.get_dtype(), s.get_shape())
"""

LIST_PTH = """
import sys, torch
sd = torch.load(sys.argv[1], weights_only=True, mmap=sys.argv[2] == "mmap")
for k, v in sd.items():
    print(k, v.dtype, tuple(v.shape))
"""

PTH_TO_SAFETENSORS = """
import sys, torch
from safetensors.torch import save_file
save_file(torch.load(sys.argv[1], weights_only=True), sys.argv[2], metadata={"format": "pt"})
"""

SAFETENSORS_TO_PTH = """
import sys, torch
from safetensors.torch import load_file
torch.save(load_file(sys.argv[1]), sys.argv[2])
"""

RENAME = """
import sys, torch
sd = torch.load(sys.argv[1], weights_only=True)
torch.save({k.removeprefix("module."): v for k, v in sd.items()}, sys.argv[2])
"""

STRIP_HEAD = """
import sys, torch
sd = torch.load(sys.argv[1], weights_only=True)
torch.save({k: v for k, v in sd.items() if ".lm_head." not in "." + k}, sys.argv[2])
"""

CAST_BF16 = """
import sys, torch
sd = torch.load(sys.argv[1], weights_only=True)
torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, sys.argv[2])
"""

AVERAGE = """
import sys, torch
sds = [torch.load(p, weights_only=True) for p in sys.argv[1:-1]]
out = {k: torch.stack([sd[k] for sd in sds]).mean(0) if v.is_floating_point() else v
       for k, v in sds[0].items()}
torch.save(out, sys.argv[-1])
"""

VALUES = """
import sys, torch
a, b = (torch.load(p, weights_only=True) for p in sys.argv[1:3])
for k, x in a.items():
    x, y = x.double(), b[k].double()
    d = (x - y).abs().max().item(), ((x - y).norm() / x.norm()).item()
    c = torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item()
    print(k, *d, c, torch.equal(a[k], b[k]))
"""

MERGE_LORA = """
import json, sys, torch
from safetensors.torch import load_file, save_file
base, adapter = load_file(sys.argv[1]), load_file(sys.argv[2] + "/adapter_model.safetensors")
config = json.load(open(sys.argv[2] + "/adapter_config.json"))
scale = config["lora_alpha"] / config["r"]
for a_name in [k for k in adapter if k.endswith(".lora_A.weight")]:
    w = "module." + a_name.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
    delta = adapter[a_name.replace("lora_A", "lora_B")].float() @ adapter[a_name].float()
    base[w] = (base[w].float() + delta * scale).to(base[w].dtype)
save_file(base, sys.argv[3])
"""

_BUILD = """
import sys, torch
sys.path.insert(0, sys.argv[3])
import models
dim, layers, vocab, head = map(int, sys.argv[4:8])
model_state = models.build(dim=dim, layers=layers, vocab=vocab, head=head).state_dict()
"""

ADAPT = (
    _BUILD
    + """
sd = torch.load(sys.argv[1], weights_only=True)
out = {}
for k, v in sd.items():
    k = k.removeprefix("module.")
    if k in model_state and model_state[k].shape == v.shape:
        out[k] = v
torch.save(out, sys.argv[2])
"""
)

DIFF = (
    _BUILD
    + """
sd = {k.removeprefix("module."): v for k, v in torch.load(sys.argv[1], weights_only=True, mmap=True).items()}
missing = [k for k in model_state if k not in sd]
unexpected = [k for k in sd if k not in model_state]
mismatched = [k for k in sd if k in model_state and model_state[k].shape != sd[k].shape]
print(len(missing), "missing", len(unexpected), "unexpected", len(mismatched), "mismatched")
"""
)

DCP_SAVE = """
import sys, torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
dcp.save(load_file(sys.argv[1]), checkpoint_id=sys.argv[2], no_dist=True)
"""

COMPARE = """
import os, sys, tempfile, torch
from safetensors import safe_open

def tensors(path):
    if os.path.isdir(path):  # a DCP folder, consolidated by torch itself
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        out = os.path.join(tempfile.mkdtemp(), "consolidated.pth")
        dcp_to_torch_save(path, out)
        yield from torch.load(out, weights_only=True).items()
    elif path.endswith(".safetensors"):
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                yield k, f.get_tensor(k)
    else:
        yield from torch.load(path, weights_only=True, mmap=True).items()

ours, theirs = dict(tensors(sys.argv[1])), dict(tensors(sys.argv[2]))
if list(ours) != list(theirs) and sorted(ours) != sorted(theirs):
    sys.exit(f"different names: {sorted(set(ours) ^ set(theirs))[:3]}")
for k, a in ours.items():
    b = theirs[k]
    if a.dtype != b.dtype or a.shape != b.shape:
        sys.exit(f"{k}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}")
    if not torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)):
        sys.exit(f"{k}: different bytes")
print(f"tensors equal ({len(ours)})")
"""
