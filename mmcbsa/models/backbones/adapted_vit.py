"""mmpretrain's and mmseg's own ``VisionTransformer`` with CBSA-style attention in chosen
layers (the CBSA repository's "ViT adaptation", docs/mechanisms.md §8).

One config key turns a ViT config of either library into the adapted form::

    model = dict(backbone=dict(type='AdaptedVisionTransformer'))   # + adapt_layers, adapt_cfg

Both classes are registered under the same name, ``AdaptedVisionTransformer``: the
subclass of ``mmpretrain.models.VisionTransformer`` in mmpretrain's ``MODELS`` and the
subclass of ``mmseg.models.backbones.VisionTransformer`` in mmseg's.

How (no copy of the libraries' forward code, no new parameters):

* the parent builds itself unchanged, so every parameter, buffer, initialisation and
  ``state_dict`` key is the parent's: released checkpoints load unchanged
  (``init_cfg=dict(type='Pretrained', ...)``, ``load_from``), and mmengine's loader
  reports any key that does not load;
* a forward hook on ``patch_embed`` (mmcv's ``PatchEmbed`` returns the tokens and the
  patch grid ``(h, w)`` in both libraries) records the grid of the current input;
  the number of prefix tokens (CLS, or none with ``with_cls_token=False``) is then
  ``N − h·w`` inside each layer;
* in each adapted layer only the attention *core* is exchanged, for a parameter-free
  module that calls :func:`mmcbsa.models.attentions.adapted_cbsa.adapted_cbsa_attention`
  (the one implementation of the math, shared with :class:`~mmcbsa.models.attentions.AdaptedCBSA`):

  - mmpretrain: ``MultiheadAttention.scaled_dot_product_attention`` (called with the
    heads ``q, k, v`` after ``qkv``) becomes :class:`AdaptedSDPA`; ``qkv``, ``proj``,
    layer scale ``gamma1``, dropouts and drop path stay the library's;
  - mmseg: the ``torch.nn.MultiheadAttention`` inside mmcv's ``MultiheadAttention``
    becomes :class:`AdaptedInProjAttention`, which takes over the very same
    ``in_proj_weight`` / ``in_proj_bias`` / ``out_proj`` parameters (so the keys
    ``attn.attn.in_proj_weight`` ... and their initialisation are unchanged).

Each core has the ``attention_maps`` of ``AdaptedCBSA`` (called with the arguments of its
own forward).

Limits: the patch grid is the one of the backbone's latest forward; calling a layer on
its own (outside the backbone's forward) uses that stale grid. ``legacy_pooling``
reproduces a reference that pools ``[CLS; patches][:N−1]`` and therefore needs exactly one
prefix token: with ``with_cls_token=False`` it is refused at build time.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn
import torch.nn.functional as F
from mmpretrain.models.backbones import VisionTransformer as PretrainVisionTransformer
from mmpretrain.models.utils import MultiheadAttention as PretrainMultiheadAttention
from mmseg.models.backbones import VisionTransformer as SegVisionTransformer
from torch import Tensor

from mmcbsa.models.attentions.adapted_cbsa import AdaptedHeadsAttention
from mmcbsa.models.attentions.base import GridLike, as_size, is_exporting, merge_heads, to_grid
from mmcbsa.registry import register_model

OWNER = 'AdaptedVisionTransformer'
ADAPT_CFG_KEYS = ('num_reps', 'legacy_pooling')


class PatchGrid:
    """Forward hook for ``patch_embed``: remembers the patch grid ``(h, w)`` of the
    latest input (mmcv's ``PatchEmbed`` returns ``(tokens, (h, w))``)."""

    def __init__(self) -> None:
        self.hw: Optional[Tuple[int, int]] = None

    def __call__(self, module: nn.Module, args, output) -> None:
        self.hw = (as_size(output[1][0]), as_size(output[1][1]))


def resolve_adapt_layers(adapt_layers: Union[None, int, Sequence[int]],
                         num_layers: int) -> List[int]:
    """``None`` -> every layer; an int or a list of indices (negative from the end) ->
    sorted distinct indices in ``[0, num_layers)``. Raises ``ValueError`` naming
    ``adapt_layers`` for anything else."""
    if adapt_layers is None:
        return list(range(num_layers))
    if isinstance(adapt_layers, int) and not isinstance(adapt_layers, bool):
        adapt_layers = [adapt_layers]
    if not isinstance(adapt_layers, (list, tuple)):
        raise ValueError(f'{OWNER}: adapt_layers must be None (every layer) or a list of '
                         f'layer indices, got {adapt_layers!r}')
    resolved = set()
    for index in adapt_layers:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f'{OWNER}: adapt_layers must hold integer layer indices, '
                             f'got {index!r}')
        if not -num_layers <= index < num_layers:
            raise ValueError(f'{OWNER}: adapt_layers index {index} is out of range for '
                             f'{num_layers} layers (valid: {-num_layers} .. {num_layers - 1})')
        resolved.add(index % num_layers)
    return sorted(resolved)


