"""CBT decode head: the CBSA segmentation decoder of the CBSA paper (docs/mechanisms.md §4).

"Towards Interpretable and Efficient Attention: Compressing All by Contracting a
Few" (NeurIPS 2025, arXiv 2509.16875). DEPICT-SA's layout (docs/mechanisms.md §3) with CBSA
(docs/mechanisms.md §1) in place of MSSA: cost linear in the number of patch tokens. The attention
is :class:`mmcbsa.models.attentions.CBSA` built from the registry; the residual
step and the mask read-out are :mod:`.class_mask_head`'s.
"""
import copy
from typing import Optional, Sequence, Tuple, Union

import torch
from mmcv.cnn import build_norm_layer
from mmengine.model import ModuleList
from torch import Tensor

from mmcbsa.registry import register_model
from ..attentions.base import GridLike, check_hw_shape, to_grid
from .class_mask_head import ClassMaskHead, PreNormAttnLayer, check_sizes

_OWNER = 'CBTHead'


@register_model(scopes=('mmseg', ))
class CBTHead(ClassMaskHead):
    """CBT decode head (docs/mechanisms.md §4).

    Feature map ``(B, C_in, h, w)`` -> patch tokens ``x (B, hw, d)`` (``d =
    channels``; ``Linear(C_in→d)`` when ``C_in != d``), class embeddings
    ``c (n_cls, d)``:

    ``t = [c; x]`` → ``num_layers`` × ``t ← t + CBSA(LN(t))`` (no FFN) → LN → split →
    masks ``LN_cls(normalize(x) normalize(c)ᵀ)`` ``(B, n_cls, h, w)``
    (docs/mechanisms.md §3, done by :class:`ClassMaskHead`; mmseg upsamples them to the image).

    The representatives are pooled from the patch tokens only (the classes are
    prefix tokens and ``hw_shape=(h, w)`` is passed), onto a ``num_reps`` grid;
    extraction and broadcast run over all ``n_cls + hw`` tokens (docs/mechanisms.md §4). CBSA is
    permutation-equivariant apart from the pooling, so putting the classes first
    (mmcbsa's token layout) matches the reference, which appends them.

    The bare defaults are the paper's ADE20K decoder: ``L = 3``, ``H = 3``,
    ``p = 100``, ``m = 10×10``.

    Args:
        in_channels: channels of the selected feature map(s) (a list with
            ``input_transform='resize_concat'``; their sum is projected).
        channels: decoder width ``d``.
        num_classes: number of classes ``n_cls``. Binary segmentation:
            ``num_classes=1`` (or ``2`` with ``out_channels=1``) and
            ``loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=True)`` — one
            foreground embedding read out as ``s · cos + b`` instead of the class-axis
            LayerNorm, which is constant for one class (:class:`ClassMaskHead`).
        num_layers: CBSA layers ``L``.
        num_heads: heads ``H``.
        head_dims: head width ``p`` (independent of ``channels``).
        num_reps: representatives ``m`` (a perfect square) or a grid ``(s_h, s_w)``.
        attn_cfg: merged into the attention config
            ``dict(type='CBSA', num_heads, head_dims, num_reps, proj_drop=dropout_ratio)``
            (e.g. ``dict(rep_mode='learned')``); a different ``type`` replaces it
            (``embed_dims`` and ``num_heads`` are still the head's).
        dropout_ratio: dropout on each attention's output (``proj_drop``).
        norm_cfg: norm of the layers, the final norm and the mask norm.
        init_std: std of the truncated-normal class embeddings (and the input
            projection, when there is one).
        kwargs: the rest of :class:`BaseDecodeHead`'s arguments.
    """

    def __init__(self,
                 in_channels: Union[int, Sequence[int]],
                 channels: int,
                 *,
                 num_classes: int,
                 num_layers: int = 3,
                 num_heads: int = 3,
                 head_dims: int = 100,
                 num_reps: GridLike = 100,
                 attn_cfg: Optional[dict] = None,
                 dropout_ratio: float = 0.,
                 norm_cfg: dict = dict(type='LN'),
                 init_std: float = 0.02,
                 init_cfg: Optional[dict] = None,
                 **kwargs) -> None:
        check_sizes(_OWNER, num_layers=num_layers, num_heads=num_heads, head_dims=head_dims)
        rep_grid = to_grid(num_reps, 'num_reps', _OWNER)  # checked here, where it enters
        super().__init__(in_channels, channels, num_classes=num_classes,
                         dropout_ratio=dropout_ratio, norm_cfg=norm_cfg, init_std=init_std,
                         init_cfg=init_cfg, **kwargs)
        self.attn_cfg = self._attn_cfg(num_heads, head_dims, rep_grid, dropout_ratio, attn_cfg)
        self.layers = ModuleList([
            PreNormAttnLayer(channels, self.attn_cfg, norm_cfg) for _ in range(num_layers)
        ])
        self.decoder_norm = build_norm_layer(norm_cfg, channels)[1]

    @staticmethod
    def _attn_cfg(num_heads: int, head_dims: int, rep_grid: Tuple[int, int],
                  dropout_ratio: float, override: Optional[dict]) -> dict:
        cfg = dict(type='CBSA', num_heads=num_heads, head_dims=head_dims,
                   num_reps=rep_grid, proj_drop=dropout_ratio)
        if override is not None:
            override = copy.deepcopy(dict(override))
            if override.get('type', cfg['type']) != cfg['type']:
                cfg = dict(num_heads=num_heads)
            cfg.update(override)
        if 'embed_dims' in cfg:
            raise ValueError(f'{_OWNER}: attn_cfg must not set embed_dims; the attention '
                             'runs at the head width (channels)')
        return cfg

    def decode(self, x: Tensor, c: Tensor, hw_shape: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """``x (B, hw, d)``, ``c (B, n_cls, d)`` -> normalised ``(patches, classes)``."""
        n_cls = c.shape[1]
        t = torch.cat((c, x), dim=1)  # (B, n_cls + hw, d): classes are prefix tokens
        hw_shape = check_hw_shape(t, hw_shape, _OWNER)  # once for every layer
        for layer in self.layers:
            t = layer(t, hw_shape=hw_shape)  # docs/mechanisms.md §4: t ← t + CBSA(LN(t))
        t = self.decoder_norm(t)
        return t[:, n_cls:], t[:, :n_cls]
