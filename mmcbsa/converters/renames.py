"""Parameter renames, one function per reference layout (as mmseg's ``vit2mmseg``).

Each maps a reference state dict onto mmcbsa's / mmseg's / mmpretrain's names and
refuses to drop a reference key silently (a ``KeyError`` names what is left or missing);
sizes are read in :mod:`mmcbsa.converters.kinds`. The attentions: CBSA / MSSA / TSSA
(``proj`` or ``qkv`` -> ``in_proj``, ``to_out`` -> ``out_proj``, per-head ``(H, 1[, 1])``
steps / temperatures -> ``(H,)``), MiTA (same names), Primal-Attention (``we``, ``wr``,
``Lambda``, ``concate_weight`` -> ``w_e``, ``w_r``, ``lambdas``, ``concat_proj``). The
models: the CBSA repository's classifiers (conv stem, ``[attention, ISTA]`` blocks), timm
ViTs (DeiT, Primal, MiTA-DeiT), the DEPICT and CBT decoders, and Segmenter checkpoints
(``encoder.`` through mmseg's own ``vit2mmseg``, ``decoder.`` through the decoder's).
"""
import importlib.util
import re
from pathlib import Path
from typing import Callable, Dict, Iterable, Mapping, Optional

from torch import Tensor

__all__ = ['convert_attention', 'convert_mita_attention', 'convert_primal_attention',
           'convert_primal', 'convert_primal_block_attention', 'convert_white_box_vit',
           'convert_timm_vit', 'convert_softmax_attention', 'convert_depict',
           'convert_cbt_decoder', 'convert_segmenter', 'ENCODER_DROPPED']

SD = Mapping[str, Tensor]


class StateDictRenamer:
    """Collects renamed tensors (``prefix`` + new name); :meth:`finish` refuses
    reference keys nobody took (errors start with ``who``)."""

    def __init__(self, state_dict: SD, prefix: str, who: str) -> None:
        self.state_dict, self.prefix, self.who = state_dict, prefix, who
        self.out: Dict[str, Tensor] = {}
        self.used = set()

    def take(self, src: str, dst: str) -> None:
        """``out[prefix + dst] = state_dict[src]``; a missing ``src`` is a ``KeyError``."""
        if src not in self.state_dict:
            raise KeyError(f'{self.who}: missing reference key {src!r}')
        self.out[self.prefix + dst] = self.state_dict[src]
        self.used.add(src)

    def add(self, renamed: Mapping[str, Tensor], sources: Iterable[str]) -> None:
        self.out.update(renamed)
        self.used.update(sources)

    def finish(self) -> Dict[str, Tensor]:
        left = sorted(set(self.state_dict) - self.used)
        if left:
            raise KeyError(f'{self.who}: unconverted reference keys {left}')
        return self.out


def _copy(state_dict: SD, names: Mapping[str, str], src: str, dst: str, who: str,
          optional: Iterable[str] = (), flatten: Iterable[str] = ()) -> Dict[str, Tensor]:
    out = {}
    for old, new in names.items():
        if src + old in state_dict:
            value = state_dict[src + old]
            out[dst + new] = value.reshape(-1) if old in flatten else value
        elif old not in optional:
            raise KeyError(f'{who}: missing reference key {src + old!r}')
    return out


# ------------------------------------------------------------------------ attentions
_WHITE_BOX = {
    'cbsa': {'proj.weight': 'in_proj.weight', 'step_rep': 'step_rep', 'step_x': 'step_x',
             'to_out.weight': 'out_proj.weight', 'to_out.bias': 'out_proj.bias'},
    'mssa': {'qkv.weight': 'in_proj.weight', 'to_out.weight': 'out_proj.weight',
             'to_out.bias': 'out_proj.bias'},
    'tssa': {'qkv.weight': 'in_proj.weight', 'temp': 'temp',
             'to_out.weight': 'out_proj.weight', 'to_out.bias': 'out_proj.bias'},
}


