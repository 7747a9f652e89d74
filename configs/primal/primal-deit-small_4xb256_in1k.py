# Primal.+DeiT-Small (docs/mechanisms.md §6): DeiT-S whose last block uses Primal-Attention
# (s=96, rank_multi=10); loss = task loss + 0.05 * KSVD loss.
# DeiT recipe of mmpretrain's `deit-small_4xb256_in1k.py` (AdamW, 300 epochs, RandAugment,
# Mixup/CutMix, label smoothing 0.1), with the backbone replaced.
_base_ = ['mmpretrain::deit/deit-small_4xb256_in1k.py']
custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)

model = dict(
    type='KSVDImageClassifier',
    ksvd_weight=0.05,  # η (docs/mechanisms.md §6.4)
    backbone=dict(_delete_=True, type='WhiteBoxViT', arch='primal-deit-small', img_size=224,
                  patch_size=16, out_type='cls_token'),
    head=dict(in_channels=384),
)
