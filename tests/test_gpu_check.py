"""tools/gpu_check.sh and its pieces (issue 11, part 4) on this machine: the script's
CPU-side path (CUDA tests skipped with their reason, skip lines, the summary table), the
summary table from recorded CUDA results, and train_throughput.py as a CPU smoke run
through mmengine's Runner."""
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / 'tools' / 'analysis_tools'


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason='tests the CPU-side path; with CUDA run tools/gpu_check.sh itself')
def test_gpu_check_script_cpu_side(tmp_path):
    env = dict(os.environ, OUT_DIR=str(tmp_path), GPU_CHECK_TESTS='tests/test_cuda.py',
               OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    proc = subprocess.run(['bash', str(REPO / 'tools' / 'gpu_check.sh')], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:]
    assert 'no CUDA device' in out
    assert 'SKIPPED' in out and 'needs a CUDA device' in out  # pytest -rs: the reasons
    assert 'skipped: benchmark_attention.py --devices cuda needs a CUDA device' in out
    assert 'skipped: train_throughput.py --device cuda needs a CUDA device' in out
    assert 'skipped: train_throughput.py --mode inference needs a CUDA device' in out
    table = (tmp_path / 'gpu_check.md').read_text()
    assert table.strip() == out.strip().split('\n[gpu_check] summary')[-1].split('\n', 1)[1]
    assert '| CUDA tests (pytest -m cuda) | all |' in table and ' skipped |' in table
    assert ' passed' not in table and 'failure' not in table
    assert table.count('not run (no CUDA device)') == 3  # benchmark, training, inference
    targets = _tool('gpu_check_report').TARGETS
    assert table.count('| not measured | n/a |') == len(targets)


def test_gpu_check_report_from_recorded_results(tmp_path):
    """The summary rows from a JUnit report, a benchmark CSV and a throughput CSV as the
    CUDA steps write them (numbers made up here)."""
    (tmp_path / 'pytest_cuda.xml').write_text(
        '<testsuites><testsuite name="pytest" tests="4">'
        '<testcase name="a"/><testcase name="b"/>'
        '<testcase name="c"><failure message="boom"/></testcase>'
        '<testcase name="d"><skipped message="why not"/></testcase>'
        '</testsuite></testsuites>')
    bench = tmp_path / 'benchmark_attention'
    bench.mkdir()
    keys = ['device', 'dtype', 'mechanism', 'n', 'grid', 'batch', 'mode', 'time_ms',
            'time_ratio', 'peak_mem_mb', 'mem_ratio']
    with open(bench / 'benchmark_attention.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for mech, n, t, r in (('MHSA', 256, 1.0, 1.0), ('MHSA', 1024, 4.0, 1.0),
                              ('CBSA', 1024, 1.0, 0.25), ('MHSA', 16384, 10.0, 1.0),
                              ('MiTA', 16384, 7.0, 0.7), ('MiTA:path=grouped', 16384, 2.0, 0.2),
                              ('MiTAX', 16384, 1.0, 0.1)):
            w.writerow(dict(device='cuda', dtype='bfloat16', mechanism=mech, n=n, grid='',
                            batch=1,
                            mode='fwd+bwd', time_ms=t, time_ratio=r, peak_mem_mb=8.0,
                            mem_ratio=1.0))
    tput = tmp_path / 'train_throughput'
    tput.mkdir()
    keys = ['model', 'baseline', 'device', 'dtype', 'img_size', 'batch_size', 'compiled',
            'images_per_s', 'ratio', 'step_ms', 'peak_mem_gib', 'cbsa_path']
    common = dict(device='cuda', dtype='bfloat16', img_size=512, compiled=False,
                  baseline='segmenter-vit-s')
    with open(tput / 'train_throughput.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerow(dict(common, model='segmenter-vit-s', batch_size=8, images_per_s=100.0,
                        ratio=1.0, step_ms=80.0, peak_mem_gib=10.0))
        w.writerow(dict(common, model='cbt-head-vit-s', batch_size=8, images_per_s=150.0,
                        ratio=1.5, step_ms=53.3, peak_mem_gib=8.0))
    infer = tmp_path / 'inference_seg512'
    infer.mkdir()
    with open(infer / 'inference_throughput.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for model, batch, compiled, ips in (('segmenter-vit-s', 1, False, 100.0),
                                            ('cbt-s-cbt-head', 1, False, 110.0),
                                            ('segmenter-vit-s', 1, True, 500.0),
                                            ('cbt-s-cbt-head', 1, True, 800.0),
                                            ('segmenter-vit-s', 32, False, 600.0),
                                            ('cbt-s-cbt-head', 32, False, 900.0)):
            ratio = ips / {(1, False): 100.0, (1, True): 500.0, (32, False): 600.0}[
                (batch, compiled)]
            w.writerow(dict(common, model=model, batch_size=batch, compiled=compiled,
                            images_per_s=ips, ratio=ratio, step_ms=1e3 * batch / ips,
                            peak_mem_gib=1.0, cbsa_path='auto'))
        w.writerow(dict(common, model='cbt-s-cbt-head', batch_size=32, images_per_s=840.0,
                        ratio=1.4, step_ms=38.1, peak_mem_gib=1.0, cbsa_path='torch'))
    table = _tool('gpu_check_report').report(str(tmp_path), cuda=True)
    assert '| CUDA tests (pytest -m cuda) | all | 2 passed, 1 failure, 1 skipped |' in table
    assert '| CUDA tests (pytest -m cuda) | skip reason | 1× why not |' in table
    assert ('| attention benchmark, cuda, fwd+bwd, N=16384 | MiTA:path=grouped | 2.00 ms, '
            '0.20× MHSA, peak 8 MiB |') in table
    assert 'N=256' not in table and 'fwd+bwd, N=1024' not in table  # only the largest N
    assert ('| training throughput (cuda, bfloat16, 512², batch 8) | cbt-head-vit-s | '
            '150.0 images/s (53.30 ms), 1.50× segmenter-vit-s, peak 8.0 GiB |') in table
    assert ('| inference (cuda, bfloat16, 512², batch 1, compiled) | cbt-s-cbt-head | '
            '800.0 images/s (1.25 ms), 1.60× segmenter-vit-s, peak 1.0 GiB |') in table
    assert ('| inference (cuda, bfloat16, 512², batch 32, CBSA path torch) | cbt-s-cbt-head | '
            '840.0 images/s (38.10 ms), 1.40× segmenter-vit-s, peak 1.0 GiB |') in table
    # the targets: measured value, bound, and whether it holds
    assert ('| CBT-S + CBT head vs Segmenter ViT-S, 512², inference throughput, batch 32 '
            '| ≥ 1.6× | 1.50× (eager) | **no** |') in table
    assert ('| CBT-S + CBT head vs Segmenter ViT-S, 512², batch-1 latency (compiled '
            'allowed) | ≤ 0.7× | 0.62× (compiled vs compiled, 1.25 ms) | yes |') in table
    assert ('| CBT head on Segmenter ViT-S vs Segmenter, training throughput | ≥ 1.0× | '
            '1.50× (150.0 images/s) | yes |') in table
    assert ('| CBSA fwd+bwd vs SDPA, N=1024 | ≤ 0.9× | 0.25× (1.00 ms, bfloat16, batch 1) '
            '| yes |') in table
    assert '| MiTA fwd+bwd vs SDPA, N=1024 | ≤ 1.2× | not measured | n/a |' in table
    # the best of MiTA and its variants (not another mechanism that starts with "MiTA")
    assert ('| MiTA fwd+bwd vs SDPA, N=16384 | ≤ 0.3× | 0.20× (MiTA:path=grouped, 2.00 ms, '
            'bfloat16, batch 1) | yes |') in table
    (tput / 'train_throughput.csv').unlink()
    assert ('| training throughput | - | not run (failed or was interrupted, see the log '
            'above) |') in _tool('gpu_check_report').report(str(tmp_path), cuda=True)


