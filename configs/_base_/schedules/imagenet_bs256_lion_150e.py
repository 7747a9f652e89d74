# CBT ImageNet-1K recipe (docs/mechanisms.md §1): Lion, lr 2e-4, weight decay 0.05,
# total batch 256, 150 epochs with 20 linear warm-up epochs followed by a cosine decay.
# `Lion` is registered into mmengine's OPTIMIZERS by `import mmcbsa` (lion-pytorch).
# Weight decay applies to every parameter (no paramwise exclusions).
optim_wrapper = dict(optimizer=dict(type='Lion', lr=2e-4, weight_decay=0.05,
                                    betas=(0.9, 0.99)))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=20,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=20, end=150,
         convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=150, val_interval=1)
val_cfg = dict()
test_cfg = dict()

# The recipe's learning rate is for a total batch of 256 (e.g. 8 GPUs x 32);
# `--auto-scale-lr`-style scaling uses this base.
auto_scale_lr = dict(base_batch_size=256)
