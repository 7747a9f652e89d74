# MiTA-DeiT-Small + DWC (docs/mechanisms.md §5): MiTA plus a 3x3 depth-wise conv of the values.
# DeiT recipe of mmpretrain's `deit-small_4xb256_in1k.py` (AdamW, 300 epochs, RandAugment,
# Mixup/CutMix, label smoothing 0.1), with the backbone replaced.
_base_ = ['mmpretrain::deit/deit-small_4xb256_in1k.py']
custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)

model = dict(
    backbone=dict(_delete_=True, type='WhiteBoxViT',
                  arch=dict(base='mita-deit-small', attn_cfg=dict(dwc=True)),
                  img_size=224, patch_size=16, out_type='cls_token'),
    head=dict(in_channels=384),
)