def test_train_throughput_cpu_smoke(tmp_path):
    """The throughput tool end to end on the CPU at toy size (1-block encoders, 32×32,
    bf16 through BF16AmpOptimWrapper; GPUs hidden): the real configs build and train
    through the Runner, and the table has a row per model with the ratio to Segmenter."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1',
               PYTHONWARNINGS='ignore', PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(TOOLS / 'train_throughput.py'), '--device', 'cpu', '--models',
         'cbt-head-vit-s', '--img-size', '32', '--batch-size', '1', '--warmup', '1',
         '--iters', '1', '--num-images', '1', '--workers', '0', '--work-dir', str(tmp_path),
         '--cfg-options', 'model.backbone.num_layers=1'], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert ('| train | segmenter-vit-s | segmenter-vit-s | no | n/a | bfloat16 | 32 | 1 |'
            in proc.stdout)
    with open(tmp_path / 'train_throughput.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['model'] for r in rows] == ['segmenter-vit-s', 'cbt-head-vit-s']
    for r in rows:
        assert r['iters'] == '1' and float(r['images_per_s']) > 0 and r['dtype'] == 'bfloat16'
        assert torch.isfinite(torch.tensor(float(r['loss'])))
    assert float(rows[0]['ratio']) == 1.0 and float(rows[1]['ratio']) > 0


def test_throughput_classifiers_and_inference_cpu_smoke(tmp_path):
    """The classifier pair (CBT-T against DeiT-T on a synthetic ImageNet) trains through
    the Runner, and the inference mode times batch 1 and --inference-batch, eager and
    compiled (CPU, float32, 32×32 images: 4 tokens, full 12-block models)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1',
               PYTHONWARNINGS='ignore', PYTHONPATH=str(REPO))
    tool = [sys.executable, str(TOOLS / 'train_throughput.py'), '--device', 'cpu',
            '--models', 'cbt-t', '--img-size', '32', '--dtype', 'float32', '--warmup', '0',
            '--iters', '1', '--num-images', '2', '--workers', '0', '--work-dir', str(tmp_path)]
    for extra in (['--batch-size', '2'], ['--mode', 'inference', '--inference-batch', '2',
                                          '--cbsa-path', 'auto', 'torch']):
        proc = subprocess.run(tool + extra, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:]
    with open(tmp_path / 'train_throughput.csv') as f:
        train = list(csv.DictReader(f))
    assert [(r['model'], r['baseline'], r['kind']) for r in train] == [
        ('deit-t', 'deit-t', 'cls'), ('cbt-t', 'deit-t', 'cls')]
    assert all(torch.isfinite(torch.tensor(float(r['loss']))) for r in train)
    with open(tmp_path / 'inference_throughput.csv') as f:
        infer = list(csv.DictReader(f))
    # every CBSA core for CBT-T, the baseline (no CBSA) once
    assert [(r['model'], r['batch_size'], r['cbsa_path']) for r in infer] == [
        ('deit-t', '1', 'n/a'), ('deit-t', '2', 'n/a'), ('cbt-t', '1', 'auto'),
        ('cbt-t', '2', 'auto'), ('cbt-t', '1', 'torch'), ('cbt-t', '2', 'torch')]
    assert all(r['compiled'] == 'False' for r in infer)
    assert all(float(r['step_ms']) > 0 and r['loss'] == '' for r in infer)


