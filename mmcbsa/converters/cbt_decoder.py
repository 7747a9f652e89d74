"""Official CBT segmentation decoder (CBSA paper, docs/mechanisms.md §4) -> :class:`CBTHead` names.

===================================  =========================================
official                             mmcbsa :class:`~mmcbsa.models.CBTHead`
===================================  =========================================
``cls_emb`` (1, n_cls, d)            ``cls_emb``
``net.layers.i.norm.*``              ``layers.i.norm.*``
``net.layers.i.fn.proj.weight``      ``layers.i.attn.in_proj.weight`` (U)
``net.layers.i.fn.step_rep/step_x``  ``layers.i.attn.step_rep/step_x`` (H,)
``net.layers.i.fn.to_out.*``         ``layers.i.attn.out_proj.*``
``decoder_norm.*``                   ``decoder_norm.*``
``mask_norm.*``                      ``mask_norm.*``
===================================  =========================================

The attention renames are :func:`mmcbsa.converters.white_box.convert_attention`'s.
A full segmenter checkpoint (``encoder.*`` Segmenter ViT + ``decoder.*``) converts
like DEPICT's: the encoder through mmseg's own ``vit2mmseg`` mapping.
"""
import re
from typing import Dict, Mapping, Optional

from torch import Tensor

from .segmenter import convert_segmenter
from .white_box import convert_attention

__all__ = ['convert_cbt_decoder', 'convert_cbt_segmenter', 'cbt_head_kwargs_from_reference',
           'infer_cbt_decoder_config']

_LAYER = re.compile(r'^net\.layers\.(\d+)\.(norm\.(?:weight|bias)|fn\..+)$')
_PLAIN = ('decoder_norm.weight', 'decoder_norm.bias', 'mask_norm.weight', 'mask_norm.bias',
          'cls_emb')


def convert_cbt_decoder(state_dict: Mapping[str, Tensor], config: Optional[Mapping] = None,
                        src_prefix: str = '', dst_prefix: str = '') -> Dict[str, Tensor]:
    """Rename an official CBT decoder state dict to :class:`CBTHead`'s.

    Args:
        state_dict: official decoder parameters (keys under ``src_prefix`` are read,
            others ignored).
        config: optional official config; when it has ``n_layers``, the number of
            layers in the checkpoint is checked against it.
        src_prefix: prefix of the decoder keys, e.g. ``'decoder.'``.
        dst_prefix: prefix of the output keys, e.g. ``'decode_head.'``.

    Raises:
        KeyError: on an unknown decoder key (nothing is dropped silently), a missing
            attention parameter, or a layer count differing from ``config``.
    """
    out: Dict[str, Tensor] = {}
    unknown, layers = [], set()
    for key, value in state_dict.items():
        if not key.startswith(src_prefix):
            continue
        name = key[len(src_prefix):]
        m = _LAYER.match(name)
        if m:
            idx, leaf = m.groups()
            if leaf.startswith('norm.'):
                out[f'{dst_prefix}layers.{idx}.{leaf}'] = value
            else:
                layers.add(int(idx))
            continue
        if name in _PLAIN:
            out[dst_prefix + name] = value
            continue
        unknown.append(key)
    for idx in sorted(layers):
        src = f'{src_prefix}net.layers.{idx}.fn.'
        converted = convert_attention('cbsa', state_dict, src, f'{dst_prefix}layers.{idx}.attn.')
        extra = [k for k in state_dict if k.startswith(src)
                 and k[len(src):] not in ('proj.weight', 'step_rep', 'step_x', 'to_out.weight',
                                          'to_out.bias')]
        unknown.extend(extra)
        out.update(converted)
    if unknown:
        raise KeyError(f'convert_cbt_decoder: unknown official decoder keys {unknown}')
    if config is not None and 'n_layers' in config and len(layers) != int(config['n_layers']):
        raise KeyError(f"convert_cbt_decoder: config n_layers={config['n_layers']} but the "
                       f'checkpoint holds {len(layers)} layers')
    return out


def cbt_head_kwargs_from_reference(config: Mapping) -> dict:
    """:class:`CBTHead` kwargs from an official CBT decoder config (``n_cls,
    d_model, n_layers, n_heads[, dim_head, num_reps]``). The official decoder has no
    input projection: ``in_channels = d_model``. Its hard-coded ``p = 100`` and
    ``m = 100`` are the defaults when the config does not name them."""
    d = int(config['d_model'])
    return dict(in_channels=d, channels=d, num_classes=int(config['n_cls']),
                num_layers=int(config['n_layers']), num_heads=int(config['n_heads']),
                head_dims=int(config.get('dim_head', 100)),
                num_reps=int(config.get('num_reps', 100)))


def infer_cbt_decoder_config(state_dict: Mapping[str, Tensor], prefix: str = '',
                             num_reps: int = 100) -> dict:
    """Official-style config read off a decoder state dict: ``n_cls``, ``d_model``
    and ``n_layers`` from the tensors, ``n_heads`` from ``step_x`` ``(H, 1, 1)``,
    ``dim_head = rows(U) / H``. ``num_reps`` is not stored in the weights."""
    cls_emb = state_dict.get(prefix + 'cls_emb')
    layers = {int(m.group(1)) for k in state_dict if k.startswith(prefix)
              for m in [_LAYER.match(k[len(prefix):])] if m}
    if cls_emb is None or not layers:
        raise KeyError(f'infer_cbt_decoder_config: no CBT decoder under {prefix!r}')
    heads = state_dict[f'{prefix}net.layers.0.fn.step_x'].numel()
    rows = state_dict[f'{prefix}net.layers.0.fn.proj.weight'].shape[0]
    return dict(n_cls=int(cls_emb.shape[1]), d_model=int(cls_emb.shape[2]),
                n_layers=len(layers), n_heads=int(heads), dim_head=int(rows // heads),
                num_reps=num_reps)


def convert_cbt_segmenter(state_dict: Mapping[str, Tensor],
                          config: Optional[Mapping] = None) -> Dict[str, Tensor]:
    """Official CBT segmenter (``encoder.*`` Segmenter ViT + ``decoder.*``) -> mmseg
    ``EncoderDecoder`` (``backbone.*`` mmseg ``VisionTransformer`` + ``decode_head.*``);
    a bare decoder state dict converts to head keys without ``decode_head.``
    (:func:`.segmenter.convert_segmenter`)."""
    return convert_segmenter(state_dict, convert_cbt_decoder, config, 'convert_cbt_segmenter')
