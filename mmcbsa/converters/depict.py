"""Official DEPICT checkpoints -> mmcbsa / mmseg names (docs/mechanisms.md §3).

Official decoder (``MaskTransformer``) parameters and their mmcbsa
:class:`~mmcbsa.models.decode_heads.DEPICTHead` names:

================================  ======================================
official                          mmcbsa
================================  ======================================
``cls_emb`` (1, n_cls, d)         ``cls_emb``
``net.layers.i.norm.*`` (SA)      ``layers.i.norm.*``
``snet.layers.i.norm.*`` (CA)     ``layers.i.norm.*``
``{s,}net.layers.i.fn.proj``      ``layers.i.attn.in_proj.weight`` (U, Hp×d)
``{s,}net.layers.i.fn.step_size`` ``layers.i.attn.step_size`` (γ)
``decoder_norm.*`` / ``snorm.*``  ``decoder_norm.*``
``cnet.layers.i.*`` (CA)          ``cross_layers.i.*`` (same renames)
``cnorm.*`` (CA)                  ``cross_norm.*``
``mask_norm.*``                   ``mask_norm.*``
================================  ======================================

A full official segmenter checkpoint nests the decoder under ``decoder.`` and the
Segmenter ViT encoder (timm names) under ``encoder.``; :func:`convert_depict_segmenter`
maps both onto an mmseg ``EncoderDecoder`` (``backbone.`` = mmseg
``VisionTransformer``, ``decode_head.`` = ``DEPICTHead``), reusing mmseg's own
``vit2mmseg`` key mapping for the encoder.
"""
import re
from typing import Dict, Mapping, Optional

from torch import Tensor

from .segmenter import convert_segmenter

__all__ = [
    'convert_depict', 'convert_depict_segmenter', 'depict_head_kwargs_from_reference',
    'infer_depict_config'
]

_LAYER = re.compile(r'^(net|snet|cnet)\.layers\.(\d+)\.(norm\.weight|norm\.bias|fn\.proj|'
                    r'fn\.step_size)$')
_LAYER_LEAF = {'norm.weight': 'norm.weight', 'norm.bias': 'norm.bias',
               'fn.proj': 'attn.in_proj.weight', 'fn.step_size': 'attn.step_size'}
_STACK = {'net': 'layers', 'snet': 'layers', 'cnet': 'cross_layers'}
_PLAIN = {'cls_emb': 'cls_emb', 'decoder_norm': 'decoder_norm', 'snorm': 'decoder_norm',
          'cnorm': 'cross_norm', 'mask_norm': 'mask_norm'}


def convert_depict(state_dict: Mapping[str, Tensor], config: Optional[Mapping] = None,
                   src_prefix: str = '', dst_prefix: str = '') -> Dict[str, Tensor]:
    """Rename an official DEPICT decoder state dict to :class:`DEPICTHead`'s.

    Args:
        state_dict: official decoder parameters (keys under ``src_prefix`` are read,
            others ignored).
        config: optional official config; when it has ``mode``, the checkpoint's
            layout (``net`` for SA, ``snet``/``cnet`` for CA) is checked against it.
        src_prefix: prefix of the decoder keys, e.g. ``'decoder.'``.
        dst_prefix: prefix of the output keys, e.g. ``'decode_head.'``.

    Raises:
        KeyError: on a decoder key this converter does not know (nothing is
            dropped silently) or a checkpoint mixing SA and CA layouts.
    """
    out: Dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if not key.startswith(src_prefix):
            continue
        name = key[len(src_prefix):]
        m = _LAYER.match(name)
        if m:
            stack, idx, leaf = m.groups()
            out[f'{dst_prefix}{_STACK[stack]}.{idx}.{_LAYER_LEAF[leaf]}'] = value
            continue
        top, _, rest = name.partition('.')
        if top in _PLAIN and (rest in ('weight', 'bias') or (top == 'cls_emb' and not rest)):
            out[dst_prefix + _PLAIN[top] + ('.' + rest if rest else '')] = value
            continue
        unknown.append(key)
    if unknown:
        raise KeyError(f'convert_depict: unknown official decoder keys {unknown}')
    mode = _mode_of(state_dict, src_prefix)
    if config is not None and 'mode' in config and mode is not None and config['mode'] != mode:
        raise KeyError(f"convert_depict: config mode {config['mode']!r} but the checkpoint "
                       f'holds a DEPICT-{mode.upper()} decoder')
    return out


