"""mmcbsa's models by name in mmpretrain's and mmseg's APIs (mmcbsa/model_index.py),
the metafiles themselves, and the README model zoo generated from them.

Nothing is downloaded: weights are checkpoints written by the tests.
"""
import importlib.util
import re
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml
from mmengine.config import Config

import mmcbsa  # noqa: F401  (registers the model index)
from mmcbsa.analysis import build_model_from_config, input_shape_from_config, model_complexity
from mmcbsa.model_index import (CLS_TASK, SEG_TASK, get_metainfo, index_root, list_models,
                                load_models, model_tasks, register_model_index)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs'
CBT_CLASSIFIERS = [f'cbt-{s}_8xb32-lion-150e_in1k' for s in ('tiny', 'small', 'base', 'large')]
SEG_DEPICT = 'depict-sa_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128'
SEG_CBT = 'mita-nano_cbt-head_1xb8-mini-ade20k-128x128'


def _metafiles():
    index = yaml.safe_load((REPO / 'model-index.yml').read_text())
    return [REPO / p for p in index['Import']]


def _metafile_models():
    for path in _metafiles():
        for model in yaml.safe_load(path.read_text())['Models']:
            yield path, model


def _image(path: Path, h: int = 60, w: int = 80) -> str:
    rng = np.random.default_rng(0)
    cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return str(path)


# --------------------------------------------------------------------------------------
# the metafiles
# --------------------------------------------------------------------------------------
def test_index_root_is_the_repository_in_a_checkout():
    assert Path(index_root()) == REPO


def test_every_config_folder_has_an_imported_metafile():
    folders = sorted(p for p in CONFIGS.iterdir() if p.is_dir() and p.name != '_base_')
    imported = set(_metafiles())
    missing = [str(f.relative_to(REPO)) for f in folders if f / 'metafile.yml' not in imported]
    assert not missing, (f'config folders without a metafile.yml listed in model-index.yml: '
                         f'{missing} (copy a block from configs/cbt/metafile.yml)')


def test_every_config_is_a_metafile_model_and_every_model_config_exists():
    configs = sorted(str(p.relative_to(REPO)) for p in CONFIGS.rglob('*.py')
                     if '_base_' not in p.parts)
    listed = [m['Config'] for _, m in _metafile_models()]
    missing = sorted(set(configs) - set(listed))
    assert not missing, (f'configs missing from configs/*/metafile.yml: {missing} '
                         f'(add a Models block each; see tools/misc/gen_model_zoo.py)')
    assert len(listed) == len(set(listed)), 'a config is listed twice'
    dangling = [c for c in listed if not (REPO / c).is_file()]
    assert not dangling, f'metafile Config paths that do not exist: {dangling}'


def test_metafile_entries_follow_the_format():
    names = []
    for path, m in _metafile_models():
        where = f'{path.relative_to(REPO)}: {m.get("Name")}'
        # Name = the config's file name (mmseg / mmpretrain style), in its own folder
        assert m['Name'] == Path(m['Config']).stem, where
        assert Path(m['Config']).parent == path.parent.relative_to(REPO), where
        assert isinstance(m['Metadata']['FLOPs'], int) and m['Metadata']['FLOPs'] > 0, where
        assert isinstance(m['Metadata']['Parameters'], int) and \
            m['Metadata']['Parameters'] > 0, where
        assert [r['Task'] for r in m['Results']] in ([CLS_TASK], [SEG_TASK]), where
        assert 'Weights' not in m or m['Weights'].startswith('https://'), where
        names.append(m['Name'])
    assert len(names) == len(set(names))
    assert sorted(names) == list_models()


def test_paper_numbers_in_metafiles():
    """Results are the papers' reported numbers (docs/mechanisms.md §1, §3, §5, §6)."""
    top1 = {'cbt-tiny_8xb32-lion-150e_in1k': 63.2, 'cbt-small_8xb32-lion-150e_in1k': 71.4,
            'cbt-base_8xb32-lion-150e_in1k': 73.4, 'cbt-large_8xb32-lion-150e_in1k': 74.4,
            'crate-tiny_8xb32-lion-150e_in1k': 64.7, 'tost-small_8xb32-lion-150e_in1k': 68.5,
            'mita-dwc-deit-small_4xb256_in1k': 80.6, 'primal-deit-small_4xb256_in1k': 79.8}
    for name, value in top1.items():
        assert get_metainfo(name).results[0].metrics == {'Top 1 Accuracy': value}, name
    miou = get_metainfo('depict-sa_vit-l_mask_8xb1-160k_ade20k-640x640').results[0].metrics
    assert miou == {'mIoU': 52.9, 'mIoU(ms)': 54.3}
    assert get_metainfo('cbt-head_vit-b_mask_8xb1-160k_ade20k-512x512').results[0].metrics == \
        {'mIoU': 49.3}


