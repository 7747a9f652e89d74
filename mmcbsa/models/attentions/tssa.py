"""Token Statistics Self-Attention (ToST, docs/mechanisms.md §2): linear in the token count."""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from torch import Tensor

from mmcbsa.registry import register_model
from .base import check_input_width, resolve_head_dims


@register_model()
class TSSA(BaseModule):
    """TSSA: tokens are softly assigned to heads and scaled by second moments.

    Per head ``h`` with ``w = x Wᵀ`` split into heads (docs/mechanisms.md §2):

    - ``ŵ = w / ‖w‖`` over the token axis;
    - ``π = softmax_heads(τ_h Σ_p ŵ²)`` ``(B, H, N)``;
    - ``s_h = (π_h / (Σ_n π_h + 1e-8))ᵀ (w_h ⊙ w_h)`` ``(B, H, 1, p)``;
    - ``o_h = −(w_h ⊙ π_h) / (1 + s_h)``; ``y = Linear_{Hp→C}(concat_h o_h)``.

    Args:
        embed_dims: token width ``C``.
        num_heads: heads ``H``.
        head_dims: head width ``p``; default ``C / H``.
        proj_bias: bias of the output projection.
        proj_drop: dropout on the output.

    Maps (analysis, ``mmcbsa.analysis``): :meth:`attention_maps` returns
    ``{'assignment': π}`` ``(B, H, N)`` (``π[b, h, n]``: share of token ``n`` in
    group/head ``h``; sums to 1 over ``h``).

    Shapes: ``x (B, N, C) -> (B, N, C)``; ``hw_shape`` is not used.
    """

    def __init__(self, embed_dims: int, num_heads: int, head_dims: Optional[int] = None,
                 proj_bias: bool = True, proj_drop: float = 0.,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.head_dims = resolve_head_dims(embed_dims, num_heads, head_dims, 'TSSA')
        self.embed_dims, self.num_heads = embed_dims, num_heads
        inner = num_heads * self.head_dims
        self.in_proj = nn.Linear(embed_dims, inner, bias=False)
        self.temp = nn.Parameter(torch.ones(num_heads))  # τ
        self.out_proj = nn.Linear(inner, embed_dims, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _assign(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``w (B, N, H, p)``, ``w ⊙ w`` and the assignment ``π (B, N, H)``."""
        check_input_width(x, self.embed_dims, 'TSSA')
        # Token-major (B, N, H, p) throughout: every elementwise op is contiguous, and
        # the two per-head reductions over channels / tokens are tiny GEMMs.
        b, n, _ = x.shape
        heads, p = self.num_heads, self.head_dims
        w = self.in_proj(x).view(b, n, heads, p)
        w2 = w * w
        # Σ_p ŵ² with ŵ = w / max(‖w‖_tokens, 1e-12) (F.normalize over the token axis)
        inv_norm2 = 1.0 / w2.sum(1).clamp_min(1e-24)  # (B, H, p)
        eye = torch.eye(heads, dtype=w.dtype, device=w.device)
        block = (inv_norm2.unsqueeze(-1) * eye.view(1, heads, 1, heads)).view(b, heads * p, heads)
        score = torch.bmm(w2.view(b, n, heads * p), block)  # (B, N, H)
        pi = torch.softmax(score * self.temp.to(score.dtype), dim=-1)  # over heads
        return w, w2, pi

    @torch.no_grad()
    def attention_maps(self, x: Tensor,
                       hw_shape: Optional[Sequence[int]] = None) -> Dict[str, Tensor]:
        """``{'assignment': π (B, H, N)}`` of ``forward(x, hw_shape)``."""
        return {'assignment': self._assign(x)[2].transpose(1, 2)}

    def forward(self, x: Tensor, hw_shape: Optional[Sequence[int]] = None) -> Tensor:
        w, w2, pi = self._assign(x)
        b, n, heads, p = w.shape
        weights = pi / (pi.sum(1, keepdim=True) + 1e-8)
        # s_h = weights_hᵀ (w_h ⊙ w_h): diagonal blocks of weightsᵀ · w2 (B, H, H·p)
        s = torch.bmm(weights.transpose(1, 2), w2.view(b, n, heads * p))
        s = s.view(b, heads, heads, p).diagonal(dim1=1, dim2=2).transpose(1, 2)  # (B, H, p)
        o = (w * pi.unsqueeze(-1)) * (-1.0 / (1 + s)).unsqueeze(1)  # −(w ⊙ π) / (1 + s)
        return self.proj_drop(self.out_proj(o.view(b, n, heads * p)))
