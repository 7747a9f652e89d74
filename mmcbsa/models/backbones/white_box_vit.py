"""One ViT family for every mmcbsa classifier/encoder: CBT, CRATE, ToST, MiTA-DeiT,
Primal.+DeiT and PrimalFormer (docs/mechanisms.md §1, §2, §5, §6).

All of them are ``[CLS; patches] + pos_embed`` followed by ``WhiteBoxBlock`` s; they
differ only in the patch embedding (conv stem or a DeiT ``16×16`` conv), the
attention config, the feed-forward part (ISTA or an MLP) and the block layout.
The attention math lives in ``mmcbsa.models.attentions`` and is built from the
registry; this file only wires the pieces together.
"""
import copy
import inspect
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmcv.cnn import build_norm_layer
from mmcv.cnn.bricks.transformer import PatchEmbed
from mmengine.model import BaseModule
from mmengine.model.weight_init import trunc_normal_
from mmpretrain.models.utils import resize_pos_embed
from torch import Tensor

from mmcbsa.models.attentions.base import check_hw_shape
from mmcbsa.models.layers import WhiteBoxBlock
from mmcbsa.registry import SEG_MODELS, register_model
from .conv_stem import ConvStem

OUT_TYPES = ('cls_token', 'featmap', 'avg_featmap', 'raw')
STEMS = ('conv', 'patch')

# Families ------------------------------------------------------------------------
# CBT (docs/mechanisms.md §1): conv stem, CBSA (p = 64, m = 64) + ISTA, no residual around ISTA,
# nn.LayerNorm's default eps 1e-5 as in the reference.
_CBT = dict(stem='conv', layout='ista', norm_eps=1e-5, ffn_cfg=dict(type='ISTA'),
            attn_cfg=dict(type='CBSA', head_dims=64, num_reps=64))
# CRATE / ToST as in the CBSA paper's same-backbone comparison (Table 4, docs/mechanisms.md §1):
# CBT's conv stem and ISTA, only the attention changes. (The original CRATE used a
# linear patch embedding; choose ``stem='patch'`` in a dict arch for that.)
_CRATE = dict(_CBT, attn_cfg=dict(type='MSSA', head_dims=64))
_TOST = dict(_CBT, attn_cfg=dict(type='TSSA', head_dims=64))
# DeiT (timm): 16×16 conv patch embedding, pre-norm residual blocks with a 4× GELU
# MLP, LayerNorm eps 1e-6.
_DEIT = dict(stem='patch', layout='residual', norm_eps=1e-6, mlp_ratio=4,
             ffn_cfg=dict(type='FFN', act_cfg=dict(type='GELU')),
             attn_cfg=dict(type='MHSA', qkv_bias=True))
# MiTA-DeiT (docs/mechanisms.md §5): 5×5 landmarks, k = 25 routed keys.
_MITA_DEIT = dict(_DEIT, attn_cfg=dict(type='MiTA', num_landmarks=25, topk=25, qkv_bias=True))
# MiTA-DeiT +DWC,Gate (docs/mechanisms.md §5b): input projection C -> 4C (q, k, v, g),
# (attention + DWC(v)) ⊙ SiLU(g) before the output projection.
_MITA_DEIT_DWC_GATE = dict(_MITA_DEIT, attn_cfg=dict(_MITA_DEIT['attn_cfg'], dwc=True, gate=True))
# Primal-Attention (docs/mechanisms.md §6): Primal.+DeiT-S uses it in the last block only (s = 96);
# PrimalFormer in every block (s = 20). rank_multi = 10 in both.
_PRIMAL_DEIT = dict(_DEIT, num_tail_layers=1,
                    tail_attn_cfg=dict(type='PrimalAttention', low_rank=96, rank_multi=10))
_PRIMALFORMER = dict(_DEIT, attn_cfg=dict(type='PrimalAttention', low_rank=20, rank_multi=10))


def _sizes(embed_dims: int, num_layers: int, num_heads: int) -> dict:
    return dict(embed_dims=embed_dims, num_layers=num_layers, num_heads=num_heads)


_TINY, _SMALL = _sizes(192, 12, 3), _sizes(384, 12, 6)
_BASE, _LARGE = _sizes(768, 12, 12), _sizes(1024, 24, 16)


