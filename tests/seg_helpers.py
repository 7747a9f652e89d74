"""Scaffolding shared by the segmentation tests (test_cbt_head.py, test_depict_head.py,
test_mixing.py, test_seg_benchmarks.py): hand-written LayerNorm reference, tiny mmseg
segmentors, data samples, the loss / predict / gradient checks every decode head goes
through, and a short tools/train.py run on generated mini data.

Not a test module (no ``test_`` prefix); importable as ``from seg_helpers import ...``
because tests/conftest.py puts tests/ on ``sys.path``. The asserts here carry their own
messages: pytest does not rewrite asserts of helper modules.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.config import ConfigDict
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

REPO = Path(__file__).resolve().parents[1]


def layer_norm_ref(t: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm over the last axis written out: ``(t - mean) / sqrt(var + eps)``,
    biased variance, then ``norm``'s affine weight and bias. ``t (..., C)``."""
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def randomise_layer_norms(module: nn.Module) -> None:
    """Move every LayerNorm off its identity init (weight in [0.5, 1.5], bias in
    [-0.2, 0.2]) so a reference that drops the affine part cannot match."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def assert_all_grads(module: nn.Module) -> None:
    """Every parameter of ``module`` got a finite, not all-zero gradient."""
    for name, p in module.named_parameters():
        assert p.grad is not None, f'{name} got no gradient (unused parameter)'
        assert torch.isfinite(p.grad).all(), f'{name} has a non-finite gradient'
        assert p.grad.abs().sum() > 0, f'{name} has an all-zero gradient'


def seg_samples(batch: int, h: int, w: int, num_classes: int) -> List[SegDataSample]:
    """``batch`` SegDataSamples of an unpadded ``h×w`` image with random labels in
    ``[0, num_classes)`` (``gt_sem_seg`` of shape ``(1, h, w)``)."""
    samples = []
    for _ in range(batch):
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, h, w)))
        samples.append(s)
    return samples


def tiny_vit_segmentor(decode_head: dict, test_cfg: Optional[dict] = None) -> nn.Module:
    """mmseg EncoderDecoder over a 2-layer mmseg ViT (width 24, 2 heads, patch 8, built
    for 32×32, CLS token, bicubic position-embedding resize) feeding ``decode_head``
    the last layer's ``(B, 24, h/8, w/8)`` map; no data preprocessor."""
    cfg = dict(
        type='EncoderDecoder',
        backbone=dict(type='VisionTransformer', img_size=(32, 32), patch_size=8, embed_dims=24,
                      num_layers=2, num_heads=2, mlp_ratio=2, out_indices=(1, ),
                      final_norm=True, with_cls_token=True, interpolate_mode='bicubic'),
        decode_head=decode_head,
        test_cfg=ConfigDict(test_cfg or dict(mode='whole')))
    return MODELS.build(cfg)


def check_segmentor_loss_and_grads(model: nn.Module, hw: Tuple[int, int],
                                   num_classes: int) -> None:
    """Train-mode ``loss`` on a batch of 2 ``hw`` images: finite ``decode.loss_ce``,
    every decode-head parameter gets a useful gradient, backbone gradients finite."""
    h, w = hw
    model.train()
    losses = model.loss(torch.randn(2, 3, h, w), seg_samples(2, h, w, num_classes))
    assert torch.isfinite(losses['decode.loss_ce']), f"loss {losses['decode.loss_ce']}"
    losses['decode.loss_ce'].backward()
    assert_all_grads(model.decode_head)
    for name, p in model.backbone.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def check_segmentor_predict(model: nn.Module, hw: Tuple[int, int], num_classes: int) -> None:
    """Eval-mode ``predict`` of one ``hw`` image (with the model's own ``test_cfg``) returns finite
    ``(num_classes, h, w)`` logits and an ``(1, h, w)`` prediction at full size."""
    h, w = hw
    model.eval()
    with torch.no_grad():
        results = model.predict(torch.randn(1, 3, h, w), seg_samples(1, h, w, num_classes))
    logits, pred = results[0].seg_logits.data, results[0].pred_sem_seg.data
    assert logits.shape == (num_classes, h, w), f'seg_logits {tuple(logits.shape)}'
    assert pred.shape == (1, h, w), f'pred_sem_seg {tuple(pred.shape)}'
    assert torch.isfinite(logits).all(), 'non-finite seg_logits'


