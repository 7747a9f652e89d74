# mmseg's Segmenter ViT-B/16 model (`segmenter_vit-b16_mask.py`: ImageNet-21k encoder,
# pretrained weights, data preprocessor) with the DEPICT-SA decode head in place of the
# mask transformer: the paper's decoder, L = 3 MSSA layers, H = 3 heads of width p = 100
# (docs/mechanisms.md §3). The same head as the configs/depict ADE20K configs. Dataset
# configs inherit it next to mmseg's dataset, runtime and schedule bases and set
# num_classes, the crop (encoder img_size, data_preprocessor size, slide test_cfg) and
# the optimizer.
_base_ = ['mmseg::_base_/models/segmenter_vit-b16_mask.py']
custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)

model = dict(
    decode_head=dict(
        _delete_=True,
        type='DEPICTHead',
        mode='sa',
        in_channels=768,
        channels=768,
        num_classes=150,
        num_layers=3,
        num_heads=3,
        head_dims=100,
        dropout_ratio=0.0,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)))
