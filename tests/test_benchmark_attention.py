"""Smoke test of tools/analysis_tools/benchmark_attention.py at tiny sizes."""
import csv
import importlib.util
import os
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'analysis_tools' / 'benchmark_attention.py'


@pytest.fixture
def bench(monkeypatch):
    # the tool sets OMP_WAIT_POLICY on import; keep that out of this test process
    monkeypatch.setenv('OMP_WAIT_POLICY', os.environ.get('OMP_WAIT_POLICY', 'ACTIVE'))
    spec = importlib.util.spec_from_file_location('benchmark_attention', TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_of(bench):
    assert bench.grid_of(256) == (16, 16)
    assert bench.grid_of(2048) == (32, 64)
    assert bench.grid_of(12) == (3, 4)
    assert bench.parse_reps('10x12') == (10, 12) and bench.parse_reps('64') == 64
    # the default sizes include DeiT's 224² image at patch 16 (14×14 = 196 tokens)
    assert bench.parse_args([]).n_list == [196, 256, 1024, 4096, 16384]
    assert bench.grid_of(196) == (14, 14)


def test_tiny_run_writes_table_csv_and_plot(bench, tmp_path, capsys):
    torch_threads = __import__('torch').get_num_threads()
    try:
        rows = bench.main(['--n-list', '16', '64', '--embed-dims', '32', '--num-heads', '2',
                           '--num-reps', '2x2', '--mechanisms', 'CBSA', 'TSSA',
                           '--devices', 'cpu', '--threads', '1', '--warmup', '1',
                           '--repeat', '2', '--max-quadratic-n', '16',
                           '--out-dir', str(tmp_path)])
    finally:
        __import__('torch').set_num_threads(torch_threads)
    out = capsys.readouterr().out
    assert '| cpu | float32 | 16 | 1 | fwd+bwd | CBSA |' in out
    assert (tmp_path / 'benchmark_attention.png').stat().st_size > 0
    with open(tmp_path / 'benchmark_attention.csv') as f:
        table = list(csv.DictReader(f))
    # N x mode x (MHSA, CBSA, TSSA, and the linear-attention floor as a reference line)
    assert len(table) == len(rows) == 2 * 2 * 4
    for r in rows:
        if r['mechanism'] == 'MHSA' and r['n'] == 64:  # above --max-quadratic-n: skipped
            assert r['time_ms'] is None and r['time_ratio'] is None
            continue
        assert r['time_ms'] > 0 and r['peak_mem_mb'] > 0
        if r['mechanism'] == 'LinearFloor':
            assert r['floor_ratio'] == 1.0
        else:
            floor = next(f for f in rows if f['mechanism'] == 'LinearFloor'
                         and f['n'] == r['n'] and f['mode'] == r['mode'])
            assert r['floor_ratio'] == pytest.approx(r['time_ms'] / floor['time_ms'])
        if r['n'] == 16:
            assert r['time_ratio'] is not None
            if r['mechanism'] == 'MHSA':
                assert r['time_ratio'] == 1.0 and r['mem_ratio'] == 1.0
        else:
            assert r['time_ratio'] is None  # no baseline at this N


def test_tokens_per_batch_dtype_and_floor_math(bench, tmp_path, capsys):
    """``--tokens-per-batch`` sets each N's batch; ``--dtype bfloat16`` runs under
    autocast; the floor module computes φ(q)(φ(k)ᵀv)/(φ(q)Σφ(k)) (checked by hand);
    impossible options are one line and exit status 2."""
    import torch
    args = bench.parse_args(['--tokens-per-batch', '100', '--n-list', '16', '64', '256'])
    assert [bench.batch_of(n, args) for n in args.n_list] == [6, 1, 1]
    assert bench.batch_of(16, bench.parse_args(['--batch', '3'])) == 3
    floor = bench.LinearFloor(8, 2)
    x = torch.randn(2, 5, 8)
    q, k, v = floor.qkv(x).view(2, 5, 3, 2, 4).unbind(2)  # (B, N, H, p) each
    phi = [torch.nn.functional.elu(t) + 1 for t in (q, k)]
    out = torch.empty(2, 5, 2, 4)
    for b in range(2):
        for h in range(2):
            qb, kb, vb = phi[0][b, :, h], phi[1][b, :, h], v[b, :, h]
            for n in range(5):
                w = kb @ qb[n]  # (N,) kernel weights of query n
                out[b, n, h] = (w[:, None] * vb).sum(0) / w.sum()
    expected = floor.proj(out.reshape(2, 5, 8))
    assert torch.allclose(floor(x), expected, atol=1e-5)
    torch_threads = torch.get_num_threads()
    try:
        rows = bench.main(['--n-list', '16', '--embed-dims', '32', '--num-heads', '2',
                           '--num-reps', '2x2', '--mechanisms', 'CBSA', '--devices', 'cpu',
                           '--threads', '1', '--warmup', '1', '--repeat', '1', '--dtype',
                           'bfloat16', '--tokens-per-batch', '48', '--no-memory',
                           '--out-dir', str(tmp_path)])
    finally:
        torch.set_num_threads(torch_threads)
    assert {r['batch'] for r in rows} == {3} and {r['dtype'] for r in rows} == {'bfloat16'}
    capsys.readouterr()
    for argv, message in ((['--tokens-per-batch', '0'], '--tokens-per-batch must be >= 1'),
                          (['--n-list', '0'], '--n-list: token counts must be >= 1'),
                          (['--embed-dims', '10', '--num-heads', '3'],
                           '--embed-dims 10 is not a multiple of --num-heads 3'),
                          (['--num-reps', 'abc'], "--num-reps must be a positive m or 'RxC'"),
                          (['--devices', 'tpu'], "--devices: ['tpu'] unknown"),
                          (['--mechanisms', 'FOO'], "--mechanisms: not registered in MODELS: "
                                                    "['FOO']")):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv + (['--devices', 'cpu'] if '--devices' not in argv else []))
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count('\n') == 1, err
        assert err.startswith(f'benchmark_attention.py: error: {message}'), err


