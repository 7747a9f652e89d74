"""The reference segmenters' shared layout (DEPICT and CBSA repositories, Segmenter
forks): ``encoder.*`` is a timm ViT, ``decoder.*`` the paper's decoder. One conversion for
all of them: mmseg's own ViT key mapping for the encoder, the given decoder converter for
the decoder (:func:`convert_segmenter`)."""
import importlib.util
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

from torch import Tensor

__all__ = ['convert_segmenter', 'ENCODER_DROPPED']

# Segmenter encoder parameters that mmseg's VisionTransformer has no place for.
ENCODER_DROPPED = ('head.', 'head_dist.', 'dist_token', 'pre_logits.')

DecoderConverter = Callable[..., Dict[str, Tensor]]


def _mmseg_vit_converter() -> Callable[[Mapping[str, Tensor]], Dict[str, Tensor]]:
    """mmseg's own timm-ViT -> mmseg ``VisionTransformer`` key mapping
    (``tools/model_converters/vit2mmseg.py``, shipped in the mmseg package)."""
    import mmseg
    path = Path(mmseg.__file__).parent / '.mim' / 'tools' / 'model_converters' / 'vit2mmseg.py'
    if not path.is_file():
        raise FileNotFoundError(f'mmseg ViT converter not found at {path}; '
                                'reinstall mmsegmentation (the package ships it under .mim)')
    spec = importlib.util.spec_from_file_location('_mmseg_vit2mmseg', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.convert_vit


def convert_segmenter(state_dict: Mapping[str, Tensor], convert_decoder: DecoderConverter,
                      config: Optional[Mapping] = None,
                      owner: str = 'convert_segmenter') -> Dict[str, Tensor]:
    """Official segmenter (``encoder.*`` + ``decoder.*``) -> mmseg ``EncoderDecoder``
    (``backbone.*`` mmseg ``VisionTransformer`` + ``decode_head.*``).

    A bare decoder state dict (neither prefix) converts to head keys without
    ``decode_head.``. The encoder's classification head (``head``, ``head_dist``) and
    distillation token are dropped: mmseg's ViT has neither.

    Args:
        state_dict: the reference checkpoint's weights.
        convert_decoder: ``(state_dict, config, src_prefix='', dst_prefix='')`` -> the
            decoder's mmcbsa keys (e.g. ``convert_depict``, ``convert_cbt_decoder``).
        config: the reference decoder's constructor arguments, if known.
        owner: named in errors.

    Raises:
        KeyError: keys outside ``encoder.`` / ``decoder.``.
    """
    has_decoder = any(k.startswith('decoder.') for k in state_dict)
    has_encoder = any(k.startswith('encoder.') for k in state_dict)
    if not has_decoder and not has_encoder:
        return convert_decoder(state_dict, config)
    other = [k for k in state_dict if not k.startswith(('encoder.', 'decoder.'))]
    if other:
        raise KeyError(f'{owner}: keys outside encoder./decoder.: {other}')
    out: Dict[str, Tensor] = {}
    if has_decoder:
        out.update(convert_decoder(state_dict, config, 'decoder.', 'decode_head.'))
    if has_encoder:
        encoder = {k[len('encoder.'):]: v for k, v in state_dict.items()
                   if k.startswith('encoder.') and not k[len('encoder.'):].startswith(
                       ENCODER_DROPPED)}
        for k, v in _mmseg_vit_converter()(encoder).items():
            out['backbone.' + k] = v
    return out