def _mode_of(state_dict: Mapping[str, Tensor], prefix: str = '') -> Optional[str]:
    stacks = {m.group(1) for k in state_dict if k.startswith(prefix)
              for m in [_LAYER.match(k[len(prefix):])] if m}
    if 'net' in stacks and stacks & {'snet', 'cnet'}:
        raise KeyError('convert_depict: checkpoint mixes SA (net.*) and CA (snet/cnet.*) keys')
    if 'net' in stacks:
        return 'sa'
    return 'ca' if stacks else None


def depict_head_kwargs_from_reference(config: Mapping) -> dict:
    """:class:`DEPICTHead` constructor kwargs from an official ``MaskTransformer``
    config (``n_cls, d_model, n_layers, n_heads[, dim_head, ca_layers, ca_dim_head,
    mode]``). The official decoder has no input projection: ``in_channels = d_model``.
    Its hard-coded widths (``p = 100``, CA ``3`` layers of ``p = 50``) are the defaults
    when the config does not name them.
    """
    d = int(config['d_model'])
    kwargs = dict(in_channels=d, channels=d, num_classes=int(config['n_cls']),
                  mode=str(config.get('mode', 'sa')), num_layers=int(config['n_layers']),
                  num_heads=int(config['n_heads']), head_dims=int(config.get('dim_head', 100)))
    if kwargs['mode'] == 'ca':
        kwargs.update(ca_num_layers=int(config.get('ca_layers', 3)),
                      ca_num_heads=int(config['n_heads']),
                      ca_head_dims=int(config.get('ca_dim_head', 50)))
    return kwargs


def infer_depict_config(state_dict: Mapping[str, Tensor], prefix: str = '',
                        dim_head: int = 100, ca_dim_head: int = 50) -> dict:
    """Official-style config read off a decoder state dict.

    ``mode``, ``n_cls``, ``d_model``, ``n_layers`` and ``ca_layers`` come from the
    tensors; the head count is ``rows(U) / dim_head``, so the head widths must be
    given (the reference hard-codes ``100`` and ``50``).
    """
    mode = _mode_of(state_dict, prefix)
    if mode is None:
        raise KeyError(f'infer_depict_config: no DEPICT decoder layers under {prefix!r}')
    cls_emb = state_dict[prefix + 'cls_emb']
    stack = 'net' if mode == 'sa' else 'snet'

    def count(s: str) -> int:
        return len({m.group(2) for k in state_dict if k.startswith(prefix)
                    for m in [_LAYER.match(k[len(prefix):])] if m and m.group(1) == s})

    rows = state_dict[f'{prefix}{stack}.layers.0.fn.proj'].shape[0]
    if rows % dim_head:
        raise ValueError(f'infer_depict_config: U has {rows} rows, not a multiple of '
                         f'dim_head={dim_head}')
    cfg = dict(mode=mode, n_cls=int(cls_emb.shape[1]), d_model=int(cls_emb.shape[2]),
               n_layers=count(stack), n_heads=rows // dim_head, dim_head=dim_head)
    if mode == 'ca':
        ca_rows = state_dict[f'{prefix}cnet.layers.0.fn.proj'].shape[0]
        if ca_rows != cfg['n_heads'] * ca_dim_head:
            raise ValueError(f'infer_depict_config: cross-attention U has {ca_rows} rows, '
                             f"expected n_heads*ca_dim_head = {cfg['n_heads'] * ca_dim_head}")
        cfg.update(ca_layers=count('cnet'), ca_dim_head=ca_dim_head)
    return cfg


def convert_depict_segmenter(state_dict: Mapping[str, Tensor],
                             config: Optional[Mapping] = None) -> Dict[str, Tensor]:
    """Official DEPICT segmenter (``encoder.*`` + ``decoder.*``) -> mmseg
    ``EncoderDecoder`` (``backbone.*`` + ``decode_head.*``); a bare decoder state dict
    converts to head keys without ``decode_head.`` (:func:`.segmenter.convert_segmenter`)."""
    return convert_segmenter(state_dict, convert_depict, config, 'convert_depict_segmenter')
