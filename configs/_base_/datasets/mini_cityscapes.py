# Mini Cityscapes: synthetic 128x256 images in Cityscapes' leftImg8bit / gtFine layout
# (train ids 0..18, 255 = ignore), written by
#   python tools/misc/make_mini_dataset.py --dataset cityscapes --out data/mini_cityscapes
# mmseg's cityscapes_768x768 data config at 1/8 scale: same dataset class, label files,
# metric and test-time augmentation; images resized around 256x128 (mmseg: 2048x1024)
# with ratio 0.5-2.0 and cut into 96x96 crops (mmseg: 768x768). No
# PhotoMetricDistortion (colour is one of the cues the synthetic classes are drawn with).
_base_ = ['mmseg::_base_/datasets/cityscapes_768x768.py']

data_root = 'data/mini_cityscapes'
crop_size = (96, 96)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(256, 128), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 128), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
