"""Multi-head Subspace Self-Attention (CRATE, docs/mechanisms.md §2) and its tied-projection
form used by the DEPICT decoders (docs/mechanisms.md §3)."""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from mmcbsa.registry import register_model
from .base import check_input_width, merge_heads, resolve_head_dims, split_heads


@register_model()
class MSSA(BaseModule):
    """MSSA: every head attends within its own learned subspace.

    ``w = x Uᵀ`` (``U ∈ R^{Hp×C}``, no bias) serves as query, key and value:
    ``o_h = softmax(w_h w_hᵀ / √p) w_h`` (docs/mechanisms.md §2). The heads are merged and

    - ``out_proj='linear'`` (CRATE): ``y = Linear_{Hp→C}(concat_h o_h)`` with bias;
    - ``out_proj='tied'`` (DEPICT, docs/mechanisms.md §3): ``y = γ · concat_h(o_h) U`` with the
      same ``U`` and a learned scalar step ``γ`` (standard-normal init).

    With ``context`` (cross-attention, DEPICT-CA): queries ``x Uᵀ``, keys and
    values ``context Uᵀ``.

    Args:
        embed_dims: token width ``C``.
        num_heads: heads ``H``.
        head_dims: head width ``p``; default ``C / H``.
        out_proj: ``'linear'`` or ``'tied'``.
        proj_bias: bias of the linear output projection.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout on the output.

    Maps (analysis, ``mmcbsa.analysis``): :meth:`attention_maps` takes the arguments of
    :meth:`forward` and returns ``{'attention': softmax(w_q w_kᵀ / √p)}``
    ``(B, H, N, L)`` (``L = N`` without ``context``), the weights the forward applies
    through SDPA, written out.

    Shapes: ``x (B, N, C)``, ``context (B, L, C)`` -> ``(B, N, C)``.
    """

    def __init__(self, embed_dims: int, num_heads: int, head_dims: Optional[int] = None,
                 out_proj: str = 'linear', proj_bias: bool = True, attn_drop: float = 0.,
                 proj_drop: float = 0., init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.head_dims = resolve_head_dims(embed_dims, num_heads, head_dims, 'MSSA')
        if out_proj not in ('linear', 'tied'):
            raise ValueError(f"MSSA: out_proj must be 'linear' or 'tied', got {out_proj!r}")
        self.embed_dims, self.num_heads, self.out_proj_mode = embed_dims, num_heads, out_proj
        inner = num_heads * self.head_dims
        self.in_proj = nn.Linear(embed_dims, inner, bias=False)  # U
        if out_proj == 'linear':
            self.out_proj = nn.Linear(inner, embed_dims, bias=proj_bias)
        else:
            self.step_size = nn.Parameter(torch.randn(1))  # γ
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """``w = x Uᵀ`` and the keys/values ``context Uᵀ`` (or ``w``), as heads."""
        check_input_width(x, self.embed_dims, 'MSSA')
        if context is not None:
            check_input_width(context, self.embed_dims, 'MSSA (context)')
        w = split_heads(self.in_proj(x), self.num_heads)  # (B, H, N, p)
        kv = w if context is None else split_heads(self.in_proj(context), self.num_heads)
        return w, kv

    @torch.no_grad()
    def attention_maps(self, x: Tensor, hw_shape: Optional[Sequence[int]] = None,
                       context: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``{'attention': (B, H, N, L)}`` of ``forward(x, hw_shape, context)``."""
        w, kv = self._heads(x, context)
        return {'attention': torch.softmax((w @ kv.transpose(-2, -1)) * self.head_dims**-0.5,
                                           dim=-1)}

    def forward(self, x: Tensor, hw_shape: Optional[Sequence[int]] = None,
                context: Optional[Tensor] = None) -> Tensor:
        w, kv = self._heads(x, context)
        drop = self.attn_drop if self.training else 0.
        # softmax(w_q w_kᵀ / √p) w_k  — SDPA's default scale is 1/√p.
        o = merge_heads(F.scaled_dot_product_attention(w, kv, kv, dropout_p=drop))
        if self.out_proj_mode == 'linear':
            y = self.out_proj(o)
        else:
            y = self.step_size * F.linear(o, self.in_proj.weight.t())  # γ · o U
        return self.proj_drop(y)
