# The CBT decode head (CBSA decoder, docs/mechanisms.md §4) in place of DEPICT-SA on the
# quick-start model: same tiny mmseg ViT encoder (width 96, 4 layers, patch 8), mini ADE20K
# data and 300-iteration schedule, so the two heads can be trained, compared and looked
# inside (docs/analysis.md) on a CPU:
#   python tools/misc/make_mini_dataset.py --dataset ade20k --out data/mini_ade20k
#   python tools/train.py configs/cbt/cbt-head_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py
_base_ = ['../depict/depict-sa_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py']

model = dict(
    decode_head=dict(
        _delete_=True,
        type='CBTHead',
        in_channels={{_base_.embed_dims}},
        channels={{_base_.embed_dims}},
        num_classes=150,
        num_layers=2,
        num_heads=3,
        head_dims=32,
        num_reps=64,  # 8x8 representatives pooled from the 16x16 patch grid
        dropout_ratio=0.0,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))