def convert_attention(kind: str, state_dict: SD, src_prefix: str = '',
                      dst_prefix: str = '') -> Dict[str, Tensor]:
    """One CBSA / MSSA / TSSA module (``kind``) under ``src_prefix`` -> mmcbsa names."""
    names = _WHITE_BOX.get(kind.lower())
    if names is None:
        raise KeyError(f'convert_attention: unknown kind {kind!r}; expected one of '
                       f'{sorted(_WHITE_BOX)}')
    return _copy(state_dict, names, src_prefix, dst_prefix, f'convert_attention({kind})',
                 flatten=('step_rep', 'step_x', 'temp'))


def convert_mita_attention(state_dict: SD, src_prefix: str = '',
                           dst_prefix: str = '') -> Dict[str, Tensor]:
    """One MiTA module (``MiTA_Attention[_Conv[_Gate]]``): same names; ``qkv`` (``qkvg``
    when gated) and ``proj`` weights required, biases and ``dwc`` copied when present."""
    proj_in = 'qkvg' if src_prefix + 'qkvg.weight' in state_dict else 'qkv'
    names = {n: n for n in (f'{proj_in}.weight', 'proj.weight', f'{proj_in}.bias',
                            'proj.bias', 'dwc.weight', 'dwc.bias')}
    return _copy(state_dict, names, src_prefix, dst_prefix, 'convert_mita_attention',
                 optional=(f'{proj_in}.bias', 'proj.bias', 'dwc.weight', 'dwc.bias'))


_PRIMAL = {'we': 'w_e', 'wr': 'w_r', 'Lambda': 'lambdas', 'qk.weight': 'qk.weight',
           'qk.bias': 'qk.bias', 'proj.weight': 'proj.weight', 'proj.bias': 'proj.bias',
           'concate_weight.weight': 'concat_proj.weight',
           'concate_weight.bias': 'concat_proj.bias'}
_PRIMAL_LEAF = re.compile(r'^(?P<prefix>(?:.*\.)?)(?P<name>we|wr|Lambda|'
                          r'concate_weight\.(?:weight|bias))$')


def convert_primal_attention(state_dict: SD, src_prefix: str = '',
                             dst_prefix: str = '') -> Dict[str, Tensor]:
    """One Primal-Attention module under ``src_prefix`` -> mmcbsa names."""
    return _copy(state_dict, _PRIMAL, src_prefix, dst_prefix, 'convert_primal_attention',
                 optional=('qk.bias', ))


def convert_primal(state_dict: SD) -> Dict[str, Tensor]:
    """The Primal-Attention leaves of a whole model renamed, whatever their prefixes
    (``blocks.3.attn.we`` -> ``blocks.3.attn.w_e``); every other key unchanged."""
    out = {}
    for key, value in state_dict.items():
        match = _PRIMAL_LEAF.match(key)
        out[match['prefix'] + _PRIMAL[match['name']] if match else key] = value
    return out


# ----------------------------------------------------------------------- classifiers
_STEM = re.compile(r'^to_patch_embedding\.proj\.(\d+)\.0\.weight$')
_WB_LAYER = re.compile(r'^transformer\.layers\.(\d+)\.')
_BN = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


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
    ren = StateDictRenamer(state_dict, prefix, 'convert_white_box_vit')
    stem = stem_indices(state_dict)
    if not stem:
        raise KeyError('convert_white_box_vit: no conv stem keys '
                       '(to_patch_embedding.proj.<i>.0.weight)')
    for k, i in enumerate(stem):
        ren.take(f'to_patch_embedding.proj.{i}.0.weight', f'backbone.patch_embed.convs.{k}'
                 '.conv.weight')
        for name in _BN:
            ren.take(f'to_patch_embedding.proj.{i}.1.{name}',
                     f'backbone.patch_embed.convs.{k}.bn.{name}')
    ren.take('cls_token', 'backbone.cls_token')
    ren.take('pos_embedding', 'backbone.pos_embed')
    for i in range(layer_count(state_dict)):
        src, dst = f'transformer.layers.{i}', f'backbone.layers.{i}'
        for name in ('weight', 'bias'):
            ren.take(f'{src}.0.norm.{name}', f'{dst}.norm1.{name}')
            ren.take(f'{src}.1.norm.{name}', f'{dst}.norm2.{name}')
        ren.take(f'{src}.1.fn.weight', f'{dst}.ffn.weight')
        ren.add(convert_attention(attn, state_dict, f'{src}.0.fn.', f'{prefix}{dst}.attn.'),
                (k for k in state_dict if k.startswith(f'{src}.0.fn.')))
    for name in ('weight', 'bias'):
        ren.take(f'mlp_head.0.{name}', f'backbone.norm.{name}')
        ren.take(f'mlp_head.1.{name}', f'head.fc.{name}')
    return ren.finish()


