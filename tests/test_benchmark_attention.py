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
    assert '| cpu | 16 | fwd+bwd | CBSA |' in out
    assert (tmp_path / 'benchmark_attention.png').stat().st_size > 0
    with open(tmp_path / 'benchmark_attention.csv') as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) == 2 * 2 * 3  # N x mode x (MHSA, CBSA, TSSA)
    for r in rows:
        if r['mechanism'] == 'MHSA' and r['n'] == 64:  # above --max-quadratic-n: skipped
            assert r['time_ms'] is None and r['time_ratio'] is None
            continue
        assert r['time_ms'] > 0 and r['peak_mem_mb'] > 0
        if r['n'] == 16:
            assert r['time_ratio'] is not None
            if r['mechanism'] == 'MHSA':
                assert r['time_ratio'] == 1.0 and r['mem_ratio'] == 1.0
        else:
            assert r['time_ratio'] is None  # no baseline at this N
