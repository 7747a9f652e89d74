"""Converters from the reference implementations' checkpoints to mmcbsa's.

``renames``: one rename function per reference layout; ``kinds``: the released
checkpoints' layouts and the sizes read off their tensors; ``checkpoint_io``: reading
(weights only) and writing; ``official``: the whole conversion behind
``tools/model_converters/official2mmcbsa.py``.
"""
from .checkpoint_io import ConversionError, read_reference_checkpoint, save_converted
from .kinds import KINDS, ConvertOptions, recognise
from .official import ConversionFailed, ConversionReport, convert_official_checkpoint
from .renames import (convert_attention, convert_cbt_decoder, convert_depict,
                      convert_mita_attention, convert_primal_attention,
                      convert_primal_block_attention, convert_segmenter, convert_timm_vit,
                      convert_white_box_vit)

__all__ = [
    'ConversionError', 'read_reference_checkpoint',
    'save_converted', 'KINDS', 'ConvertOptions', 'recognise', 'ConversionFailed',
    'ConversionReport', 'convert_official_checkpoint', 'convert_attention',
    'convert_cbt_decoder', 'convert_depict', 'convert_mita_attention',
    'convert_primal_attention', 'convert_primal_block_attention', 'convert_segmenter',
    'convert_timm_vit', 'convert_white_box_vit'
]
