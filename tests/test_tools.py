"""The tools end to end (train -> checkpoint -> resume -> test, and torchrun on CPU with
gloo) plus the infrastructure in mmcbsa.engine: weights_only-safe globals for mmengine
checkpoints, and the CPU distributed wrapper.

The tools run as subprocesses, exactly as a user runs them, on a tiny config derived from
the quick-start config (a few iterations on 48x64 synthetic ADE20K images)."""
import os
import pickle
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import mmcbsa  # noqa: F401  (registers the safe globals)
from mmcbsa.engine import (configure_cpu_distributed, mmengine_safe_globals,
                           register_mmengine_safe_globals)

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
MAIN_CONFIG = REPO / 'configs/depict/depict-sa_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py'
TIMEOUT = 900


def _env(**extra):
    env = dict(os.environ)
    # no PYTHONPATH: the tools run on the installed mmcbsa, as a user's do
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
               PYTHONWARNINGS='ignore::UserWarning,ignore::DeprecationWarning')
    # torch>=2.6 already defaults to weights_only=True; force it for every torch.load
    # the tools make, so the tests do not depend on that default.
    env['TORCH_FORCE_WEIGHTS_ONLY_LOAD'] = '1'
    env.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', None)
    env.update(extra)
    return env


def _run(cmd, **env):
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=_env(**env), timeout=TIMEOUT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, f'{cmd} failed ({proc.returncode}):\n{proc.stdout[-6000:]}'
    return proc.stdout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _logs(work_dir: Path) -> str:
    return '\n'.join(p.read_text() for p in sorted(work_dir.glob('*/*.log')))


TINY_CONFIG = '''
_base_ = [{main!r}]
data_root = {data!r}
crop_size = (32, 48)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(256, 48), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(img_size=crop_size, embed_dims=32, num_layers=1, num_heads=2),
    decode_head=dict(in_channels=32, channels=32, num_layers=1, num_heads=2, head_dims=16))
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(
    num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
max_iters = 4
param_scheduler = [dict(type='PolyLR', eta_min=1e-5, by_epoch=False, begin=0, end=100)]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(interval=2, max_keep_ckpts=3))
'''


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """(config path, data root): 4 training and 2 validation images of 48x64."""
    root = tmp_path_factory.mktemp('tools')
    data = root / 'mini_ade20k'
    _run([PY, REPO / 'tools/misc/make_mini_dataset.py', '--dataset', 'ade20k', '--out', data,
          '--num-train', '4', '--num-val', '2', '--size', '48', '64'])
    cfg = root / 'tiny_depict.py'
    cfg.write_text(TINY_CONFIG.format(main=str(MAIN_CONFIG), data=str(data)))
    return cfg, data


@pytest.fixture(scope='module')
def trained(tiny, tmp_path_factory):
    """A 4-iteration training run with tools/train.py (checkpoints at 2 and 4)."""
    cfg, _ = tiny
    work = tmp_path_factory.mktemp('train')
    out = _run([PY, REPO / 'tools/train.py', cfg, '--work-dir', work])
    return work, out


# ---------------------------------------------------------------------------------------
# train / test / resume / dist
# ---------------------------------------------------------------------------------------


def test_train_writes_checkpoints_and_validates(trained):
    work, _ = trained
    assert (work / 'iter_2.pth').is_file() and (work / 'iter_4.pth').is_file()
    assert (work / 'last_checkpoint').read_text().strip().endswith('iter_4.pth')
    log = _logs(work)
    assert 'Iter(train) [4/4]' in log
    miou = re.findall(r'Iter\(val\) \[2/2\].*mIoU: ([0-9.]+)', log)
    assert miou and 0.0 <= float(miou[-1]) <= 100.0
    # the main config logs the compression curve (CodingRateHook), here on the 2 val images
    assert re.search(r'CodingRateHook: after 0 iterations, coding rate on 2 val images: '
                     r'backbone.0 [0-9.]+, decode_head.0 [0-9.]+ \([0-9.]+ s\)', log), log[-3000:]
    ckpt = torch.load(work / 'iter_4.pth', map_location='cpu', weights_only=True)
    assert ckpt['meta']['iter'] == 4
    assert any(k.startswith('decode_head.') for k in ckpt['state_dict'])


