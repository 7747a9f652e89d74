"""tools/analysis_tools/{coding_rate,visualize_attention,zero_shot_seg,perturb_robustness}.py
and CodingRateHook, on a tiny config of each kind: DEPICT segmentor (the quick start's
model), CBT-head segmentor, CBT classifier, MiTA segmenter — in-process ``main(argv)``,
synthetic data from tools/misc/make_mini_dataset.py, two images each.

Checks: well-formed CSV with finite values, PNGs that load, the zero-shot readings'
bookkeeping, ``σ = 0`` reproducing the clean metric exactly through ``Runner.test()``,
one-line errors for users' mistakes, the hook's scalars in the training log.
"""
import csv
import importlib.util
import json
import math
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config

import mmcbsa  # noqa: F401
from mmcbsa.analysis.runtime import build_model

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / 'tools' / 'analysis_tools'
DEPICT = 'configs/depict/depict-sa_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py'
CBT_HEAD = 'configs/cbt/cbt-head_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py'
CBT_CLS = 'configs/cbt/cbt-nano-p8_1xb8-lion-2e_mini-in1k-64px.py'
MITA = 'configs/cbt/mita-nano_cbt-head_1xb8-mini-ade20k-128x128.py'
SEGMENTORS = {'depict': DEPICT, 'cbt_head': CBT_HEAD, 'mita': MITA}
KINDS = {**SEGMENTORS, 'cbt_cls': CBT_CLS}
# attention layers: mmseg ViT / MiTA encoder (4) + head (2); CBT nano (2)
NUM_LAYERS = {'depict': 6, 'cbt_head': 6, 'mita': 6, 'cbt_cls': 2}


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f'_tool_{name}', TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine two spinning OpenMP threads make
    these small models many times slower (see README, quick start)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    spec = importlib.util.spec_from_file_location(
        '_make_mini', REPO / 'tools' / 'misc' / 'make_mini_dataset.py')
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    root = tmp_path_factory.mktemp('analysis_data')
    maker.main(['--dataset', 'ade20k', '--out', str(root / 'ade'), '--num-train', '1',
                '--num-val', '2'])
    maker.main(['--dataset', 'imagenet', '--out', str(root / 'inet'), '--num-classes', '2',
                '--num-train', '1', '--num-val', '1'])
    return dict(ade=str(root / 'ade'), inet=str(root / 'inet'))


def options(kind, data):
    """``--cfg-options`` pointing a repository config at the test data."""
    root = data['inet'] if kind == 'cbt_cls' else data['ade']
    return ['--cfg-options', f'test_dataloader.dataset.data_root={root}',
            f'val_dataloader.dataset.data_root={root}', 'test_dataloader.num_workers=0',
            'test_dataloader.persistent_workers=False']


@pytest.fixture(scope='module')
def configs(data, tmp_path_factory):
    """Each kind's repository config with those options applied, dumped once as a plain
    config file (resolving ``mmseg::`` / ``mmpretrain::`` bases takes seconds per load)."""
    out = tmp_path_factory.mktemp('analysis_configs')
    paths = {}
    for kind, path in KINDS.items():
        cfg = Config.fromfile(REPO / path)
        root = data['inet'] if kind == 'cbt_cls' else data['ade']
        for split in ('train', 'val', 'test'):
            cfg[f'{split}_dataloader'].dataset.data_root = root
            cfg[f'{split}_dataloader'].num_workers = 0
            cfg[f'{split}_dataloader'].persistent_workers = False
        paths[kind] = str(out / Path(path).name)
        cfg.dump(paths[kind])
    return paths


def read_csv(path):
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    assert rows, f'{path} is empty'
    assert all(len(r) == len(rows[0]) and None not in r.values() for r in rows), path
    return rows


def assert_png(path):
    img = cv2.imread(str(path))
    assert img is not None and img.ndim == 3 and min(img.shape[:2]) > 50, path


def finite(value):
    return math.isfinite(float(value))


