# CBT decode head (the CBSA segmentation decoder, docs/mechanisms.md §4) on mmseg's Segmenter
# ViT-Large encoder, ADE20K, 640x640 crops (slide 640 / stride 608), as mmseg's
# Segmenter ViT-L config.
# Everything but the decode head (encoder, ImageNet-21k pretrained weights, data
# pipeline, SGD lr 1e-3 poly on the 160k schedule, batch 8 = 8 GPUs x 1, slide
# inference) comes from mmseg's Segmenter config, so the two are directly comparable.
# Paper decoder: L = 3 CBSA layers over [classes; patches], H = 3 heads of width
# p = 100, m = 10x10 representatives pooled from the patch tokens, no FFN.
_base_ = ['mmseg::segmenter/segmenter_vit-l_mask_8xb1-160k_ade20k-512x512.py']
custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)

model = dict(
    decode_head=dict(
        _delete_=True,
        type='CBTHead',
        in_channels=1024,
        channels=1024,
        num_classes=150,
        num_layers=3,
        num_heads=3,
        head_dims=100,
        num_reps=100,
        dropout_ratio=0.0,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))
