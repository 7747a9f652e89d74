"""Parameter renames, one function per reference layout (as mmseg's ``vit2mmseg``).

Each maps a reference state dict onto mmcbsa's / mmseg's / mmpretrain's names and never
drops a reference key silently (a ``KeyError`` names what is missing or left over); sizes
are read in :mod:`mmcbsa.converters.kinds`. Attentions: CBSA / MSSA / TSSA (``proj`` or
``qkv`` -> ``in_proj``, ``to_out`` -> ``out_proj``, per-head ``(H, 1[, 1])`` steps and
temperatures -> ``(H,)``), MiTA and timm's softmax attention (same names),
Primal-Attention (``we``, ``wr``, ``Lambda``, ``concate_weight`` -> ``w_e``, ``w_r``,
``lambdas``, ``concat_proj``). Models: the CBSA
repository's classifiers, timm ViTs (DeiT, Primal, MiTA-DeiT), the DEPICT and CBT
decoders, Segmenter checkpoints (``encoder.`` through mmseg's own ``vit2mmseg``).
"""
import importlib.util
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping

from torch import Tensor

__all__ = ['convert_attention', 'convert_mita_attention', 'convert_primal_attention',
           'convert_primal_block_attention', 'convert_white_box_vit',
           'convert_timm_vit', 'convert_depict',
           'convert_cbt_decoder', 'convert_segmenter', 'ENCODER_DROPPED']

SD = Mapping[str, Tensor]
_PER_HEAD = ('step_rep', 'step_x', 'temp')  # (H, 1[, 1]) in the references, (H,) here
_WB = ('weight', 'bias')


def _rename(state_dict: SD, names: Mapping[str, str], who: str, dst: str = '',
            optional: Iterable[str] = (), whole: bool = False) -> Dict[str, Tensor]:
    """``{dst + names[k]: state_dict[k]}``, per-head steps flattened. ``KeyError`` for a
    key of ``names`` not in ``state_dict`` (unless ``optional``) and, when ``whole``, for a
    key of ``state_dict`` not in ``names``."""
    missing = [k for k in names if k not in state_dict and k not in optional]
    if missing:
        raise KeyError(f'{who}: missing reference key {missing[0]!r}')
    left = sorted(set(state_dict) - set(names)) if whole else []
    if left:
        raise KeyError(f'{who}: unconverted reference keys {left}')
    return {dst + new: state_dict[old].reshape(-1) if old.rsplit('.', 1)[-1] in _PER_HEAD
            else state_dict[old] for old, new in names.items() if old in state_dict}


def _under(names: Mapping[str, str], src: str, dst: str) -> Dict[str, str]:
    return {src + old: dst + new for old, new in names.items()}