@pytest.mark.parametrize('kind', list(KINDS))
def test_coding_rate_tool(kind, configs, tmp_path, capsys):
    tool = load_tool('coding_rate')
    tool.main([configs[kind], '--out-dir', str(tmp_path), '--num-images', '2'])
    rows = read_csv(tmp_path / 'coding_rate.csv')
    assert len(rows) == NUM_LAYERS[kind]
    for r in rows:
        assert r['weights'] == 'init' and r['images'] == '2'
        assert finite(r['coding_rate_mean']) and float(r['coding_rate_mean']) > 0
        assert finite(r['coding_rate_std']) and float(r['coding_rate_std']) >= 0
        if kind == 'cbt_cls':  # CBSA + ISTA blocks
            assert r['ista_module'].endswith('.ffn') and 0 < float(r['sparsity_mean']) < 1
        else:
            assert r['sparsity_mean'] == ''
    assert_png(tmp_path / 'coding_rate.png')
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith('coding rate, first -> last layer (2 images)')


def test_coding_rate_compares_checkpoint_with_init(configs, tmp_path):
    cfg = Config.fromfile(configs['cbt_cls'])
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.backbone.layers[0].attn.in_proj.parameters():
            p.mul_(3.0)  # a different model than the initialisation
    ckpt = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    tool = load_tool('coding_rate')
    res = tool.main([configs['cbt_cls'], '--checkpoint', str(ckpt), '--compare-init',
                     '--out-dir', str(tmp_path), '--num-images', '2'])
    rows = read_csv(tmp_path / 'coding_rate.csv')
    assert [r['weights'] for r in rows] == ['checkpoint'] * 2 + ['init'] * 2
    # the scaled projection has the larger coding rate; the untouched layer 1 differs only
    # through its input
    ckpt0, init0 = res['checkpoint'][0], res['init'][0]
    assert ckpt0.coding_rate_mean_std[0] > init0.coding_rate_mean_std[0]


@pytest.mark.parametrize('kind', list(KINDS))
def test_visualize_attention_tool(kind, configs, tmp_path):
    tool = load_tool('visualize_attention')
    res = tool.main([configs[kind], '--out-dir', str(tmp_path), '--num-rows', '2'])
    rows = read_csv(tmp_path / 'attention_maps.csv')
    layers = sorted({r['layer'] for r in rows})
    assert layers == sorted(res['labels'][i] for i in res['chosen'])
    for layer in layers:
        assert_png(tmp_path / f'attention_{layer}.png')
    assert_png(tmp_path / 'attention_overview.png')
    for r in rows:
        assert all(finite(r[k]) for k in ('min', 'max', 'mean'))
        if r['entropy']:
            assert finite(r['entropy']) and float(r['entropy']) >= 0
    kinds = {(r['layer'].split('.')[0], r['map']) for r in rows}
    if kind == 'depict':  # mmseg ViT: CLS rows; DEPICT head (150 class tokens): mean rows
        assert kinds == {('backbone', 'cls'), ('decode_head', 'mean')}
    elif kind == 'cbt_cls':
        assert kinds == {('backbone', 'cls'), ('backbone', 'reps'), ('backbone', 'clusters')}
    else:  # the CBT head (CBSA) draws its representatives and clusters
        assert {('decode_head', 'reps'), ('decode_head', 'clusters')} <= kinds
    # softmax rows: the patch part of a probability row
    for r in rows:
        if r['map'] in ('cls', 'mean') and r['type'] != 'CBSA':
            assert 0 <= float(r['min']) and float(r['max']) <= 1


def test_visualize_attention_image_size_and_selection(data, configs, tmp_path, capsys):
    # the repository config itself, with --cfg-options
    tool = load_tool('visualize_attention')
    image = next((Path(data['ade']) / 'images' / 'validation').glob('*.jpg'))
    res = tool.main([DEPICT, '--out-dir', str(tmp_path), '--image', str(image), '--size',
                     '64', '96', '--layers', 'backbone.-1', '0', '--heads', '1',
                     *options('depict', data)])
    assert res['image'].shape == (64, 96, 3)
    assert [res['labels'][i] for i in res['chosen']] == ['backbone.3', 'backbone.0']
    rec = res['records'][res['chosen'][0]]
    assert rec.hw_shape == (8, 12) and rec.maps['cls'].shape == (1, 3, 1, 8, 12)
    rows = read_csv(tmp_path / 'attention_maps.csv')
    assert {(r['layer'], r['head']) for r in rows} == {('backbone.3', '1'), ('backbone.0', '1')}
    with pytest.raises(SystemExit) as err:
        tool.main([configs['depict'], '--out-dir', str(tmp_path), '--heads', '7'])
    assert err.value.code == 2
    assert 'has 3 heads' in capsys.readouterr().err


