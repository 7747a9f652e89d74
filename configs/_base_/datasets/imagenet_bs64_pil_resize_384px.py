# mmpretrain's ImageNet pipeline with random-resized-crop + flip only
# (imagenet_bs64_pil_resize.py), at 384 px: the CBSA ViT-adaptation reference trains on
# RandomResizedCrop(384) + flip and evaluates on a 438-px short-edge resize + 384 centre crop.
_base_ = 'mmpretrain::_base_/datasets/imagenet_bs64_pil_resize.py'

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=384, backend='pillow'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]

test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=438, edge='short', backend='pillow'),
    dict(type='CenterCrop', crop_size=384),
    dict(type='PackInputs'),
]

train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