@pytest.mark.parametrize('name', ['cbt-nano-p8_1xb8-lion-2e_mini-in1k-64px', SEG_DEPICT])
def test_metafile_flops_and_params_are_get_flops_counts(name):
    meta = get_metainfo(name)
    cfg = Config.fromfile(meta.config)
    torch.manual_seed(0)
    result = model_complexity(build_model_from_config(cfg), (3, *input_shape_from_config(cfg)))
    assert meta.metadata.data['FLOPs'] == result['flops']
    assert meta.metadata.data['Parameters'] == result['params']


def test_names_do_not_collide_with_mmpretrain_or_mmseg():
    from mmengine.infer.infer import BaseInferencer
    from modelindex.load_model_index import load
    import mmpretrain
    ours = {m.name.lower() for m in load_models()}
    index = load(str(Path(mmpretrain.__file__).parent / '.mim' / 'model-index.yml'))
    index.build_models_with_collections()
    pretrain = {m.name.lower() for m in index.models}
    seg_dir = BaseInferencer._get_repo_or_mim_dir('mmseg')
    seg = {m['Name'].lower() for m in BaseInferencer._get_models_from_metafile(seg_dir)}
    assert pretrain and seg
    assert not ours & pretrain and not ours & seg


# --------------------------------------------------------------------------------------
# README model zoo <-> metafiles
# --------------------------------------------------------------------------------------
def _zoo_tool():
    spec = importlib.util.spec_from_file_location(
        'gen_model_zoo', REPO / 'tools' / 'misc' / 'gen_model_zoo.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_readme_model_zoo_matches_metafiles():
    tool = _zoo_tool()
    current = (REPO / 'README.md').read_text(encoding='utf-8')
    assert tool.generate(str(REPO)) == current, (
        'README.md model zoo differs from configs/*/metafile.yml: '
        'run `python tools/misc/gen_model_zoo.py`')
    zoo = current.split(tool.START)[1].split(tool.END)[0]
    for model in load_models():  # one linked row per model
        assert f'| [{model.name}](' in zoo, model.name
    assert '| [cbt-small_8xb32-lion-150e_in1k](configs/cbt/cbt-small_8xb32-lion-150e_in1k.py)' \
        ' | CBT | ImageNet-1k | 71.4 | 6.67 |' in zoo


def test_model_zoo_check_mode_reports_a_stale_readme(tmp_path):
    tool = _zoo_tool()
    (tmp_path / 'configs').symlink_to(CONFIGS)
    (tmp_path / 'model-index.yml').write_text((REPO / 'model-index.yml').read_text())
    stale = re.sub(r'\| 71\.4 \|', '| 99.9 |', (REPO / 'README.md').read_text())
    (tmp_path / 'README.md').write_text(stale)
    with pytest.raises(SystemExit) as exc:
        tool.main(['--root', str(tmp_path), '--check'])
    assert 'run python tools/misc/gen_model_zoo.py' in str(exc.value.code)
    assert tool.main(['--root', str(tmp_path)]) == 0  # rewrites it
    assert (tmp_path / 'README.md').read_text() == (REPO / 'README.md').read_text()
    assert tool.main(['--root', str(tmp_path), '--check']) == 0


# --------------------------------------------------------------------------------------
# mmpretrain: list_models / get_model / inference_model / ImageClassificationInferencer
# --------------------------------------------------------------------------------------
def test_list_models_lists_the_cbt_classifiers_only():
    import mmpretrain
    names = mmpretrain.list_models('cbt*')
    assert set(CBT_CLASSIFIERS) <= set(names)
    assert all(CLS_TASK in model_tasks(get_metainfo(n)) for n in names)
    assert mmpretrain.list_models('cbt-head') == []  # segmentors are mmseg's
    assert set(mmpretrain.list_models('crate', task=CLS_TASK)) == \
        {f'crate-{s}_8xb32-lion-150e_in1k' for s in ('tiny', 'small', 'base', 'large')}


def test_registration_is_idempotent():
    import mmpretrain
    from mmseg.apis import MMSegInferencer
    lookup = MMSegInferencer._load_model_from_metafile
    before = mmpretrain.list_models()
    register_model_index()
    assert mmpretrain.list_models() == before
    assert MMSegInferencer._load_model_from_metafile is lookup


@pytest.mark.parametrize('name, backbone', [
    ('cbt-tiny_8xb32-lion-150e_in1k', 'WhiteBoxViT'),
    ('tost-tiny_8xb32-lion-150e_in1k', 'WhiteBoxViT'),
    ('mita-deit-tiny_4xb256_in1k', 'WhiteBoxViT'),
    ('primal-deit-small_4xb256_in1k', 'WhiteBoxViT'),
])
def test_get_model_builds_by_name(name, backbone):
    import mmpretrain
    model = mmpretrain.get_model(name, pretrained=False)
    assert type(model.backbone).__name__ == backbone
    assert model._metainfo.name == name
    assert Path(model._config.filename) == REPO / get_metainfo(name).config
    assert not model.training
    if name.startswith('primal'):
        assert type(model).__name__ == 'KSVDImageClassifier'


def test_inference_by_name_and_inferencer_with_a_checkpoint(tmp_path):
    import mmpretrain
    from mmpretrain.apis import ImageClassificationInferencer
    name = 'cbt-nano-p8_1xb8-lion-2e_mini-in1k-64px'  # CPU-sized CBT, 64-px pipeline
    image = _image(tmp_path / 'img.png')
    torch.manual_seed(0)
    model = mmpretrain.get_model(name, pretrained=False)
    ckpt = tmp_path / 'cbt_nano.pth'
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)

    by_model = mmpretrain.inference_model(model, image)
    assert 0 <= by_model['pred_label'] < 1000 and len(by_model['pred_scores']) == 1000
    assert by_model['pred_class']  # ImageNet class name from the config's dataset
    # by name with the checkpoint: the same prediction
    by_name = mmpretrain.inference_model(name, image, pretrained=str(ckpt))
    np.testing.assert_allclose(by_name['pred_scores'], by_model['pred_scores'], atol=1e-5)
    inferencer = ImageClassificationInferencer(name, pretrained=str(ckpt))
    result = inferencer(image)[0]
    assert result['pred_label'] == by_model['pred_label']
    np.testing.assert_allclose(result['pred_scores'], by_model['pred_scores'], atol=1e-5)


