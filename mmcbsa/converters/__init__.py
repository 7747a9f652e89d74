"""Converters from the reference implementations' parameter names to mmcbsa's.

Per-kind renames (``white_box``, ``white_box_vit``, ``timm_vit``, ``primal``,
``primal_vit``, ``mita``, ``mita_deit``, ``depict``, ``cbt_decoder``), checkpoint reading
and writing (``checkpoint_io``), the registry of released-checkpoint kinds (``kinds``) and
the whole conversion behind ``tools/model_converters/official2mmcbsa.py`` (``official``).
"""
from .white_box import (attention_kwargs_from_reference, convert_attention,
                        convert_cbsa_attention, convert_mssa_attention,
                        convert_tssa_attention)

__all__ = [
    'attention_kwargs_from_reference', 'convert_attention', 'convert_cbsa_attention',
    'convert_mssa_attention', 'convert_tssa_attention'
]
from .depict import (convert_depict, convert_depict_segmenter,  # noqa: E402
                     depict_head_kwargs_from_reference, infer_depict_config)

__all__ += [
    'convert_depict', 'convert_depict_segmenter', 'depict_head_kwargs_from_reference',
    'infer_depict_config'
]
from .cbt_decoder import (cbt_head_kwargs_from_reference,  # noqa: E402
                          convert_cbt_decoder, convert_cbt_segmenter,
                          infer_cbt_decoder_config)

__all__ += [
    'cbt_head_kwargs_from_reference', 'convert_cbt_decoder', 'convert_cbt_segmenter',
    'infer_cbt_decoder_config'
]
from .mita import convert_mita_attention, mita_kwargs_from_reference  # noqa: E402
from .primal import (convert_primal, convert_primal_attention,  # noqa: E402
                     primal_kwargs_from_reference)

__all__ += [
    'convert_mita_attention', 'mita_kwargs_from_reference', 'convert_primal',
    'convert_primal_attention', 'primal_kwargs_from_reference'
]
from .checkpoint_io import (ConversionError, load_reference_state_dict,  # noqa: E402
                            read_reference_checkpoint, save_converted)

__all__ += ['ConversionError', 'load_reference_state_dict', 'read_reference_checkpoint',
            'save_converted']
from .kinds import KINDS, ConvertOptions, recognise  # noqa: E402
from .official import (ConversionFailed, ConversionReport,  # noqa: E402
                       convert_official_checkpoint)

__all__ += ['KINDS', 'ConvertOptions', 'recognise', 'ConversionFailed', 'ConversionReport',
            'convert_official_checkpoint']