def strip_prefix(state_dict: SD, prefix: str) -> Dict[str, Tensor]:
    """The entries under ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------ attentions
_WHITE_BOX = {
    'cbsa': {'proj.weight': 'in_proj.weight', 'step_rep': 'step_rep', 'step_x': 'step_x'},
    'mssa': {'qkv.weight': 'in_proj.weight'},
    'tssa': {'qkv.weight': 'in_proj.weight', 'temp': 'temp'},
}


def _white_box(kind: str) -> Dict[str, str]:
    if kind.lower() not in _WHITE_BOX:
        raise KeyError(f'unknown attention kind {kind!r}; expected one of {sorted(_WHITE_BOX)}')
    return dict(_WHITE_BOX[kind.lower()], **{f'to_out.{n}': f'out_proj.{n}' for n in _WB})


def convert_attention(kind: str, state_dict: SD, src_prefix: str = '',
                      dst_prefix: str = '') -> Dict[str, Tensor]:
    """One CBSA / MSSA / TSSA module (``kind``) under ``src_prefix`` -> mmcbsa names."""
    return _rename(state_dict, _under(_white_box(kind), src_prefix, dst_prefix),
                   f'convert_attention({kind})')


def convert_mita_attention(state_dict: SD, src_prefix: str = '',
                           dst_prefix: str = '') -> Dict[str, Tensor]:
    """One MiTA module (``MiTA_Attention[_Conv[_Gate]]``), or timm's softmax attention
    (mmcbsa ``MHSA``), which shares its layout: same names; ``qkv`` (``qkvg`` when gated)
    and ``proj`` weights required, biases and ``dwc`` copied when present."""
    proj_in = 'qkvg' if src_prefix + 'qkvg.weight' in state_dict else 'qkv'
    optional = [src_prefix + n for n in (f'{proj_in}.bias', 'proj.bias', 'dwc.weight',
                                         'dwc.bias')]
    names = {n: n for n in (f'{proj_in}.weight', 'proj.weight')}
    names.update({n[len(src_prefix):]: n[len(src_prefix):] for n in optional})
    return _rename(state_dict, _under(names, src_prefix, dst_prefix),
                   'convert_mita_attention', optional=optional)


_PRIMAL = {'we': 'w_e', 'wr': 'w_r', 'Lambda': 'lambdas', 'qk.weight': 'qk.weight',
           'qk.bias': 'qk.bias', 'proj.weight': 'proj.weight', 'proj.bias': 'proj.bias',
           'concate_weight.weight': 'concat_proj.weight',
           'concate_weight.bias': 'concat_proj.bias'}


def convert_primal_attention(state_dict: SD, src_prefix: str = '',
                             dst_prefix: str = '') -> Dict[str, Tensor]:
    """One Primal-Attention module under ``src_prefix`` -> mmcbsa names."""
    return _rename(state_dict, _under(_PRIMAL, src_prefix, dst_prefix),
                   'convert_primal_attention', optional=[src_prefix + 'qk.bias'])


def convert_primal_block_attention(state_dict: SD, src: str, dst: str) -> Dict[str, Tensor]:
    """A Primal.+DeiT / PrimalFormer block: Primal when it has ``we``, else softmax."""
    fn = convert_primal_attention if src + 'we' in state_dict else convert_mita_attention
    return fn(state_dict, src, dst)


# ----------------------------------------------------------------------- classifiers
_STEM = re.compile(r'^to_patch_embedding\.proj\.(\d+)\.0\.weight$')
_WB_LAYER = re.compile(r'^transformer\.layers\.(\d+)\.')
TIMM_BLOCK = re.compile(r'^blocks\.(\d+)\.')


def stem_indices(state_dict: SD) -> list:
    """Indices ``i`` of the white-box conv stem's ``to_patch_embedding.proj.i.0``."""
    return sorted(int(m.group(1)) for k in state_dict if (m := _STEM.match(k)))


def layer_count(state_dict: SD, pattern: 're.Pattern' = _WB_LAYER) -> int:
    """``1 + max i`` over the keys matching ``pattern`` (group 1 is ``i``); 0 if none."""
    return 1 + max((int(m.group(1)) for k in state_dict if (m := pattern.match(k))),
                   default=-1)


def convert_white_box_vit(state_dict: SD, attn: str, prefix: str = '') -> Dict[str, Tensor]:
    """CBSA repository classifier (conv stem, ``[attn, ISTA]`` blocks, LN + Linear head,
    attention ``attn`` in CBSA/MSSA/TSSA) -> ``ImageClassifier(WhiteBoxViT,
    LinearClsHead)``."""
    if not stem_indices(state_dict):
        raise KeyError('convert_white_box_vit: no conv stem keys '
                       '(to_patch_embedding.proj.<i>.0.weight)')
    names = {'cls_token': 'backbone.cls_token', 'pos_embedding': 'backbone.pos_embed'}
    for k, i in enumerate(stem_indices(state_dict)):
        names.update(_under(dict({'0.weight': 'conv.weight'}, **{f'1.{n}': f'bn.{n}' for n in (
            *_WB, 'running_mean', 'running_var', 'num_batches_tracked')}),
            f'to_patch_embedding.proj.{i}.', f'backbone.patch_embed.convs.{k}.'))
    for i in range(layer_count(state_dict)):
        src, dst = f'transformer.layers.{i}.', f'backbone.layers.{i}.'
        names.update(_under({f'0.norm.{n}': f'norm1.{n}' for n in _WB}, src, dst))
        names.update(_under({f'1.norm.{n}': f'norm2.{n}' for n in _WB}, src, dst))
        names[f'{src}1.fn.weight'] = f'{dst}ffn.weight'
        names.update(_under(_white_box(attn), f'{src}0.fn.', f'{dst}attn.'))
    names.update(_under({f'0.{n}': f'backbone.norm.{n}' for n in _WB}, 'mlp_head.', ''))
    names.update(_under({f'1.{n}': f'head.fc.{n}' for n in _WB}, 'mlp_head.', ''))
    return _rename(state_dict, names, 'convert_white_box_vit', prefix, whole=True)