def check_adapt_cfg(adapt_cfg: Optional[dict], num_prefix_tokens: int) -> dict:
    """Validate ``adapt_cfg`` (keys ``num_reps``, ``legacy_pooling``) for a backbone with
    ``num_prefix_tokens`` tokens before the patches; returns ``num_reps`` as a grid."""
    cfg = dict(adapt_cfg or {})
    unknown = sorted(set(cfg) - set(ADAPT_CFG_KEYS))
    if unknown:
        raise ValueError(f'{OWNER}: adapt_cfg has unknown keys {unknown}; '
                         f'expected some of {list(ADAPT_CFG_KEYS)}')
    grid = to_grid(cfg.get('num_reps', 64), 'adapt_cfg.num_reps', OWNER)
    legacy = bool(cfg.get('legacy_pooling', False))
    if legacy and num_prefix_tokens != 1:
        raise ValueError(f'{OWNER}: adapt_cfg.legacy_pooling=True reproduces a reference '
                         f'that pools the first N-1 of [CLS; patches]; it needs exactly one '
                         f'prefix token (with_cls_token=True), this backbone has '
                         f'{num_prefix_tokens}')
    return dict(num_reps=grid, legacy_pooling=legacy)


class AdaptedSDPA(AdaptedHeadsAttention, nn.Module):
    """Takes the place of ``scaled_dot_product_attention`` in mmpretrain's
    ``MultiheadAttention``: ``(q, k, v)`` heads ``(B, H, N, p)`` -> ``(B, H, N, p)``
    through the adapted attention (docs/mechanisms.md §8). No parameters.

    Args:
        patch_grid: the backbone's :class:`PatchGrid` (source of ``hw_shape``).
        num_reps: representatives ``m`` (perfect square) or grid ``(s_h, s_w)``.
        legacy_pooling: the reference's pooling of the first ``N − 1`` tokens.
    """

    owner_name = OWNER

    def __init__(self, patch_grid: PatchGrid, num_reps: GridLike = 64,
                 legacy_pooling: bool = False) -> None:
        super().__init__()
        self.rep_grid = to_grid(num_reps, 'num_reps', OWNER)
        self.legacy_pooling = legacy_pooling
        self._patch_grid = patch_grid

    def attention_maps(self, query: Tensor, key: Tensor, value: Tensor,
                       *args, **kwargs) -> Dict[str, Tensor]:
        """The two weight maps (``head_maps``) of ``forward(query, key, value)``."""
        return self.head_maps(query, key, value, self._patch_grid.hw)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                attn_mask: Optional[Tensor] = None, dropout_p: float = 0.,
                scale: Optional[float] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError(f'{OWNER}: the adapted attention takes no attention mask')
        return self.attend(query, key, value, self._patch_grid.hw, dropout_p=dropout_p)

    def extra_repr(self) -> str:
        return f'num_reps={self.rep_grid}, legacy_pooling={self.legacy_pooling}'


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Whether ``b`` is ``a`` (or a view of the same memory with the same layout). While
    exporting, tensors have no memory to compare: the same shape is taken as the same."""
    if a is b:
        return True
    if is_exporting():
        return a.shape == b.shape
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class AdaptedInProjAttention(AdaptedHeadsAttention, nn.Module):
    """Takes the place of a ``torch.nn.MultiheadAttention`` used for self-attention
    (inside mmcv's ``MultiheadAttention`` in mmseg's ViT), keeping its parameters.

    ``q, k, v = split(x W_inᵀ + b_in)`` into heads, the adapted attention
    (docs/mechanisms.md §8), then ``out_proj``. The parameters are the replaced module's
    own tensors (``in_proj_weight (3C, C)``, ``in_proj_bias (3C,)``, ``out_proj``), so
    names, shapes, values and initialisation are unchanged.

    Args:
        mha: the ``nn.MultiheadAttention`` to replace (packed ``in_proj``, no
            ``bias_k``/``bias_v``).
        patch_grid: the backbone's :class:`PatchGrid` (source of ``hw_shape``).
        num_reps: representatives ``m`` (perfect square) or grid ``(s_h, s_w)``.
        legacy_pooling: the reference's pooling of the first ``N − 1`` tokens.

    Called like ``nn.MultiheadAttention`` (``query (N, B, C)``, or ``(B, N, C)`` with
    ``batch_first``; ``key``/``value`` must be ``query`` itself; no masks); returns
    ``(output, None)``.
    """

    owner_name = OWNER

    def __init__(self, mha: nn.MultiheadAttention, patch_grid: PatchGrid,
                 num_reps: GridLike = 64, legacy_pooling: bool = False) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(f'{OWNER}: only a plain self-attention nn.MultiheadAttention '
                             f'(packed in_proj, no bias_k/bias_v/add_zero_attn) can be adapted')
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias  # a Parameter or None
        self.out_proj = mha.out_proj
        self.rep_grid = to_grid(num_reps, 'num_reps', OWNER)
        self.legacy_pooling = legacy_pooling
        self._patch_grid = patch_grid

    def _heads(self, query: Tensor) -> Tensor:
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        return qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def attention_maps(self, query: Tensor, *args, **kwargs) -> Dict[str, Tensor]:
        """The two weight maps (``head_maps``) of ``forward(query, ...)``."""
        qkv = self._heads(query)
        return self.head_maps(qkv[0], qkv[1], qkv[2], self._patch_grid.hw)

    def forward(self, query: Tensor, key: Optional[Tensor] = None,
                value: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        for name, other in (('key', key), ('value', value)):
            if other is not None and not _same_tensor(other, query):
                raise ValueError(f'{OWNER}: the adapted attention is self-attention only '
                                 f'({name} must be the query)')
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise ValueError(f'{OWNER}: the adapted attention takes no attention mask')
        qkv = self._heads(query)
        out = self.attend(qkv[0], qkv[1], qkv[2], self._patch_grid.hw,
                          dropout_p=self.dropout if self.training else 0.)
        out = self.out_proj(merge_heads(out))
        return (out if self.batch_first else out.transpose(0, 1)), None

    def extra_repr(self) -> str:
        return (f'embed_dim={self.embed_dim}, num_heads={self.num_heads}, '
                f'num_reps={self.rep_grid}, legacy_pooling={self.legacy_pooling}')


def _install_patch_grid(backbone: nn.Module) -> PatchGrid:
    grid = PatchGrid()
    backbone.patch_embed.register_forward_hook(grid)
    return grid


def _python_drop_probs(backbone: nn.Module) -> None:
    """Make every stochastic-depth probability a Python float: mmpretrain's ViT takes
    them from ``np.linspace`` (NumPy scalars), and a NumPy scalar in mmcv's ``drop_path``
    test is a graph break under ``torch.compile`` (one per block in training)."""
    for module in backbone.modules():
        prob = getattr(module, 'drop_prob', None)
        if prob is not None and type(prob) is not float:  # np.float64 is a float subclass
            module.drop_prob = float(prob)


_ADAPT_ARGS_DOC = """
    Args:
        adapt_layers: layers whose attention is adapted: ``None`` (default) = every
            layer; an index or a list of indices (negative from the end). An index out of
            range raises ``ValueError``.
        adapt_cfg: options of the adapted attention: ``num_reps`` (representatives
            ``m``, a perfect square, or a grid ``(s_h, s_w)``; default 64 = 8×8) and
            ``legacy_pooling`` (the reference's pooling of the first ``N − 1`` tokens;
            needs the CLS token; default False).
        *args, **kwargs: the parent ``VisionTransformer`` 's arguments, unchanged.

    Attributes:
        adapted_layers (list[int]): indices of the adapted layers.
