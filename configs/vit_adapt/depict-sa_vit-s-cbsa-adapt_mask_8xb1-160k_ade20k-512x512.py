# DEPICT-SA on mmseg's Segmenter ViT-Small encoder adapted to CBSA-style attention
# (docs/mechanisms.md §8), ADE20K. One change to
# configs/depict/depict-sa_vit-s_mask_8xb1-160k_ade20k-512x512.py: the encoder type. Its
# ImageNet-21K-pretrained weights (Segmenter's vit_small_p16_384) load unchanged; every
# encoder layer pools 8x8 = 64 representatives from its 32x32 patch grid (512 crops).
_base_ = ['../depict/depict-sa_vit-s_mask_8xb1-160k_ade20k-512x512.py']
custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)

model = dict(backbone=dict(type='AdaptedVisionTransformer'))
