"""timm-layout ViT classifiers (DeiT and the models built on it: Primal.+DeiT,
PrimalFormer, MiTA-DeiT) -> mmpretrain ``ImageClassifier`` with a ``WhiteBoxViT``
backbone (``stem='patch'``, ``layout='residual'``) and a ``LinearClsHead``.

timm names: ``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.i.{norm1, attn, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``.
mmcbsa names: ``backbone.patch_embed.projection``, ``backbone.{cls_token, pos_embed}``,
``backbone.layers.i.{norm1, attn, norm2, ffn.layers.0.0, ffn.layers.1}``,
``backbone.norm``, ``head.fc``. The attention of each block is renamed by a function
given by the caller (Primal-Attention, MiTA, or timm's softmax attention, whose
``qkv`` / ``proj`` names mmcbsa's ``MHSA`` keeps).
"""
import math
import re
from typing import Callable, Dict, Mapping

from torch import Tensor

from .renaming import StateDictRenamer

__all__ = ['convert_timm_vit', 'convert_softmax_attention', 'infer_timm_vit_sizes',
           'timm_block_indices']

_BLOCK = re.compile(r'^blocks\.(\d+)\.')

#: ``fn(state_dict, src_prefix, dst_prefix) -> renamed tensors`` of one attention.
AttentionConverter = Callable[[Mapping[str, Tensor], str, str], Dict[str, Tensor]]


def timm_block_indices(state_dict: Mapping[str, Tensor]) -> list:
    """Sorted indices ``i`` of the ``blocks.i.*`` keys."""
    return sorted({int(m.group(1)) for k in state_dict if (m := _BLOCK.match(k))})


def convert_softmax_attention(state_dict: Mapping[str, Tensor], src_prefix: str = '',
                              dst_prefix: str = '') -> Dict[str, Tensor]:
    """timm softmax attention (``qkv.{weight,bias}``, ``proj.{weight,bias}``) -> mmcbsa
    ``MHSA`` (same names). ``qkv.bias`` is optional."""
    out = {}
    for name in ('qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias'):
        key = src_prefix + name
        if key in state_dict:
            out[dst_prefix + name] = state_dict[key]
        elif name != 'qkv.bias':
            raise KeyError(f'convert_softmax_attention: missing reference key {key!r}')
    return out


def convert_timm_vit(state_dict: Mapping[str, Tensor], convert_attention: AttentionConverter,
                     prefix: str = '') -> Dict[str, Tensor]:
    """Rename a timm-layout ViT classifier.

    Args:
        state_dict: the reference model's parameters (no ``module.`` prefix).
        convert_attention: renames one block's attention, called as
            ``convert_attention(state_dict, 'blocks.i.attn.', prefix +
            'backbone.layers.i.attn.')``; every key under ``blocks.i.attn.`` must be
            taken by it.
        prefix: prepended to every output key.

    Returns:
        A state dict for ``ImageClassifier(backbone=WhiteBoxViT, head=LinearClsHead)``.

    Raises:
        KeyError: a missing reference key, or reference keys left unconverted (all
            named: nothing is dropped silently).
    """
    ren = StateDictRenamer(state_dict, prefix, 'convert_timm_vit')
    take = ren.take
    for name in ('weight', 'bias'):
        take(f'patch_embed.proj.{name}', f'backbone.patch_embed.projection.{name}')
        take(f'norm.{name}', f'backbone.norm.{name}')
        take(f'head.{name}', f'head.fc.{name}')
    take('cls_token', 'backbone.cls_token')
    take('pos_embed', 'backbone.pos_embed')
    blocks = timm_block_indices(state_dict)
    if blocks != list(range(len(blocks))):
        raise KeyError(f'convert_timm_vit: blocks {blocks} are not numbered 0..{len(blocks) - 1}')
    for i in blocks:
        src, dst = f'blocks.{i}', f'backbone.layers.{i}'
        for name in ('weight', 'bias'):
            take(f'{src}.norm1.{name}', f'{dst}.norm1.{name}')
            take(f'{src}.norm2.{name}', f'{dst}.norm2.{name}')
            take(f'{src}.mlp.fc1.{name}', f'{dst}.ffn.layers.0.0.{name}')
            take(f'{src}.mlp.fc2.{name}', f'{dst}.ffn.layers.1.{name}')
        attn_src = f'{src}.attn.'
        renamed = convert_attention(state_dict, attn_src, f'{prefix}{dst}.attn.')
        attn_keys = [k for k in state_dict if k.startswith(attn_src)]
        if len(renamed) != len(attn_keys):
            taken = len(renamed)
            raise KeyError(f'convert_timm_vit: block {i} attention has {len(attn_keys)} '
                           f'tensors but its converter took {taken}: {sorted(attn_keys)}')
        ren.add(renamed, attn_keys)
    return ren.finish()


def infer_timm_vit_sizes(state_dict: Mapping[str, Tensor]) -> dict:
    """Sizes of a timm-layout ViT read off its tensors.

    Returns:
        ``embed_dim`` (``cls_token``), ``depth`` (``blocks.i``), ``patch_size``
        (``patch_embed.proj.weight``), ``img_size`` (``pos_embed``: CLS + a square
        grid of patches), ``mlp_ratio`` (``mlp.fc1``), ``num_classes`` (``head``; None
        without a head), ``qkv_bias`` (whether block 0 has ``attn.qkv.bias``, or
        ``attn.qkvg.bias`` in gated MiTA).

    Raises:
        KeyError: a tensor these come from is missing.
        ValueError: a non-square patch, a ``pos_embed`` that is not CLS + a square
            grid, or widths that disagree.
    """
    def need(key: str) -> Tensor:
        if key not in state_dict:
            raise KeyError(f'timm ViT layout: reference key {key!r} not found')
        return state_dict[key]

    dim = int(need('cls_token').shape[-1])
    blocks = timm_block_indices(state_dict)
    if not blocks:
        raise KeyError('timm ViT layout: no blocks.<i>.* keys')
    patch_w = need('patch_embed.proj.weight')
    if patch_w.ndim != 4 or patch_w.shape[-1] != patch_w.shape[-2]:
        raise ValueError(f'patch_embed.proj.weight has shape {tuple(patch_w.shape)}: not a '
                         'square patch convolution')
    if patch_w.shape[0] != dim:
        raise ValueError(f'patch_embed.proj.weight makes {patch_w.shape[0]} channels but '
                         f'cls_token has {dim}')
    pos = need('pos_embed')
    tokens = int(pos.shape[1])
    grid = math.isqrt(max(tokens - 1, 0))
    if tokens < 2 or grid * grid != tokens - 1 or pos.shape[-1] != dim:
        raise ValueError(f'pos_embed has shape {tuple(pos.shape)}: not CLS + a square grid of '
                         f'width {dim} (distilled models with a dist_token are not supported)')
    fc1 = need('blocks.0.mlp.fc1.weight')
    return dict(embed_dim=dim, depth=len(blocks), patch_size=int(patch_w.shape[-1]),
                img_size=grid * int(patch_w.shape[-1]), mlp_ratio=fc1.shape[0] / dim,
                num_classes=int(state_dict['head.weight'].shape[0])
                if 'head.weight' in state_dict else None,
                qkv_bias=('blocks.0.attn.qkv.bias' in state_dict
                          or 'blocks.0.attn.qkvg.bias' in state_dict))