def check_resize_concat_head(build_head: Callable[..., nn.Module]) -> None:
    """``build_head(**overrides)`` over three levels (4, 8, 16 channels at 9×9, 6×10,
    3×5), selecting levels 1 and 2 with ``resize_concat``: the masks come at the first
    selected level's grid, the input projection reads 8 + 16 channels, and every
    parameter gets a gradient."""
    head = build_head(in_channels=[8, 16], in_index=[1, 2], input_transform='resize_concat',
                      channels=20)
    feats = [torch.randn(2, 4, 9, 9), torch.randn(2, 8, 6, 10), torch.randn(2, 16, 3, 5)]
    out = head(feats)
    assert out.shape == (2, head.num_classes, 6, 10), f'masks {tuple(out.shape)}'
    assert head.input_proj.in_features == 24, head.input_proj
    out.square().mean().backward()
    assert_all_grads(head)


def check_head_matches_fixture(head: nn.Module, fx: dict, tol: float) -> None:
    """Run a converted decode head on an official fixture and compare its masks.

    ``fx['input']`` holds ``(B, h*w, d)`` row-major patch tokens of an image of
    ``fx['config']['im_size']`` cut into ``patch_size`` patches; they go to ``head`` as one
    ``(B, d, h, w)`` map, and the ``(B, n_cls, h, w)`` masks must match ``fx['output']``
    within ``tol`` (max abs).
    """
    cfg = fx['config']
    h, w = (s // cfg['patch_size'] for s in cfg['im_size'])
    tokens = fx['input']
    b, n, d = tokens.shape
    assert n == h * w and d == cfg['d_model'], f'tokens {tuple(tokens.shape)}, grid {h}x{w}'
    feat = tokens.transpose(1, 2).reshape(b, d, h, w)
    with torch.no_grad():
        masks = head([feat])
    expected = (b, cfg['n_cls'], h, w)
    assert masks.shape == fx['output'].shape == expected, \
        f'masks {tuple(masks.shape)}, fixture {tuple(fx["output"].shape)}, want {expected}'
    err = (masks - fx['output']).abs().max().item()
    assert err <= tol, f'max abs err {err:.3g} > {tol}'


def train_on_mini_data(config: Path, dataset: str, tmp_path: Path, iters: int,
                       size: Optional[Sequence[int]] = None) -> Tuple[List[dict], str, Path]:
    """Generate a 4 + 2 image mini ``dataset`` (tools/misc/make_mini_dataset.py), train
    ``config`` on it for ``iters`` iterations (batch 2, validation at the end) through
    tools/train.py in a subprocess, and check that it exited cleanly and logged one
    finite loss per iteration.

    Returns:
        The records of the visualizer's ``scalars.json``, the text of the Runner's log and
        the work directory (checkpoint ``iter_{iters}.pth``).
    """
    data, work = tmp_path / f'mini_{dataset}', tmp_path / 'work'
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
               PYTHONWARNINGS='ignore::UserWarning,ignore::DeprecationWarning')
    make = [sys.executable, str(REPO / 'tools/misc/make_mini_dataset.py'), '--dataset',
            dataset, '--out', str(data), '--num-train', '4', '--num-val', '2']
    if size is not None:
        make += ['--size', *map(str, size)]
    subprocess.run(make, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    options = [f'{split}_dataloader.{key}' for split in ('train', 'val', 'test')
               for key in (f'dataset.data_root={data}', 'num_workers=0',
                           'persistent_workers=False')]
    options += ['train_dataloader.batch_size=2', f'train_cfg.max_iters={iters}',
                f'train_cfg.val_interval={iters}', 'default_hooks.logger.interval=1']
    proc = subprocess.run([sys.executable, str(REPO / 'tools/train.py'), str(config),
                           '--work-dir', str(work), '--cfg-options', *options],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scalars = sorted(work.glob('*/vis_data/scalars.json'))
    assert scalars, 'no scalars.json written by the visualizer backend'
    records = [json.loads(line) for line in scalars[-1].read_text().splitlines()]
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == iters and all(math.isfinite(v) for v in losses), losses
    log = ''.join(p.read_text() for p in work.glob('*/*.log'))
    return records, log, work