# --------------------------------------------------------------------------------------
# mmseg: MMSegInferencer(model=NAME, weights=CKPT)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize('name, head', [(SEG_DEPICT, 'DEPICTHead'), (SEG_CBT, 'CBTHead')])
def test_mmseg_inferencer_by_name(tmp_path, name, head):
    from mmseg.apis import MMSegInferencer
    meta = get_metainfo(name, task=SEG_TASK)
    torch.manual_seed(0)
    model = build_model_from_config(Config.fromfile(meta.config))
    classes = tuple(f'class{i}' for i in range(150))
    palette = [[i, 255 - i, (7 * i) % 256] for i in range(150)]
    ckpt = tmp_path / 'seg.pth'
    torch.save({'state_dict': model.state_dict(),
                'meta': {'dataset_meta': {'classes': classes, 'palette': palette}}}, ckpt)
    image = _image(tmp_path / 'img.png', 60, 90)

    inferencer = MMSegInferencer(model=name, weights=str(ckpt), device='cpu')
    assert type(inferencer.model.decode_head).__name__ == head
    loaded = inferencer.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert inferencer.model.dataset_meta['classes'] == classes
    pred = inferencer(image, return_datasamples=False)['predictions']
    assert pred.shape == (60, 90) and pred.min() >= 0 and pred.max() < 150


def test_mmseg_lookup_leaves_other_names_to_mmseg():
    from mmseg.apis import MMSegInferencer
    me = SimpleNamespace(scope='mmseg')
    cfg, weights = MMSegInferencer._load_model_from_metafile(
        me, 'segmenter_vit-t_mask_8xb1-160k_ade20k-512x512')
    assert cfg.model.decode_head.type == 'SegmenterMaskTransformerHead'
    assert weights.startswith('https://download.openmmlab.com/')
    cfg, weights = MMSegInferencer._load_model_from_metafile(me, SEG_DEPICT.upper())
    assert cfg.model.decode_head.type == 'DEPICTHead' and weights is None
    with pytest.raises(ValueError, match='Cannot find model'):
        MMSegInferencer._load_model_from_metafile(me, 'no-such-model')
