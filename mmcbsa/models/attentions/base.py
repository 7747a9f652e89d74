"""Shared pieces of the attention family: argument checks, head splitting and the
pooling of patch tokens into a small grid of representatives (docs/mechanisms.md §1.2, §5.1).

Token layout used by every mmcbsa attention: ``x`` is ``(B, N, C)`` with
``N - h*w >= 0`` prefix tokens (CLS, registers, class embeddings) first and the
``h*w`` patch tokens after them, row-major on the ``h x w`` grid given by
``hw_shape``.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mmcbsa.ops.once import warn_once  # noqa: F401  (re-exported: the models' import)

GridLike = Union[int, Sequence[int]]


def check_positive(value: int, name: str, owner: str) -> int:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'{owner}: {name} must be a positive integer, got {value!r}')
    return value


def resolve_head_dims(embed_dims: int, num_heads: int, head_dims: Optional[int],
                      owner: str) -> int:
    """Head width ``p``: ``head_dims`` if given, else ``embed_dims // num_heads``.

    Raises a ``ValueError`` naming the offending parameter when the sizes cannot work.
    """
    check_positive(embed_dims, 'embed_dims', owner)
    check_positive(num_heads, 'num_heads', owner)
    if head_dims is None:
        if embed_dims % num_heads:
            raise ValueError(f'{owner}: embed_dims ({embed_dims}) must be divisible by '
                             f'num_heads ({num_heads}) when head_dims is not given')
        return embed_dims // num_heads
    return check_positive(head_dims, 'head_dims', owner)


def to_grid(value: GridLike, name: str, owner: str) -> Tuple[int, int]:
    """Turn ``m`` (a perfect square) or ``(s_h, s_w)`` into a grid ``(s_h, s_w)``.

    Every entry must be a positive ``int``: floats are refused even when integral
    (``8.0``), and so are bools, as for every other size parameter
    (:func:`check_positive`); nothing is rounded or truncated silently.

    Raises:
        ValueError: naming ``name``, for a non-integer, non-positive or non-square
            ``m``, or a pair of the wrong length / with such an entry.
    """
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f'{owner}: {name} must be an int or a (rows, cols) pair, '
                             f'got {value!r}')
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f'{owner}: {name} must be a positive integer or a pair of '
                                 f'positive integers (rows, cols), got {value!r}')
        return int(value[0]), int(value[1])
    check_positive(value, name, owner)
    side = math.isqrt(value)
    if side * side != value:
        raise ValueError(f'{owner}: {name}={value} is not a perfect square; give the '
                         f'grid explicitly as ({name}_rows, {name}_cols), e.g. (8, 8)')
    return side, side


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """``(B, N, H*p) -> (B, H, N, p)`` (a view; no copy)."""
    b, n, c = t.shape
    return t.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """``(B, H, N, p) -> (B, N, H*p)``."""
    b, h, n, p = t.shape
    return t.transpose(1, 2).reshape(b, n, h * p)


def check_input_width(x: Tensor, embed_dims: int, owner: str,
                      token_layout: bool = True) -> None:
    """Raise ``ValueError`` naming ``embed_dims`` unless ``x`` has that many channels.

    ``token_layout=True``: ``x`` must be ``(B, N, embed_dims)``; ``False``: any
    ``(..., embed_dims)`` (feed-forward parts). A shape comparison only, so it costs
    nothing and traces under ``torch.compile`` without a graph break.
    """
    if (token_layout and x.dim() != 3) or x.dim() < 1 or x.shape[-1] != embed_dims:
        layout = '(B, N, embed_dims' if token_layout else '(..., embed_dims'
        raise ValueError(f'{owner}: expected an input of shape {layout}={embed_dims}), '
                         f'got {tuple(x.shape)}')


def is_compiling() -> bool:
    """Whether the code is being traced by ``torch.compile`` (dynamo / export)."""
    compiler = getattr(torch, 'compiler', None)
    if compiler is not None and hasattr(compiler, 'is_compiling'):  # torch >= 2.3
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()  # pragma: no cover


def is_exporting() -> bool:
    """Whether the code is being traced by ``torch.export`` (and so by the ONNX
    exporter, docs/deployment.md). Exported graphs keep no shape guards, so code on
    this path must compute the same function for every input size: no branch on a
    size, no compiled kernel, no ``int()`` of a size."""
    compiler = getattr(torch, 'compiler', None)
    return bool(compiler is not None and hasattr(compiler, 'is_exporting')
                and compiler.is_exporting())


def as_size(v) -> int:
    """``int(v)``, except that a symbolic size (``torch.SymInt`` while exporting with
    dynamic shapes) stays symbolic: ``int()`` would fix the graph to this input."""
    return v if isinstance(v, torch.SymInt) else int(v)


class HWShape(tuple):
    """``(h, w)`` of a patch grid already checked against ``num_tokens`` tokens by
    :func:`check_hw_shape`. The value is validated once, where it enters (the backbone
    or head that made the tokens): the attentions of the layers that follow take it
    as it is when their token count is ``num_tokens``, and check anything else."""

    def __new__(cls, h, w, num_tokens):
        self = super().__new__(cls, (h, w))
        self.num_tokens = num_tokens
        return self


def check_hw_shape(x: Tensor, hw_shape: Optional[Sequence[int]], owner: str) -> HWShape:
    """Validate ``hw_shape`` against the token count of ``x`` (``B, N, C``); returns it as
    an :class:`HWShape` that later checks of the same ``N`` accept without repeating."""
    h, w = _check_hw(x.shape[1], hw_shape, owner)
    return HWShape(h, w, x.shape[1])


def _check_hw(num_tokens: int, hw_shape: Optional[Sequence[int]],
              owner: str) -> Tuple[int, int]:
    if isinstance(hw_shape, HWShape) and hw_shape.num_tokens == num_tokens:
        return hw_shape[0], hw_shape[1]
    return validate_hw(num_tokens, hw_shape, owner)


def validate_hw(num_tokens: int, hw_shape: Optional[Sequence[int]],
                owner: str) -> Tuple[int, int]:
    """The check itself: ``hw_shape`` is ``(h, w)`` with ``0 < h·w <= num_tokens``."""
    if hw_shape is None:
        raise ValueError(f'{owner}: hw_shape=(h, w) of the patch grid is required')
    h, w = as_size(hw_shape[0]), as_size(hw_shape[1])
    if h <= 0 or w <= 0 or h * w > num_tokens:
        raise ValueError(f'{owner}: hw_shape={tuple(hw_shape)} needs h*w <= N '
                         f'(N={num_tokens} tokens)')
    return h, w


def patch_span(num_tokens: int, hw_shape: Optional[Sequence[int]], legacy: bool,
               owner: str) -> Tuple[int, int, int]:
    """The one pooling rule: which tokens are pooled into representatives or landmarks
    (docs/mechanisms.md §1.2, §5.1, §8), as ``(start, h, w)``: the ``h·w`` tokens from
    ``start`` form a row-major ``h × w`` grid.

    * default: the patch tokens, after ``N − h·w`` prefix tokens, on ``hw_shape``;
    * ``legacy`` (the reference implementations; released checkpoints): the first
      ``N − 1`` tokens in sequence order (CLS included, last patch dropped) as a
      ``⌊√(N−1)⌋`` square; ``hw_shape`` is not used.

    Raises:
        ValueError: naming ``owner`` and the parameter, when the tokens cannot form it.
    """
    if legacy:
        side = math.isqrt(max(num_tokens - 1, 0))
        if side < 1 or side * side != num_tokens - 1:
            raise ValueError(f'{owner}: legacy_pooling needs N - 1 to be a square number of '
                             f'tokens (reference behaviour), got N={num_tokens}')
        return 0, side, side
    h, w = _check_hw(num_tokens, hw_shape, owner)
    return num_tokens - h * w, h, w


def pool_grid_channels_last(img: Tensor, grid: Tuple[int, int]) -> Tensor:
    """``F.adaptive_avg_pool2d`` of a channels-last image ``img (B, h, w, C)`` (any
    strides) onto ``grid`` -> ``(B, s_h, s_w, C)``.

    When ``s_h`` divides ``h`` and ``s_w`` divides ``w`` the bins are equal blocks and the
    pooling is one mean over a strided view (a single reduction kernel, no copy); otherwise
    the image is pooled by ``adaptive_avg_pool2d`` (same values). Measured on an H200: the
    adaptive kernel took most of CBSA's forward at 65,536 tokens in one image (1,024
    tokens per bin, docs/benchmark_attention.md, "CUDA").
    """
    b, h, w, c = img.shape
    s_h, s_w = grid
    if is_exporting():
        return adaptive_avg_pool2d_any(img, grid, channels_last=True)
    if h % s_h == 0 and w % s_w == 0:
        return img.unflatten(1, (s_h, h // s_h)).unflatten(3, (s_w, w // s_w)).mean((2, 4))
    return F.adaptive_avg_pool2d(img.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)


def pool_patch_tokens(t: Tensor, hw_shape: Optional[Sequence[int]], grid: Tuple[int, int],
                      legacy: bool = False, owner: str = 'pool_patch_tokens') -> Tensor:
    """Adaptive average pooling of the tokens :func:`patch_span` selects onto ``grid``.

    Args:
        t: ``(B, N, C)`` tokens, prefix tokens first then ``h*w`` patches row-major.
        hw_shape: ``(h, w)`` of the patch grid.
        grid: ``(s_h, s_w)`` output grid; ``m = s_h * s_w``.
        legacy: the reference implementations' pooling (:func:`patch_span`).
        owner: named in errors.

    Returns:
        ``(B, m, C)`` pooled tokens, row-major on ``grid``.
    """
    b, n, c = t.shape
    start, h, w = patch_span(n, hw_shape, legacy, owner)
    img = t[:, start:start + h * w].transpose(1, 2).reshape(b, c, h, w)
    pooled = adaptive_avg_pool2d_any(img, grid)  # (B, C, s_h, s_w)
    return pooled.flatten(2).transpose(1, 2)


def _bin_matrix(size, bins: int, like: Tensor) -> Tensor:
    """``(bins, size)`` averaging weights of ``adaptive_avg_pool`` along one axis: row
    ``i`` is ``1 / (e_i − s_i)`` on ``[s_i, e_i)``, ``s_i = ⌊i·size/bins⌋``,
    ``e_i = ⌈(i+1)·size/bins⌉`` (PyTorch's bins), 0 elsewhere. Built from ``arange``
    so that ``size`` may be symbolic."""
    i = torch.arange(bins, device=like.device).unsqueeze(1)
    j = torch.arange(size, device=like.device).unsqueeze(0)
    start = torch.div(i * size, bins, rounding_mode='floor')
    end = torch.div((i + 1) * size + bins - 1, bins, rounding_mode='floor')
    inside = (j >= start) & (j < end)
    return inside.to(like.dtype) / (end - start).to(like.dtype)


def adaptive_avg_pool2d_any(img: Tensor, grid: Tuple[int, int],
                            channels_last: bool = False) -> Tensor:
    """``F.adaptive_avg_pool2d(img, grid)`` for any input size, written as two small
    matrix products with the bin weights of :func:`_bin_matrix` (same bins, same
    values up to summation order). Used while exporting (:func:`is_exporting`): the
    graph then holds one computation for every height and width, where the pooling
    kernel would be fixed to the traced size, and ONNX has no adaptive pooling.

    ``img``: ``(..., h, w)`` -> ``(..., s_h, s_w)``; with ``channels_last``
    ``(B, h, w, C)`` -> ``(B, s_h, s_w, C)``.
    """
    if channels_last:
        return adaptive_avg_pool2d_any(img.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)
    if not is_exporting():
        return F.adaptive_avg_pool2d(img, grid)
    rows = _bin_matrix(img.shape[-2], grid[0], img)  # (s_h, h)
    cols = _bin_matrix(img.shape[-1], grid[1], img)  # (s_w, w)
    return rows @ img @ cols.t()


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would run matrix products in, else ``x.dtype``."""
    dev = x.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except TypeError:  # torch < 2.4
        enabled = (torch.is_autocast_cpu_enabled() if dev == 'cpu'
                   else torch.is_autocast_enabled())
    if not enabled:
        return x.dtype
    if hasattr(torch, 'get_autocast_dtype'):
        return torch.get_autocast_dtype(dev)
    return (torch.get_autocast_cpu_dtype() if dev == 'cpu'
            else torch.get_autocast_gpu_dtype())


def softmax_fp32(t: Tensor) -> Tensor:
    """Softmax over the last axis with float32 (or better) statistics."""
    acc = torch.promote_types(t.dtype, torch.float32)
    return torch.softmax(t, dim=-1, dtype=acc).to(t.dtype)


def softmax_backward(grad: Tensor, out: Tensor) -> Tensor:
    """``out ⊙ (grad − Σ_last grad ⊙ out)`` (gradient of the softmax input).

    May overwrite ``grad`` (callers pass a buffer they own)."""
    if out.dtype in (torch.float32, torch.float64):
        if hasattr(torch, '_softmax_backward_data'):  # one fused kernel
            return torch._softmax_backward_data(grad, out, -1, out.dtype)
        dot = torch.linalg.vecdot(grad, out, dim=-1).unsqueeze(-1)
        return grad.sub_(dot).mul_(out)
    g, o = grad.float(), out.float()
    g = g - torch.linalg.vecdot(g, o, dim=-1).unsqueeze(-1)
    return g.mul_(o).to(out.dtype)