def test_test_tool_metric_masks_and_visualisation(tiny, trained, tmp_path):
    cfg, data = tiny
    work, _ = trained
    out_dir, vis_dir = tmp_path / 'pred', tmp_path / 'vis'
    _run([PY, REPO / 'tools/test.py', cfg, work / 'iter_4.pth', '--work-dir', tmp_path / 'w',
          '--out', out_dir, '--show-dir', vis_dir])
    log = _logs(tmp_path / 'w')
    assert re.search(r'Iter\(test\) \[2/2\].*aAcc: [0-9.]+ +mIoU: [0-9.]+', log), log[-3000:]
    masks = sorted(out_dir.glob('*.png'))
    assert [m.name for m in masks] == ['ADE_val_00000001.png', 'ADE_val_00000002.png']
    import cv2
    mask = cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (48, 64) and mask.dtype == np.uint8
    assert mask.min() >= 1 and mask.max() <= 150  # ADE ids (reduce_zero_label undone)
    assert len(list(vis_dir.rglob('*.png'))) == 2


def test_resume_auto_with_weights_only_load(tiny, trained, tmp_path):
    cfg, _ = tiny
    work, _ = trained
    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    for name in ('iter_2.pth', 'iter_4.pth'):
        (resumed / name).write_bytes((work / name).read_bytes())
    (resumed / 'last_checkpoint').write_text(str(resumed / 'iter_4.pth'))
    _run([PY, REPO / 'tools/train.py', cfg, '--work-dir', resumed, '--resume',
          '--cfg-options', 'train_cfg.max_iters=6'])
    log = _logs(resumed)
    assert 'resumed epoch: 0, iter: 4' in log
    assert 'Iter(train) [5/6]' in log and 'Iter(train) [1/6]' not in log
    assert (resumed / 'iter_6.pth').is_file()


def test_resume_from_path(tiny, trained, tmp_path):
    cfg, _ = tiny
    work, _ = trained
    _run([PY, REPO / 'tools/train.py', cfg, '--work-dir', tmp_path, '--resume',
          work / 'iter_2.pth', '--cfg-options', 'train_cfg.max_iters=3'])
    log = _logs(tmp_path)
    assert f'Load checkpoint from {work / "iter_2.pth"}' in log
    assert 'resumed epoch: 0, iter: 2' in log and 'Iter(train) [3/3]' in log


@pytest.mark.parametrize('tool, args, message', [
    ('train.py', ['missing.py'], 'config file not found: missing.py'),
    ('test.py', [MAIN_CONFIG, 'missing.pth'], 'checkpoint not found: missing.pth'),
    ('train.py', [MAIN_CONFIG, '--resume', 'missing.pth'], 'missing.pth: no such file'),
    ('train.py', [MAIN_CONFIG, '--launcher', 'slurm'],
     "launcher=\"slurm\" needs the environment variables ['SLURM_PROCID', 'SLURM_NTASKS', "
     "'SLURM_NODELIST'], which are not set (start the processes with srun"),
    # a key the model does not take, an argument check of mmcv / mmseg
    ('train.py', [MAIN_CONFIG, '--cfg-options', 'model.backbone.foo=1'],
     "the config cannot be built: TypeError: VisionTransformer.__init__() got an unexpected "
     "keyword argument 'foo'"),
    ('test.py', [MAIN_CONFIG, REPO / 'README.md', '--cfg-options',
                 'model.backbone.embed_dims=50'],
     'the config cannot be built: AssertionError: embed_dim must be divisible by num_heads'),
    ('train.py', [MAIN_CONFIG, '--resume', REPO / 'README.md'],
     'README.md is truncated or corrupt (not a readable torch checkpoint'),
    ('train.py', [MAIN_CONFIG, '--cfg-options', 'train_dataloader.dataset.data_root=nowhere'],
     "No such file or directory: 'nowhere/"),
    # a model the config cannot build (here a WhiteBoxViT key that was removed)
    ('train.py', [REPO / 'configs/cbt/cbt-nano-p8_1xb8-lion-2e_mini-in1k-64px.py',
                  '--cfg-options', 'model.backbone.attn_cfg.num_reps=4'],
     'attn_cfg was removed; use layer_cfgs=dict(attn_cfg=...)'),
])
def test_user_mistakes_are_one_line(tool, args, message, tmp_path):
    """A missing config, checkpoint or dataset: one ``TOOL: error: ...`` line on
    stderr and exit status 2, no traceback."""
    proc = subprocess.run([PY, str(REPO / 'tools' / tool), *map(str, args), '--work-dir',
                           str(tmp_path)], cwd=REPO, env=_env(), timeout=TIMEOUT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f'{tool}: error: ')]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]


