"""ISTA feed-forward layer of CRATE / CBT (docs/mechanisms.md §1, "CBT block")."""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from torch import Tensor

from mmcbsa.registry import register_model
from ..attentions.base import check_input_width


@register_model()
class ISTA(BaseModule):
    """One proximal-gradient step towards a sparse code in a learned dictionary.

    ``ISTA(u) = ReLU(u + η (u D − u Dᵀ D) − η λ)`` with a square dictionary
    ``D ∈ R^{C×C}`` (row-vector convention; docs/mechanisms.md §1). There is no residual around
    it in the CBT/CRATE block. The gradient term is evaluated as ``(u − u Dᵀ) D``
    (two ``C×C`` products per token, exactly equal to the three-product form).

    Args:
        embed_dims: token width ``C``.
        step_size: ``η`` (default 0.1).
        lambd: sparsity weight ``λ`` (default 0.1).

    Shapes: ``(..., C) -> (..., C)``.
    """

    def __init__(self, embed_dims: int, step_size: float = 0.1, lambd: float = 0.1,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(embed_dims, int) or embed_dims <= 0:
            raise ValueError(f'ISTA: embed_dims must be a positive integer, got {embed_dims!r}')
        self.embed_dims, self.step_size, self.lambd = embed_dims, step_size, lambd
        self.weight = nn.Parameter(torch.empty(embed_dims, embed_dims))  # D
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        check_input_width(x, self.embed_dims, 'ISTA', token_layout=False)
        d = self.weight
        # u D − u Dᵀ D = (u − u Dᵀ) D: two d×d products per token instead of three.
        grad = F.linear(x - F.linear(x, d), d.t())
        return F.relu(x + self.step_size * grad - self.step_size * self.lambd)
