"""``ckpt merge-lora``: a LoRA adapter folder merged into its base model's weights."""

from __future__ import annotations

from typing import Any

import click

from ._options import output_format, read_options, write_options
from ._writing import conversion_options, run


@click.command("merge-lora")
@click.argument("base", type=click.Path(path_type=str))
@click.argument("adapter", type=click.Path(path_type=str))
@read_options
@write_options
@conversion_options
@output_format
def COMMAND(base: str, adapter: str, output: str | None, **flags: Any) -> None:
    """Merge the LoRA adapter folder ADAPTER into the weights of BASE, as peft's merge_and_unload().

    Each adapted weight becomes W + (B @ A) * scale, with scale = lora_alpha / r (lora_alpha /
    sqrt(r) with use_rslora; per module from rank_pattern and alpha_pattern), the delta transposed
    for fan_in_fan_out (GPT-2's Conv1D), computed in float32 and cast back to W's dtype. Tensors the
    adapter stores whole (modules_to_save) replace the base's; every other tensor is kept as it is.
    The adapter's base_model.model. names are matched to BASE's. What cannot be merged exactly
    (DoRA, other PEFT types, trained biases, a module BASE lacks, shapes that differ) is refused
    and nothing is written. The output is written atomically, then reopened and compared.

    \b
    Examples:
      ckpt merge-lora fixtures/real/hf_gpt2_tiny fixtures/lora_gpt2_tiny \\
        -o /tmp/ckpt-readme/gpt2-merged.safetensors
      ckpt merge-lora base-hf/ lora-out/ -o merged/ --max-shard-size 5GB --dtype bf16
      ckpt merge-lora model.pth lora-out/ --dry-run
    """
    from ..surgery.lora import merge_lora

    run(merge_lora, base, adapter, output, **flags)
