"""Mixed-precision training through mmengine (issue 11, part 2).

* every model family of ``model_cases.FAMILIES`` trains a few iterations with
  ``BF16AmpOptimWrapper`` (mmengine ``train_step`` + optimizer wrapper; bfloat16
  autocast on the CPU): the forward really runs in bfloat16, parameters stay float32,
  losses are finite and fall on a fixed batch;
* the wrapper's own contract (dtype check, no loss scaler in checkpoints, gradient
  clipping);
* ``configure_amp`` (what ``tools/train.py --amp`` does) on machines with and
  without CUDA, and ``tools/train.py --amp`` training a tiny config on this machine.

fp16 with dynamic loss scaling needs CUDA (mmengine's ``AmpOptimWrapper``): see
tests/test_cuda.py.
"""
import importlib.util
import re

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from model_cases import FAMILIES, REPO, tiny_seg_runner_cfg

from mmcbsa.engine import BF16AmpOptimWrapper, configure_amp

STEPS = 6


@pytest.mark.parametrize('case', FAMILIES, ids=[f.id for f in FAMILIES])
def test_bf16_amp_training_of_every_family(case):
    torch.manual_seed(0)
    model = case.build().train()
    wrapper = build_optim_wrapper(model, dict(type='BF16AmpOptimWrapper',
                                              optimizer=dict(type='AdamW', lr=2e-3)))
    assert isinstance(wrapper, BF16AmpOptimWrapper)
    seen = []  # output dtypes of every nn.Linear / nn.Conv2d module that runs
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    batch = case.batch_data(model)
    losses = []
    for _ in range(STEPS):  # the same batch every time: the loss has to fall
        log_vars = model.train_step(batch, optim_wrapper=wrapper)
        losses.append(float(log_vars['loss']))
    for h in hooks:
        h.remove()
    assert seen and all(d == torch.bfloat16 for d in seen), seen  # autocast was on
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    half = STEPS // 2
    assert losses[-1] < losses[0] and sum(losses[half:]) < sum(losses[:half]), losses


def test_bf16_wrapper_contract():
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match='dtype'):
        BF16AmpOptimWrapper(dtype='float16', optimizer=torch.optim.SGD(lin.parameters(), 0.1))
    wrapper = BF16AmpOptimWrapper(optimizer=torch.optim.SGD(lin.parameters(), lr=0.1),
                                  clip_grad=dict(max_norm=1e-3))
    with wrapper.optim_context(lin):
        y = lin(torch.randn(5, 4))
    assert y.dtype == torch.bfloat16
    before = [p.detach().clone() for p in lin.parameters()]
    wrapper.update_params(y.float().square().sum() * 100)
    # gradient clipped to norm 1e-3, then an SGD step of lr 0.1: an update of norm 1e-4
    update = sum((p - b).square().sum() for p, b in zip(lin.parameters(), before)).sqrt()
    assert update.item() == pytest.approx(1e-4, rel=1e-3)
    state = wrapper.state_dict()
    assert 'loss_scaler' not in state
    state['loss_scaler'] = {'scale': 65536.0}  # from an fp16 AmpOptimWrapper checkpoint
    wrapper.load_state_dict(state)


@pytest.mark.parametrize('wrapper,enable,cuda,expected', [
    # --amp on a GPU: fp16 + dynamic loss scaling
    (dict(type='OptimWrapper'), True, True,
     dict(type='AmpOptimWrapper', loss_scale='dynamic')),
    (dict(type='OptimWrapper', dtype='bfloat16'), True, True,
     dict(type='AmpOptimWrapper', loss_scale='dynamic', dtype='bfloat16')),
    (dict(type='OptimWrapper', loss_scale=512.), True, True,
     dict(type='AmpOptimWrapper', loss_scale=512.)),
    # --amp on a CPU: bf16, no scaler
    (dict(type='OptimWrapper'), True, False, dict(type='BF16AmpOptimWrapper')),
    # an `-amp-` config on a CPU, with or without --amp
    (dict(type='AmpOptimWrapper', loss_scale='dynamic'), False, False,
     dict(type='BF16AmpOptimWrapper')),
    (dict(type='AmpOptimWrapper', loss_scale='dynamic'), True, False,
     dict(type='BF16AmpOptimWrapper')),
    # left alone
    (dict(type='AmpOptimWrapper', loss_scale='dynamic'), False, True,
     dict(type='AmpOptimWrapper', loss_scale='dynamic')),
    (dict(type='OptimWrapper'), False, False, dict(type='OptimWrapper')),
    (dict(type='BF16AmpOptimWrapper'), True, True, dict(type='BF16AmpOptimWrapper')),
])
def test_configure_amp(wrapper, enable, cuda, expected):
    cfg = Config(dict(optim_wrapper=dict(wrapper, optimizer=dict(type='SGD', lr=0.1))))
    note = configure_amp(cfg, enable, cuda=cuda)
    got = cfg.optim_wrapper.to_dict()
    assert got.pop('optimizer') == dict(type='SGD', lr=0.1)
    assert got == expected
    changed = enable or wrapper['type'] == 'AmpOptimWrapper'
    assert (note is None) == (not changed)
    if note is not None:
        assert expected['type'] in note
        assert ('bfloat16' in note) == (expected['type'] == 'BF16AmpOptimWrapper'
                                        or expected.get('dtype') == 'bfloat16')


def test_configure_amp_errors():
    assert configure_amp(Config(dict(model=dict())), False, cuda=False) is None
    with pytest.raises(ValueError, match='needs an optim_wrapper'):
        configure_amp(Config(dict(model=dict())), True, cuda=False)
    cfg = Config(dict(optim_wrapper=dict(type='OptimWrapperDict')))
    with pytest.raises(ValueError, match='optim_wrapper.type'):
        configure_amp(cfg, True, cuda=True)
    cfg = Config(dict(optim_wrapper=dict(type='AmpOptimWrapper', dtype='float16')))
    with pytest.raises(ValueError, match='bfloat16 only'):
        configure_amp(cfg, False, cuda=False)


def _train_tool():
    spec = importlib.util.spec_from_file_location('mmcbsa_train_tool', REPO / 'tools/train.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_train_tool_amp_runs_on_this_machine(tmp_path):
    """``tools/train.py CONFIG --amp`` (in process): bf16 without CUDA, fp16 with loss
    scaling with CUDA; the choice is logged and the losses are finite."""
    tiny_seg_runner_cfg(tmp_path, 'amp', max_iters=2)  # writes tmp_path/tiny_amp.py
    work = tmp_path / 'work'
    _train_tool().main([str(tmp_path / 'tiny_amp.py'), '--amp', '--work-dir', str(work)])
    log = '\n'.join(p.read_text() for p in work.rglob('*.log'))
    if torch.cuda.is_available():
        assert 'float16 autocast with dynamic loss scaling (AmpOptimWrapper)' in log
    else:
        assert 'bfloat16 autocast without loss scaling (BF16AmpOptimWrapper' in log
    losses = [float(v) for v in re.findall(r'Iter\(train\) \[\d/2\].* loss: ([0-9.e+-]+)',
                                           log)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses))), log[-2000:]


def test_train_tool_user_error_is_one_line(tmp_path, capsys):
    tiny_seg_runner_cfg(tmp_path, 'bad', max_iters=1)
    with pytest.raises(SystemExit) as exc:
        _train_tool().main([str(tmp_path / 'tiny_bad.py'), '--amp', '--cfg-options',
                            'optim_wrapper.type=OptimWrapperDict'])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r'train\.py: error: .*optim_wrapper\.type', err[0]), err