def test_mechanism_variants(bench, tmp_path, capsys):
    """``NAME:key=value[,...]`` measures a mechanism with other constructor arguments as
    its own row (after its mechanism), built with exactly those arguments; a variant that
    cannot be built is one line and exit status 2, before anything is timed."""
    import torch
    assert bench.split_variant('MiTA') == ('MiTA', {})
    assert bench.split_variant('MiTA:path=grouped,topk=9,query_block_size=4') == (
        'MiTA', {'path': 'grouped', 'topk': 9, 'query_block_size': 4})
    assert bench.available_mechanisms(['MiTA:path=grouped', 'CBSA', 'MiTA'], floor=False) == [
        'MHSA', 'CBSA', 'MiTA:path=grouped', 'MiTA']
    # the reference lines may be named (they are measured anyway)
    assert bench.available_mechanisms(['CBSA', 'LinearFloor', 'MHSA']) == [
        'MHSA', 'CBSA', 'LinearFloor']
    args = bench.parse_args(['--embed-dims', '32', '--num-heads', '2'])
    built = bench.build('MiTA:path=grouped,topk=9', args, torch.device('cpu'))
    assert (built.path, built.topk, built.embed_dims) == ('grouped', 9, 32)
    torch_threads = torch.get_num_threads()
    try:
        rows = bench.main(['--n-list', '64', '--embed-dims', '32', '--num-heads', '2',
                           '--mechanisms', 'MiTA:path=grouped,num_landmarks=4',
                           'MiTA:path=dense,num_landmarks=4', '--devices', 'cpu',
                           '--threads', '1', '--warmup', '0', '--repeat', '1', '--no-memory',
                           '--no-floor', '--out-dir', str(tmp_path)])
    finally:
        torch.set_num_threads(torch_threads)
    assert [r['mechanism'] for r in rows if r['mode'] == 'fwd'] == [
        'MHSA', 'MiTA:path=grouped,num_landmarks=4', 'MiTA:path=dense,num_landmarks=4']
    assert all(r['time_ms'] > 0 for r in rows)
    capsys.readouterr()
    for spec, message in (('MiTA:foo=1', "'MiTA:foo=1': MiTA has no argument ['foo']"),
                          ('MiTA:path', "'MiTA:path': expected NAME:key=value"),
                          ('MiTA:', "'MiTA:': no key=value after the colon"),
                          ('MHSA:x=1', "'MHSA:x=1': the reference lines MHSA and LinearFloor"),
                          ('MiTA:path=fast', "'MiTA:path=fast': MiTA: path must be one of")):
        with pytest.raises(SystemExit) as exc:
            bench.main(['--mechanisms', spec, '--devices', 'cpu', '--out-dir', str(tmp_path)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count('\n') == 1, err
        assert err.startswith(f'benchmark_attention.py: error: --mechanisms: {message}'), err
