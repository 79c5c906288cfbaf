"""``ckpt adapt``: apply ``diff``'s diagnosis in one go and say what the output will load."""

from __future__ import annotations

from typing import Any

import click

from ..core.coverage import DEFAULT_MIN_COVERAGE
from ._options import output_format, read_options, write_options
from ._writing import conversion_options, mapping_options, run


@click.command("adapt")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("target")
@click.option(
    "--target-key",
    default=None,
    metavar="A.B",
    help="The entry that holds the weights in a TARGET checkpoint.",
)
@click.option(
    "--min-coverage",
    type=click.FloatRange(0, 100),
    default=DEFAULT_MIN_COVERAGE,
    show_default=True,
    metavar="P",
    help="Refuse to write unless at least P% of the target's tensors (and at least one) load.",
)
@click.option(
    "--resize-vocab",
    is_flag=True,
    help="Resize embeddings and LM heads of another vocabulary size: keep the trained rows, add new ones "
    "(--new-rows) or drop the last ones, instead of dropping the tensors.",
)
@click.option(
    "--new-rows",
    type=click.Choice(["mean", "zeros"]),
    default="mean",
    show_default=True,
    help="With --resize-vocab: new rows are the mean of the trained rows (as Hugging Face) or zeros.",
)
@click.option(
    "--keep-classes",
    default=None,
    metavar="I,J,...|@FILE",
    help="Keep these rows of a larger classifier head, in this order (or read one index per line from "
    "FILE), instead of dropping the head.",
)
@click.option(
    "--no-resample-pos-embed",
    "resample_pos_embed",
    flag_value=False,
    default=True,
    help="Drop a position embedding (or relative position bias table) on another grid instead of "
    "resampling it.",
)
@click.option(
    "--no-adapt-input-conv",
    "adapt_input_conv",
    flag_value=False,
    default=True,
    help="Drop the first conv when its input channels differ instead of adapting it (timm's rule).",
)
@mapping_options
@read_options
@write_options
@conversion_options
@output_format
def COMMAND(src: str, target: str, output: str | None, **flags: Any) -> None:
    """Make SRC load into TARGET: align key prefixes, drop the head and what has no place.

    TARGET is what `ckpt diff` accepts: a checkpoint (--target-key picks its entry), an
    inspect JSON, or an architecture such as 'torchvision.models.resnet50(num_classes=2)' or
    'models.py:build(num_classes=2)'. Only what the data justifies is applied, each step
    listed in the plan: a wrapper prefix shared by a real share of the keys, and drops (the
    head, what has no place). Keys that pair only by their dotted suffix are a guess: shown
    with the `ckpt rename --replace ...` that applies them, never applied. The report says
    what the output loads with load_state_dict(strict=False): exactly the missing keys listed
    (the target keeps its own values there), nothing unexpected. As timm does, a position
    embedding on another grid is resampled (bicubic) and the first conv adapted to other input
    channels, each listed as a transform (--no-resample-pos-embed, --no-adapt-input-conv turn
    them off). When less than P percent of
    the target (--min-coverage, default 50), or nothing, would load, nothing is written (exit
    2; a --dry-run warns and exits 1).

    Only when asked: --resize-vocab keeps the trained rows of an embedding or LM head whose
    vocabulary size changed (new rows from their mean, or --new-rows zeros; shrinking keeps the
    first rows), and --keep-classes 3,17,42 keeps those rows of a larger classifier head.

    --map MAP.toml applies a mapping file first (--reverse: backwards); the checks above then
    run on its output, and the notes name target tensors left unfilled and sources unused.

    \b
    Examples:
      ckpt adapt fixtures/resnet_dp_6.pth 'fixtures/models.py:resnet_like(num_classes=2)' \\
        -o /tmp/ckpt-readme/resnet_2.pth
      ckpt adapt fixtures/vgg_1000.pth 'torch.nn.DataParallel(fixtures/models.py:vgg_like(num_classes=2))' \\
        -o /tmp/ckpt-readme/vgg_2.pth
      ckpt adapt last.ckpt model.safetensors -o fixed.safetensors --dry-run --min-coverage 90
      ckpt adapt lm.safetensors 'transformers.GPT2LMHeadModel(...)' --resize-vocab -o lm-resized.safetensors
      ckpt adapt vgg.pth 'models.py:vgg_like(num_classes=3)' --keep-classes 3,17,42 -o vgg_3.pth
      ckpt adapt vit_tv.pth 'timm.create_model("vit_base_patch16_224")' --map vit.toml -o vit_timm.pth
    """
    from ..surgery.operations import adapt

    run(adapt, src, target, output, trust_target=True, **flags)
