"""Keep learned weights when only the shape changed: position tables and the input conv.

Three :class:`~ckptsurgeon.surgery.transforms.Transform` builders, each doing what timm's
``checkpoint_filter_fn`` does when a model is built at another image size or channel count:

- :func:`resample_pos_embed`: an absolute position embedding (``[1, prefix + H*W, C]`` or
  ``[prefix + H*W, C]``) from one grid to another, prefix tokens (class, distillation, registers)
  kept, the grid interpolated (bicubic with antialias by default, as timm's
  ``resample_abs_pos_embed``); a 1-D sequence (sizes given as one number) along its length.
- :func:`resize_rel_pos_bias`: a relative position bias table (``(2W-1)**2`` rows x heads) to
  another window, as timm's ``resize_rel_pos_bias_table`` (no extra tokens).
- :func:`adapt_input_conv`: an input conv weight ``[out, in, kh, kw]`` to N input channels with
  timm's ``adapt_input_conv`` rule (1: summed over RGB; N > 3: RGB repeated and scaled by 3/N).

Each computes in float32 and casts back to the input's dtype (as timm does), so its output has
the input's dtype. The shape logic (:func:`grid_change`, :func:`rel_window`,
:func:`channel_change`) needs no torch: ``diff``'s diagnosis asks it from names and shapes.
Torch is imported only when a value is computed.

Example:
    >>> recs = {"pos_embed": TensorRecord("pos_embed", "float32", (1, 197, 64))}
    >>> resample_pos_embed(recs, "pos_embed", (1, 577, 64)).description
    'resample pos_embed: a 14x14 grid + 1 token -> 24x24 + 1 (bicubic, antialias)'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.dtypes import DTYPES
from ..core.record import TensorRecord
from ..errors import SurgeryError
from .transforms import Output, Transform

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "GridChange",
    "adapt_input_conv",
    "adapt_input_conv_tensor",
    "channel_change",
    "grid_change",
    "rel_window",
    "resample_pos_embed",
    "resample_pos_embed_tensor",
    "resize_rel_pos_bias",
    "resize_rel_pos_bias_tensor",
]

# The prefix-token counts tried when the grids are inferred (class token, + distillation or register).
PREFIX_COUNTS = (0, 1, 2)
# Names (a dotted part of the key) of absolute position tables and of relative position bias tables.
POS_EMBED_NAMES = frozenset(
    {"pos_embed", "position_embedding", "position_embeddings", "absolute_pos_embed", "pos_embedding"}
)
REL_POS_NAMES = frozenset({"relative_position_bias_table"})

Size = int | tuple[int, int]


@dataclass(frozen=True)
class GridChange:
    """A position table's layout on both sides: ``prefix`` tokens, then a grid (``(h, w)``) or a
    1-D sequence (``(n,)``), and the table's shape (``[1, T, C]`` or ``[T, C]``).

    Example:
        >>> grid_change((1, 197, 64), (1, 577, 64)).words("pos_embed")
        'pos_embed: a 14x14 grid + 1 token -> 24x24 + 1'
    """

    prefix: int
    old: tuple[int, ...]
    new: tuple[int, ...]

    def words(self, name: str) -> str:
        old, new = _size_text(self.old), _size_text(self.new)
        kind = "grid" if len(self.old) == 2 else "sequence of"
        if not self.prefix:
            return f"{name}: a {old} {kind} -> {new}".replace("sequence of -> ", "sequence -> ")
        tokens = "token" if self.prefix == 1 else "tokens"
        return f"{name}: a {old} {kind} + {self.prefix} {tokens} -> {new} + {self.prefix}"


def _size_text(size: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in size)


def named_pos_embed(name: str) -> bool:
    """True when a dotted part of ``name`` names an absolute position table (``pos_embed`` ...).

    Example:
        >>> named_pos_embed("vision_model.embeddings.position_embedding.weight"), named_pos_embed("fc.w")
        (True, False)
    """
    return any(part in POS_EMBED_NAMES for part in name.split("."))


def named_rel_pos(name: str) -> bool:
    """True when a dotted part of ``name`` is ``relative_position_bias_table``."""
    return any(part in REL_POS_NAMES for part in name.split("."))


def _tokens(shape: Sequence[int]) -> tuple[int, int] | None:
    """(token count, channels) of a ``[1, T, C]`` or ``[T, C]`` table, else None."""
    if len(shape) == 3 and shape[0] == 1:
        return shape[1], shape[2]
    if len(shape) == 2:
        return shape[0], shape[1]
    return None


def _square(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side and side * side == n else None


def grid_change(
    source: Sequence[int],
    target: Sequence[int],
    *,
    old_size: Size | None = None,
    new_size: Size | None = None,
    prefix_tokens: int | None = None,
) -> GridChange | None:
    """The layout of a position table resampled from shape ``source`` to ``target``, or None when
    they are not two tables of one width (and rank) or the grids cannot be told.

    Sizes given are checked against the token counts; not given, both sides must be square grids
    after the same 0, 1 or 2 prefix tokens (``prefix_tokens`` picks one). An int size is a 1-D
    sequence.

    Example:
        >>> grid_change((1, 198, 8), (1, 146, 8))
        GridChange(prefix=2, old=(14, 14), new=(12, 12))
        >>> grid_change((50, 8), (60, 8)) is None, grid_change((50, 8), (60, 8), old_size=50, new_size=60)
        (True, GridChange(prefix=0, old=(50,), new=(60,)))
    """
    src, tgt = _tokens(source), _tokens(target)
    if src is None or tgt is None or len(source) != len(target) or src[1] != tgt[1]:
        return None
    counts = PREFIX_COUNTS if prefix_tokens is None else (prefix_tokens,)
    found = []
    for prefix in counts:
        old = _layout(src[0] - prefix, old_size)
        new = _layout(tgt[0] - prefix, new_size)
        if old is not None and new is not None and len(old) == len(new):
            found.append(GridChange(prefix, old, new))
    return found[0] if len(found) == 1 else None


def _layout(tokens: int, size: Size | None) -> tuple[int, ...] | None:
    if tokens <= 0:
        return None
    if size is None:
        side = _square(tokens)
        return None if side is None else (side, side)
    dims = (size,) if isinstance(size, int) else tuple(size)
    return dims if math.prod(dims) == tokens and all(d > 0 for d in dims) else None


def rel_window(source: Sequence[int], target: Sequence[int]) -> tuple[int, int] | None:
    """(old window, new window) of a relative position bias table ``[(2W-1)**2, heads]`` resized
    to another window with as many heads, else None.

    Example:
        >>> rel_window((169, 4), (529, 4)), rel_window((170, 4), (529, 4))
        ((7, 12), None)
    """
    if len(source) != 2 or len(target) != 2 or source[1] != target[1]:
        return None
    sides = _square(source[0]), _square(target[0])
    if sides[0] is None or sides[1] is None or sides[0] % 2 == 0 or sides[1] % 2 == 0:
        return None
    return (sides[0] + 1) // 2, (sides[1] + 1) // 2


def channel_change(source: Sequence[int], target: Sequence[int]) -> tuple[int, int] | None:
    """(input channels in the file, in the target) of a conv weight ``[out, in, kh, kw]`` whose only
    difference is dimension 1 and that timm's rule adapts (3 channels to any; 3*k to 1), else None.

    Example:
        >>> channel_change((16, 3, 7, 7), (16, 1, 7, 7)), channel_change((16, 3, 7, 7), (8, 1, 7, 7))
        ((3, 1), None)
    """
    if len(source) != 4 or len(target) != 4 or source[1] == target[1]:
        return None
    if (source[0], *source[2:]) != (target[0], *target[2:]) or target[1] < 1:
        return None
    old, new = source[1], target[1]
    if old == 3 or (new == 1 and old % 3 == 0):
        return old, new
    return None


# -- the transforms ----------------------------------------------------------------------------
def resample_pos_embed(
    tensors: Mapping[str, TensorRecord],
    name: str,
    target_shape: Sequence[int],
    output: str | None = None,
    *,
    old_size: Size | None = None,
    new_size: Size | None = None,
    prefix_tokens: int | None = None,
    mode: str | None = None,
    antialias: bool = True,
) -> Transform:
    """Position table ``name`` resampled to ``target_shape`` (written as ``output``, default ``name``).

    Grids are inferred from the token counts (square after 0, 1 or 2 prefix tokens) unless
    ``old_size``/``new_size`` give them (``(h, w)``, or an int for a 1-D sequence). ``mode`` is
    ``F.interpolate``'s (default ``bicubic`` for a grid, ``linear`` for a sequence);
    ``antialias`` as timm (used when downsampling with ``bilinear``/``bicubic``).

    Example:
        >>> recs = {"pe": TensorRecord("pe", "bfloat16", (1, 50, 8))}
        >>> resample_pos_embed(recs, "pe", (1, 197, 8)).outputs[0]
        Output(name='pe', dtype='bfloat16', shape=(1, 197, 8))
        >>> resample_pos_embed({"pe": TensorRecord("pe", "float32", (50, 8))}, "pe", (60, 8))
        Traceback (most recent call last):
        ...
        ckptsurgeon.errors.SurgeryError: resample pe: [50, 8] -> [60, 8] is not a square grid after 0, ...
    """
    rec = _floating(tensors, name, "resample")
    target_shape = tuple(int(d) for d in target_shape)
    change = grid_change(
        rec.shape, target_shape, old_size=old_size, new_size=new_size, prefix_tokens=prefix_tokens
    )
    if change is None:
        raise SurgeryError(_grid_refusal(name, rec.shape, target_shape, old_size, new_size, prefix_tokens))
    mode = mode or ("bicubic" if len(change.old) == 2 else "linear")
    flags = f"{mode}, antialias" if antialias and mode in _ANTIALIAS_MODES else mode
    description = f"resample {change.words(name)} ({flags})"

    def compute(inputs: tuple[TensorRecord, ...], _index: int) -> Any:
        table = inputs[0].to_torch()
        flat = table.reshape(1, *table.shape[-2:])
        out = resample_pos_embed_tensor(flat, change.old, change.new, change.prefix, mode, antialias)
        return out.reshape(target_shape)

    return Transform(description, (name,), (Output(output or name, rec.dtype, target_shape),), compute)


_ANTIALIAS_MODES = ("bilinear", "bicubic")


def _grid_refusal(
    name: str,
    source: tuple[int, ...],
    target: tuple[int, ...],
    old_size: Size | None,
    new_size: Size | None,
    prefix_tokens: int | None,
) -> str:
    shapes = f"{list(source)} -> {list(target)}"
    src, tgt = _tokens(source), _tokens(target)
    if src is None or tgt is None or len(source) != len(target) or src[1] != tgt[1]:
        return (
            f"resample {name}: {shapes} are not two position tables [1, tokens, C] or [tokens, C] of one "
            "width; only the token count can change"
        )
    if old_size is not None or new_size is not None:
        prefixes = "0, 1 or 2" if prefix_tokens is None else str(prefix_tokens)
        return (
            f"resample {name}: {shapes} does not hold old_size={old_size} and new_size={new_size} after "
            f"{prefixes} prefix tokens; give both sizes (h, w), or ints for a 1-D sequence"
        )
    prefixes = "0, 1 or 2 prefix tokens" if prefix_tokens is None else f"{prefix_tokens} prefix tokens"
    return (
        f"resample {name}: {shapes} is not a square grid after {prefixes} on both sides; "
        "give old_size= and new_size= (an int for a 1-D sequence)"
    )


def resize_rel_pos_bias(
    tensors: Mapping[str, TensorRecord], name: str, target_shape: Sequence[int], output: str | None = None
) -> Transform:
    """Relative position bias table ``name`` (``[(2W-1)**2, heads]``) resized to ``target_shape``'s
    window, as timm's ``resize_rel_pos_bias_table`` does without extra tokens.

    Example:
        >>> recs = {"t": TensorRecord("t", "float32", (169, 4))}
        >>> resize_rel_pos_bias(recs, "t", (529, 4)).description
        'resize t: relative position bias window 7x7 -> 12x12'
    """
    rec = _floating(tensors, name, "resize")
    target_shape = tuple(int(d) for d in target_shape)
    windows = rel_window(rec.shape, target_shape)
    if windows is None:
        raise SurgeryError(
            f"resize {name}: {list(rec.shape)} -> {list(target_shape)} are not two relative position bias "
            "tables [(2W-1)**2, heads] with as many heads (extra tokens are not supported)"
        )
    old, new = windows
    description = f"resize {name}: relative position bias window {old}x{old} -> {new}x{new}"

    def compute(inputs: tuple[TensorRecord, ...], _index: int) -> Any:
        return resize_rel_pos_bias_tensor(inputs[0].to_torch(), new)

    return Transform(description, (name,), (Output(output or name, rec.dtype, target_shape),), compute)


def adapt_input_conv(
    tensors: Mapping[str, TensorRecord], name: str, in_chans: int, output: str | None = None
) -> Transform:
    """Input conv weight ``name`` (``[out, in, kh, kw]``) adapted to ``in_chans`` input channels by
    timm's ``adapt_input_conv`` rule.

    Example:
        >>> recs = {"conv1.weight": TensorRecord("conv1.weight", "float32", (16, 3, 7, 7))}
        >>> adapt_input_conv(recs, "conv1.weight", 1).description
        'adapt conv1.weight: 3 input channels -> 1 (summed over the 3)'
    """
    rec = _floating(tensors, name, "adapt")
    target_shape = (*rec.shape[:1], in_chans, *rec.shape[2:]) if len(rec.shape) == 4 else ()
    change = channel_change(rec.shape, target_shape) if target_shape else None
    if change is None:
        raise SurgeryError(_conv_refusal(name, rec.shape, in_chans))
    old, new = change
    if new == 1:
        how = f"summed over the {old}" if old == 3 else f"summed over each group of 3 of the {old}"
    elif new < 3:
        how = f"the first {new} of the 3, scaled by 3/{new}"
    else:
        how = f"the 3 repeated, scaled by 3/{new}"
    description = f"adapt {name}: {old} input channels -> {new} ({how})"

    def compute(inputs: tuple[TensorRecord, ...], _index: int) -> Any:
        return adapt_input_conv_tensor(inputs[0].to_torch(), new)

    return Transform(description, (name,), (Output(output or name, rec.dtype, target_shape),), compute)


def _conv_refusal(name: str, shape: tuple[int, ...], in_chans: int) -> str:
    if len(shape) != 4:
        return f"adapt {name}: {list(shape)} is not a conv weight [out, in, kh, kw]"
    if in_chans < 1:
        return f"adapt {name}: cannot adapt to {in_chans} input channels"
    if shape[1] == in_chans:
        return f"adapt {name}: it already has {in_chans} input channels"
    return (
        f"adapt {name}: {shape[1]} input channels -> {in_chans} is not timm's rule (it adapts 3 channels, "
        "or 3*k to 1)"
    )


def conv_shape_refusal(name: str, source: Sequence[int], target: Sequence[int]) -> str | None:
    """The one line refusing to adapt conv ``name`` from ``source`` to ``target`` (None when it adapts).

    Example:
        >>> conv_shape_refusal("conv1.weight", (16, 3, 7, 7), (8, 1, 7, 7))
        'adapt conv1.weight: [16, 3, 7, 7] -> [8, 1, 7, 7] changes more than the input channels (dimension 1)'
    """
    if channel_change(source, target) is not None:
        return None
    if len(source) == len(target) == 4 and (source[0], *source[2:]) != (target[0], *target[2:]):
        return (
            f"adapt {name}: {list(source)} -> {list(target)} changes more than the input channels "
            "(dimension 1)"
        )
    return _conv_refusal(name, tuple(source), target[1] if len(target) == 4 else 0)


# -- the arithmetic (torch) ------------------------------------------------------------------------
def resample_pos_embed_tensor(
    table: torch.Tensor,
    old: Sequence[int],
    new: Sequence[int],
    prefix: int = 1,
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """``[1, prefix + prod(old), C]`` -> ``[1, prefix + prod(new), C]``: prefix kept, the grid (or
    1-D sequence) interpolated in float32 (``align_corners=False``), cast back to ``table``'s dtype.

    Example:
        >>> import torch
        >>> resample_pos_embed_tensor(torch.zeros(1, 5, 2), (2, 2), (3, 3)).shape
        torch.Size([1, 10, 2])
    """
    import torch
    import torch.nn.functional as F

    head, body = table[:, :prefix], table[:, prefix:]
    channels = body.shape[-1]
    body = body.float().reshape(1, *old, channels)
    # channels first: [1, C, h, w] (or [1, C, n]) as interpolate wants
    body = body.permute(0, len(old) + 1, *range(1, len(old) + 1))
    use_antialias = antialias and mode in _ANTIALIAS_MODES
    body = F.interpolate(body, size=tuple(new), mode=mode, antialias=use_antialias)
    body = body.permute(0, *range(2, len(new) + 2), 1).reshape(1, -1, channels).to(table.dtype)
    return torch.cat([head, body], dim=1)


def adapt_input_conv_tensor(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """timm's ``adapt_input_conv`` rule on ``[out, in, kh, kw]``, in float32, cast back.

    1 channel: the sum over the input channels (over each group of 3 when there are 3*k); otherwise
    (from 3) the channels repeated to ``in_chans`` and scaled by ``3 / in_chans``.

    Example:
        >>> import torch
        >>> adapt_input_conv_tensor(torch.ones(1, 3, 1, 1), 1).flatten().tolist()
        [3.0]
    """
    dtype = weight.dtype
    w = weight.float()
    out, chans, kh, kw = w.shape
    if in_chans == 1:  # 3*k channels: each group of 3 summed
        w = w.reshape(out, chans // 3, 3, kh, kw).sum(dim=2) if chans > 3 else w.sum(dim=1, keepdim=True)
    elif in_chans != 3:
        copies = -(-in_chans // 3)
        w = w.repeat(1, copies, 1, 1)[:, :in_chans, :, :]
        w = w * (3 / float(in_chans))
    return w.to(dtype)


def resize_rel_pos_bias_tensor(table: torch.Tensor, new_window: int) -> torch.Tensor:
    """``[(2W-1)**2, heads]`` -> ``[(2N-1)**2, heads]``, as timm's ``resize_rel_pos_bias_table``:

    the old offsets are placed on a geometric progression (BEiT's rule: spaced so that the old
    table's edge lands on the new one's) and every new integer offset is interpolated linearly
    between them, per head, in float32, then cast back.

    Example:
        >>> import torch
        >>> resize_rel_pos_bias_tensor(torch.zeros(9, 2), 3).shape
        torch.Size([25, 2])
    """
    import torch

    src = math.isqrt(table.shape[0])
    dst = 2 * new_window - 1
    if src == dst:
        return table
    old = _progression(src, dst)
    points = torch.tensor(old)
    half = dst // 2
    wanted = torch.arange(-half, half + 0.1, 1.0)
    heads = []
    for head in range(table.shape[1]):
        grid = table[:, head].reshape(src, src).float()
        heads.append(_bilinear(points, grid, wanted).reshape(-1, 1))
    return torch.cat(heads, dim=-1).to(table.dtype)


def _progression(src: int, dst: int) -> list[float]:
    """The old table's offsets, ``-d[k] .. 0 .. d[k]``, spaced by powers of a ratio found by
    bisection so that the half-width ``src // 2`` steps span ``dst // 2``."""
    left, right = 1.01, 1.5
    ratio = left
    while right - left > 1e-6:
        ratio = (left + right) / 2.0
        span = (1.0 - ratio ** (src // 2)) / (1.0 - ratio)
        if span > dst // 2:
            right = ratio
        else:
            left = ratio
    steps = []
    at = 1.0
    for i in range(src // 2):
        steps.append(at)
        at += ratio ** (i + 1)
    return [-s for s in reversed(steps)] + [0.0] + steps


def _bilinear(points: torch.Tensor, values: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """``values`` (on the grid ``points`` x ``points``) at every (y, x) of ``wanted`` x ``wanted``,
    interpolated linearly along each axis (clamped at the edges), flattened row-major."""
    import torch

    ys, xs = torch.meshgrid(wanted, wanted, indexing="ij")
    sides = []
    for at in (ys.reshape(-1), xs.reshape(-1)):
        right = torch.bucketize(at, points).clamp(max=points.shape[0] - 1)
        left = (right - 1).clamp(0, points.shape[0] - 1)
        to_left = (at - points[left]).clamp(min=0)
        to_right = (points[right] - at).clamp(min=0)
        both = (to_left == 0) & (to_right == 0)
        to_left = torch.where(both, torch.ones_like(to_left), to_left)
        to_right = torch.where(both, torch.ones_like(to_right), to_right)
        sides.append(((left, right), (to_left, to_right)))
    (ly, ry), (dly, dry) = sides[0]
    (lx, rx), (dlx, drx) = sides[1]
    total = (
        values[ly, lx] * (dry * drx)
        + values[ly, rx] * (dry * dlx)
        + values[ry, lx] * (dly * drx)
        + values[ry, rx] * (dly * dlx)
    )
    return total / ((dly + dry) * (dlx + drx))


def _floating(tensors: Mapping[str, TensorRecord], name: str, what: str) -> TensorRecord:
    rec = tensors.get(name)
    if rec is None:
        raise SurgeryError(f"{what} {name}: no tensor {name!r}")
    known = DTYPES.get(rec.dtype)
    if known is None or not known.is_floating:
        raise SurgeryError(f"{what} {name}: it is {rec.dtype}; only floating tensors are interpolated")
    return rec
