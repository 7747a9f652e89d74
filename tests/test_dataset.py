"""tools/misc/make_mini_dataset.py: layouts (ADE20K, Cityscapes, ImageNet), label values,
determinism, and that the real mmseg / mmpretrain dataset classes read the output
unchanged."""
import hashlib
import importlib.util
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        'make_mini_dataset', REPO / 'tools' / 'misc' / 'make_mini_dataset.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _digest(root: Path) -> str:
    h = hashlib.sha1()
    for path in sorted(p for p in root.rglob('*') if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope='module')
def mini_ade(tmp_path_factory):
    root = tmp_path_factory.mktemp('ade') / 'mini_ade20k'
    gen.main(['--dataset', 'ade20k', '--out', str(root), '--num-train', '5', '--num-val', '3',
              '--size', '40', '56', '--seed', '3'])
    return root


def test_ade20k_layout_and_labels(mini_ade):
    expected = {
        'images/training': [f'ADE_train_{i:08d}.jpg' for i in range(1, 6)],
        'images/validation': [f'ADE_val_{i:08d}.jpg' for i in range(1, 4)],
        'annotations/training': [f'ADE_train_{i:08d}.png' for i in range(1, 6)],
        'annotations/validation': [f'ADE_val_{i:08d}.png' for i in range(1, 4)],
    }
    for sub, names in expected.items():
        assert sorted(p.name for p in (mini_ade / sub).iterdir()) == names
    allowed = {0} | set(gen.ADE_CLASSES)
    seen = set()
    for ann in (mini_ade / 'annotations').rglob('*.png'):
        label = cv2.imread(str(ann), cv2.IMREAD_UNCHANGED)
        assert label.dtype == np.uint8 and label.shape == (40, 56)  # one channel, H x W
        values = set(np.unique(label).tolist())
        assert values <= allowed
        seen |= values
        img = cv2.imread(str(ann).replace('annotations', 'images').replace('.png', '.jpg'),
                         cv2.IMREAD_UNCHANGED)
        assert img.shape == (40, 56, 3)
    assert len(seen - {0}) >= 4  # several classes over 8 images


def test_ade20k_classes_are_distinguishable_by_appearance(tmp_path):
    """Pixels of a class, averaged over instances, sit near that class's base colour and
    their texture variation matches the class's texture (learnable structure)."""
    rng = np.random.default_rng(0)
    pixels = {c: [] for c in gen.ADE_CLASSES}
    for _ in range(12):
        img, label = gen.draw_ade_sample(64, 64, rng)
        for c in pixels:
            pixels[c].append(img[label == c].astype(np.float64))
    for c, chunks in pixels.items():
        values = np.concatenate(chunks)
        assert len(values) > 50, f'class {c} never drawn'
        colour = np.asarray(gen.ADE_CLASSES[c].colour, np.float64)
        assert np.abs(values.mean(0) - colour).max() < 25, c
    # a plain class (sky) varies much less than a striped one (floor)
    sky = np.concatenate(pixels[3]).std(0).mean()
    floor = np.concatenate(pixels[4]).std(0).mean()
    assert sky * 3 < floor


def test_ade20k_deterministic(tmp_path):
    args = ['--dataset', 'ade20k', '--num-train', '3', '--num-val', '2', '--size', '32', '32']
    gen.main(args + ['--out', str(tmp_path / 'a'), '--seed', '7'])
    gen.main(args + ['--out', str(tmp_path / 'b'), '--seed', '7'])
    gen.main(args + ['--out', str(tmp_path / 'c'), '--seed', '8'])
    assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b')
    assert _digest(tmp_path / 'a') != _digest(tmp_path / 'c')