@pytest.mark.parametrize('kind', list(SEGMENTORS))
def test_zero_shot_seg_tool(kind, configs, tmp_path):
    tool = load_tool('zero_shot_seg')
    res = tool.main([configs[kind], '--out-dir', str(tmp_path), '--background-classes',
                     'wall', 'sky', 'floor'])
    rows = read_csv(tmp_path / 'zero_shot_seg.csv')
    readings = {r['reading'] for r in rows}
    assert {'all-foreground', 'attention-mass'} <= readings
    if kind != 'depict':  # CBSA in the head: clusters per head, and the grid baseline
        assert {'clusters', 'grid-parts'} <= readings
        assert sum(r['reading'] == 'clusters' for r in rows) == 3
    for r in rows:
        assert r['images'] == '2'
        for key in ('IoU.background', 'IoU.foreground', 'mIoU', 'aAcc'):
            assert 0 <= float(r[key]) <= 100
    assert res['all-foreground']['IoU.background'] == 0
    assert_png(tmp_path / 'zero_shot_seg.png')
    masks = sorted((tmp_path / 'masks').glob('*_attention-mass.png'))
    assert len(masks) == 2
    mask = cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (128, 128) and set(mask.flatten().tolist()) <= {0, 255}


def test_zero_shot_seg_classifier_needs_masks(configs, tmp_path, capsys):
    tool = load_tool('zero_shot_seg')
    with pytest.raises(SystemExit) as err:
        tool.main([configs['cbt_cls'], '--out-dir', str(tmp_path)])
    assert err.value.code == 2
    assert 'needs ground-truth masks' in capsys.readouterr().err
    # with an mmseg config's images and masks, the classifier's CLS maps are read
    res = tool.main([configs['cbt_cls'], '--out-dir', str(tmp_path), '--seg-data',
                     configs['depict'], '--background-classes', 'wall', 'sky', 'floor'])
    assert {'attention-mass', 'grid-parts', 'clusters/head0', 'clusters/head1'} <= set(res)
    with pytest.raises(SystemExit):
        tool.main([configs['depict'], '--out-dir', str(tmp_path), '--background-classes',
                   'lava'])
    assert "unknown class 'lava'" in capsys.readouterr().err


def _confident_checkpoint(config, kind, path):
    """A model of ``kind`` whose predictions are partly right (so that the clean metric is
    not 0): segmentors predict class 0 (wall) everywhere through the mask LayerNorm's
    bias, the classifier predicts class 0 through the head's bias."""
    model = build_model(Config.fromfile(config))
    with torch.no_grad():
        if kind == 'cbt_cls':
            model.head.fc.bias.zero_()[0] = 10.0
        else:
            norm = model.decode_head.mask_norm
            norm.weight.zero_()
            norm.bias.zero_()[0] = 1.0
    torch.save({'state_dict': model.state_dict()}, path)
    return str(path)


@pytest.mark.parametrize('kind', list(KINDS))
def test_perturb_robustness_tool(kind, configs, tmp_path):
    tool = load_tool('perturb_robustness')
    ckpt = _confident_checkpoint(configs[kind], kind, tmp_path / 'model.pth')
    argv = [configs[kind], '--checkpoint', ckpt, '--out-dir', str(tmp_path), '--sigmas', '0',
            '1', '--seeds', '1']
    if kind == 'depict':
        argv += ['--orthogonal']
    if kind == 'cbt_head':  # noise on the CBSA projections U only
        argv += ['--params', r'decode_head\.layers\.\d+\.attn\.in_proj']
    rows = tool.main(argv)
    assert [{k: str(v) for k, v in r.items()} for r in rows] == read_csv(
        tmp_path / 'perturb_robustness.csv')
    key = 'accuracy/top1' if kind == 'cbt_cls' else 'mIoU'
    assert {r['metric'] for r in rows} == {key}
    clean = rows[0]
    assert clean['transform'] == 'none' and float(clean['value']) > 0
    zero = [r for r in rows if r['transform'] == 'gaussian' and float(r['sigma']) == 0]
    assert zero and all(r['value'] == clean['value'] for r in zero)  # σ = 0: exactly clean
    assert all(finite(r['value']) for r in rows)
    if kind == 'depict':
        assert {r['mode'] for r in rows if r['transform'] == 'orthogonal'} == {
            'whole', 'per_head'}
    if kind == 'cbt_head':
        assert {r['params'] for r in rows if r['transform'] == 'gaussian'} == {
            r'decode_head\.layers\.\d+\.attn\.in_proj'}
    assert_png(tmp_path / 'perturb_robustness.png')