"""


@register_model(scopes=('mmpretrain',), name='AdaptedVisionTransformer')
class PretrainAdaptedVisionTransformer(PretrainVisionTransformer):
    __doc__ = """mmpretrain's ``VisionTransformer`` with the attention of the chosen
    layers in CBSA style (docs/mechanisms.md §8); registered in mmpretrain's ``MODELS``
    as ``AdaptedVisionTransformer``. State-dict keys and shapes are the parent's.
    """ + _ADAPT_ARGS_DOC

    def __init__(self, *args, adapt_layers: Union[None, int, Sequence[int]] = None,
                 adapt_cfg: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _python_drop_probs(self)
        cfg = check_adapt_cfg(adapt_cfg, self.num_extra_tokens)
        self.adapted_layers = resolve_adapt_layers(adapt_layers, self.num_layers)
        self._patch_grid = _install_patch_grid(self)
        for index in self.adapted_layers:
            attn = self.layers[index].attn
            if not isinstance(attn, PretrainMultiheadAttention):
                raise ValueError(f'{OWNER}: layer {index} has a {type(attn).__name__}; '
                                 f'only mmpretrain MultiheadAttention can be adapted')
            attn.scaled_dot_product_attention = AdaptedSDPA(self._patch_grid, **cfg)


@register_model(scopes=('mmseg',), name='AdaptedVisionTransformer')
class SegAdaptedVisionTransformer(SegVisionTransformer):
    __doc__ = """mmseg's ``VisionTransformer`` (Segmenter / DEPICT / CBT-head encoders)
    with the attention of the chosen layers in CBSA style (docs/mechanisms.md §8);
    registered in mmseg's ``MODELS`` as ``AdaptedVisionTransformer``. State-dict keys and
    shapes are the parent's.
    """ + _ADAPT_ARGS_DOC

    def __init__(self, *args, adapt_layers: Union[None, int, Sequence[int]] = None,
                 adapt_cfg: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _python_drop_probs(self)
        cfg = check_adapt_cfg(adapt_cfg, 1 if self.with_cls_token else 0)
        self.adapted_layers = resolve_adapt_layers(adapt_layers, len(self.layers))
        self._patch_grid = _install_patch_grid(self)
        for index in self.adapted_layers:
            inner = getattr(self.layers[index].attn, 'attn', None)
            if not isinstance(inner, nn.MultiheadAttention):
                raise ValueError(f'{OWNER}: layer {index} has no torch nn.MultiheadAttention '
                                 f'to adapt (found {type(inner).__name__})')
            self.layers[index].attn.attn = AdaptedInProjAttention(inner, self._patch_grid,
                                                                  **cfg)
