"""Reference white-box ViT classifiers (CBT / CRATE / ToST code base: conv stem +
``[attention, ISTA]`` blocks + ``LN → Linear`` head) -> mmpretrain ``ImageClassifier``
with a ``WhiteBoxViT`` backbone and a ``LinearClsHead``.

Reference names:

- ``to_patch_embedding.proj.{0,2,4,6}.{0,1}``: conv (``.0``) and BatchNorm (``.1``)
  of each stem stage (the odd indices are GELUs);
- ``cls_token``, ``pos_embedding``;
- ``transformer.layers.i.0.{norm, fn}``: pre-norm + attention;
  ``transformer.layers.i.1.{norm, fn.weight}``: pre-norm + ISTA dictionary;
- ``mlp_head.0`` (LayerNorm), ``mlp_head.1`` (Linear).

mmcbsa names (classifier level): ``backbone.patch_embed.convs.k.{conv,bn}``,
``backbone.{cls_token,pos_embed}``, ``backbone.layers.i.{norm1,attn,norm2,ffn}``,
``backbone.norm``, ``head.fc``.
"""
import re
from typing import Dict, Mapping

from torch import Tensor

from .renaming import StateDictRenamer
from .white_box import attention_kwargs_from_reference, convert_attention

_BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
_STEM = re.compile(r'^to_patch_embedding\.proj\.(\d+)\.0\.weight$')
_LAYER = re.compile(r'^transformer\.layers\.(\d+)\.')


def _stem_indices(state_dict: Mapping[str, Tensor]) -> list:
    idx = sorted(int(m.group(1)) for k in state_dict if (m := _STEM.match(k)))
    if not idx:
        raise KeyError('convert_white_box_vit: no conv stem keys '
                       '(to_patch_embedding.proj.<i>.0.weight) in the state dict')
    return idx


def convert_white_box_vit(state_dict: Mapping[str, Tensor], config: Mapping,
                          prefix: str = '') -> Dict[str, Tensor]:
    """Rename a reference ``vit_{cbsa,mssa,tssa}_ista_classifier`` state dict.

    Args:
        state_dict: the reference model's ``state_dict``.
        config: the reference constructor arguments (``attn`` in CBSA/MSSA/TSSA).
        prefix: prepended to every output key.

    Returns:
        A state dict for ``ImageClassifier(backbone=WhiteBoxViT, head=LinearClsHead)``.
    """
    kind = str(config['attn']).lower()
    if str(config.get('ffn', 'ISTA')).upper() != 'ISTA':
        raise ValueError(f"convert_white_box_vit: only ffn='ISTA' references are "
                         f"supported, got {config.get('ffn')!r}")
    ren = StateDictRenamer(state_dict, prefix, 'convert_white_box_vit')
    take = ren.take
    for k, i in enumerate(_stem_indices(state_dict)):
        src = f'to_patch_embedding.proj.{i}'
        take(f'{src}.0.weight', f'backbone.patch_embed.convs.{k}.conv.weight')
        for name in _BN_KEYS:
            take(f'{src}.1.{name}', f'backbone.patch_embed.convs.{k}.bn.{name}')
    take('cls_token', 'backbone.cls_token')
    take('pos_embedding', 'backbone.pos_embed')
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := _LAYER.match(k)))
    for i in range(depth):
        src, dst = f'transformer.layers.{i}', f'backbone.layers.{i}'
        for name in ('weight', 'bias'):
            take(f'{src}.0.norm.{name}', f'{dst}.norm1.{name}')
            take(f'{src}.1.norm.{name}', f'{dst}.norm2.{name}')
        take(f'{src}.1.fn.weight', f'{dst}.ffn.weight')
        attn = convert_attention(kind, state_dict, f'{src}.0.fn.', prefix + f'{dst}.attn.')
        ren.add(attn, (k for k in state_dict if k.startswith(f'{src}.0.fn.')))
    for name in ('weight', 'bias'):
        take(f'mlp_head.0.{name}', f'backbone.norm.{name}')
        take(f'mlp_head.1.{name}', f'head.fc.{name}')
    return ren.finish()


def white_box_vit_model_cfg(config: Mapping, legacy_pooling: bool = True) -> dict:
    """mmpretrain ``ImageClassifier`` config equivalent to a reference classifier.

    Sizes come from ``config`` (``image_size``, ``patch_size``, ``num_classes``,
    ``dim``, ``depth``, ``heads``, ``dim_head``, ``attn``). CBSA uses the
    reference's legacy pooling (docs/mechanisms.md §1) unless ``legacy_pooling=False``.
    """
    kind = str(config['attn']).lower()
    attn = attention_kwargs_from_reference(kind, config)
    attn.pop('embed_dims')
    attn.pop('num_heads')
    if kind == 'cbsa':
        attn['legacy_pooling'] = legacy_pooling
    attn['type'] = kind.upper()
    dim = int(config['dim'])
    return dict(
        type='ImageClassifier',
        backbone=dict(
            type='WhiteBoxViT',
            arch=dict(embed_dims=dim, num_layers=int(config['depth']),
                      num_heads=int(config['heads']), stem='conv', layout='ista',
                      norm_eps=1e-5, attn_cfg=attn, ffn_cfg=dict(type='ISTA')),
            img_size=int(config['image_size']), patch_size=int(config['patch_size']),
            out_type='cls_token'),
        neck=None,
        head=dict(type='LinearClsHead', num_classes=int(config['num_classes']),
                  in_channels=dim, loss=dict(type='CrossEntropyLoss')))


def infer_white_box_vit_config(state_dict: Mapping[str, Tensor],
                               dim_head: int = 64) -> dict:
    """Read a reference classifier's constructor arguments off its tensors.

    The attention kind follows from its parameters (``step_rep`` → CBSA, ``temp`` →
    TSSA, otherwise MSSA); CBSA/TSSA store one step/temperature per head, so their
    head count is read off; MSSA's is ``inner width / dim_head``.
    """
    dim = state_dict['cls_token'].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := _LAYER.match(k)))
    attn = 'transformer.layers.0.0.fn.'
    if attn + 'step_rep' in state_dict:
        kind, heads = 'CBSA', state_dict[attn + 'step_rep'].shape[0]
        inner = state_dict[attn + 'proj.weight'].shape[0]
    elif attn + 'temp' in state_dict:
        kind, heads = 'TSSA', state_dict[attn + 'temp'].shape[0]
        inner = state_dict[attn + 'qkv.weight'].shape[0]
    else:
        kind = 'MSSA'
        inner = state_dict[attn + 'qkv.weight'].shape[0]
        if inner % dim_head:
            raise ValueError(f'infer_white_box_vit_config: MSSA inner width {inner} is not '
                             f'a multiple of dim_head={dim_head}')
        heads = inner // dim_head
    patch_size = 2 ** len(_stem_indices(state_dict))
    num_patches = state_dict['pos_embedding'].shape[1] - 1
    side = int(round(num_patches ** 0.5))
    if side * side != num_patches:
        raise ValueError(f'infer_white_box_vit_config: pos_embedding has {num_patches} '
                         f'patch positions, not a square grid')
    return dict(image_size=side * patch_size, patch_size=patch_size,
                num_classes=state_dict['mlp_head.1.weight'].shape[0], dim=dim, depth=depth,
                heads=int(heads), dim_head=int(inner // heads), attn=kind, ffn='ISTA')