def test_perturb_robustness_refuses_what_it_cannot_measure(configs, tmp_path, capsys):
    tool = load_tool('perturb_robustness')
    with pytest.raises(SystemExit) as err:
        tool.main([configs['cbt_head'], '--out-dir', str(tmp_path), '--orthogonal',
                   '--sigmas', '0'])
    assert err.value.code == 2 and 'DEPICT' in capsys.readouterr().err
    # a test set of another class count than the head's: every metric would be wrong
    with pytest.raises(SystemExit) as err:
        tool.main([configs['cbt_head'], '--out-dir', str(tmp_path), '--sigmas', '0',
                   '--cfg-options', 'test_dataloader.dataset.metainfo.classes=a,b'])
    line = capsys.readouterr().err.strip()
    assert err.value.code == 2 and re.fullmatch(
        r"perturb_robustness.py: error: the config's test dataset \(\w+\) has 2 classes, "
        r"the model predicts \d+: set the dataset .* before testing", line), line


def test_coding_rate_hook_logs_scalars(configs, tmp_path):
    from mmengine.runner import Runner
    cfg = Config.fromfile(configs['depict'])
    cfg.work_dir = str(tmp_path)
    cfg.train_dataloader.batch_size = 1
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=100)
    cfg.param_scheduler = []
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=100)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None  # training only
    cfg.custom_hooks = [dict(type='CodingRateHook', interval=1, num_images=1, split='test')]
    # a visualizer of its own (mmengine keeps instances by name across runners)
    cfg.visualizer.name = f'coding_rate_hook_test_{tmp_path.name}'
    runner = Runner.from_cfg(cfg)
    runner.train()
    scalars = list((tmp_path).glob('*/vis_data/scalars.json'))
    assert len(scalars) == 1
    records = [json.loads(line) for line in scalars[0].read_text().splitlines()]
    # the initialisation at step 0 (written by the hook), then LoggerHook's two lines
    assert [r['step'] for r in records] == [0, 1, 2]
    assert 'loss' not in records[0] and all('loss' in r for r in records[1:])
    keys = [f'coding_rate/backbone.{i}' for i in range(4)] + ['coding_rate/decode_head.0',
                                                              'coding_rate/decode_head.1']
    for r in records:
        assert all(math.isfinite(r[key]) and r[key] > 0 for key in keys), r
    # one more step of training moved the weights, so the values changed
    assert records[2][keys[0]] != records[0][keys[0]]
    log = next(tmp_path.glob('*/*.log')).read_text()
    assert 'coding_rate/decode_head.0' in log and 'CodingRateHook: after 2 iterations' in log


@pytest.mark.cuda
def test_tools_on_cuda(configs, tmp_path):
    load_tool('coding_rate').main([configs['depict'], '--out-dir', str(tmp_path),
                                   '--num-images', '2', '--device', 'cuda'])
    assert len(read_csv(tmp_path / 'coding_rate.csv')) == NUM_LAYERS['depict']
    ckpt = _confident_checkpoint(configs['depict'], 'depict', tmp_path / 'model.pth')
    rows = load_tool('perturb_robustness').main([
        configs['depict'], '--checkpoint', ckpt, '--out-dir', str(tmp_path), '--sigmas', '0',
        '0.1', '--seeds', '1', '--orthogonal', '--device', 'cuda'])
    assert rows[1]['value'] == rows[0]['value']


# --------------------------------------------------------------------- weights that do not fit
def _cbt_head_checkpoint(configs, path):
    """A real checkpoint of the CBT-head segmentor (its initialisation)."""
    torch.save({'state_dict': build_model(Config.fromfile(configs['cbt_head'])).state_dict(),
                'meta': {}}, path)
    return path


TOOL_ARGS = {  # tool: extra arguments for a quick run on the DEPICT config
    'coding_rate': ['--num-images', '1'],
    'visualize_attention': ['--layers', '-1'],
    'zero_shot_seg': ['--num-images', '1'],
    'perturb_robustness': ['--num-images', '1', '--sigmas', '0.1'],
}


