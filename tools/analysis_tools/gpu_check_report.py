"""The one summary table of ``tools/gpu_check.sh``.

Reads what the check's steps wrote into its output directory and prints one Markdown
table (also written to ``gpu_check.md`` there):

* ``pytest_cuda.xml``: JUnit report of ``pytest -m cuda`` (passed / failed / skipped,
  with the skip reasons);
* ``benchmark_attention/benchmark_attention.csv``: fwd+bwd time and peak memory of
  every attention on CUDA at the largest token count, with the ratio to MHSA;
* ``train_throughput/train_throughput.csv``: training images/s of each model and the
  ratio to its baseline (Segmenter ViT-S, DeiT);
* ``inference*/inference_throughput.csv``: inference latency / throughput, eager and
  compiled;

then one table of the speed targets (:data:`TARGETS`, issue 18) with the measured value
and whether each holds.

A step whose file is missing is reported as not run, with the reason (no CUDA device,
or see the log above).

Example::

    python tools/analysis_tools/gpu_check_report.py work_dirs/gpu_check
"""
import argparse
import csv
import glob
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


def _read(path: str) -> List[dict]:
    if not osp.isfile(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _path_note(row: dict) -> str:
    """``', CBSA path torch'`` for a row timed with another CBSA core than the default."""
    path = row.get('cbsa_path')
    return f', CBSA path {path}' if path not in (None, '', 'auto', 'n/a') else ''


def throughput_rows(paths: List[str], cuda: bool, what: str) -> List[Row]:
    rows = [r for p in paths for r in _read(p)]
    if not rows:
        return _missing(what, cuda)
    out = []
    for r in rows:
        ips = float(r['images_per_s'])
        ratio = f", {float(r['ratio']):.2f}× {r['baseline']}" if r.get('ratio') else ''
        mem = f", peak {float(r['peak_mem_gib']):.1f} GiB" if r.get('peak_mem_gib') else ''
        compiled = (', compiled' if r.get('compiled') == 'True' else '') + _path_note(r)
        out.append((f"{what} ({r['device']}, {r['dtype']}, {r['img_size']}², batch "
                    f"{r['batch_size']}{compiled})", r['model'],
                    f"{ips:.1f} images/s ({float(r['step_ms']):.2f} ms){ratio}{mem}"))
    return out


# (description, kind, selector, bound, le): ``le`` True means measured <= bound holds.
# kinds: 'attn' (fwd+bwd time / MHSA or / floor at N), 'train' / 'infer' (images/s ratio,
# or the latency ratio for batch 1).
TARGETS = [
    ('CBT-S + CBT head vs Segmenter ViT-S, 512², inference throughput, batch 32',
     'infer', dict(model='cbt-s-cbt-head', batch=32, img=512), 1.6, False),
    ('CBT-S + CBT head vs Segmenter ViT-S, 512², batch-1 latency (compiled allowed)',
     'latency', dict(model='cbt-s-cbt-head', batch=1, img=512), 0.7, True),
    ('CBT-S + CBT head vs Segmenter ViT-S, 512², training throughput, batch 8',
     'train', dict(model='cbt-s-cbt-head'), 2.0, False),
    ('CBT head on Segmenter ViT-S vs Segmenter, training throughput', 'train',
     dict(model='cbt-head-vit-s'), 1.0, False),
    ('DEPICT-SA head on Segmenter ViT-S vs Segmenter, training throughput', 'train',
     dict(model='depict-sa-vit-s'), 1.0, False),
    ('CBSA fwd+bwd vs SDPA, N=1024', 'attn', dict(mech='CBSA', n=1024), 0.9, True),
    ('CBSA fwd+bwd vs SDPA, N=4096', 'attn', dict(mech='CBSA', n=4096), 0.5, True),
    ('CBSA fwd+bwd vs SDPA, N=16384', 'attn', dict(mech='CBSA', n=16384), 0.25, True),
    ('CBSA fwd+bwd vs the linear-attention floor, N=65536', 'floor',
     dict(mech='CBSA', n=65536), 1.5, True),
    ('MiTA fwd+bwd vs SDPA, N=1024', 'attn', dict(mech='MiTA', n=1024), 1.2, True),
    ('MiTA fwd+bwd vs SDPA, N=16384', 'attn', dict(mech='MiTA', n=16384), 0.3, True),
]


def _measure(kind: str, sel: dict, bench: List[dict], train: List[dict],
             infer: List[dict]):
    """``(value, how)`` of one target, or ``(None, why)``."""
    if kind in ('attn', 'floor'):
        col = 'time_ratio' if kind == 'attn' else 'floor_ratio'
        # the mechanism or a variant of it (``MiTA:path=grouped``): the best row, named
        hit = [r for r in bench if r['device'] == 'cuda' and r['mode'] == 'fwd+bwd'
               and r['mechanism'].split(':')[0] == sel['mech'] and int(r['n']) == sel['n']
               and r.get(col)]
        if not hit:
            return None, 'not measured'
        r = min(hit, key=lambda r: float(r[col]))
        variant = f"{r['mechanism']}, " if r['mechanism'] != sel['mech'] else ''
        return float(r[col]), f"{variant}{float(r['time_ms']):.2f} ms, " \
            f"{r.get('dtype', '?')}, batch {r['batch']}"
    if kind == 'train':
        hit = [r for r in train if r['model'] == sel['model'] and r.get('ratio')]
        if not hit:
            return None, 'not measured'
        best = max(hit, key=lambda r: float(r['ratio']))
        return float(best['ratio']), f"{float(best['images_per_s']):.1f} images/s{_path_note(best)}"
    hit = [r for r in infer if r['model'] == sel['model'] and int(r['batch_size']) == sel['batch']
           and int(r['img_size']) == sel['img'] and r.get('ratio')]
    if not hit:
        return None, 'not measured'
    if kind == 'infer':
        best = max(hit, key=lambda r: float(r['ratio']))
        return float(best['ratio']), ('compiled' if best['compiled'] == 'True' else 'eager') \
            + _path_note(best)
    # latency ratio = 1 / throughput ratio at batch 1; the better of eager and compiled
    best = max(hit, key=lambda r: float(r['ratio']))
    return 1.0 / float(best['ratio']), ('compiled vs compiled' if best['compiled'] == 'True'
                                        else 'eager vs eager') + \
        f", {float(best['step_ms']):.2f} ms{_path_note(best)}"


def target_rows(out_dir: str) -> List[str]:
    bench = _read(osp.join(out_dir, 'benchmark_attention', 'benchmark_attention.csv'))
    train = _read(osp.join(out_dir, 'train_throughput', 'train_throughput.csv'))
    infer = [r for p in sorted(glob.glob(osp.join(out_dir, 'inference*',
                                                  'inference_throughput.csv')))
             for r in _read(p)]
    lines = ['| target | bound | measured | holds |', '|---|---:|---:|---|']
    for text, kind, sel, bound, le in TARGETS:
        value, how = _measure(kind, sel, bench, train, infer)
        if value is None:
            lines.append(f"| {text} | {'≤' if le else '≥'} {bound}× | {how} | n/a |")
            continue
        ok = value <= bound if le else value >= bound
        lines.append(f"| {text} | {'≤' if le else '≥'} {bound}× | {value:.2f}× ({how}) | "
                     f"{'yes' if ok else '**no**'} |")
    return lines


def report(out_dir: str, cuda: bool) -> str:
    rows = (pytest_rows(osp.join(out_dir, 'pytest_cuda.xml'), cuda)
            + benchmark_rows(osp.join(out_dir, 'benchmark_attention',
                                      'benchmark_attention.csv'), cuda)
            + throughput_rows([osp.join(out_dir, 'train_throughput', 'train_throughput.csv')],
                              cuda, 'training throughput')
            + throughput_rows(sorted(glob.glob(osp.join(out_dir, 'inference*',
                                                        'inference_throughput.csv'))),
                              cuda, 'inference'))
    lines = ['| check | item | result |', '|---|---|---|']
    lines += [f'| {a} | {b} | {c} |' for a, b, c in rows]
    lines += ['', 'Targets (issue 18; ratios in this run):', ''] + target_rows(out_dir)
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