TIMM_BLOCK = re.compile(r'^blocks\.(\d+)\.')


def convert_softmax_attention(state_dict: SD, src_prefix: str = '',
                              dst_prefix: str = '') -> Dict[str, Tensor]:
    """timm's softmax attention -> mmcbsa ``MHSA`` (same names; ``qkv.bias`` optional)."""
    names = {n: n for n in ('qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias')}
    return _copy(state_dict, names, src_prefix, dst_prefix, 'convert_softmax_attention',
                 optional=('qkv.bias', ))


def convert_timm_vit(state_dict: SD,
                     convert_block_attention: Callable[[SD, str, str], Dict[str, Tensor]],
                     prefix: str = '', head: str = 'head.fc.') -> Dict[str, Tensor]:
    """timm-layout ViT classifier -> ``ImageClassifier(WhiteBoxViT)`` with the classifier
    under ``head`` (``LinearClsHead``'s ``head.fc.``; mmpretrain's DeiT configs use
    ``VisionTransformerClsHead``'s ``head.layers.head.``); each block's attention by
    ``convert_block_attention(sd, 'blocks.i.attn.', dst)``, which must take every key
    under ``blocks.i.attn.``."""
    ren = StateDictRenamer(state_dict, prefix, 'convert_timm_vit')
    for name in ('weight', 'bias'):
        ren.take(f'patch_embed.proj.{name}', f'backbone.patch_embed.projection.{name}')
        ren.take(f'norm.{name}', f'backbone.norm.{name}')
        ren.take(f'head.{name}', f'{head}{name}')
    ren.take('cls_token', 'backbone.cls_token')
    ren.take('pos_embed', 'backbone.pos_embed')
    for i in range(layer_count(state_dict, TIMM_BLOCK)):
        src, dst = f'blocks.{i}', f'backbone.layers.{i}'
        for name in ('weight', 'bias'):
            ren.take(f'{src}.norm1.{name}', f'{dst}.norm1.{name}')
            ren.take(f'{src}.norm2.{name}', f'{dst}.norm2.{name}')
            ren.take(f'{src}.mlp.fc1.{name}', f'{dst}.ffn.layers.0.0.{name}')
            ren.take(f'{src}.mlp.fc2.{name}', f'{dst}.ffn.layers.1.{name}')
        attn_keys = [k for k in state_dict if k.startswith(f'{src}.attn.')]
        renamed = convert_block_attention(state_dict, f'{src}.attn.', f'{prefix}{dst}.attn.')
        if len(renamed) != len(attn_keys):
            raise KeyError(f'convert_timm_vit: block {i} attention has {len(attn_keys)} '
                           f'tensors but its converter took {len(renamed)}: {sorted(attn_keys)}')
        ren.add(renamed, attn_keys)
    return ren.finish()


def convert_primal_block_attention(state_dict: SD, src: str, dst: str) -> Dict[str, Tensor]:
    """A Primal.+DeiT / PrimalFormer block: Primal when it has ``we``, else softmax."""
    fn = convert_primal_attention if src + 'we' in state_dict else convert_softmax_attention
    return fn(state_dict, src, dst)


# ---------------------------------------------------------------------- segmentation
_DEPICT_LAYER = re.compile(r'^(net|snet|cnet)\.layers\.(\d+)\.(norm\.weight|norm\.bias|'
                           r'fn\.proj|fn\.step_size)$')
_DEPICT_LEAF = {'norm.weight': 'norm.weight', 'norm.bias': 'norm.bias',
                'fn.proj': 'attn.in_proj.weight', 'fn.step_size': 'attn.step_size'}
