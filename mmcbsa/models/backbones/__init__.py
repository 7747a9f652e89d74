from .adapted_vit import (AdaptedInProjAttention, AdaptedSDPA,
                          PretrainAdaptedVisionTransformer, SegAdaptedVisionTransformer)
from .conv_stem import ConvStem
from .white_box_vit import WhiteBoxViT

__all__ = ['AdaptedInProjAttention', 'AdaptedSDPA', 'ConvStem',
           'PretrainAdaptedVisionTransformer', 'SegAdaptedVisionTransformer', 'WhiteBoxViT']
