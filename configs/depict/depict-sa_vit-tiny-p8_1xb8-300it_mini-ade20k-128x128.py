# DEPICT-SA decode head on a tiny ViT encoder (mmseg VisionTransformer, trained from
# scratch) for the synthetic mini ADE20K. Sized to learn on 2 CPU cores in minutes:
#   bash tools/quickstart.sh
# The encoder skeleton and the 300-iteration schedule come from the `_base_` files.
_base_ = [
    '../_base_/models/mini_encoder_decoder.py',
    '../_base_/datasets/mini_ade20k.py',
    '../_base_/schedules/mini_ade20k_adamw.py',
]
custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)

model = dict(
    decode_head=dict(
        type='DEPICTHead',
        mode='sa',
        in_channels={{_base_.embed_dims}},
        channels={{_base_.embed_dims}},
        num_classes=150,
        num_layers=2,
        num_heads=3,
        head_dims=32,
        dropout_ratio=0.0,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))

# The compression curve as a by-product of training (docs/analysis.md): every 50
# iterations and before the first, the coding rate of each attention layer's input on the
# first 4 validation images goes into the log (vis_data/scalars.json);
# tools/analysis_tools/coding_rate.py --training-log WORK_DIR draws it.
custom_hooks = [dict(type='CodingRateHook', interval=50, num_images=4)]
