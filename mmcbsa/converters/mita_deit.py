"""Reference MiTA-DeiT classifiers (MiTA repository, ``MiTA-DeiT/main.py``: a timm
DeiT whose every block's attention is replaced by ``MiTA_Attention`` or, for ``+DWC``,
``MiTA_Attention_Conv``; docs/mechanisms.md §5) -> mmpretrain ``ImageClassifier`` with
a ``WhiteBoxViT`` backbone whose attention is mmcbsa's ``MiTA``.

Reference names: timm DeiT's (:mod:`mmcbsa.converters.timm_vit`), each block's
attention ``blocks.i.attn.{qkv, proj[, dwc]}.*`` (the MiTA module keeps timm's names;
pooling has no parameters). The attention renames are
:func:`mmcbsa.converters.mita.convert_mita_attention`'s.

Not stored in the weights (the reference's command-line arguments, also saved in the
checkpoint's ``args`` by ``main.py``): ``pool_size`` ``P`` (``P²`` landmarks, default 5)
and ``kv_topk`` ``K`` (``K²`` routed keys, default 5); the ``+DWC`` module fixes both
(5×5 landmarks, 25 routed keys). The head count is not stored either (``qkv`` is
``3d × d``): DeiT's head width 64 is the default.
"""
from typing import Dict, Mapping

from torch import Tensor

from .mita import convert_mita_attention, mita_kwargs_from_reference
from .timm_vit import convert_timm_vit

__all__ = ['convert_mita_deit', 'mita_deit_model_cfg']


def convert_mita_deit(state_dict: Mapping[str, Tensor], prefix: str = '') -> Dict[str, Tensor]:
    """Rename a reference MiTA-DeiT (with or without ``+DWC``) state dict.

    Args:
        state_dict: the reference model's parameters.
        prefix: prepended to every output key.

    Raises:
        KeyError: missing or unconverted reference keys (all named).
    """
    return convert_timm_vit(state_dict, convert_mita_attention, prefix)


def mita_deit_model_cfg(config: Mapping) -> dict:
    """mmpretrain ``ImageClassifier`` config equivalent to a reference MiTA-DeiT.

    Args:
        config: ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``,
            ``num_classes``, ``mlp_ratio``, ``qkv_bias``, ``dwc`` and the MiTA sizes
            ``pool_size`` / ``kv_topk`` in the reference's squared convention
            (:func:`mmcbsa.converters.mita.mita_kwargs_from_reference`).

    Returns:
        The model config; the attention pools its landmarks the legacy way
        (``legacy_pooling=True``), as the released weights were trained.
    """
    dim = int(config['embed_dim'])
    attn = mita_kwargs_from_reference(dict(config, dim=dim))
    grid = attn.pop('num_landmarks')
    attn.pop('embed_dims')
    attn.pop('num_heads')
    num_landmarks = grid[0] * grid[1] if grid[0] == grid[1] else list(grid)
    arch = dict(embed_dims=dim, num_layers=int(config['depth']),
                num_heads=int(config['num_heads']), stem='patch', layout='residual',
                norm_eps=1e-6, mlp_ratio=float(config.get('mlp_ratio', 4)),
                ffn_cfg=dict(type='FFN', act_cfg=dict(type='GELU')),
                attn_cfg=dict(type='MiTA', num_landmarks=num_landmarks, **attn))
    return dict(
        type='ImageClassifier',
        backbone=dict(type='WhiteBoxViT', arch=arch, img_size=int(config['img_size']),
                      patch_size=int(config['patch_size']), out_type='cls_token'),
        neck=None,
        head=dict(type='LinearClsHead', num_classes=int(config['num_classes']),
                  in_channels=dim, loss=dict(type='CrossEntropyLoss')))
