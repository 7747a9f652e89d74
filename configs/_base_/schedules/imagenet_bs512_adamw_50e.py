# CBSA ViT-adaptation fine-tuning recipe (docs/mechanisms.md §8; the CBSA repository's
# CBSA_finetune_vit/main.py): AdamW (betas 0.9 / 0.999), lr 5e-5, weight decay 0.01 on
# every parameter, total batch 512 (8 GPUs x 64), 50 epochs.
# Learning rate: the reference multiplies the lr per epoch e by
# min((e + 1) / 10, (1 + cos(pi * e / 50)) / 2); here (per iteration) a linear warm-up
# over 10 epochs from 0.1x, then a cosine decay to 0 over the remaining 40.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=5e-5, betas=(0.9, 0.999), weight_decay=0.01))

param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=10,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=0., by_epoch=True, begin=10, end=50,
         convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=50, val_interval=1)
val_cfg = dict()
test_cfg = dict()

# The recipe's learning rate is for a total batch of 512 (e.g. 8 GPUs x 64);
# `--auto-scale-lr`-style scaling uses this base.
auto_scale_lr = dict(base_batch_size=512)
