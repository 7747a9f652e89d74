# DEPICT-CA decode head on a tiny ViT encoder (mmseg VisionTransformer, width 96, patch
# 8, trained from scratch) for the synthetic mini Cityscapes: 19 classes, 96x96 crops,
# slide inference 96 / stride 64 (the 768 / 512 Cityscapes recipe of
# depict-ca_vit-*_mask_8xb1-80k_cityscapes-768x768 at 1/8 scale). Sized to train on 2
# CPU cores:
#   python tools/misc/make_mini_dataset.py --dataset cityscapes --out data/mini_cityscapes
#   python tools/train.py configs/depict/depict-ca_vit-tiny-p8_1xb8-300it_mini-cityscapes-96x96.py
# The encoder skeleton and the 300-iteration AdamW schedule are the mini ADE20K ones.
_base_ = [
    '../_base_/models/mini_encoder_decoder.py',
    '../_base_/datasets/mini_cityscapes.py',
    '../_base_/schedules/mini_ade20k_adamw.py',
]
custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)

model = dict(
    data_preprocessor=dict(size={{_base_.crop_size}}),
    backbone=dict(img_size={{_base_.crop_size}}),
    decode_head=dict(
        type='DEPICTHead',
        mode='ca',
        in_channels={{_base_.embed_dims}},
        channels={{_base_.embed_dims}},
        num_classes=19,
        num_layers=2,
        num_heads=3,
        head_dims=32,
        ca_num_layers=2,
        ca_num_heads=3,
        ca_head_dims=16,
        dropout_ratio=0.0,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    test_cfg=dict(mode='slide', crop_size={{_base_.crop_size}}, stride=(64, 64)))
