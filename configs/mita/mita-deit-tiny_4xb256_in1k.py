# MiTA-DeiT-Tiny (docs/mechanisms.md §5): DeiT-T with Mixture-of-Top-k Attention
# (5x5 landmarks, k=25).
# DeiT recipe of mmpretrain's `deit-tiny_4xb256_in1k.py` (AdamW, 300 epochs, RandAugment,
# Mixup/CutMix, label smoothing 0.1), with the backbone replaced.
_base_ = ['mmpretrain::deit/deit-tiny_4xb256_in1k.py']
custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)

model = dict(
    backbone=dict(_delete_=True, type='WhiteBoxViT', arch='mita-deit-tiny', img_size=224,
                  patch_size=16, out_type='cls_token'),
    head=dict(in_channels=192),
)
