# ViT-B/16 fine-tuned into CBSA-style attention (docs/mechanisms.md §8), ImageNet-1K,
# 224 px, with the reference recipe (AdamW lr 5e-5, wd 0.01, batch 512 = 8 GPUs x 64,
# 50 epochs; random-resized-crop + flip, label smoothing 0.1).
# Start: mmpretrain's ImageNet-21K-pretrained ViT-B/16 fine-tuned on IN-1K at 384 px
# (vit-base-p16_in21k-pre_3rdparty_in1k-384px, 85.43 top-1; AugReg weights), its position
# embedding resized 24x24 -> 14x14 on load.
# The reference starts from timm's vit_base_patch16_224.augreg2_in21k_ft_in1k.
# Every layer adapted (8x8 = 64 representatives pooled on the true patch grid); every
# pretrained tensor (backbone and 1000-class head) loads unchanged.
_base_ = [
    'mmpretrain::_base_/models/vit-base-p16.py',
    'mmpretrain::_base_/datasets/imagenet_bs64_pil_resize.py',
    '../_base_/schedules/imagenet_bs512_adamw_50e.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)

checkpoint = 'https://download.openmmlab.com/mmclassification/v0/vit/finetune/vit-base-p16_in21k-pre-3rdparty_ft-64xb64_in1k-384_20210928-98e8652b.pth'  # noqa
model = dict(
    backbone=dict(type='AdaptedVisionTransformer', img_size=224, drop_rate=0.),
    head=dict(
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')),
    init_cfg=dict(type='Pretrained', checkpoint=checkpoint))
# the checkpoint's input normalisation (pixels to [-1, 1])
data_preprocessor = dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5])
