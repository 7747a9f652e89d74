# DEPICT-SA decode head on mmseg's Segmenter ViT-Base encoder, ADE20K.
# Everything but the decode head (encoder, ImageNet-21k pretrained weights, data
# pipeline, SGD lr 1e-3 poly on the 160k schedule, batch 8 = 8 GPUs x 1, slide
# inference) comes from mmseg's Segmenter config, so the two are directly comparable.
# Paper decoder (docs/mechanisms.md §3): L = 3 MSSA layers, H = 3 heads of width p = 100.
_base_ = ['mmseg::segmenter/segmenter_vit-b_mask_8xb1-160k_ade20k-512x512.py']
custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)

model = dict(
    decode_head=dict(
        _delete_=True,
        type='DEPICTHead',
        mode='sa',
        in_channels=768,
        channels=768,
        num_classes=150,
        num_layers=3,
        num_heads=3,
        head_dims=100,
        dropout_ratio=0.0,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))
