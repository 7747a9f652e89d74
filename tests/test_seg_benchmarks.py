"""Cityscapes and Pascal Context configs (docs/mechanisms.md §10) and the mini Cityscapes.

- every ``*_cityscapes-768x768`` / ``*_pascal-context-59-480x480`` config is its ADE20K
  counterpart (same encoder, pretrained weights and decode head) with mmseg's dataset
  base, 80k schedule, the dataset's classes, crop, slide window and batch;
- the mini Cityscapes config trains a few iterations through tools/train.py (mmengine
  Runner, mmseg's CityscapesDataset, pipeline, slide inference and IoUMetric).
"""
import functools
import re
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from seg_helpers import train_on_mini_data

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs'
ADE20K = '8xb1-160k_ade20k-512x512'
DATASETS = {
    # name suffix -> (dataset class, classes, crop, slide stride, batch per GPU, lr)
    '8xb1-80k_cityscapes-768x768': ('CityscapesDataset', 19, 768, 512, 1, 0.01),
    '8xb2-80k_pascal-context-59-480x480': ('PascalContextDataset59', 59, 480, 320, 2, 1e-3),
}
HEADS = ('depict/depict-sa', 'depict/depict-ca', 'cbt/cbt-head')


@functools.lru_cache(maxsize=None)
def _load(rel: str) -> Config:
    return Config.fromfile(str(CONFIGS / rel))


def _benchmark_configs():
    return [pytest.param(f'{head}_vit-{enc}_mask_{suffix}.py', suffix,
                         id=f'{head}_vit-{enc}_{suffix.split("_")[1]}')
            for head in HEADS for enc in ('s', 'b') for suffix in DATASETS]


def _without(d: dict, *keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


@pytest.mark.parametrize('rel, suffix', _benchmark_configs())
def test_benchmark_config_is_the_ade20k_config_on_new_data(rel, suffix):
    dataset, classes, crop, stride, batch, lr = DATASETS[suffix]
    assert (CONFIGS / rel).is_file(), rel
    cfg, ade = _load(rel), _load(rel.replace(suffix, ADE20K))
    model, ade_model = cfg.model, ade.model
    # encoder and pretrained weights as in the ADE20K config; the grid follows the crop
    assert model.pretrained == ade_model.pretrained
    assert _without(model.backbone, 'img_size') == _without(ade_model.backbone, 'img_size')
    assert tuple(model.backbone.img_size) == (crop, crop)
    assert _without(model.data_preprocessor, 'size') == \
        _without(ade_model.data_preprocessor, 'size')
    assert tuple(model.data_preprocessor.size) == (crop, crop)
    # the same decode head, with the dataset's classes
    assert _without(model.decode_head, 'num_classes') == \
        _without(ade_model.decode_head, 'num_classes')
    assert model.decode_head.num_classes == classes
    assert model.test_cfg == dict(mode='slide', crop_size=(crop, crop), stride=(stride, stride))
    # mmseg's dataset base and 80k schedule, the dataset's batch and the Segmenter lr
    assert cfg.train_dataloader.dataset.type == dataset == cfg.val_dataloader.dataset.type
    crops = [t.crop_size for t in cfg.train_dataloader.dataset.pipeline
             if t.type == 'RandomCrop']
    assert crops == [(crop, crop)]
    assert cfg.train_dataloader.batch_size == batch and cfg.val_dataloader.batch_size == 1
    assert cfg.train_cfg.max_iters == 80000 and cfg.param_scheduler[0].end == 80000
    assert cfg.optimizer.type == 'SGD' and cfg.optimizer.lr == lr
    assert cfg.optimizer.weight_decay == 0.0
    assert cfg.val_evaluator.type == 'IoUMetric' and cfg.default_scope == 'mmseg'


def test_mini_cityscapes_trains_with_train_tool(tmp_path):
    """A few iterations of the mini Cityscapes DEPICT-CA config through tools/train.py on
    a freshly generated 128x256 mini Cityscapes, then a slide-window validation."""
    iters = 3
    config = CONFIGS / 'depict/depict-ca_vit-tiny-p8_1xb8-300it_mini-cityscapes-96x96.py'
    records, log, work = train_on_mini_data(config, 'cityscapes', tmp_path, iters)
    miou = [r['mIoU'] for r in records if 'mIoU' in r]
    assert len(miou) == 1 and 0.0 <= miou[0] <= 100.0
    assert re.search(rf'Iter\(train\) \[{iters}/{iters}\]', log)
    assert re.search(r'Iter\(val\) \[2/2\]', log)  # both validation images
    ckpt = torch.load(work / f'iter_{iters}.pth', map_location='cpu', weights_only=True)
    sd = ckpt['state_dict']
    assert sd['decode_head.cls_emb'].shape == (1, 19, 96)  # the 19 Cityscapes classes
    assert 'decode_head.cross_layers.0.attn.in_proj.weight' in sd  # DEPICT-CA
    assert ckpt['meta']['dataset_meta']['classes'][0] == 'road'