def test_mmseg_ade20k_dataset_reads_it(mini_ade):
    from mmengine.registry import init_default_scope
    from mmseg.datasets import ADE20KDataset
    init_default_scope('mmseg')
    ds = ADE20KDataset(
        data_root=str(mini_ade),
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', reduce_zero_label=True),
            dict(type='PackSegInputs')
        ])
    assert len(ds) == 3 and len(ds.metainfo['classes']) == 150
    sample = ds[0]
    assert tuple(sample['inputs'].shape) == (3, 40, 56)
    gt = sample['data_samples'].gt_sem_seg.data
    raw = cv2.imread(str(mini_ade / 'annotations/validation/ADE_val_00000001.png'),
                     cv2.IMREAD_UNCHANGED)
    # reduce_zero_label: ADE id c -> c - 1, 'other' (0) -> 255 (ignored)
    expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    np.testing.assert_array_equal(gt[0].numpy(), expected)


@pytest.fixture(scope='module')
def mini_cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('cs') / 'mini_cityscapes'
    gen.main(['--dataset', 'cityscapes', '--out', str(root), '--num-train', '5',
              '--num-val', '3', '--size', '40', '72', '--seed', '3'])
    return root


def test_cityscapes_layout_and_labels(mini_cityscapes):
    """leftImg8bit / gtFine per split and city, Cityscapes file names, train ids and 255."""
    root = mini_cityscapes
    expected = {
        'train': ['aachen_000000_000019', 'aachen_000001_000019', 'aachen_000002_000019',
                  'bremen_000000_000019', 'bremen_000001_000019'],
        'val': ['frankfurt_000000_000019', 'frankfurt_000001_000019', 'lindau_000000_000019'],
    }
    seen = set()
    for split, stems in expected.items():
        images = sorted(p.relative_to(root / 'leftImg8bit' / split).as_posix()
                        for p in (root / 'leftImg8bit' / split).rglob('*.png'))
        assert images == [f'{s.split("_")[0]}/{s}_leftImg8bit.png' for s in stems]
        labels = sorted((root / 'gtFine' / split).rglob('*.png'))
        assert [p.name for p in labels] == [f'{s}_gtFine_labelTrainIds.png' for s in stems]
        for ann in labels:
            label = cv2.imread(str(ann), cv2.IMREAD_UNCHANGED)
            assert label.dtype == np.uint8 and label.shape == (40, 72)
            seen |= set(np.unique(label).tolist())
            img = cv2.imread(str(ann).replace('gtFine', 'leftImg8bit').replace(
                '_leftImg8bit_labelTrainIds', '_leftImg8bit'), cv2.IMREAD_UNCHANGED)
            assert img.shape == (40, 72, 3)
    assert seen <= set(gen.CITYSCAPES_CLASSES) | {255}
    assert len(seen - {255}) >= 4 and 255 in seen  # several classes and an ignored region
    assert set(gen.CITYSCAPES_CLASSES) <= set(range(19))


def test_cityscapes_deterministic(tmp_path):
    args = ['--dataset', 'cityscapes', '--num-train', '2', '--num-val', '1', '--size', '24', '48']
    gen.main(args + ['--out', str(tmp_path / 'a'), '--seed', '7'])
    gen.main(args + ['--out', str(tmp_path / 'b'), '--seed', '7'])
    gen.main(args + ['--out', str(tmp_path / 'c'), '--seed', '8'])
    assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b')
    assert _digest(tmp_path / 'a') != _digest(tmp_path / 'c')