@pytest.mark.parametrize('argv,message', [
    (['--img-size', '40', '--device', 'cpu'], 'multiple of the patch size'),
    (['--iters', '0', '--device', 'cpu'], '--iters must be >= 1'),
    (['--device', 'cpu', '--dtype', 'float16'], 'float16 training needs loss scaling'),
    (['--device', 'cpu', '--inference-batch', '0'], '--inference-batch must be >= 1'),
    (['--device', 'cpu', '--cbsa-path', 'triton'], '--cbsa-path triton needs --device cuda'),
])
def test_train_throughput_user_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        _tool('train_throughput').main(argv)


def test_set_cbsa_path_reaches_every_cbsa_module():
    from mmcbsa.models.attentions import CBSA
    from mmcbsa.models.backbones import WhiteBoxViT
    set_path = _tool('train_throughput').set_cbsa_path
    model = WhiteBoxViT(arch=dict(base='cbt-tiny', num_layers=3), img_size=32)
    assert set_path(model, 'torch') == 3
    assert [m.path for m in model.modules() if isinstance(m, CBSA)] == ['torch'] * 3
    assert set_path(WhiteBoxViT(arch=dict(base='deit-tiny', num_layers=2), img_size=32),
                    'torch') == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message without CUDA')
def test_train_throughput_without_cuda_is_one_line():
    with pytest.raises(SystemExit) as err:
        _tool('train_throughput').main([])
    assert str(err.value) == ('train_throughput.py: CUDA is not available on this machine; '
                              'use --device cpu for a (slow) CPU run')


def test_profile_train_step_cpu_smoke(tmp_path):
    """tools/analysis_tools/profile_train_step.py: one profiled training step of CBT-T
    through the Runner on the CPU prints the operator table."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1',
               PYTHONWARNINGS='ignore', PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(TOOLS / 'profile_train_step.py'), '--models', 'cbt-t',
         '--profile-iters', '1', '--rows', '5', '--device', 'cpu', '--img-size', '32',
         '--batch-size', '2', '--warmup', '1', '--num-images', '2', '--workers', '0',
         '--dtype', 'float32', '--work-dir', str(tmp_path)], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert '## cbt-t: 1 training steps, batch 2, 32², float32' in proc.stdout
    assert 'Self CPU time total' in proc.stdout and 'aten::' in proc.stdout
