"""CBSA-style attention for a pretrained softmax ViT (the CBSA repository's "ViT
adaptation"; docs/mechanisms.md §8).

The module keeps the ViT's ``qkv = Linear_{C→3C}`` and ``proj = Linear_{C→C}`` (names and
shapes of mmpretrain's ``MultiheadAttention`` and timm's ``Attention``), so a pretrained
ViT's weights load unchanged; only the attention pattern changes. Per head, with
``p = C / H`` and scale ``1/√p``:

1. representatives ``Q0 = pool(q)`` ``(m, p)``: adaptive average pooling of the queries
   of the patch tokens on their ``h × w`` grid to ``s_h × s_w`` (``m = s_h·s_w``);
2. contract: ``Δ = softmax_tokens(Q0 kᵀ / √p) v`` ``(m, p)``;
3. broadcast: ``out = softmax_reps(q Q0ᵀ / √p) Δ`` ``(N, p)``.

Both steps are ``F.scaled_dot_product_attention`` calls (``SDPA(Q0, k, v)`` and
``SDPA(q, Q0, Δ)``), so their cost is ``O(N m p)`` per head, linear in ``N``, and their
softmax statistics stay in float32 under autocast.

The math lives in :func:`adapted_cbsa_attention` (heads in, heads out) and in the
:class:`AdaptedHeadsAttention` mixin (argument checks and recording). :class:`AdaptedCBSA`
is the stand-alone module; :mod:`mmcbsa.models.backbones.adapted_vit` plugs the same
function into mmpretrain's and mmseg's own ``VisionTransformer`` s.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from mmcbsa.registry import register_model
from .base import (GridLike, check_input_width, merge_heads, patch_span, pool_patch_tokens,
                   resolve_head_dims, softmax_fp32, split_heads, to_grid, warn_once)

Weights = Tuple[Tensor, Tensor]


def adapted_cbsa_attention(q: Tensor, k: Tensor, v: Tensor,
                           hw_shape: Optional[Sequence[int]], grid: Tuple[int, int],
                           legacy_pooling: bool = False, dropout_p: float = 0.,
                           return_weights: bool = False, owner: str = 'AdaptedCBSA'
                           ) -> Tuple[Tensor, Optional[Weights]]:
    """Representative attention on heads (docs/mechanisms.md §8, steps 1–3).

    Args:
        q: queries ``(B, H, N, p)``; tokens are ``N - h·w`` prefix tokens (CLS,
            registers) first, then the ``h·w`` patches row-major.
        k: keys ``(B, H, N, p)``.
        v: values ``(B, H, N, p)``.
        hw_shape: ``(h, w)`` of the patch grid (unused with ``legacy_pooling``).
        grid: ``(s_h, s_w)`` grid of representatives, ``m = s_h·s_w``.
        legacy_pooling: pool like the reference code: the first ``N − 1`` tokens in
            sequence order (CLS included, last patch dropped) as a ``⌊√N⌋`` square.
        dropout_p: dropout on the contraction weights (as the reference; pass 0 in eval).
        return_weights: also return the two attention maps, computed explicitly.
        owner: module name used in error and warning messages.

    Returns:
        ``out (B, H, N, p)`` and, if ``return_weights``, ``(contract, broadcast)``:
        ``contract = softmax_tokens(Q0 kᵀ/√p)`` ``(B, H, m, N)`` and
        ``broadcast = softmax_reps(q Q0ᵀ/√p)`` ``(B, H, N, m)``; else ``None``.
    """
    b, heads, n, p = q.shape
    _, h, w = patch_span(n, hw_shape, legacy_pooling, owner)
    pooled_from = h * w
    m = grid[0] * grid[1]
    if m > pooled_from:
        warn_once(f'{owner}:num_reps={m}>{pooled_from}',
                  f'{owner}: {m} representatives ({grid[0]}x{grid[1]}) pooled from only '
                  f'{pooled_from} patch tokens; attention is no cheaper than softmax '
                  f'attention then (the linear cost needs num_reps < number of patches)')
    # Q0: pool all C = H·p query channels, then split into heads. A contiguous (B, N, C)
    # copy of the queries is a channels-last image for the pooling (2x faster on CPU than
    # the strided view); the (small) representatives are made contiguous so that SDPA
    # takes its fused kernels (they need unit stride in the last dimension).
    q_tokens = q.transpose(1, 2).reshape(b, n, heads * p).contiguous()
    reps = split_heads(pool_patch_tokens(q_tokens, hw_shape, grid, legacy=legacy_pooling,
                                         owner=owner).contiguous(), heads)
    scale = p ** -0.5
    if not return_weights:
        delta = F.scaled_dot_product_attention(reps, k, v, dropout_p=dropout_p, scale=scale)
        return F.scaled_dot_product_attention(q, reps, delta, scale=scale), None
    contract = softmax_fp32(torch.matmul(reps, k.transpose(-2, -1)) * scale)  # (B, H, m, N)
    delta = torch.matmul(F.dropout(contract, dropout_p) if dropout_p > 0 else contract, v)
    broadcast = softmax_fp32(torch.matmul(q, reps.transpose(-2, -1)) * scale)  # (B, H, N, m)
    return torch.matmul(broadcast, delta), (contract, broadcast)


class AdaptedHeadsAttention:
    """Mixin: the adapted attention on ``(B, H, N, p)`` heads.

    Hosts set ``rep_grid``, ``legacy_pooling`` (and optionally ``owner_name``, the name
    used in messages); :meth:`attend` runs :func:`adapted_cbsa_attention`,
    :meth:`head_maps` returns its two weight maps for the same heads.
    """

    rep_grid: Tuple[int, int]
    legacy_pooling: bool

    def _adapted(self, q: Tensor, k: Tensor, v: Tensor, hw_shape: Optional[Sequence[int]],
                 dropout_p: float, return_weights: bool) -> Tuple[Tensor, Optional[Weights]]:
        return adapted_cbsa_attention(
            q, k, v, hw_shape, self.rep_grid, legacy_pooling=self.legacy_pooling,
            dropout_p=dropout_p, return_weights=return_weights,
            owner=getattr(self, 'owner_name', type(self).__name__))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, hw_shape: Optional[Sequence[int]],
               dropout_p: float = 0.) -> Tensor:
        return self._adapted(q, k, v, hw_shape, dropout_p, False)[0]

    @torch.no_grad()
    def head_maps(self, q: Tensor, k: Tensor, v: Tensor,
                  hw_shape: Optional[Sequence[int]]) -> Dict[str, Tensor]:
        """``{'attention': softmax_tokens(Q0 kᵀ/√p) (B, H, m, N), 'broadcast':
        softmax_reps(q Q0ᵀ/√p) (B, H, N, m)}`` for heads ``q, k, v (B, H, N, p)``."""
        contract, broadcast = self._adapted(q, k, v, hw_shape, 0., True)[1]
        return {'attention': contract, 'broadcast': broadcast}


@register_model()
class AdaptedCBSA(AdaptedHeadsAttention, BaseModule):
    """Pretrained-ViT attention in CBSA style (docs/mechanisms.md §8).

    With ``q, k, v = split(qkv(x))`` into ``H`` heads of width ``p = C / H``:

    * ``Q0 = pool(q)`` ``(B, H, m, p)``: adaptive average pooling of the patch tokens'
      queries on their ``h × w`` grid to ``s_h × s_w`` (prefix tokens excluded; any grid,
      non-square images allowed). With ``legacy_pooling=True``: the reference's pooling
      of the first ``N − 1`` tokens (CLS included, last patch dropped) as a ``⌊√N⌋``
      square, for exact reproduction of the reference (needs ``N − 1`` square);
    * ``Δ = softmax_tokens(Q0 kᵀ / √p) v`` ``(B, H, m, p)`` — the representatives read
      every token (prefix tokens included);
    * ``o = softmax_reps(q Q0ᵀ / √p) Δ`` ``(B, H, N, p)`` — every token reads them back;
    * ``y = proj(concat_h o)``.

    This is CBSA's extract/broadcast (docs/mechanisms.md §1) with separate query/key/value
    maps and no contraction among the representatives. Cost ``O(N m C)`` besides the two
    projections, against ``O(N² C)`` for softmax attention.

    Maps (analysis, ``mmcbsa.analysis``): :meth:`attention_maps` takes the arguments of
    :meth:`forward` and returns ``{'attention': softmax_tokens(Q0 kᵀ/√p)}``
    ``(B, H, m, N)`` (the contraction weights) and ``{'broadcast': softmax_reps(q
    Q0ᵀ/√p)}`` ``(B, H, N, m)``. The forward runs both steps through
    ``F.scaled_dot_product_attention`` and materialises no ``m × N`` map.

    Args:
        embed_dims: token width ``C``.
        num_heads: heads ``H`` (``C`` must be divisible by ``H``).
        num_reps: representatives ``m``: a perfect square (square grid) or a grid
            ``(s_h, s_w)``. Default 64 (8×8, the reference).
        legacy_pooling: pool like the reference implementation (see above).
        qkv_bias: bias of ``qkv``.
        proj_bias: bias of ``proj``.
        attn_drop: dropout on the contraction weights (training only), as the reference.
        proj_drop: dropout after ``proj``.
        init_cfg: mmengine initialisation config.

    Shapes: ``x (B, N, C)``, ``hw_shape=(h, w)`` with ``h·w <= N`` (prefix tokens first)
    -> ``(B, N, C)``.
    """

    def __init__(self, embed_dims: int, num_heads: int, num_reps: GridLike = 64,
                 legacy_pooling: bool = False, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0.,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.head_dims = resolve_head_dims(embed_dims, num_heads, None, 'AdaptedCBSA')
        self.rep_grid = to_grid(num_reps, 'num_reps', 'AdaptedCBSA')
        self.num_reps = self.rep_grid[0] * self.rep_grid[1]
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.legacy_pooling = bool(legacy_pooling)
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(embed_dims, embed_dims, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: Tensor) -> Tensor:
        check_input_width(x, self.embed_dims, 'AdaptedCBSA')
        b, n, _ = x.shape
        return self.qkv(x).view(b, n, 3, self.num_heads, self.head_dims).permute(2, 0, 3, 1, 4)

    @torch.no_grad()
    def attention_maps(self, x: Tensor,
                       hw_shape: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
        """The two weight maps of ``forward(x, hw_shape)`` (see the class docstring)."""
        qkv = self._heads(x)
        return self.head_maps(qkv[0], qkv[1], qkv[2], hw_shape)

    def forward(self, x: Tensor, hw_shape: Optional[Sequence[int]] = None) -> Tensor:
        qkv = self._heads(x)
        out = self.attend(qkv[0], qkv[1], qkv[2], hw_shape,
                          dropout_p=self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(merge_heads(out)))
