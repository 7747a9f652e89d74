"""Reference MiTA (``MiTA_Attention``, ``MiTA_Attention_Conv``,
``MiTA_Attention_Conv_Gate``, ``MiTA_Attention_Route``) -> mmcbsa ``MiTA``.

Reference parameter names per attention module (prefix-free): ``qkv.{weight,bias}``
(``qkvg.{weight,bias}`` in the gated variant: output chunks q, k, v, g),
``proj.{weight,bias}`` and, for the ``+DWC`` variants, ``dwc.{weight,bias}``.
mmcbsa's :class:`~mmcbsa.models.attentions.mita.MiTA` uses the same names, so
conversion is a checked copy; the sizes are what differ: the reference squares its
arguments (``pool_size=P`` means ``P²`` landmarks, ``kv_topk=K`` means ``K²`` routed
keys; the DWC and gate variants fix ``P = 5`` and ``P²`` routed keys, the routed-only
variant routes ``2P²`` keys) and pools the landmarks the legacy way
(docs/mechanisms.md §5.1, §5b).
"""
from typing import Dict, Mapping

from torch import Tensor

_OPTIONAL = ('proj.bias', 'dwc.weight', 'dwc.bias')


def convert_mita_attention(state_dict: Mapping[str, Tensor], src_prefix: str = '',
                           dst_prefix: str = '') -> Dict[str, Tensor]:
    """Copy one reference MiTA attention's parameters (keys under ``src_prefix``)
    to mmcbsa names under ``dst_prefix``.

    ``qkv.weight`` (or, for the gated variant, ``qkvg.weight``) and ``proj.weight``
    must be present; biases and ``dwc.*`` are copied when present.
    """
    proj_in = 'qkvg' if src_prefix + 'qkvg.weight' in state_dict else 'qkv'
    out = {}
    for name in (f'{proj_in}.weight', 'proj.weight'):
        if src_prefix + name not in state_dict:
            raise KeyError(f'convert_mita_attention: missing reference key '
                           f'{src_prefix + name!r}')
    for name in (f'{proj_in}.weight', 'proj.weight', f'{proj_in}.bias') + _OPTIONAL:
        if src_prefix + name in state_dict:
            out[dst_prefix + name] = state_dict[src_prefix + name]
    return out


def mita_kwargs_from_reference(config: Mapping, dwc: bool = False, gate: bool = False,
                               routed: bool = False) -> dict:
    """``MiTA`` constructor kwargs from a reference MiTA module's config.

    Args:
        config: ``dim``, ``num_heads`` and optionally ``pool_size`` (``P``, default
            5; the segmentation code's routed variant uses 9), ``kv_topk`` (``K``,
            ``MiTA_Attention`` only: ``K²`` routed keys, default 5), ``qkv_bias``
            (default False), ``proj_bias`` (default True), and the flags ``dwc``,
            ``gate``, ``routed`` (take precedence over the arguments).
        dwc: the reference module is ``MiTA_Attention_Conv`` (``P²`` routed keys).
        gate: the reference module is ``MiTA_Attention_Conv_Gate`` (implies
            ``dwc``; ``P²`` routed keys, input projection ``qkvg``).
        routed: the reference module is ``MiTA_Attention_Route`` (no agent expert,
            ``kv_topk·2 = 2P²`` routed keys).

    Returns:
        kwargs with ``legacy_pooling=True`` (the released checkpoints' pooling).
    """
    pool = int(config.get('pool_size', 5))
    gate = bool(config.get('gate', gate))
    dwc = bool(config.get('dwc', dwc)) or gate
    routed = bool(config.get('routed', routed))
    if 'kv_topk' in config:
        topk = int(config['kv_topk']) ** 2
    else:
        topk = pool * pool if (dwc or routed) else 25
    if routed:
        topk *= 2
    return dict(embed_dims=int(config['dim']), num_heads=int(config['num_heads']),
                num_landmarks=(pool, pool), topk=topk,
                qkv_bias=bool(config.get('qkv_bias', False)),
                proj_bias=bool(config.get('proj_bias', True)), dwc=dwc, gate=gate,
                mode='routed' if routed else 'mixture', legacy_pooling=True)
