# DEPICT-SA decode head on mmseg's Segmenter ViT-Small encoder, Cityscapes (19 classes,
# 768x768 crops, slide inference 768 / stride 512): the ViT-Base config with mmseg's
# Segmenter ViT-S/16 encoder (width 384, 6 heads, ImageNet-21k weights, as
# segmenter_vit-s_mask_8xb1-160k_ade20k-512x512); decoder, data and schedule unchanged.
_base_ = ['./depict-sa_vit-b_mask_8xb1-80k_cityscapes-768x768.py']
checkpoint = 'https://download.openmmlab.com/mmsegmentation/v0.5/pretrain/segmenter/vit_small_p16_384_20220308-410f6037.pth'  # noqa

model = dict(
    pretrained=checkpoint,
    backbone=dict(embed_dims=384, num_heads=6),
    decode_head=dict(in_channels=384, channels=384))
