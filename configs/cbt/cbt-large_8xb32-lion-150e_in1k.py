# CBT-Large
# ImageNet-1K, CBT recipe (docs/mechanisms.md §1): conv stem + [CBSA, ISTA] blocks,
# Lion lr 2e-4 / wd 0.05, batch 256 (8 GPUs x 32), 150 epochs (20 warm-up),
# label smoothing 0.1, random-resized-crop + flip only.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs32.py',
    '../_base_/schedules/imagenet_bs256_lion_150e.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)

model = dict(
    type='ImageClassifier',
    backbone=dict(type='WhiteBoxViT', arch='cbt-large', img_size=224, patch_size=16,
                  out_type='cls_token'),
    neck=None,
    # head = Linear on the CLS token after the backbone's final LayerNorm
    head=dict(type='LinearClsHead', num_classes=1000, in_channels=1024,
              loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
              topk=(1, 5)),
)
