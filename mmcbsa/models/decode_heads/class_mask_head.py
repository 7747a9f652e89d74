"""What the white-box decode heads share: class embeddings decoded jointly with the
patch tokens, then a cosine-similarity mask read-out (docs/mechanisms.md §3 "Masks", §4).

:class:`ClassMaskHead` holds the plumbing of :class:`~.DEPICTHead` (docs/mechanisms.md §3) and
:class:`~.CBTHead` (docs/mechanisms.md §4): input checks, the feature map -> token projection, the
class embeddings, removal of :class:`BaseDecodeHead`'s 1×1 classifier and feature
dropout, and the mask read-out with its class-axis LayerNorm. :class:`PreNormAttnLayer`
is their one decoder step ``t ← t + attn(LN(t))`` around any mmcbsa attention; the
heads differ only in which attention they build and how they stack the layers.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import build_norm_layer
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from torch import Tensor

from mmcbsa.registry import build_model
from ..attentions.base import check_positive, warn_once


class PreNormAttnLayer(BaseModule):
    """One pre-norm residual attention step (docs/mechanisms.md §3, §4), no feed-forward part.

    - self-attention (``context=None``): ``t ← t + attn(LN(t), hw_shape)``;
    - cross-attention: ``t ← t + attn(t, context=LN(context))`` — the queries ``t``
      are not normalised, the keys/values source is (DEPICT-CA, docs/mechanisms.md §3); needs an
      attention whose ``forward`` takes ``context`` (e.g. ``MSSA``).

    Args:
        embed_dims: token width ``d``.
        attn_cfg: config of the attention, built from the registry with
            ``embed_dims`` filled in (``dict(type='CBSA', num_heads=3, ...)``).
        norm_cfg: config of the pre-norm.

    Shapes: ``t (B, N, d)``, ``context (B, L, d)`` -> ``(B, N, d)``.
    """

    def __init__(self, embed_dims: int, attn_cfg: dict,
                 norm_cfg: dict = dict(type='LN'), init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.norm = build_norm_layer(norm_cfg, embed_dims)[1]
        self.attn = build_model(dict(attn_cfg, embed_dims=embed_dims))

    def forward(self, t: Tensor, hw_shape: Optional[Sequence[int]] = None,
                context: Optional[Tensor] = None) -> Tensor:
        if context is None:
            return t + self.attn(self.norm(t), hw_shape=hw_shape)
        return t + self.attn(t, context=self.norm(context))


class ClassMaskHead(BaseDecodeHead):
    """Base of the class-embedding / mask read-out decode heads (not registered).

    Feature map(s) -> patch tokens ``x (B, hw, d)`` (``d = channels``; a
    ``Linear(C_in→d)`` when ``C_in != d``, identity otherwise), class embeddings
    ``c (B, K, d)`` (``K = out_channels``; trunc-normal, std ``init_std``). A subclass
    implements :meth:`decode` (tokens -> normalised patches and classes); this class
    turns the result into masks at the feature grid, ``(B, K, h, w)``;
    :class:`BaseDecodeHead` upsamples them to the image in ``loss_by_feat`` /
    ``predict_by_feat``:

    - ``K = num_classes >= 2`` (docs/mechanisms.md §3):
      ``masks = LN_cls(normalize(patches) · normalize(c)ᵀ)``, a LayerNorm with learned
      affine over the class axis, trained with the softmax cross-entropy;
    - binary mode, mmseg's ``out_channels=1`` (``num_classes=1``, or ``num_classes=2``
      with ``out_channels=1``): one foreground embedding and
      ``logit = s · cos(patch, c_fg) + b`` with a learned scalar scale ``s`` and bias
      ``b`` (init 4 and 0: a fully (anti-)aligned patch can reach
      ``sigmoid(±4) ≈ 0.98 / 0.02``, while the small cosines at init keep the first
      logits mild), trained with the sigmoid binary cross-entropy
      (``loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=True)``); mmseg turns
      ``sigmoid(logit) > threshold`` into the prediction. A LayerNorm over a class axis
      of length one always returns its bias — the masks would be constant and no
      gradient would reach the decoder or the encoder — so the affine takes its place.
      (With two classes, ``LN_cls`` of two scores is ``±1`` up to its ``eps``: only the
      sign of their difference survives, which is why mmseg's binary convention,
      ``out_channels=1``, is the one to use.)

    Several backbone levels: ``in_index=[...]`` with ``input_transform='resize_concat'``
    (all levels resized to the first selected one, concatenated, then projected).

    Args:
        in_channels: channels of the selected feature map (a list with
            ``input_transform='resize_concat'``; their sum is projected).
        channels: decoder width ``d``.
        num_classes: number of classes ``n_cls`` (one embedding and one mask each;
            ``1`` is mmseg's binary mode, see above).
        dropout_ratio: passed on to the subclass' attention (no feature dropout is
            applied before the masks); in ``[0, 1)``.
        norm_cfg: norm of the layers, the final norm(s) and the mask norm.
        init_std: std of the truncated-normal class embeddings (and of the input
            projection, when there is one).
        kwargs: the rest of :class:`BaseDecodeHead`'s arguments (``in_index``,
            ``input_transform``, ``loss_decode``, ``align_corners``, ``out_channels``
            (``None``, ``num_classes`` or ``1``), ``threshold`` (binary mode), ...).

    Raises:
        ValueError: naming the parameter for sizes that cannot work, ``out_channels``
            other than ``num_classes`` or 1 (1 with ``num_classes`` 1 or 2 only), or a
            binary head trained with the softmax cross-entropy (constant for one channel).
    """

    def __init__(self,
                 in_channels: Union[int, Sequence[int]],
                 channels: int,
                 *,
                 num_classes: int,
                 dropout_ratio: float = 0.,
                 norm_cfg: dict = dict(type='LN'),
                 init_std: float = 0.02,
                 init_cfg: Optional[dict] = None,
                 **kwargs) -> None:
        owner = type(self).__name__
        check_positive(channels, 'channels', owner)
        check_positive(num_classes, 'num_classes', owner)
        if not 0. <= float(dropout_ratio) < 1.:
            raise ValueError(f'{owner}: dropout_ratio must be in [0, 1), got {dropout_ratio!r}')
        out_channels = kwargs.get('out_channels')
        if out_channels is None:  # mmseg's rule: out_channels defaults to num_classes
            out_channels = num_classes
        if out_channels not in (1, num_classes):
            raise ValueError(f'{owner}: out_channels ({out_channels!r}) must be num_classes '
                             f'({num_classes}), or 1 for a binary head (one foreground logit '
                             'thresholded by `threshold`)')
        if out_channels == 1 and num_classes > 2:
            raise ValueError(f'{owner}: out_channels=1 is the binary mode (background / '
                             f'foreground), so num_classes must be 1 or 2, got {num_classes}')
        if out_channels == 1:
            check_binary_loss(owner, num_classes, kwargs.get('loss_decode'))
        elif num_classes == 2:
            warn_once(f'{owner}-two-classes',
                      f'{owner}: num_classes=2 with the class-axis LayerNorm keeps only the '
                      'sign of the difference of the two class scores (LN of two values is '
                      '±1 up to eps), which starves the gradients; for binary segmentation '
                      "use out_channels=1 with loss_decode=dict(type='CrossEntropyLoss', "
                      'use_sigmoid=True)')
        check_head_inputs(owner, in_channels, kwargs.get('in_index', -1),
                          kwargs.get('input_transform'))

        super().__init__(in_channels, channels, num_classes=num_classes,
                         dropout_ratio=dropout_ratio, init_cfg=init_cfg, **kwargs)
        # The mask read-out replaces BaseDecodeHead's 1x1 classifier and its feature
        # dropout: unused parameters would break DDP.
        delattr(self, 'conv_seg')
        delattr(self, 'dropout')

        self.init_std = init_std
        self.input_proj = (nn.Identity() if self.in_channels == channels else
                           nn.Linear(self.in_channels, channels))
        self.binary = self.out_channels == 1
        self.cls_emb = nn.Parameter(torch.zeros(1, self.out_channels, channels))
        if self.binary:  # logit = s · cos + b (a class-axis LN of one value is constant)
            self.mask_scale = nn.Parameter(torch.full((1, ), 4.0))
            self.mask_bias = nn.Parameter(torch.zeros(1))
        else:
            self.mask_norm = build_norm_layer(norm_cfg, num_classes)[1]
        self._init_class_params()

    def _init_class_params(self) -> None:
        # docs/mechanisms.md §3: class embeddings trunc-normal(std 0.02).
        trunc_normal_(self.cls_emb, std=self.init_std)
        if isinstance(self.input_proj, nn.Linear):
            trunc_normal_(self.input_proj.weight, std=self.init_std)
            nn.init.zeros_(self.input_proj.bias)

    def decode(self, x: Tensor, c: Tensor, hw_shape: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """Decoder proper: ``x (B, hw, d)``, ``c (B, n_cls, d)`` -> final
        ``(patches (B, hw, d), classes (B, n_cls, d))``."""
        raise NotImplementedError

    def forward(self, inputs: Union[Tuple[Tensor], List[Tensor]]) -> Tensor:
        """Multi-level features -> masks ``(B, K, h, w)`` at the feature grid."""
        x = self._transform_inputs(inputs)  # (B, C_in, h, w)
        b, width, h, w = x.shape
        if width != self.in_channels:
            raise ValueError(f'{type(self).__name__}: in_channels={self.in_channels} but the '
                             f'selected feature map has {width} channels (the backbone\'s '
                             f'output width); set in_channels={width}')
        x = self.input_proj(x.flatten(2).transpose(1, 2))  # (B, hw, d)
        c = self.cls_emb.expand(b, -1, -1)  # (B, K, d)
        patches, c = self.decode(x, c, (h, w))
        return self.masks(patches, c, (h, w))

    def loss_by_feat(self, seg_logits: Tensor, batch_data_samples) -> dict:
        """:class:`BaseDecodeHead`'s loss and accuracy, with the ``(B, K, h, w)`` masks
        resized to the label size by :func:`resize_separable` in float32 first (mmseg's own
        bilinear resize then has nothing left to do: same size, a copy).

        Same values as mmseg's resize (up to float32 rounding: about 1e-6), but its backward
        is two matrix products instead of a scatter over every output pixel: that backward
        took 55 ms of a 95 ms training step (batch 8, 512², 150 classes, H200), and in
        bfloat16, as mmseg would run it under autocast, 221 ms (docs/benchmark_attention.md,
        "CUDA"). On 2 CPU cores it is 1.3-1.7× faster too.
        """
        size = batch_data_samples[0].gt_sem_seg.data.shape[-2:]
        seg_logits = resize_separable(seg_logits.float(), tuple(size), self.align_corners)
        return super().loss_by_feat(seg_logits, batch_data_samples)

    def masks(self, patches: Tensor, c: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        """Masks (docs/mechanisms.md §3): cosine similarity of patches and classes, LN
        over classes (binary mode: the learned affine ``s · cos + b`` instead of the LN).

        ``patches (B, hw, d)``, ``c (B, K, d)`` -> ``(B, K, h, w)``.
        """
        b, k = c.shape[:2]
        masks = F.normalize(patches, dim=-1) @ F.normalize(c, dim=-1).transpose(1, 2)
        if self.binary:
            masks = masks * self.mask_scale + self.mask_bias  # (B, hw, 1)
        else:
            masks = self.mask_norm(masks)  # (B, hw, n_cls)
        return masks.transpose(1, 2).reshape(b, k, *hw_shape)


def _linear_resize_matrix(n_in: int, n_out: int, align_corners: bool,
                          like: Tensor) -> Tensor:
    """``(n_in, n_out)``: column ``j`` holds the weights PyTorch's 1-D linear interpolation
    gives output ``j`` (obtained by interpolating the identity, so the rule is PyTorch's)."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device)[None]
    return F.interpolate(eye, size=n_out, mode='linear', align_corners=align_corners)[0]


def resize_separable(x: Tensor, size: Tuple[int, int], align_corners: bool) -> Tensor:
    """``F.interpolate(x, size, mode='bilinear', align_corners=align_corners)`` as two
    matrix products ``R_hᵀ · x · R_w`` (bilinear interpolation is separable), without
    autocast: ``x`` keeps its dtype.

    ``x (B, K, h, w)`` -> ``(B, K, H, W)``; ``R_h (h, H)``, ``R_w (w, W)`` from
    :func:`_linear_resize_matrix`. Forward and backward are GEMMs (the library kernel's
    backward scatters into the input, with atomic additions on CUDA).
    """
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    with torch.autocast(x.device.type, enabled=False):
        r_h = _linear_resize_matrix(h, size[0], align_corners, x)
        r_w = _linear_resize_matrix(w, size[1], align_corners, x)
        return r_h.t() @ (x @ r_w)


def check_sizes(owner: str, **sizes: int) -> None:
    """Every given size (``num_layers=3, head_dims=100, ...``) is a positive integer;
    else a ``ValueError`` naming it and ``owner``. The heads' one argument check."""
    for name, value in sizes.items():
        check_positive(value, name, owner)


def check_binary_loss(owner: str, num_classes: int, loss_decode) -> None:
    """A binary head (``out_channels=1``) needs a sigmoid loss: refuse mmseg's
    softmax ``CrossEntropyLoss`` (its default ``use_sigmoid=False``), which over one
    channel is a constant — the head would train nothing."""
    losses = loss_decode if isinstance(loss_decode, (list, tuple)) else [loss_decode]
    for loss in losses:
        if loss is None:  # BaseDecodeHead's default: softmax cross-entropy
            loss = dict(type='CrossEntropyLoss')
        if str(loss.get('type', '')).split('.')[-1] == 'CrossEntropyLoss' \
                and not loss.get('use_sigmoid', False):
            raise ValueError(
                f'{owner}: num_classes={num_classes} with out_channels=1 is the binary mode '
                '(one foreground logit per pixel, sigmoid > threshold); train it with '
                "loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=True) — the softmax "
                'cross-entropy (use_sigmoid=False) of one channel is constant. Labels: '
                '0 = background, 1 = foreground, 255 = ignored')


def check_head_inputs(owner: str, in_channels, in_index, input_transform) -> None:
    """Named errors for what :meth:`BaseDecodeHead._init_inputs` only asserts."""
    if input_transform not in (None, 'resize_concat'):
        raise ValueError(f"{owner}: input_transform must be None or 'resize_concat' "
                         f'(the head decodes one feature map), got {input_transform!r}')
    if input_transform is None:
        if not isinstance(in_channels, int) or not isinstance(in_index, int):
            raise ValueError(f'{owner}: with input_transform=None, in_channels '
                             f'({in_channels!r}) and in_index ({in_index!r}) must be ints; '
                             "use input_transform='resize_concat' for several levels")
        check_positive(in_channels, 'in_channels', owner)
        return
    if not isinstance(in_channels, (list, tuple)) or not isinstance(in_index, (list, tuple)) \
            or len(in_channels) != len(in_index) or not in_channels:
        raise ValueError(f"{owner}: input_transform='resize_concat' needs in_channels "
                         f'({in_channels!r}) and in_index ({in_index!r}) as lists of equal length')
    for ch in in_channels:
        check_positive(ch, 'in_channels', owner)