@pytest.mark.parametrize('tool', list(TOOL_ARGS))
def test_checkpoints_that_do_not_fit_are_refused(tool, configs, tmp_path, capsys):
    """An empty or foreign checkpoint is one line and exit status 2 (it was accepted: exit
    0 and numbers from random weights labelled 'checkpoint'); --allow-partial loads what
    fits, with a warning naming the rest."""
    empty, corrupt = tmp_path / 'bad.pth', tmp_path / 'corrupt.pth'
    torch.save({'x': 1}, empty)
    corrupt.write_bytes(b'not a checkpoint')
    foreign = _cbt_head_checkpoint(configs, tmp_path / 'cbt_head.pth')
    run = load_tool(tool).main
    base = [configs['depict'], '--out-dir', str(tmp_path / 'out')] + TOOL_ARGS[tool]
    with pytest.raises(SystemExit) as err:
        run(base + ['--checkpoint', str(empty)])
    assert err.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line == (f'{tool}.py: error: checkpoint {empty} holds no model weights (a dict of '
                    "tensors, or one under \"model\" or \"state_dict\"); it has ['x']")
    with pytest.raises(SystemExit) as err:
        run(base + ['--checkpoint', str(corrupt)])
    assert err.value.code == 2
    line = capsys.readouterr().err.strip()
    assert '\n' not in line and line.startswith(
        f'{tool}.py: error: {corrupt} is truncated or corrupt (not a readable torch checkpoint: ')
    with pytest.raises(SystemExit) as err:
        run(base + ['--checkpoint', str(foreign)])
    assert err.value.code == 2
    line = capsys.readouterr().err.strip()
    assert '\n' not in line and line.startswith(f'{tool}.py: error: checkpoint {foreign} '
                                                'does not fit the model: ')
    assert 'missing keys (decode_head.' in line and 'unexpected keys (decode_head.' in line
    assert line.endswith('(--allow-partial loads only what fits)')
    with pytest.warns(UserWarning, match='--allow-partial: loaded'):
        run(base + ['--checkpoint', str(foreign), '--allow-partial'])


def test_load_weights_only_refuses_in_one_line(tmp_path):
    """The one weights-only loader (tools and converters): a missing, empty or corrupt
    file, or one that needs a class to unpickle, is a ValueError naming the file."""
    import argparse

    from mmcbsa.engine.weights import load_weights_only, read_state_dict
    pickled = tmp_path / 'pickled.pth'
    torch.save({'args': argparse.Namespace(a=1)}, pickled)
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'corrupt.pth').write_bytes(b'not a checkpoint')
    for name, message in (('missing.pth', 'missing.pth: no such file'),
                          ('empty.pth', 'empty.pth is empty (0 bytes): not a checkpoint'),
                          ('corrupt.pth', 'corrupt.pth is truncated or corrupt'),
                          ('pickled.pth', 'pickled.pth is not a weights-only checkpoint: it '
                                          'needs argparse.Namespace to load')):
        with pytest.raises(ValueError, match=re.escape(message)) as err:
            read_state_dict(str(tmp_path / name))
        assert '\n' not in str(err.value)
    assert load_weights_only(str(pickled), [argparse.Namespace])['args'].a == 1


def test_read_state_dict_finds_the_weights_of_every_layout(tmp_path):
    """Tools and converters read weights through one rule: mmengine's ``state_dict``, a
    training script's ``model``, or a bare dict; one leading ``module.`` dropped."""
    from mmcbsa.engine.weights import read_checkpoint, read_state_dict
    w = torch.arange(3.)
    path = tmp_path / 'ckpt.pth'
    for layout in ({'state_dict': {'module.a.w': w}, 'meta': {'epoch': 1}},
                   {'model': {'a.w': w}, 'epoch': 3}, {'module.a.w': w}):
        torch.save(layout, path)
        sd = read_state_dict(str(path))
        assert list(sd) == ['a.w'] and torch.equal(sd['a.w'], w)
    assert read_checkpoint(str(path)).stripped_prefix == 1
    torch.save({'model': {'a.w': w, 'step': 3}}, path)
    with pytest.raises(ValueError, match=re.escape(
            f"{path}: entry ['model']['step'] is a int, not a tensor")):
        read_state_dict(str(path))
    torch.save({}, path)
    with pytest.raises(ValueError, match=re.escape(f'checkpoint {path} holds no model weights')):
        read_state_dict(str(path))