def test_test_tool_compiles_test_step_from_the_config(tiny, trained, tmp_path):
    """``compile=True`` (mmengine's switch, which the Runner applies to ``train_step``
    only): tools/test.py compiles ``test_step`` and reports the eager metrics; a value
    that is neither a bool nor a dict is one line."""
    cfg, _ = tiny
    work, _ = trained
    metrics = []
    for extra in ([], ['--cfg-options', 'compile=True']):
        _run([PY, REPO / 'tools/test.py', cfg, work / 'iter_4.pth', '--work-dir',
              tmp_path / f'w{len(metrics)}', *extra])
        log = _logs(tmp_path / f'w{len(metrics)}')
        assert ('test_step compiled' in log) == bool(extra)
        metrics.append(re.search(r'Iter\(test\) \[2/2\] +(aAcc: .*mAcc: [0-9.]+)', log)[1])
    assert metrics[0] == metrics[1], metrics
    proc = subprocess.run([PY, str(REPO / 'tools/test.py'), str(cfg), str(work / 'iter_4.pth'),
                           '--work-dir', str(tmp_path / 'w'), '--cfg-options', 'compile=3'],
                          cwd=REPO, env=_env(), timeout=TIMEOUT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert 'test.py: error: compile must be True, False or a dict' in proc.stderr


def test_test_tool_refuses_checkpoints_that_do_not_fit(tiny, trained, tmp_path):
    """tools/test.py: an empty or corrupt checkpoint, or one whose tensors do not match the
    model's, is one line and exit status 2 (mmengine would load it with strict=False and evaluate
    partly random weights); --allow-partial evaluates anyway. A test set whose class count
    is not the model's is one line too."""
    cfg, _ = tiny
    work, _ = trained
    empty, partial = tmp_path / 'empty.pth', tmp_path / 'partial.pth'
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'not a checkpoint')
    torch.save({'x': 1}, empty)
    ckpt = torch.load(work / 'iter_4.pth', map_location='cpu', weights_only=True)
    dropped = sorted(k for k in ckpt['state_dict'] if k.startswith('decode_head.'))[0]
    del ckpt['state_dict'][dropped]
    torch.save(ckpt, partial)

    def test_tool(path, *extra):
        return subprocess.run([PY, str(REPO / 'tools/test.py'), str(cfg), str(path),
                               '--work-dir', str(tmp_path / 'w'), *extra], cwd=REPO,
                              env=_env(), timeout=TIMEOUT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)

    for path, message in ((empty, 'holds no model weights'),
                          (corrupt, f'{corrupt} is truncated or corrupt (not a readable '
                                    'torch checkpoint: '),
                          (partial, f'tensors against the model\'s {len(ckpt["state_dict"]) + 1}'
                                    f': 1 missing keys ({dropped})')):
        proc = test_tool(path)
        assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith('test.py: error: ')]
        assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    proc = test_tool(partial, '--allow-partial')
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a test set of another class count than the head's: silently wrong metrics otherwise
    proc = test_tool(work / 'iter_4.pth', '--cfg-options',
                     'test_dataloader.dataset.metainfo.classes=a,b')
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"^test.py: error: the config's test dataset \(\w+\) has 2 classes, the "
                     r'model predicts \d+: set the dataset', proc.stderr, re.M), proc.stderr


