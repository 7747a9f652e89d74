"""Reference Primal-Attention classifiers (timm-style ViTs: PrimalFormer, every block
Primal; Primal.+DeiT, the last ``num_ksvd_layer`` blocks Primal; docs/mechanisms.md §6)
-> mmpretrain ``KSVDImageClassifier`` with a ``WhiteBoxViT`` backbone.

The timm layout is renamed by :func:`mmcbsa.converters.timm_vit.convert_timm_vit`;
softmax-attention blocks keep timm's ``qkv``/``proj`` (mmcbsa ``MHSA``), Primal blocks
go through :func:`convert_primal_attention`.
"""
from typing import Dict, List, Mapping, Optional

from torch import Tensor

from .primal import convert_primal_attention, primal_kwargs_from_reference
from .timm_vit import convert_softmax_attention, convert_timm_vit, infer_timm_vit_sizes

__all__ = ['convert_primal_vit', 'primal_vit_model_cfg', 'infer_primal_vit_config']

#: rank_multi of the reference models (not stored in the weights).
DEFAULT_RANK_MULTI = 10


def _convert_block_attention(state_dict: Mapping[str, Tensor], src: str,
                             dst: str) -> Dict[str, Tensor]:
    if src + 'we' in state_dict:
        return convert_primal_attention(state_dict, src, dst)
    return convert_softmax_attention(state_dict, src, dst)


def convert_primal_vit(state_dict: Mapping[str, Tensor], config: Optional[Mapping] = None,
                       prefix: str = '') -> Dict[str, Tensor]:
    """Rename a reference ``primalformer_classifier`` / ``primal_deit_classifier``
    state dict (which blocks are Primal is read off the keys: ``attn.we``).

    Args:
        state_dict: the reference model's parameters.
        config: unused (kept for call compatibility; the layout is in the keys).
        prefix: prepended to every output key.
    """
    return convert_timm_vit(state_dict, _convert_block_attention, prefix)