_DEPICT_STACK = {'net': 'layers', 'snet': 'layers', 'cnet': 'cross_layers'}
_DEPICT_PLAIN = {'cls_emb': 'cls_emb', 'decoder_norm': 'decoder_norm', 'snorm': 'decoder_norm',
                 'cnorm': 'cross_norm', 'mask_norm': 'mask_norm'}


def depict_mode(state_dict: SD, prefix: str = '') -> Optional[str]:
    """``'sa'`` (``net.*``), ``'ca'`` (``snet``/``cnet``) or None: the DEPICT decoder
    under ``prefix``. ``KeyError`` for a mix of both."""
    stacks = {m.group(1) for k in state_dict if k.startswith(prefix)
              for m in [_DEPICT_LAYER.match(k[len(prefix):])] if m}
    if 'net' in stacks and stacks & {'snet', 'cnet'}:
        raise KeyError('convert_depict: checkpoint mixes SA (net.*) and CA (snet/cnet.*) keys')
    return 'sa' if 'net' in stacks else ('ca' if stacks else None)


def depict_layer_count(state_dict: SD, prefix: str, stack: str) -> int:
    return len({m.group(2) for k in state_dict if k.startswith(prefix)
                for m in [_DEPICT_LAYER.match(k[len(prefix):])] if m and m.group(1) == stack})


def convert_depict(state_dict: SD, src_prefix: str = '',
                   dst_prefix: str = '') -> Dict[str, Tensor]:
    """DEPICT decoder (``MaskTransformer``, SA or CA; keys under ``src_prefix``) ->
    ``DEPICTHead`` under ``dst_prefix``."""
    depict_mode(state_dict, src_prefix)
    out: Dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if not key.startswith(src_prefix):
            continue
        name = key[len(src_prefix):]
        m = _DEPICT_LAYER.match(name)
        top, _, rest = name.partition('.')
        if m:
            stack, idx, leaf = m.groups()
            out[f'{dst_prefix}{_DEPICT_STACK[stack]}.{idx}.{_DEPICT_LEAF[leaf]}'] = value
        elif top in _DEPICT_PLAIN and (rest in ('weight', 'bias') or name == 'cls_emb'):
            out[dst_prefix + _DEPICT_PLAIN[top] + ('.' + rest if rest else '')] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f'convert_depict: unknown official decoder keys {unknown}')
    return out


CBT_LAYER = re.compile(r'^net\.layers\.(\d+)\.(norm\.(?:weight|bias)|fn\..+)$')
_CBT_PLAIN = ('decoder_norm.weight', 'decoder_norm.bias', 'mask_norm.weight',
              'mask_norm.bias', 'cls_emb')


def convert_cbt_decoder(state_dict: SD, src_prefix: str = '',
                        dst_prefix: str = '') -> Dict[str, Tensor]:
    """CBT decoder (CBSA paper; keys under ``src_prefix``) -> ``CBTHead`` under
    ``dst_prefix``."""
    out: Dict[str, Tensor] = {}
    unknown, layers = [], set()
    for key, value in state_dict.items():
        if not key.startswith(src_prefix):
            continue
        name = key[len(src_prefix):]
        m = CBT_LAYER.match(name)
        if m and m.group(2).startswith('norm.'):
            out[f'{dst_prefix}layers.{m.group(1)}.{m.group(2)}'] = value
        elif m:
            layers.add(int(m.group(1)))
            if m.group(2)[len('fn.'):] not in _WHITE_BOX['cbsa']:
                unknown.append(key)
        elif name in _CBT_PLAIN:
            out[dst_prefix + name] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f'convert_cbt_decoder: unknown official decoder keys {unknown}')
    for i in sorted(layers):
        out.update(convert_attention('cbsa', state_dict, f'{src_prefix}net.layers.{i}.fn.',
                                     f'{dst_prefix}layers.{i}.attn.'))
    return out


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
    encoder = {k[len('encoder.'):]: v for k, v in state_dict.items()
               if k.startswith('encoder.') and not k[len('encoder.'):].startswith(ENCODER_DROPPED)}
    if encoder:
        out.update({'backbone.' + k: v for k, v in _mmseg_vit2mmseg()(encoder).items()})
    return out
