# Black-box baseline of the quick-start model: mmseg's own Segmenter mask-transformer head
# (2 ViT layers with MLPs, 3 heads) in place of DEPICT-SA, same tiny encoder, mini ADE20K
# data and 300-iteration schedule. DEPICT's robustness claim (docs/analysis.md,
# tools/analysis_tools/perturb_robustness.py) is measured against this head.
_base_ = ['./depict-sa_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py']

model = dict(
    decode_head=dict(
        _delete_=True,
        type='SegmenterMaskTransformerHead',
        in_channels={{_base_.embed_dims}},
        channels={{_base_.embed_dims}},
        embed_dims={{_base_.embed_dims}},
        num_classes=150,
        num_layers=2,
        num_heads=3,
        drop_path_rate=0.0,
        dropout_ratio=0.0,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))
