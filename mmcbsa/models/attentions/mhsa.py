"""Standard multi-head softmax self-attention through PyTorch SDPA: the baseline
every mmcbsa mechanism is compared against."""
from typing import Dict, Optional, Sequence, Tuple

import torch
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

    Maps (analysis, ``mmcbsa.analysis``): :meth:`attention_maps` returns
    ``{'attention': softmax(q kᵀ / √p)}`` ``(B, H, N, N)``, the weights the forward
    applies through SDPA, written out.

    Shapes: ``x (B, N, C) -> (B, N, C)``; ``hw_shape`` is not used.
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

    def _qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        check_input_width(x, self.embed_dims, 'MHSA')
        b, n, _ = x.shape
        # unbind, not qkv[0], qkv[1], qkv[2]: each indexing op's backward allocates a
        # zero-filled full-size gradient (13 % of fwd+bwd in fill_); unbind's backward is
        # one stack. fwd+bwd 0.86-0.92x of the indexed version (N=197, B=8, C=384, H=6,
        # 1 thread, load 1.0 on 2 cores; 0.96x at N=4097, B=1)
        return self.qkv(x).view(b, n, 3, self.num_heads, self.head_dims).permute(
            2, 0, 3, 1, 4).unbind(0)

    @torch.no_grad()
    def attention_maps(self, x: Tensor,
                       hw_shape: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
        """``{'attention': (B, H, N, N)}`` of ``forward(x, hw_shape)``."""
        q, k, _ = self._qkv(x)
        return {'attention': torch.softmax((q @ k.transpose(-2, -1)) * self.head_dims**-0.5,
                                           dim=-1)}

    def forward(self, x: Tensor, hw_shape: Optional[Sequence[int]] = None) -> Tensor:
        q, k, v = self._qkv(x)
        drop = self.attn_drop if self.training else 0.
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.proj_drop(self.proj(merge_heads(out)))