def infer_primal_vit_config(state_dict: Mapping[str, Tensor], rank_multi: Optional[int] = None,
                            num_heads: Optional[int] = None) -> dict:
    """Reference config (the keys :func:`primal_vit_model_cfg` reads) from the tensors.

    Read off the tensors: embed dim, depth, patch and image size, MLP ratio, class
    count, biases (:func:`~mmcbsa.converters.timm_vit.infer_timm_vit_sizes`), which
    blocks are Primal (``attn.we``: the last ``num_ksvd_layer``, or all of them for
    PrimalFormer), heads and low rank ``s`` (``attn.we`` is ``(H, n, s)``).

    ``rank_multi`` is not stored, but the sample count is: ``n = min(N, s·rank_multi)``
    with ``N`` the training token count (docs/mechanisms.md §6.2). When ``n < N`` it
    fixes ``rank_multi = n / s``; when ``n = N`` every token was sampled, and the
    reference default 10 is used if it samples them all.

    Args:
        state_dict: timm-style reference state dict (no ``module.`` prefix).
        rank_multi: sampled positions per rank; read as above when None, checked
            against ``n`` otherwise.
        num_heads: heads; read from ``attn.we`` when None, checked against it otherwise.

    Raises:
        KeyError / ValueError: missing tensors, or sizes that contradict each other
            or the given values.
    """
    sizes = infer_timm_vit_sizes(state_dict)
    depth = sizes['depth']
    primal = [i for i in range(depth) if f'blocks.{i}.attn.we' in state_dict]
    if not primal:
        raise ValueError('no Primal-Attention block (blocks.<i>.attn.we)')
    if primal != list(range(depth - len(primal), depth)):
        raise ValueError(f'Primal blocks {primal} are not the last num_ksvd_layer='
                         f'{len(primal)} of depth={depth}')
    num_tokens = (sizes['img_size'] // sizes['patch_size']) ** 2 + 1  # CLS + grid

    heads_read = {int(state_dict[f'blocks.{i}.attn.we'].shape[0]) for i in primal}
    if len(heads_read) != 1:
        raise ValueError(f'Primal blocks disagree on the head count {sorted(heads_read)}')
    heads = heads_read.pop()
    if num_heads is not None and num_heads != heads:
        raise ValueError(f'--num-heads {num_heads} contradicts attn.we, which holds '
                         f'{heads} heads')

    ranks: List[int] = []
    multis = set()
    for i in primal:
        _, n, s = (int(v) for v in state_dict[f'blocks.{i}.attn.we'].shape)
        if rank_multi is not None:
            expected = min(num_tokens, s * rank_multi)
            if n != expected:
                hint = f' (the tensors say --rank-multi {n // s})' \
                    if n % s == 0 and n < num_tokens else ''
                raise ValueError(f'--rank-multi {rank_multi} gives n = min({num_tokens}, '
                                 f'{s}*{rank_multi}) = {expected} sampled positions, but '
                                 f'blocks.{i}.attn.we has n = {n}{hint}')
            multis.add(rank_multi)
        elif n < num_tokens:
            if n % s:
                raise ValueError(f'blocks.{i}.attn.we is {(heads, n, s)}: n = {n} sampled '
                                 f'positions is not a multiple of the rank s = {s}')
            multis.add(n // s)
        elif n == num_tokens and s * DEFAULT_RANK_MULTI >= num_tokens:
            multis.add(DEFAULT_RANK_MULTI)
        else:
            raise ValueError(f'blocks.{i}.attn.we samples n = {n} positions of N = '
                             f'{num_tokens} tokens with rank s = {s}: give --rank-multi R '
                             f'with {s}*R >= {num_tokens}')
        ranks.append(s)
    if len(multis) != 1:
        raise ValueError(f'Primal blocks {primal} imply different rank_multi values '
                         f'{sorted(multis)}')

    config = dict(img_size=sizes['img_size'], patch_size=sizes['patch_size'],
                  embed_dim=sizes['embed_dim'], depth=depth, num_heads=heads,
                  rank_multi=multis.pop(), mlp_ratio=sizes['mlp_ratio'],
                  num_classes=sizes['num_classes'],
                  qk_bias=f'blocks.{primal[0]}.attn.qk.bias' in state_dict)
    if len(primal) == depth:  # PrimalFormer: one rank per block
        config['low_rank'] = ranks
    else:  # Primal.+DeiT: one rank, the last num_ksvd_layer blocks
        if len(set(ranks)) != 1:
            raise ValueError(f'Primal blocks {primal} have different low ranks {ranks}; '
                             'only PrimalFormer gives one per block')
        config.update(low_rank=ranks[0], num_ksvd_layer=len(primal),
                      qkv_bias=sizes['qkv_bias'])
    return config


def primal_vit_model_cfg(config: Mapping, ksvd_weight: float = 0.05) -> dict:
    """mmpretrain ``KSVDImageClassifier`` config equivalent to a reference model.

    Written the way ``WhiteBoxViT.arch_zoo`` writes Primal.+DeiT (``num_tail_layers``
    Primal blocks given by ``tail_attn_cfg``) and PrimalFormer (``attn_cfg`` Primal in
    every block; ``layer_cfgs``, one dict per block, where a block's rank differs from
    block 0's).

    Args:
        config: the reference config: ``img_size``, ``patch_size``, ``embed_dim``,
            ``depth``, ``num_heads``, ``low_rank`` (a list for PrimalFormer), ``rank_multi``,
            ``num_classes`` and optionally ``num_ksvd_layer`` (default: every block),
            ``mlp_ratio`` (4), ``norm_eps`` (1e-6), ``qkv_bias`` (True), ``qk_bias``.
        ksvd_weight: ``η`` of the KSVD loss (docs/mechanisms.md §6.4).
    """
    depth, dim = int(config['depth']), int(config['embed_dim'])
    low_rank = config['low_rank']

    def primal(rank: int) -> dict:
        kwargs = primal_kwargs_from_reference(dict(config, low_rank=rank))
        return dict(type='PrimalAttention', low_rank=kwargs['low_rank'],
                    rank_multi=kwargs['rank_multi'], qk_bias=kwargs['qk_bias'])

    arch = dict(embed_dims=dim, num_layers=depth, num_heads=int(config['num_heads']),
                stem='patch', layout='residual', norm_eps=float(config.get('norm_eps', 1e-6)),
                mlp_ratio=float(config.get('mlp_ratio', 4)),
                ffn_cfg=dict(type='FFN', act_cfg=dict(type='GELU')),
                attn_cfg=dict(type='MHSA', qkv_bias=bool(config.get('qkv_bias', True))))
    if isinstance(low_rank, (list, tuple)):
        if len(low_rank) != depth:
            raise ValueError(f'primal_vit_model_cfg: low_rank has {len(low_rank)} entries, '
                             f'expected depth={depth}')
        arch['attn_cfg'] = primal(int(low_rank[0]))
        per_block = [{} if int(r) == int(low_rank[0]) else dict(attn_cfg=dict(low_rank=int(r)))
                     for r in low_rank]
    else:
        arch.update(num_tail_layers=int(config.get('num_ksvd_layer', depth)),
                    tail_attn_cfg=primal(int(low_rank)))
        per_block = []
    backbone = dict(type='WhiteBoxViT', arch=arch, img_size=config['img_size'],
                    patch_size=int(config['patch_size']), out_type='cls_token')
    if any(per_block):
        backbone['layer_cfgs'] = per_block
    return dict(
        type='KSVDImageClassifier',
        ksvd_weight=ksvd_weight,
        backbone=backbone,
        neck=None,
        head=dict(type='LinearClsHead', num_classes=int(config['num_classes']),
                  in_channels=dim, loss=dict(type='CrossEntropyLoss')))