def _zoo(names: Sequence[str], family: dict, sizes: dict) -> dict:
    return {name: dict(copy.deepcopy(family), **sizes) for name in names}


ARCH_KEYS = frozenset({'base', 'embed_dims', 'num_layers', 'num_heads', 'stem', 'attn_cfg',
                       'ffn_cfg', 'layout', 'norm_eps', 'mlp_ratio', 'num_tail_layers',
                       'tail_attn_cfg'})
# Keys WhiteBoxViT took before its attention was set in two places only (arch,
# layer_cfgs): each is refused with its replacement.
REMOVED_KEYS = {
    'attn_cfg': "layer_cfgs=dict(attn_cfg=...) (every block) or arch=dict(base=..., "
                "attn_cfg=...)",
    'ffn_cfg': "layer_cfgs=dict(ffn_cfg=...) or arch=dict(base=..., ffn_cfg=...)",
    'tail_attn_cfg': "arch=dict(base=..., num_tail_layers=n, tail_attn_cfg=...) or "
                     "layer_cfgs (a list with one dict per block)",
    'num_tail_layers': "arch=dict(base=..., num_tail_layers=n, tail_attn_cfg=...)",
    'attn_cfg_override': "layer_cfgs, a list with one dict per block "
                         "(e.g. dict(attn_cfg=...) for the blocks to change)",
}


def check_removed_keys(removed: dict) -> None:
    """A ``ValueError`` naming the replacement of a key WhiteBoxViT no longer takes (a
    ``TypeError`` for a key it never took, as Python would raise)."""
    for key in removed:
        if key in REMOVED_KEYS:
            raise ValueError(f'WhiteBoxViT: {key} was removed; use {REMOVED_KEYS[key]} '
                             '(docs: the WhiteBoxViT docstring)')
    if removed:
        raise TypeError(f'WhiteBoxViT.__init__() got unexpected keyword arguments '
                        f'{sorted(removed)}')


def merge_cfg(base: Optional[dict], new: Optional[dict]) -> Optional[dict]:
    """``new`` on top of ``base``; a different ``type`` replaces ``base`` entirely
    (keyword arguments of one attention do not apply to another)."""
    if new is None:
        return copy.deepcopy(base)
    if base is None or ('type' in new and new['type'] != base.get('type')):
        return copy.deepcopy(dict(new))
    return {**copy.deepcopy(base), **copy.deepcopy(dict(new))}


