# MiTA segmenter in miniature: a 4-block MiTA encoder (width 96, patch 8, trained from
# scratch) with the CBT decode head, on the synthetic mini ADE20K. Same pieces as
# mita-s_cbt-head_8xb1-160k_ade20k-512x512.py (7x7 landmarks, 49 routed keys; CBSA
# decoder with pooled representatives), sized to train on 2 CPU cores:
#   python tools/misc/make_mini_dataset.py --dataset ade20k --out data/mini_ade20k
#   python tools/train.py configs/cbt/mita-nano_cbt-head_1xb8-mini-ade20k-128x128.py
# Skeleton and schedule come from the `_base_` files; the backbone is replaced and the
# schedule runs 1500 iterations instead of 300.
_base_ = [
    '../_base_/models/mini_encoder_decoder.py',
    '../_base_/datasets/mini_ade20k.py',
    '../_base_/schedules/mini_ade20k_adamw.py',
]
custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='WhiteBoxViT',
        arch=dict(base='mita-deit-t', embed_dims={{_base_.embed_dims}}, num_layers=4,
                  num_heads=3, attn_cfg=dict(num_landmarks=49, topk=49)),
        img_size={{_base_.crop_size}},
        patch_size=8,
        out_indices=-1,
        out_type='featmap',
        with_cls_token=True,
        final_norm=True),
    decode_head=dict(
        type='CBTHead',
        in_channels={{_base_.embed_dims}},
        channels={{_base_.embed_dims}},
        num_classes=150,
        num_layers=2,
        num_heads=3,
        head_dims=32,
        num_reps=64,
        dropout_ratio=0.0,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))

# `max_iters` is used inside the base's dicts, so every value derived from it is
# re-stated here.
max_iters = 1500
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=100),
    dict(type='PolyLR', eta_min=1e-5, power=1.0, by_epoch=False, begin=100, end=max_iters)
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(checkpoint=dict(interval=500))
