"""The one summary table of ``tools/gpu_check.sh``.

Reads what the check's steps wrote into its output directory and prints one Markdown
table (also written to ``gpu_check.md`` there):

* ``pytest_cuda.xml``: JUnit report of ``pytest -m cuda`` (passed / failed / skipped,
  with the skip reasons);
* ``benchmark_attention/benchmark_attention.csv``: fwd+bwd time and peak memory of
  every attention on CUDA at the largest token count, with the ratio to MHSA;
* ``train_throughput/train_throughput.csv``: training images/s of each segmentor
  and the ratio to mmseg's Segmenter ViT-S.

A step whose file is missing is reported as not run, with the reason (no CUDA device,
or see the log above).

Example::

    python tools/analysis_tools/gpu_check_report.py work_dirs/gpu_check
"""
import argparse
import csv
import os.path as osp
import xml.etree.ElementTree as ET
from collections import Counter
from typing import List, Tuple

Row = Tuple[str, str, str]


def _missing(what: str, cuda: bool) -> List[Row]:
    reason = 'failed or was interrupted, see the log above' if cuda else 'no CUDA device'
    return [(what, '-', f'not run ({reason})')]


def pytest_rows(path: str, cuda: bool) -> List[Row]:
    what = 'CUDA tests (pytest -m cuda)'
    if not osp.isfile(path):
        return _missing(what, cuda)
    cases = ET.parse(path).getroot().iter('testcase')
    outcome, reasons = Counter(), Counter()
    for case in cases:
        kinds = [child.tag for child in case if child.tag in ('failure', 'error', 'skipped')]
        kind = kinds[0] if kinds else 'passed'
        outcome[kind] += 1
        if kind == 'skipped':
            reasons[next(c for c in case if c.tag == 'skipped').get('message', '')] += 1
    text = ', '.join(f'{outcome[k]} {k}' for k in ('passed', 'failure', 'error', 'skipped')
                     if outcome[k]) or 'no tests collected'
    rows = [(what, 'all', text)]
    rows += [(what, 'skip reason', f'{n}× {r}') for r, n in reasons.items()]
    return rows


def benchmark_rows(path: str, cuda: bool) -> List[Row]:
    what = 'attention benchmark, cuda, fwd+bwd'
    if not osp.isfile(path):
        return _missing(what, cuda)
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r['device'] == 'cuda' and r['mode'] == 'fwd+bwd'
                and r['time_ms']]
    if not rows:
        return [(what, '-', 'no CUDA rows in the CSV')]
    n = max(int(r['n']) for r in rows)
    out = []
    for r in (r for r in rows if int(r['n']) == n):
        ratio = f", {float(r['time_ratio']):.2f}× MHSA" if r['time_ratio'] else ''
        mem = (f", peak {float(r['peak_mem_mb']):.0f} MiB" if r['peak_mem_mb'] else '')
        out.append((f'{what}, N={n}', r['mechanism'], f"{float(r['time_ms']):.2f} ms{ratio}{mem}"))
    return out


def throughput_rows(path: str, cuda: bool) -> List[Row]:
    what = 'training throughput'
    if not osp.isfile(path):
        return _missing(what, cuda)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    base = next((float(r['images_per_s']) for r in rows if r['model'] == 'segmenter-vit-s'),
                None)
    out = []
    for r in rows:
        ips = float(r['images_per_s'])
        ratio = f', {ips / base:.2f}× Segmenter ViT-S' if base else ''
        mem = f", peak {float(r['peak_mem_gib']):.1f} GiB" if r['peak_mem_gib'] else ''
        out.append((f"{what} ({r['device']}, {r['dtype']}, {r['img_size']}², batch "
                    f"{r['batch_size']})", r['model'], f'{ips:.1f} images/s{ratio}{mem}'))
    return out


def report(out_dir: str, cuda: bool) -> str:
    rows = (pytest_rows(osp.join(out_dir, 'pytest_cuda.xml'), cuda)
            + benchmark_rows(osp.join(out_dir, 'benchmark_attention',
                                      'benchmark_attention.csv'), cuda)
            + throughput_rows(osp.join(out_dir, 'train_throughput', 'train_throughput.csv'),
                              cuda))
    lines = ['| check | item | result |', '|---|---|---|']
    lines += [f'| {a} | {b} | {c} |' for a, b, c in rows]
    return '\n'.join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description='Summary table of tools/gpu_check.sh')
    parser.add_argument('out_dir', help="the check's output directory")
    args = parser.parse_args(argv)
    if not osp.isdir(args.out_dir):
        raise SystemExit(f'gpu_check_report.py: error: no directory {args.out_dir}')
    import torch
    table = report(args.out_dir, torch.cuda.is_available())
    with open(osp.join(args.out_dir, 'gpu_check.md'), 'w') as f:
        f.write(table + '\n')
    print(table)
    return table


if __name__ == '__main__':
    main()