@register_model()
class WhiteBoxViT(BaseModule):
    """Vision transformer with pluggable attention / feed-forward / block layout.

    ``x = [CLS; stem(img)] + pos_embed`` (interpolated to the input's patch grid),
    then ``num_layers`` ``WhiteBoxBlock`` s (each attention gets ``hw_shape``), and a
    final LayerNorm after the last block (docs/mechanisms.md §1 "Classifier"; the classifier head
    is ``Linear`` on the normalised CLS token).

    A block's attention is set in exactly two places, as in mmpretrain's ViT: the
    ``arch`` (the family's attention for every block, and for Primal.+DeiT the one of its
    last blocks) and ``layer_cfgs`` (changes on top of it, for every block or per block).
    ``layer_cfgs=dict(attn_cfg=dict(type='MSSA'))`` swaps the attention of every block;
    ``attn_cfg`` merges into the block's config, and a different ``type`` replaces it
    (keyword arguments of one attention do not apply to another).

    Args:
        arch: a name from :attr:`arch_zoo` (``'cbt-tiny'`` ... ``'primalformer-small'``)
            or a dict with ``embed_dims``, ``num_layers``, ``num_heads`` and optionally
            ``stem`` (``'conv'`` | ``'patch'``), ``attn_cfg`` (every block),
            ``ffn_cfg``, ``layout`` (``'ista'`` | ``'residual'``), ``norm_eps``,
            ``mlp_ratio`` (MLP feed-forward width = ``mlp_ratio · embed_dims``),
            ``num_tail_layers`` / ``tail_attn_cfg`` (the last ``num_tail_layers`` blocks
            use ``tail_attn_cfg`` merged on ``attn_cfg``: Primal.+DeiT's
            ``num_ksvd_layer``). A dict arch may name a ``base`` zoo arch and change
            some of its keys (``attn_cfg`` is merged).
        img_size: training image size; sets the stored position-embedding grid.
        patch_size: patch size ``P`` (conv stem: a power of two).
        in_channels: image channels.
        out_indices: blocks whose output is returned (negative = from the end).
        out_type: ``'cls_token'`` ``(B, C)`` (mmpretrain classification),
            ``'featmap'`` ``(B, C, h, w)`` (mmseg), ``'avg_featmap'`` ``(B, C)`` (mean
            of the patch tokens) or ``'raw'`` ``(B, N, C)``. The final norm is
            applied to the last block's output only (as in mmpretrain/mmseg ViTs).
        with_cls_token: prepend a CLS token.
        final_norm: LayerNorm after the last block.
        layer_cfgs: ``WhiteBoxBlock`` keyword arguments on top of the arch's, one dict
            for every block or a list with one dict per block; their ``attn_cfg`` and
            ``ffn_cfg`` are merged into the block's (e.g.
            ``dict(attn_cfg=dict(legacy_pooling=True))``).
        drop_rate: dropout after adding the position embedding.
        drop_path_rate: stochastic depth, increasing linearly from 0 over the blocks.
        interpolate_mode: position-embedding interpolation mode.
        patch_cfg: extra kwargs of the stem (``ConvStem`` or mmcv ``PatchEmbed``).
        norm_cfg: override of the block/final norm config (default LN with the arch's
            ``norm_eps``).

    Inputs of any size from one patch up: sides that are not multiples of ``P`` are
    zero-padded at the bottom/right (like mmseg's ``VisionTransformer``), giving a
    ``⌈H/P⌉ × ⌈W/P⌉`` grid. The first forward of an input that cannot work raises a
    ``ValueError`` naming its size and the minimum:

    - a side smaller than one patch (``H < P`` or ``W < P``): the patch would be
      mostly padding;
    - with BatchNorm in training mode in the stem (the conv stem's default): its last
      BatchNorm sees ``B·⌈H/P⌉·⌈W/P⌉`` values per channel and needs at least two, so a
      single image of one patch (``P×P``) is refused — use a batch of two or an image
      of at least ``P×2P``. The earlier BatchNorms see more values, and the conv stem's
      receptive field (``2^{k+1} − 1`` pixels for ``k`` convs, 31 for ``P = 16``) is
      not a further bound: every stride-2 conv gets an even-sized, zero-padded input.

    Shapes: ``(B, in_channels, H, W)`` -> tuple of the outputs at ``out_indices``.
    """

    arch_zoo: Dict[str, dict] = {
        **_zoo(['cbt-t', 'cbt-tiny'], _CBT, _TINY),
        **_zoo(['cbt-s', 'cbt-small'], _CBT, _SMALL),
        **_zoo(['cbt-b', 'cbt-base'], _CBT, _BASE),
        **_zoo(['cbt-l', 'cbt-large'], _CBT, _LARGE),
        **_zoo(['crate-t', 'crate-tiny'], _CRATE, _TINY),
        **_zoo(['crate-s', 'crate-small'], _CRATE, _SMALL),
        **_zoo(['crate-b', 'crate-base'], _CRATE, _BASE),
        **_zoo(['crate-l', 'crate-large'], _CRATE, _LARGE),
        **_zoo(['tost-t', 'tost-tiny'], _TOST, _TINY),
        **_zoo(['tost-s', 'tost-small'], _TOST, _SMALL),
        **_zoo(['deit-t', 'deit-tiny'], _DEIT, _TINY),
        **_zoo(['deit-s', 'deit-small'], _DEIT, _SMALL),
        **_zoo(['mita-deit-t', 'mita-deit-tiny'], _MITA_DEIT, _TINY),
        **_zoo(['mita-deit-s', 'mita-deit-small'], _MITA_DEIT, _SMALL),
        **_zoo(['mita-deit-s-dwc-gate', 'mita-deit-small-dwc-gate'], _MITA_DEIT_DWC_GATE,
               _SMALL),
        **_zoo(['primal-deit-s', 'primal-deit-small'], _PRIMAL_DEIT, _SMALL),
        **_zoo(['primalformer-s', 'primalformer-small'], _PRIMALFORMER, _SMALL),
    }
    num_extra_tokens = 1

    def __init__(self, arch: Union[str, dict] = 'cbt-small',
                 img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16,
                 in_channels: int = 3, out_indices: Union[int, Sequence[int]] = -1,
                 out_type: str = 'cls_token', with_cls_token: bool = True,
                 final_norm: bool = True,
                 layer_cfgs: Union[dict, Sequence[dict], None] = None,
                 drop_rate: float = 0., drop_path_rate: float = 0.,
                 interpolate_mode: str = 'bicubic', patch_cfg: Optional[dict] = None,
                 norm_cfg: Optional[dict] = None, init_cfg=None, **removed) -> None:
        check_removed_keys(removed)
        super().__init__(init_cfg=init_cfg)
        self.arch_settings = self.resolve_arch(arch)
        s = self.arch_settings
        self.embed_dims = s['embed_dims']
        self.num_layers = s['num_layers']
        self.num_heads = s['num_heads']
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = img_size
        if out_type not in OUT_TYPES:
            raise ValueError(f'WhiteBoxViT: out_type must be one of {OUT_TYPES}, '
                             f'got {out_type!r}')
        if out_type == 'cls_token' and not with_cls_token:
            raise ValueError("WhiteBoxViT: out_type='cls_token' needs with_cls_token=True")
        self.out_type = out_type
        self.with_cls_token = with_cls_token
        self.num_extra_tokens = 1 if with_cls_token else 0
        self.interpolate_mode = interpolate_mode

        # stem ------------------------------------------------------------------
        stem = s.get('stem', 'conv')
        if stem not in STEMS:
            raise ValueError(f'WhiteBoxViT: arch stem must be one of {STEMS}, got {stem!r}')
        patch_cfg = dict(patch_cfg or {})
        if stem == 'conv':
            self.patch_embed = ConvStem(in_channels=in_channels, embed_dims=self.embed_dims,
                                        patch_size=patch_size, input_size=img_size,
                                        **patch_cfg)
        else:
            kwargs = dict(in_channels=in_channels, embed_dims=self.embed_dims,
                          conv_type='Conv2d', kernel_size=patch_size, stride=patch_size,
                          padding='corner', input_size=img_size)
            kwargs.update(patch_cfg)
            self.patch_embed = PatchEmbed(**kwargs)
        self.patch_size = patch_size
        self.patch_resolution = tuple(self.patch_embed.init_out_size)
        num_patches = self.patch_resolution[0] * self.patch_resolution[1]

        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dims)) \
            if with_cls_token else None
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + self.num_extra_tokens, self.embed_dims))
        self._register_load_state_dict_pre_hook(self._prepare_pos_embed)
        self.drop_after_pos = nn.Dropout(p=drop_rate)

        # blocks ----------------------------------------------------------------
        if norm_cfg is None:
            norm_cfg = dict(type='LN', eps=s.get('norm_eps', 1e-5))
        attn_cfgs = self._arch_attn_cfgs()
        base_ffn = copy.deepcopy(s.get('ffn_cfg', dict(type='ISTA')))
        if isinstance(layer_cfgs, dict) or layer_cfgs is None:
            layer_cfgs = [dict(layer_cfgs or {}) for _ in range(self.num_layers)]
        if len(layer_cfgs) != self.num_layers:
            raise ValueError(f'WhiteBoxViT: layer_cfgs has {len(layer_cfgs)} entries, '
                             f'expected num_layers={self.num_layers}')
        dpr = torch.linspace(0, drop_path_rate, self.num_layers, device='cpu').tolist()
        layers = []
        for i in range(self.num_layers):
            cfg = dict(embed_dims=self.embed_dims, num_heads=self.num_heads,
                       attn_cfg=attn_cfgs[i], ffn_cfg=copy.deepcopy(base_ffn),
                       layout=s.get('layout', 'ista'), drop_path_rate=dpr[i],
                       norm_cfg=copy.deepcopy(norm_cfg))
            extra = dict(layer_cfgs[i])
            if 'attn_cfg' in extra:
                cfg['attn_cfg'] = merge_cfg(cfg['attn_cfg'], extra.pop('attn_cfg'))
            if 'ffn_cfg' in extra:
                cfg['ffn_cfg'] = merge_cfg(cfg['ffn_cfg'], extra.pop('ffn_cfg'))
            cfg.update(extra)
            if cfg['ffn_cfg']['type'] in ('FFN', 'mmcv.FFN'):
                cfg['ffn_cfg'].setdefault('feedforward_channels',
                                          int(s.get('mlp_ratio', 4) * self.embed_dims))
            # e.g. PrimalAttention fixes its sample count from the tokens at img_size
            self._fill_train_tokens(cfg['attn_cfg'], num_patches + self.num_extra_tokens)
            layers.append(WhiteBoxBlock(**cfg))
        self.layers = nn.ModuleList(layers)
        self.final_norm = final_norm
        if final_norm:
            self.norm = build_norm_layer(norm_cfg, self.embed_dims)[1]

        # outputs -----------------------------------------------------------------
        if isinstance(out_indices, int):
            out_indices = [out_indices]
        resolved = []
        for idx in out_indices:
            j = idx + self.num_layers if idx < 0 else idx
            if not 0 <= j < self.num_layers:
                raise ValueError(f'WhiteBoxViT: out_indices entry {idx} is out of range '
                                 f'for num_layers={self.num_layers}')
            resolved.append(j)
        self.out_indices = resolved

    # construction helpers ---------------------------------------------------------
    @classmethod
    def resolve_arch(cls, arch: Union[str, dict]) -> dict:
        if isinstance(arch, str):
            key = arch.lower()
            if key not in cls.arch_zoo:
                raise ValueError(f'WhiteBoxViT: unknown arch {arch!r}; choose one of '
                                 f'{sorted(cls.arch_zoo)} or give a dict')
            return copy.deepcopy(cls.arch_zoo[key])
        arch = copy.deepcopy(dict(arch))
        unknown = sorted(set(arch) - ARCH_KEYS)
        if unknown:
            raise ValueError(f'WhiteBoxViT: arch has unknown keys {unknown}'
                             + ('' if 'attn_cfg_override' not in unknown else
                                ' (attn_cfg_override: use layer_cfgs, a list with one dict '
                                'per block, e.g. [..., dict(attn_cfg=...)])')
                             + f'; the keys are {sorted(ARCH_KEYS)}')
        base = arch.pop('base', None)
        settings = cls.resolve_arch(base) if base is not None else {}
        if 'attn_cfg' in arch and 'attn_cfg' in settings:
            arch['attn_cfg'] = merge_cfg(settings['attn_cfg'], arch['attn_cfg'])
        settings.update(arch)
        for key in ('embed_dims', 'num_layers', 'num_heads'):
            value = settings.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f'WhiteBoxViT: arch {key} must be a positive integer, '
                                 f'got {value!r}')
        return settings

    def _arch_attn_cfgs(self) -> List[dict]:
        """Each block's attention config as the arch gives it (before ``layer_cfgs``)."""
        s, depth = self.arch_settings, self.num_layers
        base = copy.deepcopy(s.get('attn_cfg', dict(type='CBSA')))
        tail = s.get('tail_attn_cfg')
        n_tail = s.get('num_tail_layers', 0)
        if isinstance(n_tail, bool) or not isinstance(n_tail, int) or not 0 <= n_tail <= depth:
            raise ValueError(f'WhiteBoxViT: arch num_tail_layers must be an integer in '
                             f'[0, num_layers={depth}], got {n_tail!r}')
        if n_tail and tail is None:
            raise ValueError('WhiteBoxViT: arch num_tail_layers > 0 needs tail_attn_cfg')
        return [merge_cfg(base, tail) if i >= depth - n_tail else copy.deepcopy(base)
                for i in range(depth)]

    @staticmethod
    def _fill_train_tokens(attn_cfg: dict, num_tokens: int) -> None:
        """Give ``num_tokens_train`` (tokens at ``img_size``, CLS included) to attentions
        whose constructor takes it (Primal-Attention, docs/mechanisms.md §6.2), unless set."""
        cls = attn_cfg.get('type')
        if isinstance(cls, str):
            cls = SEG_MODELS.get(cls)
        if cls is None or 'num_tokens_train' in attn_cfg:
            return
        if 'num_tokens_train' in inspect.signature(cls.__init__).parameters:
            attn_cfg['num_tokens_train'] = num_tokens

    def init_weights(self) -> None:
        super().init_weights()
        if not (isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained'):
            trunc_normal_(self.pos_embed, std=0.02)
            if self.cls_token is not None:
                trunc_normal_(self.cls_token, std=0.02)

    def _prepare_pos_embed(self, state_dict, prefix, *args, **kwargs) -> None:
        """Resize a checkpoint's ``pos_embed`` to this model's grid when loading."""
        name = prefix + 'pos_embed'
        if name not in state_dict:
            return
        ckpt = state_dict[name]
        if ckpt.shape == self.pos_embed.shape:
            return
        extra = self.num_extra_tokens
        if not self.with_cls_token and ckpt.shape[1] == self.pos_embed.shape[1] + 1:
            ckpt, extra = ckpt[:, 1:], 0
        side = int(round((ckpt.shape[1] - extra) ** 0.5))
        if side * side != ckpt.shape[1] - extra:
            raise ValueError(f'WhiteBoxViT: cannot resize checkpoint pos_embed of shape '
                             f'{tuple(ckpt.shape)} (not a square grid)')
        state_dict[name] = resize_pos_embed(ckpt, (side, side), self.patch_resolution,
                                            self.interpolate_mode, extra)

    # forward ------------------------------------------------------------------
    def _check_input_size(self, x: Tensor) -> None:
        """Named errors for inputs the stem cannot embed (see the class docstring)."""
        b, (h, w), p = x.shape[0], x.shape[-2:], self.patch_size
        if h < p or w < p:
            raise ValueError(f'WhiteBoxViT: an input of {h}x{w} pixels is smaller than one '
                             f'{p}x{p} patch (patch_size={p}); the minimum input size is '
                             f'{p}x{p}')
        cells = -(-h // p) * -(-w // p)  # ⌈H/P⌉·⌈W/P⌉
        if b * cells < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                                 for m in self.patch_embed.modules()):
            raise ValueError(f'WhiteBoxViT: a batch of {b} image of {h}x{w} pixels is a '
                             f'single {p}x{p} patch, but the stem\'s BatchNorm in training '
                             f'mode needs more than one value per channel; use a batch of '
                             f'at least 2 or an input of at least {p}x{2 * p} pixels')

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """``(B, C_in, H, W)`` -> tuple over ``out_indices`` (see ``out_type``)."""
        self._check_input_size(x)
        b = x.shape[0]
        x, hw_shape = self.patch_embed(x)  # (B, h*w, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + resize_pos_embed(self.pos_embed, self.patch_resolution, hw_shape,
                                 mode=self.interpolate_mode,
                                 num_extra_tokens=self.num_extra_tokens)
        x = self.drop_after_pos(x)
        hw_shape = check_hw_shape(x, hw_shape, 'WhiteBoxViT')  # once for every block
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x, hw_shape=hw_shape)
            if i == self.num_layers - 1 and self.final_norm:
                x = self.norm(x)
            if i in self.out_indices:
                outs.append(self._format_output(x, hw_shape))
        return tuple(outs)

    def _format_output(self, x: Tensor, hw_shape: Tuple[int, int]) -> Tensor:
        if self.out_type == 'raw':
            return x
        if self.out_type == 'cls_token':
            return x[:, 0]
        patches = x[:, self.num_extra_tokens:]
        if self.out_type == 'avg_featmap':
            return patches.mean(dim=1)
        return patches.transpose(1, 2).reshape(x.shape[0], -1, *hw_shape)  # (B, C, h, w)

    def get_layer_depth(self, param_name: str, prefix: str = '') -> Tuple[int, int]:
        """Layer depth of a parameter for layer-wise lr decay (mmpretrain protocol):
        stem / tokens / position embedding 0, block ``i`` ``i + 1``, the rest last."""
        num_layers = self.num_layers + 2
        if not param_name.startswith(prefix):
            return num_layers - 1, num_layers
        name = param_name[len(prefix):]
        if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed'):
            return 0, num_layers
        if name.startswith('layers.'):
            return int(name.split('.')[1]) + 1, num_layers
        return num_layers - 1, num_layers
