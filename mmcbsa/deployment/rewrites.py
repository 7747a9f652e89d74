"""What changes while a model is exported (:func:`export_rewrites`), in the manner of
mmdeploy's function rewriters: the position-embedding code of mmpretrain's and mmseg's
ViTs, and of :class:`~mmcbsa.models.WhiteBoxViT`, returns the stored table unchanged when
the input has the training grid and resizes it otherwise. Traced with a symbolic height
and width, that branch fixes the exported graph to the traced size. While exporting, the
table is resized for every input instead: bicubic resizing onto the same grid returns the
table itself (the cubic kernel is 1 at the sample and 0 at its neighbours), so the graph
computes what the eager model computes, at every size.

``nn.AdaptiveAvgPool2d`` (mmseg's pyramid pooling in UperNet / PSPNet heads, for example)
pools with :func:`~mmcbsa.models.attentions.base.adaptive_avg_pool2d_any`: the ONNX
translation of the pooling kernel fixes its windows to the traced size (measured: 0.14 off
and 7 % of the labels wrong at another size for an UperNet head), the matrix form holds
for every size.

Nothing outside the ``with`` block sees a change.
"""
import contextlib
import importlib
from typing import Iterator, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mmcbsa.models.attentions.base import adaptive_avg_pool2d_any

__all__ = ['export_rewrites', 'resize_pos_embed_always']

# modules that call mmpretrain's ``resize_pos_embed`` in their forward, by name
_PRETRAIN_CALLERS = ('mmpretrain.models.backbones.vision_transformer',
                     'mmpretrain.models.backbones.deit',
                     'mmcbsa.models.backbones.white_box_vit')


def resize_pos_embed_always(pos_embed: Tensor, src_shape, dst_shape, mode: str = 'bicubic',
                            num_extra_tokens: int = 1) -> Tensor:
    """mmpretrain's ``resize_pos_embed`` without its early return for equal grids.

    Args:
        pos_embed: ``(1, extra + src_h·src_w, C)``.
        src_shape: ``(src_h, src_w)``, the stored grid.
        dst_shape: ``(h, w)``, the input's grid (may be symbolic).
        mode: ``F.interpolate`` mode.
        num_extra_tokens: prefix tokens (CLS, distillation) kept as they are.

    Returns:
        ``(1, extra + h·w, C)``.
    """
    _, length, c = pos_embed.shape
    src_h, src_w = src_shape
    if length != src_h * src_w + num_extra_tokens:
        raise ValueError(f'pos_embed of {length} tokens does not match the grid '
                         f'{src_h}x{src_w} + {num_extra_tokens} prefix tokens')
    grid = pos_embed[:, num_extra_tokens:].reshape(1, src_h, src_w, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(dst_shape), align_corners=False, mode=mode)
    grid = grid.flatten(2).transpose(1, 2).to(pos_embed.dtype)
    return torch.cat((pos_embed[:, :num_extra_tokens], grid), dim=1)


def _mmseg_pos_embeding(self, patched_img: Tensor, hw_shape, pos_embed: Tensor) -> Tensor:
    """mmseg ``VisionTransformer._pos_embeding`` that always resizes (see the module
    docstring); the stored grid is ``img_size // patch_size`` as in mmseg."""
    pos_h = self.img_size[0] // self.patch_size
    pos_w = self.img_size[1] // self.patch_size
    pos_embed = resize_pos_embed_always(pos_embed, (pos_h, pos_w), hw_shape,
                                        self.interpolate_mode, num_extra_tokens=1)
    return self.drop_after_pos(patched_img + pos_embed)


def _targets() -> List[Tuple[object, str, object]]:
    """``(owner, attribute, replacement)`` for every installed module to rewrite."""
    from mmpretrain.models.utils import resize_pos_embed
    targets = []
    for name in _PRETRAIN_CALLERS:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover (an mmpretrain without that backbone)
            continue
        if getattr(module, 'resize_pos_embed', None) is resize_pos_embed:
            targets.append((module, 'resize_pos_embed', resize_pos_embed_always))
    from mmseg.models.backbones.vit import VisionTransformer
    targets.append((VisionTransformer, '_pos_embeding', _mmseg_pos_embeding))
    targets.append((nn.AdaptiveAvgPool2d, 'forward', _adaptive_avg_pool_forward))
    return targets


def _adaptive_avg_pool_forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name)
    """``nn.AdaptiveAvgPool2d.forward`` for every input size (see the module docstring);
    an output size with ``None`` (keep that side) stays the kernel's."""
    size = self.output_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if any(s is None for s in size):
        return F.adaptive_avg_pool2d(input, self.output_size)
    return adaptive_avg_pool2d_any(input, size)


@contextlib.contextmanager
def export_rewrites() -> Iterator[None]:
    """Apply the rewrites of this module for the duration of the block."""
    targets = _targets()
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
    try:
        for owner, attr, new in targets:
            setattr(owner, attr, new)
        yield
    finally:
        for owner, attr, old in saved:
            setattr(owner, attr, old)