def test_stock_torch_load_needs_the_allow_list(trained):
    """Negative control: without ``import mmcbsa`` the mmengine checkpoint does not load
    with weights_only=True, so the resume tests above exercise the allow-list."""
    work, _ = trained
    code = ('import torch, sys\n'
            'try:\n'
            f'    torch.load({str(work / "iter_4.pth")!r}, weights_only=True)\n'
            'except Exception as e:\n'
            '    print("REJECTED", type(e).__name__); sys.exit(0)\n'
            'print("LOADED")\n')
    out = subprocess.run([PY, '-c', code], env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT).stdout
    assert 'REJECTED UnpicklingError' in out, out


def test_dist_train_two_processes_on_cpu(tiny, tmp_path):
    cfg, _ = tiny
    out = _run(['bash', REPO / 'tools/dist_train.sh', cfg, '2', '--work-dir', tmp_path],
               PORT=str(_free_port()))
    log = _logs(tmp_path)
    assert 'Distributed training: True' in log
    # The CPU run reports itself truthfully: the world size as CPU processes (mmengine's
    # Runner would say "GPU number") and gloo as the backend, in the runtime environment
    # and in the logged config (the runtime bases say nccl). torch's build settings in
    # the system information keep their upper-case "USE_NCCL=ON": a fact about the
    # binary, not about this run.
    assert 'World size (CPU processes): 2' in log
    assert "dist_cfg: {'backend': 'gloo'}" in log and "backend='gloo'" in log
    for text in (log, out):
        assert 'GPU number' not in text and 'nccl' not in text
    assert 'Iter(train) [4/4]' in log and (tmp_path / 'iter_4.pth').is_file()
    assert 'MMCPUDistributedDataParallel' in log or 'MMCPUDistributedDataParallel' in out


# ---------------------------------------------------------------------------------------
# mmcbsa.engine: safe globals
# ---------------------------------------------------------------------------------------


def test_register_safe_globals_idempotent():
    before = list(torch.serialization.get_safe_globals())
    assert register_mmengine_safe_globals() is True
    assert register_mmengine_safe_globals() is True
    assert torch.serialization.get_safe_globals() == before
    for entry in mmengine_safe_globals():
        assert entry in before
    assert getattr not in before  # the real getattr is never allow-listed