def test_class_count_problem_by_hand():
    """The test set's class count (metainfo, else the dataset class's METAINFO) against
    the head's num_classes, wrappers unwrapped; silent when either is unknown."""
    from mmengine.config import Config

    from mmcbsa.engine.weights import class_count_problem

    class Head(torch.nn.Module):
        num_classes = 3

    model = torch.nn.Module()
    model.decode_head = Head()
    wrapped = torch.nn.Module()
    wrapped.module = model

    def cfg(**dataset):
        return Config(dict(default_scope='mmseg', test_dataloader=dict(dataset=dataset)))

    assert class_count_problem(cfg(metainfo=dict(classes=('a', 'b', 'c'))), wrapped) is None
    assert class_count_problem(cfg(metainfo=dict(classes=('a', 'b'))), wrapped) == (
        "the config's test dataset (None) has 2 classes, the model predicts 3: set the "
        "dataset (test_dataloader.dataset) or the head's num_classes before testing")
    assert 'CityscapesDataset) has 19 classes' in class_count_problem(
        cfg(type='CityscapesDataset'), model)
    assert class_count_problem(cfg(type='CityscapesDataset'), torch.nn.Linear(1, 1)) is None
    assert class_count_problem(Config(dict(default_scope='mmseg')), model) is None
    # mmpretrain's ``classes`` argument: a list counts, a file of names is not read here
    assert 'has 2 classes' in class_count_problem(cfg(classes=['a', 'b']), model)
    assert class_count_problem(cfg(classes='classes.txt'), model) is None


def test_fit_problem_counts_by_hand():
    from mmcbsa.engine.weights import fit_problem
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    sd = dict(model.state_dict())
    assert fit_problem(model, sd) is None
    sd['0.weight'] = torch.zeros(4, 2)
    del sd['1.bias']
    sd['2.weight'] = torch.zeros(1)
    assert fit_problem(model, sd) == (
        "4 tensors against the model's 4: 1 missing keys (1.bias); 1 unexpected keys "
        '(2.weight); 1 shape mismatches, checkpoint vs model (0.weight (4, 2) vs (3, 2))')
    # keys under an allowed prefix may be missing (a decoder-only checkpoint's encoder)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith('1.')}
    assert fit_problem(model, sd, allow_missing=['1.']) is None
    assert fit_problem(model, sd, allow_missing=['0.']).startswith(
        "2 tensors against the model's 4: 2 missing keys (1.weight, 1.bias)")


@pytest.mark.parametrize('tool', list(TOOL_ARGS))
def test_out_dir_that_is_a_file_is_one_line(tool, configs, tmp_path, capsys):
    taken = tmp_path / 'taken'
    taken.write_text('')
    with pytest.raises(SystemExit) as err:
        load_tool(tool).main([configs['depict'], '--out-dir', str(taken)] + TOOL_ARGS[tool])
    assert err.value.code == 2
    assert capsys.readouterr().err.strip() == (f'{tool}.py: error: --out-dir {taken} is a '
                                               'file, not a directory')
    with pytest.raises(SystemExit):
        load_tool(tool).main([configs['depict'], '--out-dir', str(taken / 'below')]
                             + TOOL_ARGS[tool])
    assert capsys.readouterr().err.startswith(f'{tool}.py: error: --out-dir {taken}/below '
                                              'cannot be created: ')


def test_image_that_is_not_an_image_is_one_line(configs, tmp_path, capsys):
    text = tmp_path / 'notes.png'
    text.write_text('not an image')
    with pytest.raises(SystemExit) as err:
        load_tool('visualize_attention').main([configs['depict'], '--out-dir',
                                               str(tmp_path / 'out'), '--image', str(text)])
    assert err.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line == (f'visualize_attention.py: error: image {text} cannot be read (failed to '
                    f'load image: {text})'), line


