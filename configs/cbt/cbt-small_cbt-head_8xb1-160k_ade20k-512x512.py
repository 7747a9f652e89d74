# The fully linear segmenter: CBT-S (conv stem, CBSA + ISTA blocks, docs/mechanisms.md §1)
# as the encoder under the CBT decode head (docs/mechanisms.md §4), ADE20K 512x512: the
# CBT-head config on mmseg's Segmenter ViT-S recipe (data pipeline, SGD lr 1e-3 poly on the
# 160k schedule, batch 8 = 8 GPUs x 1, slide inference 512 / stride 512) with only the
# encoder changed. Neither part is quadratic in the number of tokens; this is the model
# that tools/analysis_tools/train_throughput.py times against Segmenter ViT-S
# (docs/benchmark_attention.md, "CUDA").
# No ImageNet CBT-S weights are loaded (pretrained=None); to start from a CBT-S trained
# with configs/cbt/cbt-small_8xb32-lion-150e_in1k.py, set
#   model.backbone.init_cfg=dict(type='Pretrained', checkpoint=CKPT, prefix='backbone.')
# (the position embedding is resized to the 32x32 grid on load).
_base_ = ['./cbt-head_vit-s_mask_8xb1-160k_ade20k-512x512.py']

model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='WhiteBoxViT',
        arch='cbt-small',
        img_size=(512, 512),
        patch_size=16,
        out_indices=-1,
        out_type='featmap',
        with_cls_token=True,
        final_norm=True,
        drop_path_rate=0.1))
