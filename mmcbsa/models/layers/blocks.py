"""Transformer block layouts shared by mmcbsa's backbones and heads."""
from typing import Optional, Sequence

import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.drop import DropPath
from mmengine.model import BaseModule
from torch import Tensor

from mmcbsa.registry import build_model, register_model

LAYOUTS = ('ista', 'residual')


@register_model()
class WhiteBoxBlock(BaseModule):
    """One transformer block with a pluggable attention and feed-forward part.

    Layouts:

    - ``'ista'`` (CRATE / CBT, docs/mechanisms.md §1): ``z = x + attn(LN1(x))``, then
      ``x' = ffn(LN2(z))`` — no residual around the feed-forward (ISTA) part.
    - ``'residual'`` (DeiT): ``x = x + attn(LN1(x))``, ``x = x + ffn(LN2(x))``.

    Args:
        embed_dims: token width ``C``.
        num_heads: attention heads.
        attn_cfg: attention config; ``type`` is any mmcbsa attention (``CBSA``,
            ``MSSA``, ``TSSA``, ``MiTA``, ``PrimalAttention``, ``MHSA``);
            ``embed_dims`` / ``num_heads`` are filled in.
        ffn_cfg: ``dict(type='ISTA')`` or an mmcv ``FFN`` config (``type='FFN'``,
            ``feedforward_channels`` ...); ``embed_dims`` is filled in and mmcv's FFN
            is built without its own identity shortcut.
        layout: ``'ista'`` or ``'residual'``.
        drop_path_rate: stochastic depth on the residual branches.
        norm_cfg: norm layer config (default ``LN``, eps 1e-5).

    Shapes: ``x (B, N, C)``, ``hw_shape=(h, w)`` -> ``(B, N, C)``.
    """

    def __init__(self, embed_dims: int, num_heads: int, attn_cfg: Optional[dict] = None,
                 ffn_cfg: Optional[dict] = None, layout: str = 'ista',
                 drop_path_rate: float = 0., norm_cfg: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if layout not in LAYOUTS:
            raise ValueError(f'WhiteBoxBlock: layout must be one of {LAYOUTS}, got {layout!r}')
        self.layout = layout
        norm_cfg = dict(type='LN') if norm_cfg is None else norm_cfg
        attn_cfg = dict(type='CBSA') if attn_cfg is None else dict(attn_cfg)
        ffn_cfg = dict(type='ISTA') if ffn_cfg is None else dict(ffn_cfg)
        attn_cfg.setdefault('embed_dims', embed_dims)
        attn_cfg.setdefault('num_heads', num_heads)
        ffn_cfg.setdefault('embed_dims', embed_dims)
        if ffn_cfg['type'] in ('FFN', 'mmcv.FFN'):
            ffn_cfg.setdefault('add_identity', False)
        self.norm1 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.attn = build_model(attn_cfg)
        self.norm2 = build_norm_layer(norm_cfg, embed_dims)[1]
        self.ffn = build_model(ffn_cfg)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: Tensor, hw_shape: Optional[Sequence[int]] = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), hw_shape=hw_shape))
        if self.layout == 'ista':
            return self.ffn(self.norm2(x))
        return x + self.drop_path(self.ffn(self.norm2(x)))