# --------------------------------------------------------------------- the compression curve
def test_train_tool_coding_rate_hook_switch(configs, tmp_path):
    """``tools/train.py --coding-rate-hook 1``: the hook from the command line (the
    ``--cfg-options custom_hooks=[dict(...)]`` form cannot be parsed: one usage error);
    its scalars reach the training log that ``coding_rate.py --training-log`` reads."""
    import subprocess
    import sys
    env = dict(__import__('os').environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    base = [sys.executable, str(REPO / 'tools' / 'train.py'), configs['depict'],
            '--work-dir', str(tmp_path / 'work')]
    short = ['--cfg-options', 'train_cfg.max_iters=2', 'train_cfg.val_interval=100',
             'default_hooks.logger.interval=1', 'train_dataloader.batch_size=1',
             'param_scheduler=[]']
    bad = subprocess.run(base + ['--cfg-options',
                                 "custom_hooks=[dict(type='CodingRateHook',interval=1)]"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and 'Traceback' not in bad.stderr
    assert ('train.py: error: --cfg-options: values of --cfg-options are numbers, strings, '
            'lists or tuples; a dict') in bad.stderr
    zero = subprocess.run(base + ['--coding-rate-hook', '0'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert zero.returncode == 2 and zero.stderr.strip().splitlines()[-1] == (
        'train.py: error: CodingRateHook: interval must be a positive integer, got 0')
    ok = subprocess.run(base + ['--coding-rate-hook', '1', '--coding-rate-images', '1']
                        + short, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    series = load_tool('coding_rate').read_training_log(str(tmp_path / 'work'))
    assert sorted(s for s, _ in series['coding_rate/decode_head.0']) == [0, 1, 2]


def test_coding_rate_checks_training_log_before_measuring(configs, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        load_tool('coding_rate').main([configs['depict'], '--out-dir', str(tmp_path),
                                       '--training-log', str(tmp_path / 'nothing')])
    assert err.value.code == 2
    out, errors = capsys.readouterr()
    assert '[coding_rate]' not in out  # nothing was measured first
    assert errors.strip() == (f'coding_rate.py: error: --training-log: {tmp_path}/nothing '
                              'not found')
    text = tmp_path / 'scalars.json'
    text.write_text('{"step": 0}\nnot json\n')
    with pytest.raises(SystemExit):
        load_tool('coding_rate').main([configs['depict'], '--out-dir', str(tmp_path),
                                       '--training-log', str(text)])
    assert capsys.readouterr().err.strip() == (
        f'coding_rate.py: error: --training-log: {text} is not an mmengine scalars.json '
        '(line 2 is not JSON)')


def test_learned_change_is_the_per_image_difference(configs, tmp_path):
    """``--compare-init``: the CSV's learned_mean / learned_std of a layer are the mean and
    standard deviation over the images of (trained − init), computed here by hand."""
    cfg = Config.fromfile(configs['depict'])
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.decode_head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': model.state_dict()}, ckpt)
    res = load_tool('coding_rate').main([configs['depict'], '--checkpoint', str(ckpt),
                                         '--compare-init', '--num-images', '2',
                                         '--out-dir', str(tmp_path)])
    rows = {r['layer']: r for r in read_csv(tmp_path / 'coding_rate.csv')
            if r['weights'] == 'checkpoint'}
    for trained, init in zip(res['checkpoint'], res['init']):
        diffs = [a - b for a, b in zip(trained.coding_rate, init.coding_rate)]
        mean = sum(diffs) / len(diffs)
        std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))
        row = rows[trained.label]
        assert float(row['learned_mean']) == pytest.approx(mean, abs=1e-5)
        assert float(row['learned_std']) == pytest.approx(std, abs=1e-5)
    # the encoder was not changed: nothing learned there
    assert all(float(rows[f'backbone.{i}']['learned_mean']) == 0 for i in range(4))


# --------------------------------------------------------------------- figures say what they show
def test_tile_grid_text_is_wrapped_not_clipped(tmp_path):
    """A title and column titles longer than their band are wrapped: no line is wider
    than the band, and no text touches the picture's left or right edge (it used to be
    drawn from x = 1 and cut off at the right)."""
    from mmcbsa.analysis.plots import save_tile_grid, wrap_text
    font = cv2.FONT_HERSHEY_SIMPLEX
    for line in wrap_text('a rather long title that cannot fit into sixty-four pixels', 64):
        assert cv2.getTextSize(line, font, 0.33, 1)[0][0] <= 60
    tile = np.full((32, 32, 3), 200, np.uint8)
    title = 'decode_head.1 (CBSA, decode_head.layers.1.attn), 32x32 patches, 150 prefix tokens'
    save_tile_grid([[tile, tile]], str(tmp_path / 'g.png'), ['head 0'],
                   ['image', 'representative 12 of 100'], title=title, tile_px=48)
    drawn = cv2.imread(str(tmp_path / 'g.png'))
    assert (drawn[:, 0] == 255).all() and (drawn[:, -1] == 255).all()
    top = drawn[:int(np.flatnonzero((drawn[:, :, 0] < 250).any(1))[-1])]
    assert (top < 128).any()  # there is text


def test_tile_grid_colour_scale_is_the_heat_colormap(tmp_path):
    from matplotlib import colormaps

    from mmcbsa.analysis.plots import save_tile_grid
    tile = np.full((32, 32, 3), 200, np.uint8)
    save_tile_grid([[tile] * 4], str(tmp_path / 'g.png'), tile_px=64, colour_scale=True)
    drawn = cv2.imread(str(tmp_path / 'g.png'))[..., ::-1]  # RGB
    grid_h = 64 + 2
    band = drawn[grid_h + 8].astype(int)  # the middle row of the gradient strip
    spread = band.max(-1) - band.min(-1) > 3  # coloured (the labels beside it are grey)
    xs = np.flatnonzero(spread)
    coloured = band[xs[0]:xs[-1] + 1]
    assert spread[xs[0]:xs[-1] + 1].all()  # one contiguous strip
    ramp = (colormaps['inferno'](np.linspace(0, 1, len(coloured)))[:, :3] * 255).round()
    assert len(coloured) >= 40
    assert np.abs(coloured.astype(float) - ramp).max() <= 2


def test_figures_name_weights_layers_scores_and_ground_truth(configs, tmp_path, monkeypatch):
    """visualize_attention.py and zero_shot_seg.py say what each picture shows: which
    weights, which layer, the colour scale; the zero-shot columns carry their IoU and the
    ground-truth-assisted reading says that it uses the ground truth."""
    calls = []
    for tool in ('visualize_attention', 'zero_shot_seg'):
        module = load_tool(tool)
        monkeypatch.setattr(module, 'save_tile_grid',
                            lambda tiles, path, rows, cols, title=None, **kw: calls.append(
                                (path, cols, title, kw)))
        extra = ['--layers', '-1'] if tool == 'visualize_attention' else ['--num-images', '2']
        module.main([configs['cbt_head'], '--out-dir', str(tmp_path)] + extra)
    layer, overview, zero = calls
    assert 'untrained' in layer[2] and 'decode_head.1' in layer[2] and layer[3]['colour_scale']
    assert 'untrained' in overview[2] and overview[3]['colour_scale']
    assert 'zero-shot foreground' in zero[2] and 'untrained' in zero[2] and 'IoU' in zero[2]
    assert any(c.startswith('attention mass (no labels used), IoU ') and c.endswith(' %')
               for c in zero[1])
    assert any('by ground-truth majority, IoU ' in c for c in zero[1])
    assert any('USES THE GROUND TRUTH' in line for line in zero[3]['legend'])


def test_plots_label_both_panels_and_keep_legends_off_the_curves(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    saved = []
    monkeypatch.setattr(Figure, 'savefig', lambda fig, *a, **k: saved.append(fig))
    rows = [dict(transform='none', value='50.0', sigma='0', scope='head', params='',
                 mode='')]
    rows += [dict(transform='gaussian', value=str(40.0 - s), sigma=str(s), scope='head',
                  params='', mode='') for s in (0.1, 1.0)]
    rows += [dict(transform='orthogonal', value='50.0', sigma='', scope='head', params='',
                  mode='whole')]
    load_tool('perturb_robustness').plot(rows, str(tmp_path / 'r.png'), 'mIoU', 'title')
    bar = saved[-1].axes[1]
    assert bar.get_ylabel() == 'mIoU'  # the bar panel had no y label
    load_tool('coding_rate').plot_training(
        {'coding_rate/backbone.0': [(0, 2.0), (10, 1.0)],
         'coding_rate/backbone.1': [(0, 2.1), (10, 0.9)]}, str(tmp_path / 't.png'), 'title')
    legend = saved[-1].axes[0].get_legend()
    anchor = legend.get_bbox_to_anchor().transformed(saved[-1].axes[0].transAxes.inverted())
    assert anchor.y1 < 0  # below the axes, not over the curves' common start