def convert_timm_vit(state_dict: SD,
                     convert_block_attention: Callable[[SD, str, str], Dict[str, Tensor]],
                     prefix: str = '', head: str = 'head.fc.') -> Dict[str, Tensor]:
    """timm-layout ViT classifier -> ``ImageClassifier(WhiteBoxViT)`` with the classifier
    under ``head`` (``LinearClsHead``'s ``head.fc.``; mmpretrain's DeiT configs use
    ``VisionTransformerClsHead``'s ``head.layers.head.``); each block's attention by
    ``convert_block_attention(sd, 'blocks.i.attn.', dst)``, which must take every key
    under ``blocks.i.attn.``."""
    names = {'cls_token': 'backbone.cls_token', 'pos_embed': 'backbone.pos_embed'}
    for n in _WB:
        names.update({f'patch_embed.proj.{n}': f'backbone.patch_embed.projection.{n}',
                      f'norm.{n}': f'backbone.norm.{n}', f'head.{n}': f'{head}{n}'})
    out, attn_keys = {}, set()
    for i in range(layer_count(state_dict, TIMM_BLOCK)):
        src, dst = f'blocks.{i}.', f'backbone.layers.{i}.'
        names.update(_under({f'{a}.{n}': f'{b}.{n}' for n in _WB for a, b in (
            ('norm1', 'norm1'), ('norm2', 'norm2'), ('mlp.fc1', 'ffn.layers.0.0'),
            ('mlp.fc2', 'ffn.layers.1'))}, src, dst))
        keys = [k for k in state_dict if k.startswith(f'{src}attn.')]
        renamed = convert_block_attention(state_dict, f'{src}attn.', f'{prefix}{dst}attn.')
        if len(renamed) != len(keys):
            raise KeyError(f'convert_timm_vit: block {i} attention has {len(keys)} '
                           f'tensors but its converter took {len(renamed)}: {sorted(keys)}')
        out.update(renamed)
        attn_keys.update(keys)
    rest = {k: v for k, v in state_dict.items() if k not in attn_keys}
    return dict(out, **_rename(rest, names, 'convert_timm_vit', prefix, whole=True))


# ---------------------------------------------------------------------- segmentation
_DEPICT_LAYER = re.compile(r'^(net|snet|cnet)\.layers\.(\d+)\.')
_DEPICT_STACK = {'net': 'layers', 'snet': 'layers', 'cnet': 'cross_layers'}
_DEPICT_LEAF = dict({f'norm.{n}': f'norm.{n}' for n in _WB}, **{
    'fn.proj': 'attn.in_proj.weight', 'fn.step_size': 'attn.step_size'})
_DEPICT_NORMS = {f'{a}.{n}': f'{b}.{n}' for n in _WB for a, b in (
    ('decoder_norm', 'decoder_norm'), ('snorm', 'decoder_norm'), ('cnorm', 'cross_norm'),
    ('mask_norm', 'mask_norm'))}


def stack_layers(state_dict: SD, prefix: str, stack: str) -> int:
    """Layers of the decoder stack ``net`` / ``snet`` / ``cnet`` under ``prefix`` (DEPICT,
    CBT)."""
    return len({m.group(2) for k in state_dict if k.startswith(prefix)
                for m in [_DEPICT_LAYER.match(k[len(prefix):])] if m and m.group(1) == stack})


