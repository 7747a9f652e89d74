"""Convolutional patch embedding of CBT / the white-box ViTs (docs/mechanisms.md §1,
"Classifier")."""
import math
from typing import Optional, Tuple

import torch.nn as nn
from mmcv.cnn import ConvModule
from mmcv.cnn.bricks.transformer import AdaptivePadding
from mmengine.model import BaseModule
from torch import Tensor


class ConvStem(BaseModule):
    """A stack of ``3×3`` stride-2 convolutions that embeds ``P×P`` patches.

    For a patch size ``P = 2^k`` the stem has ``k`` convolutions (no bias), each
    followed by BatchNorm, with GELU between them but not after the last; the
    channels double towards ``C``: ``in → C/2^{k-1} → … → C/2 → C``. ``P = 16`` gives
    ``3 → C/8 → C/4 → C/2 → C`` and ``P = 8`` gives ``3 → C/4 → C/2 → C``
    (docs/mechanisms.md §1).

    Inputs whose sides are not multiples of ``P`` are zero-padded at the bottom and
    right first (mmcv ``AdaptivePadding``, ``'corner'``, like mmseg's ViT), so the
    output grid is ``(⌈H/P⌉, ⌈W/P⌉)``.

    Args:
        in_channels: image channels.
        embed_dims: output width ``C``.
        patch_size: ``P``, a power of two ``>= 2``.
        norm_cfg: norm after each conv (default BatchNorm).
        act_cfg: activation between the convs (default GELU).
        input_size: optional training image size; sets ``init_out_size``.

    Shapes: ``(B, in, H, W)`` -> tokens ``(B, h*w, C)`` and ``(h, w)``.
    """

    def __init__(self, in_channels: int = 3, embed_dims: int = 768, patch_size: int = 16,
                 norm_cfg: Optional[dict] = None, act_cfg: Optional[dict] = None,
                 input_size: Optional[Tuple[int, int]] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 2 \
                or patch_size & (patch_size - 1):
            raise ValueError(f'ConvStem: patch_size must be a power of two >= 2 (one '
                             f'stride-2 conv per factor 2), got {patch_size!r}')
        num_convs = int(math.log2(patch_size))
        first = 2 ** (num_convs - 1)
        if embed_dims % first:
            raise ValueError(f'ConvStem: embed_dims ({embed_dims}) must be divisible by '
                             f'{first} for patch_size={patch_size} (stem channels '
                             f'embed_dims/{first} ... embed_dims)')
        norm_cfg = dict(type='BN') if norm_cfg is None else norm_cfg
        act_cfg = dict(type='GELU') if act_cfg is None else act_cfg
        self.patch_size = patch_size
        self.embed_dims = embed_dims
        self.adaptive_padding = AdaptivePadding(kernel_size=patch_size, stride=patch_size,
                                                padding='corner')
        channels = [in_channels] + [embed_dims // 2 ** (num_convs - 1 - i)
                                    for i in range(num_convs)]
        self.convs = nn.Sequential(*[
            ConvModule(channels[i], channels[i + 1], 3, stride=2, padding=1, bias=False,
                       norm_cfg=norm_cfg,
                       act_cfg=act_cfg if i < num_convs - 1 else None)
            for i in range(num_convs)
        ])
        self.init_out_size = None
        if input_size is not None:
            h, w = input_size
            self.init_out_size = (math.ceil(h / patch_size), math.ceil(w / patch_size))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        x = self.convs(self.adaptive_padding(x))  # (B, C, h, w)
        hw_shape = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), hw_shape