def test_mmseg_cityscapes_dataset_reads_it(mini_cityscapes):
    """mmseg's CityscapesDataset with the mini config's data settings: counts, the 19
    Cityscapes classes, labels passed through unchanged (train ids, 255 ignored)."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS
    init_default_scope('mmseg')
    cfg = Config.fromfile(str(REPO / 'configs/_base_/datasets/mini_cityscapes.py'))
    sizes = {}
    for split in ('train', 'val'):
        ds_cfg = cfg[f'{split}_dataloader'].dataset
        ds_cfg.data_root = str(mini_cityscapes)
        ds_cfg.pipeline = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations'),
                           dict(type='PackSegInputs')]
        ds = DATASETS.build(ds_cfg)
        assert type(ds).__name__ == 'CityscapesDataset'
        assert len(ds.metainfo['classes']) == 19 and ds.metainfo['classes'][13] == 'car'
        sizes[split] = len(ds)
    assert sizes == {'train': 5, 'val': 3}
    sample = ds[2]  # val, sorted by path: lindau_000000_000019
    assert sample['data_samples'].img_path.endswith('lindau_000000_000019_leftImg8bit.png')
    assert tuple(sample['inputs'].shape) == (3, 40, 72)
    raw = cv2.imread(str(mini_cityscapes / 'gtFine/val/lindau/'
                         'lindau_000000_000019_gtFine_labelTrainIds.png'), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(sample['data_samples'].gt_sem_seg.data[0].numpy(), raw)


def test_imagenet_layout_and_mmpretrain_reads_it(tmp_path):
    root = tmp_path / 'mini_imagenet'
    gen.main(['--dataset', 'imagenet', '--out', str(root), '--num-classes', '3',
              '--num-train', '4', '--num-val', '2', '--size', '24', '40'])
    wnids = gen.IMAGENET_WNIDS[:3]
    assert sorted(p.name for p in (root / 'train').iterdir()) == wnids
    assert sorted(p.name for p in (root / 'val').iterdir()) == wnids
    assert len(list((root / 'train' / wnids[1]).glob('*.JPEG'))) == 4
    lines = (root / 'meta' / 'val.txt').read_text().split('\n')
    assert lines[0] == f'{wnids[0]}/ILSVRC2012_val_00000001.JPEG 0'

    from mmengine.registry import init_default_scope
    from mmpretrain.datasets import CustomDataset, ImageNet
    init_default_scope('mmpretrain')
    pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
    train = ImageNet(data_root=str(root), split='train', pipeline=pipeline)
    val = ImageNet(data_root=str(root), split='val', pipeline=pipeline)
    assert len(train) == 12 and len(val) == 6
    # labels are the real ImageNet-1k indices of the wnids (0 = tench, 1 = goldfish, ...)
    assert [train.get_data_info(i)['gt_label'] for i in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    assert train.metainfo['classes'][1].startswith('goldfish')
    sample = val[5]
    assert tuple(sample['inputs'].shape) == (3, 24, 40)
    assert int(sample['data_samples'].gt_label) == 2
    # the plain folder layout works with CustomDataset (classes = folder names)
    folders = CustomDataset(data_root=str(root), data_prefix='train', pipeline=pipeline)
    assert folders.metainfo['classes'] == tuple(wnids) and len(folders) == 12


def test_imagenet_classes_differ_and_are_deterministic():
    a = gen.draw_imagenet_sample(0, 32, 32, np.random.default_rng([1, 2]))
    b = gen.draw_imagenet_sample(0, 32, 32, np.random.default_rng([1, 2]))
    np.testing.assert_array_equal(a, b)
    looks = {gen.imagenet_appearance(k) for k in range(len(gen.IMAGENET_WNIDS))}
    assert len(looks) == len(gen.IMAGENET_WNIDS)  # every class has its own look


def test_bad_arguments_name_the_parameter(tmp_path):
    with pytest.raises(ValueError, match='num_classes'):
        gen.make_imagenet(str(tmp_path), 21, 1, 1, (16, 16), 0)
    with pytest.raises(ValueError, match='size'):
        gen.main(['--out', str(tmp_path / 'x'), '--size', '4', '16'])
    with pytest.raises(ValueError, match='num_train'):
        gen.main(['--dataset', 'cityscapes', '--out', str(tmp_path / 'y'), '--num-train', '-1'])


def test_cli_reports_a_mistake_in_one_line(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(REPO / 'tools/misc/make_mini_dataset.py'),
                           '--dataset', 'cityscapes', '--out', str(tmp_path / 'z'),
                           '--size', '4', '64'], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == 'make_mini_dataset.py: error: size (4 x 64) must be at ' \
        'least 8 x 8'
    assert not (tmp_path / 'z').exists()
