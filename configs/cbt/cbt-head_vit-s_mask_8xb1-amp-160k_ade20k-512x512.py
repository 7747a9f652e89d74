# CBT decode head on Segmenter ViT-S, ADE20K, with automatic mixed precision: the only
# change to cbt-head_vit-s_mask_8xb1-160k_ade20k-512x512.py is mmengine's AmpOptimWrapper
# (float16 autocast, dynamic loss scaling; docs/compile_and_amp.md), as in mmseg's
# `-amp-` configs. On a machine without CUDA, tools/train.py trains it in bfloat16
# (BF16AmpOptimWrapper).
_base_ = ['./cbt-head_vit-s_mask_8xb1-160k_ade20k-512x512.py']

optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