class _Reduce:
    """Pickles as ``func(*args)``; used to craft payloads."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_arbitrary_classes_still_rejected(tmp_path):
    module = tmp_path / 'mmcbsa_test_payload.py'
    module.write_text(textwrap.dedent('''
        class Payload:
            def __init__(self):
                self.value = 3
    '''))
    sys.path.insert(0, str(tmp_path))
    try:
        import mmcbsa_test_payload
        path = tmp_path / 'custom.pth'
        torch.save({'state_dict': {}, 'meta': mmcbsa_test_payload.Payload()}, path)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)
        # and a plain REDUCE call of a non-allow-listed callable
        torch.save({'x': _Reduce(os.getenv, ('HOME', ))}, tmp_path / 'call.pth')
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / 'call.pth', weights_only=True)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop('mmcbsa_test_payload', None)


def test_getattr_only_resolves_history_buffer_methods(tmp_path):
    from mmengine.logging import HistoryBuffer
    ok = tmp_path / 'ok.pth'
    torch.save({'m': _Reduce(getattr, (HistoryBuffer, 'mean'))}, ok)
    assert torch.load(ok, weights_only=True)['m'] is HistoryBuffer.mean
    for target, name in [(np.ndarray, 'tofile'), (HistoryBuffer, '__init__'),
                         (HistoryBuffer, '__class__'), (np.dtype, 'type')]:
        bad = tmp_path / 'bad.pth'
        torch.save({'m': _Reduce(getattr, (target, name))}, bad)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(bad, weights_only=True)


def test_history_buffer_and_numpy_roundtrip(tmp_path):
    from mmengine.logging import HistoryBuffer
    buf = HistoryBuffer()
    for v in (1.0, 2.0, 4.0):
        buf.update(v)
    data = {'buf': buf, 'f64': np.float64(0.5), 'i64': np.int64(3), 'f32': np.float32(2),
            'arr': np.arange(4, dtype=np.int32), 'bools': np.array([True, False])}
    torch.save(data, tmp_path / 'hb.pth')
    back = torch.load(tmp_path / 'hb.pth', weights_only=True)
    assert back['buf'].mean() == pytest.approx(7 / 3) and back['buf'].current() == 4.0
    assert back['f64'] == 0.5 and back['i64'] == 3 and back['f32'] == 2
    np.testing.assert_array_equal(back['arr'], np.arange(4, dtype=np.int32))
    assert back['bools'].tolist() == [True, False]


# ---------------------------------------------------------------------------------------
# mmcbsa.engine: CPU distributed
# ---------------------------------------------------------------------------------------


def test_configure_cpu_distributed_sets_wrapper():
    from mmengine.config import Config
    cfg = Config(dict(launcher='pytorch', find_unused_parameters=True))
    changed = configure_cpu_distributed(cfg)
    if torch.cuda.is_available():  # GPU path untouched
        assert not changed and 'model_wrapper_cfg' not in cfg
        return
    assert changed
    assert cfg.model_wrapper_cfg == dict(type='MMCPUDistributedDataParallel',
                                         broadcast_buffers=False, find_unused_parameters=True)
    assert cfg.env_cfg.dist_cfg == dict(backend='gloo')
    user = Config(dict(launcher='pytorch', model_wrapper_cfg=dict(
        type='MMDistributedDataParallel', detect_anomalous_params=True),
        env_cfg=dict(cudnn_benchmark=True, dist_cfg=dict(backend='nccl', timeout=60))))
    assert configure_cpu_distributed(user)
    assert user.model_wrapper_cfg == dict(type='MMCPUDistributedDataParallel',
                                          detect_anomalous_params=True)
    # only the backend changes: the group is gloo; timeout and the rest are kept
    assert user.env_cfg == dict(cudnn_benchmark=True,
                                dist_cfg=dict(backend='gloo', timeout=60))
    assert not configure_cpu_distributed(Config(dict(launcher='none')))


DDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
import mmcbsa  # noqa: F401
from mmengine.model import BaseModel
from mmengine.registry import MODEL_WRAPPERS
from mmcbsa.engine import MMCPUDistributedDataParallel

class Tiny(BaseModel):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x, mode='tensor'):
        return self.fc(x)

dist.init_process_group('gloo', init_method='tcp://127.0.0.1:' + sys.argv[1], rank=0,
                        world_size=1)
model = MODEL_WRAPPERS.build(
    dict(type='MMCPUDistributedDataParallel', broadcast_buffers=False),
    default_args=dict(module=Tiny(), device_ids=[0]))  # as Runner.wrap_model does
assert isinstance(model, MMCPUDistributedDataParallel), type(model)
assert model.device_ids is None, model.device_ids
model(torch.randn(4, 3)).sum().backward()
assert model.module.fc.weight.grad is not None
dist.barrier()
print('DDP-OK', flush=True)
"""


def test_cpu_ddp_wrapper_drops_device_ids():
    """Runner.wrap_model passes device_ids=[LOCAL_RANK]; the CPU wrapper drops them and
    trains under a gloo group. Runs in a subprocess: a process group and DDP reducer are
    process-global state (and gloo teardown must not race the test process's GIL)."""
    out = _run([PY, '-c', DDP_SCRIPT, str(_free_port())])
    assert 'DDP-OK' in out
