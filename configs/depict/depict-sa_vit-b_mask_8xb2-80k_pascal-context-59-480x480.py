# DEPICT-SA decode head on mmseg's Segmenter ViT-Base encoder, Pascal Context 59 (59
# classes, 480x480 crops, slide inference 480 / stride 320). Model: mmseg's Segmenter
# ViT-B/16 (ImageNet-21k weights) with the DEPICT-SA decoder (docs/mechanisms.md §3): L
# = 3 MSSA layers, H = 3 heads of width p = 100, as in
# depict-sa_vit-b_mask_8xb1-160k_ade20k-512x512.py. The encoder's img_size
# (position-embedding grid) follows the crop. mmseg's pascal_context_59 data,
# 80k-iteration poly schedule, batch 16 = 8 GPUs x 2 (mmseg's Pascal Context configs use
# 16 = 4 x 4, and so does the Segmenter recipe the papers train with: batch 16, 256
# epochs ~ 80k iterations), SGD lr 1e-3 (Segmenter).
_base_ = [
    '../_base_/models/segmenter_vit-b16_depict-sa.py',
    'mmseg::_base_/datasets/pascal_context_59.py', 'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py'
]
crop_size = (480, 480)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(img_size=crop_size),
    decode_head=dict(num_classes=59),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(320, 320)))

optimizer = dict(lr=0.001, weight_decay=0.0)
optim_wrapper = dict(type='OptimWrapper', optimizer=optimizer)
train_dataloader = dict(
    # num_gpus: 8 -> batch_size: 16
    batch_size=2)
val_dataloader = dict(batch_size=1)
