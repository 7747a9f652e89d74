"""DEPICT decode heads: self-attention (SA) and cross-attention (CA) forms (docs/mechanisms.md §3).

"Rethinking Decoders for Transformer-based Semantic Segmentation: A Compression
Perspective" (NeurIPS 2024, arXiv 2411.03033). Both heads are stacks of MSSA steps
with a tied in/out projection and no FFN, followed by a cosine-similarity mask
read-out. The attention itself is :class:`mmcbsa.models.attentions.MSSA`
(``out_proj='tied'``), the residual step and the mask read-out are shared with the
CBT head (:mod:`.class_mask_head`); this file only composes them.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmengine.model import ModuleList
from torch import Tensor

from mmcbsa.registry import register_model
from ..attentions.base import check_hw_shape
from .class_mask_head import ClassMaskHead, PreNormAttnLayer, check_sizes

_OWNER = 'DEPICTHead'


class DEPICTLayer(PreNormAttnLayer):
    """One DEPICT step: ``t ← t + γ · MSSA_tied(LN(t))`` (docs/mechanisms.md §3).

    Self-attention (``context=None``): ``w = LN(t) Uᵀ`` is query, key and value.
    Cross-attention: queries ``t Uᵀ`` from the (un-normalised) class embeddings,
    keys/values ``LN(context) Uᵀ`` from the patch tokens.

    Args:
        embed_dims: token width ``d``.
        num_heads: heads ``H``.
        head_dims: head width ``p`` (``U ∈ R^{Hp×d}``, independent of ``d``).
        attn_drop: dropout on the attention weights (training only).
        norm_cfg: config of the pre-norm (``LN``).

    Shapes: ``t (B, N, d)``, ``context (B, L, d)`` -> ``(B, N, d)``.
    """

    def __init__(self, embed_dims: int, num_heads: int, head_dims: int,
                 attn_drop: float = 0., norm_cfg: dict = dict(type='LN')) -> None:
        super().__init__(
            embed_dims,
            dict(type='MSSA', num_heads=num_heads, head_dims=head_dims, out_proj='tied',
                 attn_drop=attn_drop),
            norm_cfg=norm_cfg)
        # U ~ N(0, 1) / √d (docs/mechanisms.md §3); γ keeps MSSA's standard-normal init.
        nn.init.normal_(self.attn.in_proj.weight, mean=0., std=embed_dims ** -0.5)


@register_model(scopes=('mmseg', ))
class DEPICTHead(ClassMaskHead):
    """DEPICT decode head, ``mode='sa'`` (DEPICT-SA) or ``mode='ca'`` (DEPICT-CA).

    Feature map ``(B, C_in, h, w)`` -> tokens ``x (B, hw, d)`` (``d = channels``;
    a ``Linear(C_in→d)`` when ``C_in != d``, identity otherwise — the reference has
    ``C_in = d``), class embeddings ``c (n_cls, d)``:

    - SA: ``[c; x]`` → ``num_layers`` tied-MSSA self-attention layers → LN → split.
    - CA: ``x`` → ``num_layers`` tied-MSSA self-attention layers → LN;
      ``c`` → ``ca_num_layers`` cross-attention layers over those patches → LN.
    - Masks (:class:`ClassMaskHead`): ``normalize(x) normalize(c)ᵀ`` →
      ``LayerNorm(n_cls)`` over the class axis → ``(B, n_cls, h, w)``.
      :class:`BaseDecodeHead` upsamples them to the image in ``loss_by_feat`` /
      ``predict_by_feat``.

    Class embeddings are placed before the patches (mmcbsa's token layout, prefix
    tokens first); the reference appends them, which the (permutation-equivariant)
    self-attention does not see.

    The bare defaults reproduce the paper's ADE20K decoder: ``L = 3``, ``H = 3``,
    ``p = 100``; CA: 3 cross layers with ``p = 50``.

    Args:
        in_channels: channels of the selected feature map(s) (a list with
            ``input_transform='resize_concat'``; their sum is projected).
        channels: decoder width ``d`` (``d_model``).
        num_classes: number of classes ``n_cls`` (one embedding each). Binary
            segmentation: ``num_classes=1`` (or ``2`` with ``out_channels=1``) and
            ``loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=True)`` — one
            foreground embedding read out as ``s · cos + b`` instead of the class-axis
            LayerNorm, which is constant for one class (:class:`ClassMaskHead`).
        mode: ``'sa'`` or ``'ca'``.
        num_layers: self-attention layers ``L`` over the patches (and classes in SA).
        num_heads: heads ``H`` of those layers.
        head_dims: head width ``p`` of those layers (independent of ``channels``).
        ca_num_layers: cross-attention layers (CA only).
        ca_num_heads: heads of the cross-attention layers; default ``num_heads``.
        ca_head_dims: head width of the cross-attention layers.
        dropout_ratio: dropout on the attention weights (the reference's
            ``dropout``); no feature dropout is applied before the masks.
        norm_cfg: norm of the layers, the final norms and the mask norm.
        init_std: std of the truncated-normal class embeddings (and the input
            projection, when there is one).
        kwargs: the rest of :class:`BaseDecodeHead`'s arguments (``in_index``,
            ``input_transform``, ``loss_decode``, ``align_corners``, ...).
    """

    def __init__(self,
                 in_channels: Union[int, Sequence[int]],
                 channels: int,
                 *,
                 num_classes: int,
                 mode: str = 'sa',
                 num_layers: int = 3,
                 num_heads: int = 3,
                 head_dims: int = 100,
                 ca_num_layers: int = 3,
                 ca_num_heads: Optional[int] = None,
                 ca_head_dims: int = 50,
                 dropout_ratio: float = 0.,
                 norm_cfg: dict = dict(type='LN'),
                 init_std: float = 0.02,
                 init_cfg: Optional[dict] = None,
                 **kwargs) -> None:
        if mode not in ('sa', 'ca'):
            raise ValueError(f"{_OWNER}: mode must be 'sa' or 'ca', got {mode!r}")
        check_sizes(_OWNER, num_layers=num_layers, num_heads=num_heads, head_dims=head_dims)
        if mode == 'ca':
            ca_num_heads = num_heads if ca_num_heads is None else ca_num_heads
            check_sizes(_OWNER, ca_num_layers=ca_num_layers, ca_num_heads=ca_num_heads,
                        ca_head_dims=ca_head_dims)
        super().__init__(in_channels, channels, num_classes=num_classes,
                         dropout_ratio=dropout_ratio, norm_cfg=norm_cfg, init_std=init_std,
                         init_cfg=init_cfg, **kwargs)
        self.mode = mode
        d = channels
        self.layers = ModuleList([
            DEPICTLayer(d, num_heads, head_dims, dropout_ratio, norm_cfg)
            for _ in range(num_layers)
        ])
        self.decoder_norm = build_norm_layer(norm_cfg, d)[1]
        if mode == 'ca':
            self.cross_layers = ModuleList([
                DEPICTLayer(d, ca_num_heads, ca_head_dims, dropout_ratio, norm_cfg)
                for _ in range(ca_num_layers)
            ])
            self.cross_norm = build_norm_layer(norm_cfg, d)[1]

    def decode(self, x: Tensor, c: Tensor, hw_shape: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """``x (B, hw, d)``, ``c (B, n_cls, d)`` -> normalised ``(patches, classes)``."""
        n_cls = c.shape[1]
        if self.mode == 'sa':
            t = torch.cat((c, x), dim=1)  # (B, n_cls + hw, d), classes first
            hw_shape = check_hw_shape(t, hw_shape, 'DEPICTHead')  # once for every layer
            for layer in self.layers:
                t = layer(t, hw_shape=hw_shape)
            t = self.decoder_norm(t)
            return t[:, n_cls:], t[:, :n_cls]
        hw_shape = check_hw_shape(x, hw_shape, 'DEPICTHead')
        for layer in self.layers:
            x = layer(x, hw_shape=hw_shape)
        patches = self.decoder_norm(x)
        for layer in self.cross_layers:
            c = layer(c, context=patches)
        return patches, self.cross_norm(c)
