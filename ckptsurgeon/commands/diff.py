"""``ckpt diff``: what of a checkpoint would load into a target, why not, and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ._options import make_read_options, output_format, read_options

if TYPE_CHECKING:  # pragma: no cover
    from ..formats import ReadOptions


@click.command("diff")
@click.argument("source", type=click.Path(path_type=str))
@click.argument("target")
@read_options
@output_format
@click.option(
    "--target-key",
    default=None,
    metavar="A.B",
    help="The entry that holds the weights in a TARGET checkpoint.",
)
@click.option("-v", "--verbose", is_flag=True, help="List every key (matched ones too), one per row.")
@click.option(
    "--min-coverage",
    type=click.FloatRange(0, 100),
    default=None,
    metavar="P",
    help="Exit 0 when at least P% of the target's tensors load as saved, and alarm below P "
    "(default: exit 0 only when all load strictly; alarm below 50%).",
)
@click.option(
    "--values",
    "values",
    is_flag=True,
    help="Compare the values of two checkpoints tensor by tensor (TARGET: a checkpoint): max |a-b|, "
    "relative L2, cosine, bit-for-bit equal.",
)
@click.option(
    "--atol",
    type=click.FloatRange(0),
    default=None,
    metavar="X",
    help="With --values: exit 0 when every tensor is within |b-a| <= atol + rtol*|a| (rtol 0 if not given).",
)
@click.option(
    "--rtol",
    type=click.FloatRange(0),
    default=None,
    metavar="X",
    help="With --values: the relative tolerance (atol 0 if not given).",
)
@click.option(
    "--propose-map",
    "propose_map",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    metavar="MAP.toml",
    help="Write a mapping from SOURCE to TARGET proposed by structure (blocks, order, shapes) to MAP.toml: "
    "rules marked certain or ambiguous, to review and apply with `ckpt adapt --map`.",
)
@click.option("--force", is_flag=True, help="With --propose-map: overwrite an existing MAP.toml.")
def COMMAND(
    source: str,
    target: str,
    key: str | None,
    allow_globals: tuple[str, ...],
    unsafe: bool,
    output_format: str,
    target_key: str | None,
    verbose: bool,
    min_coverage: float | None,
    values: bool,
    atol: float | None,
    rtol: float | None,
    propose_map: str | None,
    force: bool,
) -> None:
    """Diff a checkpoint against a model: what would load, what not, why, and the fix.

    SOURCE is any checkpoint `ckpt inspect` opens (--key picks a nested entry). TARGET is
    another checkpoint (--target-key picks its entry), JSON from `ckpt inspect --format json`,
    or an architecture call built on the meta device (no memory, no download):
    `pkg.module.factory(args)` or `path/to/models.py:factory(args)`; arguments are
    literals or further calls.

    Exit status: 0 when SOURCE loads into TARGET with strict loading as is (or, with
    --min-coverage P, when at least P% of the target's tensors load as saved, and at least
    one), 1 when it does not, 2 on error. The report alarms when less than P% (default 50%,
    the bar `ckpt adapt` and load_into refuse below) loads as saved.

    With --values, SOURCE (A) and TARGET (B) are two checkpoints, paired by name through the
    key transform diff finds (a `module.` wrapper on one side pairs); each pair is read, measured
    and freed in turn. Every pair is measured in float64 whatever the two dtypes, A the reference:
    max |a-b|, rel L2 = ||a-b||/||a|| (0 when both are all zeros, inf when only A is), cosine. A
    NaN on either side is reported as such, never as equal. Exit status: 0 when every tensor is
    paired and equal bit for bit (or, with --atol/--rtol, within |b-a| <= atol + rtol*|a|,
    torch.allclose in float64, NaN never within), 1 when not, 2 on error.

    \b
    Examples:
      ckpt diff fixtures/vgg_1000.pth 'torch.nn.DataParallel(fixtures/models.py:vgg_like(num_classes=2))'
      ckpt diff fixtures/resnet_dp_6.pth 'fixtures/models.py:resnet_like(num_classes=2)' -v
      ckpt diff model.pth 'torchvision.models.resnet50(num_classes=2)' --format json
      ckpt diff last.ckpt other.safetensors --key state_dict --min-coverage 90
      ckpt diff --values model.pth model-bf16.safetensors --atol 1e-2
      ckpt diff tv_vit.pth timm_vit.safetensors --propose-map vit.toml

    With --propose-map MAP.toml, SOURCE's tensors are paired with TARGET's by structure (repeated
    blocks aligned, then order, shape and role; fused q/k/v, transposed and reshaped tensors as
    transforms) and the mapping is written to MAP.toml (atomically; --force to overwrite), each rule
    marked certain or ambiguous with the reason. Exit status: 0 when every target tensor is covered by
    certain rules, 1 when a rule is ambiguous or a target tensor is left unfilled, 2 on error.
    """
    options = make_read_options(allow_globals, unsafe, target=True)
    if propose_map is not None:
        _propose(
            source, target, key, target_key, options, propose_map, force, values or min_coverage is not None
        )
    elif force:
        raise click.UsageError("--force is for --propose-map (an existing mapping file is kept without it)")
    if values:
        if min_coverage is not None:
            raise click.UsageError("--min-coverage is for a load check; --values checks with --atol/--rtol")
        if "(" in target and not Path(target).exists():
            raise click.UsageError(
                f"--values compares the values of two checkpoints; {target!r} is an architecture "
                "(it holds no values): give a second checkpoint"
            )
        from ..diffing.values import compare_values

        compared = compare_values(
            source, target, atol=atol, rtol=rtol, key=key, b_key=target_key, read_options=options
        )
        click.echo(compared.render(output_format, verbose=verbose), nl=False)
        raise click.exceptions.Exit(0 if compared.passes() else 1)
    if atol is not None or rtol is not None:
        raise click.UsageError("--atol and --rtol need --values")
    from ..diffing.result import diff

    result = diff(
        source, target, key=key, read_options=options, target_key=target_key, min_coverage=min_coverage
    )
    click.echo(result.render(output_format, verbose=verbose), nl=False)
    raise click.exceptions.Exit(0 if result.passes() else 1)


def _propose(
    source: str,
    target: str,
    key: str | None,
    target_key: str | None,
    options: ReadOptions,
    path: str,
    force: bool,
    conflicting: bool,
) -> None:
    if conflicting:
        raise click.UsageError(
            "--propose-map writes a mapping; it does not combine with --values or --min-coverage"
        )
    from ..diffing.proposal import propose_mapping, write_proposal

    proposal = propose_mapping(source, target, key=key, read_options=options, target_key=target_key)
    write_proposal(proposal, path, force=force, source=source, target=target)
    click.echo(proposal.report(path), nl=False)
    raise click.exceptions.Exit(0 if proposal.complete else 1)
