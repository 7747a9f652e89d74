# CBT-Small, ImageNet-1K CBT recipe with automatic mixed precision: the only change to
# cbt-small_8xb32-lion-150e_in1k.py is mmengine's AmpOptimWrapper (float16 autocast,
# dynamic loss scaling; fp16 gradients underflow without it, docs/compile_and_amp.md).
# On a machine without CUDA, tools/train.py trains it in bfloat16 (BF16AmpOptimWrapper).
_base_ = ['./cbt-small_8xb32-lion-150e_in1k.py']

optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