def convert_depict(state_dict: SD, src_prefix: str = '',
                   dst_prefix: str = '') -> Dict[str, Tensor]:
    """DEPICT decoder (``MaskTransformer``, SA: ``net``, or CA: ``snet`` + ``cnet``; keys
    under ``src_prefix``) -> ``DEPICTHead`` under ``dst_prefix``."""
    sd = strip_prefix(state_dict, src_prefix)
    stacks = {k.split('.')[0] for k in sd if _DEPICT_LAYER.match(k)}
    if 'net' in stacks and stacks & {'snet', 'cnet'}:
        raise KeyError('convert_depict: checkpoint mixes SA (net.*) and CA (snet/cnet.*) keys')
    names = dict(_DEPICT_NORMS, cls_emb='cls_emb')
    for stack in stacks:
        for i in range(stack_layers(sd, '', stack)):
            names.update(_under(_DEPICT_LEAF, f'{stack}.layers.{i}.',
                                f'{_DEPICT_STACK[stack]}.{i}.'))
    return _rename(sd, names, 'convert_depict', dst_prefix, optional=_DEPICT_NORMS,
                   whole=True)


def convert_cbt_decoder(state_dict: SD, src_prefix: str = '',
                        dst_prefix: str = '') -> Dict[str, Tensor]:
    """CBT decoder (CBSA paper; keys under ``src_prefix``) -> ``CBTHead`` under
    ``dst_prefix``."""
    sd = strip_prefix(state_dict, src_prefix)
    names = {n: n for n in ('cls_emb', *(f'{a}.{b}' for a in ('decoder_norm', 'mask_norm')
                                         for b in _WB))}
    for i in range(stack_layers(sd, '', 'net')):
        src, dst = f'net.layers.{i}.', f'layers.{i}.'
        names.update(_under({f'norm.{n}': f'norm.{n}' for n in _WB}, src, dst))
        names.update(_under(_white_box('cbsa'), f'{src}fn.', f'{dst}attn.'))
    return _rename(sd, names, 'convert_cbt_decoder', dst_prefix, whole=True)


# Segmenter encoder parameters that mmseg's VisionTransformer has no place for.
ENCODER_DROPPED = ('head.', 'head_dist.', 'dist_token', 'pre_logits.')


def _mmseg_vit2mmseg() -> Callable[[SD], Dict[str, Tensor]]:
    """mmseg's own timm-ViT key mapping (``tools/model_converters/vit2mmseg.py``, shipped
    in the mmseg package under ``.mim``)."""
    import mmseg
    path = Path(mmseg.__file__).parent / '.mim' / 'tools' / 'model_converters' / 'vit2mmseg.py'
    if not path.is_file():
        raise FileNotFoundError(f'mmseg ViT converter not found at {path}; '
                                'reinstall mmsegmentation (the package ships it under .mim)')
    spec = importlib.util.spec_from_file_location('_mmseg_vit2mmseg', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.convert_vit


def convert_segmenter(state_dict: SD, convert_decoder: Callable[..., Dict[str, Tensor]]
                      ) -> Dict[str, Tensor]:
    """Segmenter-style checkpoint (``encoder.`` timm ViT + ``decoder.``) -> mmseg
    ``EncoderDecoder`` (``backbone.`` mmseg ``VisionTransformer`` + ``decode_head.``).
    The encoder's classification head and distillation token are dropped; a bare
    decoder converts to head keys without ``decode_head.``."""
    if not any(k.startswith(('encoder.', 'decoder.')) for k in state_dict):
        return convert_decoder(state_dict)
    other = [k for k in state_dict if not k.startswith(('encoder.', 'decoder.'))]
    if other:
        raise KeyError(f'convert_segmenter: keys outside encoder./decoder.: {other}')
    out = convert_decoder(state_dict, 'decoder.', 'decode_head.')
    encoder = {k: v for k, v in strip_prefix(state_dict, 'encoder.').items()
               if not k.startswith(ENCODER_DROPPED)}
    if encoder:
        out.update({'backbone.' + k: v for k, v in _mmseg_vit2mmseg()(encoder).items()})
    return out
