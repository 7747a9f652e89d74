# CBT decode head (the CBSA segmentation decoder) on mmseg's Segmenter ViT-Base encoder,
# Cityscapes (19 classes, 768x768 crops, slide inference 768 / stride 512). Model:
# mmseg's Segmenter ViT-B/16 (ImageNet-21k weights) with the CBT decoder
# (docs/mechanisms.md §4): L = 3 CBSA layers, H = 3 heads of width p = 100, m = 10x10
# representatives, as in cbt-head_vit-b_mask_8xb1-160k_ade20k-512x512.py. The encoder's
# img_size (position-embedding grid) follows the crop. mmseg's cityscapes_768x768 data,
# 80k-iteration poly schedule, batch 8 = 8 GPUs x 1 (as mmseg's ViT Cityscapes configs,
# setr_vit-l_*_8xb1-80k_cityscapes-768x768, and the Segmenter recipe the papers train
# with: batch 8, 216 epochs ~ 80k iterations), SGD lr 0.01 (the Segmenter recipe's
# Cityscapes rate, also mmseg's schedule default).
_base_ = [
    '../_base_/models/segmenter_vit-b16_cbt-head.py',
    'mmseg::_base_/datasets/cityscapes_768x768.py', 'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py'
]
crop_size = (768, 768)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(img_size=crop_size),
    decode_head=dict(num_classes=19),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(512, 512)))

optimizer = dict(lr=0.01, weight_decay=0.0)
optim_wrapper = dict(type='OptimWrapper', optimizer=optimizer)
train_dataloader = dict(
    # num_gpus: 8 -> batch_size: 8
    batch_size=1)
val_dataloader = dict(batch_size=1)
