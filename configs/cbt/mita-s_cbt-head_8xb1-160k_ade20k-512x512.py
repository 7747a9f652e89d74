# MiTA linear-time segmenter: MiTA-DeiT-S encoder (MiTA in every block, docs/mechanisms.md §5) with
# the CBT decode head (docs/mechanisms.md §4), ADE20K 512x512, on mmseg's Segmenter ViT-S recipe
# (data pipeline, SGD lr 1e-3 poly on the 160k schedule, batch 8 = 8 GPUs x 1,
# slide inference 512 / stride 512).
# Segmentation encoder setting of docs/mechanisms.md §5: 7x7 = 49 landmarks pooled from the patch
# grid, 49 routed keys per expert. Neither part is quadratic in the number of tokens.
# No released MiTA checkpoint is loaded (pretrained=None): to start from an ImageNet
# MiTA-DeiT-S trained with mmcbsa, set
#   model.backbone.init_cfg=dict(type='Pretrained', checkpoint=CKPT, prefix='backbone.')
# (the position embedding is resized to the 32x32 grid on load).
_base_ = ['mmseg::segmenter/segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py']
custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)

model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='WhiteBoxViT',
        arch=dict(base='mita-deit-s', attn_cfg=dict(num_landmarks=49, topk=49)),
        img_size=(512, 512),
        patch_size=16,
        out_indices=-1,
        out_type='featmap',
        with_cls_token=True,
        final_norm=True,
        drop_path_rate=0.1),
    decode_head=dict(
        _delete_=True,
        type='CBTHead',
        in_channels=384,
        channels=384,
        num_classes=150,
        num_layers=3,
        num_heads=3,
        head_dims=100,
        num_reps=100,
        dropout_ratio=0.0,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))
