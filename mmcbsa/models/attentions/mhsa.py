"""Standard multi-head softmax self-attention through PyTorch SDPA: the baseline
every mmcbsa mechanism is compared against."""
from typing import Optional, Sequence

import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from mmcbsa.registry import register_model
from .base import check_input_width, merge_heads, resolve_head_dims


@register_model()
class MHSA(BaseModule):
    """``softmax(q kᵀ / √p) v`` with ``q, k, v = Linear_{C→3C}(x)`` (timm naming).

    Args:
        embed_dims: token width ``C``.
        num_heads: number of heads ``H`` (``p = C / H``).
        qkv_bias: bias of the ``qkv`` projection.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.

    Shapes: ``x (B, N, C) -> (B, N, C)``; ``hw_shape`` is accepted and unused.
    """

    def __init__(self, embed_dims: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0.,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.head_dims = resolve_head_dims(embed_dims, num_heads, None, 'MHSA')
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.qkv = nn.Linear(embed_dims, 3 * embed_dims, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, hw_shape: Optional[Sequence[int]] = None) -> Tensor:
        check_input_width(x, self.embed_dims, 'MHSA')
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dims).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], dropout_p=self.attn_drop if self.training else 0.)
        return self.proj_drop(self.proj(merge_heads(out)))
