"""Robustness to weight perturbations: the config's real metric under Gaussian noise.

DEPICT's experiment (docs/mechanisms.md §9): add ``N(0, σ²)`` to every parameter of the
decode head (``--scope head``), the backbone or the whole model, for each ``σ`` of
``--sigmas`` and ``--seeds`` random draws, and evaluate. The evaluation is the config's
own: mmengine's ``Runner.test()`` with its test dataloader and evaluator (mmseg
``IoUMetric`` -> mIoU, mmpretrain ``Accuracy`` -> top-1). Before every run the clean
weights are restored from a copy, so the runs are independent; ``σ = 0`` reproduces the
clean metric exactly. ``--orthogonal`` also applies DEPICT's random orthogonal
transforms of ``U`` in the head's tied MSSA layers (``whole``: ``Q U``; ``per_head``:
``Q_h U_h``) — per-head rotations leave a tied layer's function unchanged, whole ones
mix the heads' subspaces (see ``mmcbsa.analysis.perturb``). ``--params REGEX`` restricts
the noise to the parameters of the scope whose names match (e.g. ``in_proj``: only ``U``).

Writes ``perturb_robustness.csv`` (one row per run) and ``perturb_robustness.png`` (metric
against σ, mean ± std over seeds; orthogonal transforms as bars) into ``--out-dir``; the
runner's own logs go to ``--out-dir/runner``.

Example::

    python tools/analysis_tools/perturb_robustness.py \\
        configs/depict/depict-sa_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py \\
        --checkpoint work_dirs/quickstart/iter_300.pth --out-dir work_dirs/robustness \\
        --scope head --seeds 3 --orthogonal
"""
import argparse
import os.path as osp
from typing import Dict, List

import numpy as np
import torch
from mmengine.runner.utils import set_random_seed
from mmengine.utils import ProgressBar

import mmcbsa  # noqa: F401  (registers modules and checkpoint safe globals)
from mmcbsa.analysis.perturb import (ORTHOGONAL_MODES, SCOPES, orthogonal_transform_,
                                     perturb_parameters_, scope_parameters, tied_mssa_layers)
from mmcbsa.analysis.plots import new_figure, set_title
from mmcbsa.analysis.runtime import config_seed, resolve_device, unwrap
from mmcbsa.cli import (add_analysis_args, build_runner, cli_main,
                        load_analysis_config, write_csv)
from mmcbsa.engine.weights import class_count_problem, load_weights

DEFAULT_SIGMAS = [float(f'{s:.4g}') for s in np.logspace(-3, 0, 7)]  # 1e-3 ... 1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_analysis_args(parser)
    parser.add_argument('--sigmas', type=float, nargs='+', default=DEFAULT_SIGMAS,
                        help='noise standard deviations (default: 7 on a log grid from 1e-3 '
                        'to 1)')
    parser.add_argument('--scope', choices=SCOPES, default='head',
                        help='parameters perturbed (default: head)')
    parser.add_argument('--params', default=None, metavar='REGEX',
                        help='only perturb the parameters of the scope whose name matches this '
                        'regular expression (e.g. in_proj: the U of MSSA / CBSA layers)')
    parser.add_argument('--seeds', type=int, default=3,
                        help='random draws per σ (seeds 0 .. N-1; default 3)')
    parser.add_argument('--orthogonal', action='store_true',
                        help='also apply random orthogonal transforms to U of the head\'s '
                        'tied MSSA layers (DEPICT heads)')
    parser.add_argument('--num-images', type=int, default=None,
                        help='evaluate on the first N test images (default: all)')
    parser.add_argument('--metric', default=None,
                        help='metric key reported (default: mIoU, else accuracy/top1)')
    parser.add_argument('--verbose', action='store_true',
                        help='keep the runner\'s INFO logs (per-class tables) on screen')
    return parser.parse_args(argv)


def _metric_key(metrics: Dict[str, float], wanted) -> str:
    if wanted is not None:
        if wanted not in metrics:
            raise ValueError(f'--metric {wanted!r} is not among the metrics {list(metrics)}')
        return wanted
    for key in ('mIoU', 'accuracy/top1'):
        if key in metrics:
            return key
    numeric = [k for k, v in metrics.items() if isinstance(v, (int, float))]
    if not numeric:
        raise ValueError(f'no numeric metric in {metrics}')
    return numeric[0]


def plot(rows: List[dict], path: str, key: str, title: str) -> None:
    clean = [float(r['value']) for r in rows if r['transform'] == 'none'][0]
    noise = [r for r in rows if r['transform'] == 'gaussian']
    ortho = [r for r in rows if r['transform'] == 'orthogonal']
    fig = new_figure(8.0 if ortho else 5.0, 3.4)
    axes = fig.subplots(1, 2 if ortho else 1, squeeze=False,
                        gridspec_kw=dict(width_ratios=[2, 1]) if ortho else None)[0]
    sigmas = sorted({float(r['sigma']) for r in noise})
    pos = [s for s in sigmas if s > 0]
    if pos:
        vals = [[float(r['value']) for r in noise if float(r['sigma']) == s] for s in pos]
        where = noise[0]['scope'] + (f' /{noise[0]["params"]}/' if noise[0]['params'] else '')
        axes[0].errorbar(pos, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals],
                         marker='o', capsize=3, label=f'N(0, σ²) on {where}')
        axes[0].set_xscale('log')
    axes[0].axhline(clean, color='grey', linestyle='--', label='clean')
    axes[0].set_xlabel('σ', fontsize=8)
    axes[0].set_ylabel(key, fontsize=8)
    axes[0].grid(linestyle='--', alpha=0.5)
    axes[0].legend(fontsize=7)
    if ortho:
        names = ['clean'] + [m for m in ORTHOGONAL_MODES if any(r['mode'] == m for r in ortho)]
        vals = [[clean]] + [[float(r['value']) for r in ortho if r['mode'] == m]
                            for m in names[1:]]
        axes[1].bar(range(len(names)), [np.mean(v) for v in vals],
                    yerr=[np.std(v) for v in vals], capsize=3,
                    color=['grey'] + ['C1'] * (len(names) - 1))
        axes[1].set_xticks(range(len(names)))
        axes[1].set_xticklabels(['clean'] + [f'Q {m}' for m in names[1:]], fontsize=8)
        axes[1].set_title('orthogonal U transforms', fontsize=8)
        axes[1].set_ylabel(key, fontsize=8)
        axes[1].grid(axis='y', linestyle='--', alpha=0.5)
    set_title(fig, title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


@cli_main
def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    if args.seeds <= 0:
        raise ValueError(f'--seeds must be positive, got {args.seeds}')
    if any(not s >= 0 for s in args.sigmas):
        raise ValueError(f'--sigmas must be >= 0, got {args.sigmas}')
    if args.num_images is not None and args.num_images <= 0:
        raise ValueError(f'--num-images must be positive, got {args.num_images}')
    device = resolve_device(args.device)
    cfg = load_analysis_config(args)
    cfg.work_dir = osp.join(args.out_dir, 'runner')
    cfg.load_from = None  # loaded below, by the fit-checking loader
    cfg.resume = False
    cfg.launcher = 'none'
    if not args.verbose:
        cfg.log_level = 'WARNING'
    if args.num_images is not None:
        cfg.test_dataloader.dataset.indices = args.num_images
    if cfg.get('visualizer'):  # mmengine reuses visualizers by name: one per output dir
        cfg.visualizer.name = f'perturb_robustness:{osp.abspath(args.out_dir)}'

    runner = build_runner(cfg)
    model = unwrap(runner.model)
    if args.checkpoint is not None:  # weights that do not fit are refused (exit status 2)
        load_weights(model, args.checkpoint, args.allow_partial)
    else:  # the config's initialisation, as the other tools
        set_random_seed(config_seed(cfg))
        model.init_weights()
    problem = class_count_problem(cfg, model)  # else every metric is silently wrong
    if problem:
        raise ValueError(problem)
    model.to(device)
    perturbed = list(scope_parameters(model, args.scope, args.params))  # fails early
    if not perturbed:
        raise ValueError(f'--params {args.params!r} matches no parameter in scope '
                         f'{args.scope!r}')
    if args.orthogonal and not tied_mssa_layers(model, 'head'):
        raise ValueError('--orthogonal needs a DEPICT decode head (tied-projection MSSA '
                         'layers); this model has none')
    clean_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    runs = [('none', None, None, None)]
    runs += [('gaussian', s, None, seed) for s in args.sigmas for seed in range(args.seeds)]
    if args.orthogonal:
        runs += [('orthogonal', None, m, seed) for m in ORTHOGONAL_MODES
                 for seed in range(args.seeds)]
    print(f'[perturb_robustness] {len(runs)} evaluations of '
          f'{len(runner.test_dataloader.dataset)} images')
    bar = ProgressBar(len(runs))
    rows, key = [], None
    for transform, sigma, mode, seed in runs:
        model.load_state_dict(clean_state)
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        if transform == 'gaussian':
            perturb_parameters_(model, sigma, args.scope, gen, args.params)
        elif transform == 'orthogonal':
            orthogonal_transform_(model, mode, 'head', gen)
        metrics = runner.test()
        key = key or _metric_key(metrics, args.metric)
        rows.append(dict(transform=transform,
                         scope=args.scope if transform == 'gaussian' else
                         ('head' if transform == 'orthogonal' else ''),
                         params=(args.params or '') if transform == 'gaussian' else '',
                         sigma='' if sigma is None else sigma, mode=mode or '',
                         seed='' if seed is None else seed, metric=key,
                         value=f'{float(metrics[key]):.4f}'))
        bar.update()
    print()
    model.load_state_dict(clean_state)
    csv_path = osp.join(args.out_dir, 'perturb_robustness.csv')
    png_path = osp.join(args.out_dir, 'perturb_robustness.png')
    write_csv(csv_path, rows)
    weights = (f'checkpoint {osp.basename(args.checkpoint)}' if args.checkpoint
               else 'untrained (the config\'s initialisation)')
    plot(rows, png_path, key, f'{osp.basename(args.config)}, {weights}: {key} under weight '
         f'noise, mean ± std over {args.seeds} seed(s)')
    clean = float(rows[0]['value'])
    means = []
    for s in args.sigmas:
        v = [float(r['value']) for r in rows if r['transform'] == 'gaussian' and r['sigma'] == s]
        means.append(f'{s:g}: {np.mean(v):.2f}')
    where = args.scope + (f' /{args.params}/' if args.params else '')
    text = f'{key} clean {clean:.2f}; σ on {where} ({args.seeds} seeds) ' + ', '.join(means)
    if args.orthogonal:
        text += '; orthogonal ' + ', '.join(
            f'{m} {np.mean([float(r["value"]) for r in rows if r["mode"] == m]):.2f}'
            for m in ORTHOGONAL_MODES)
    print(text + f'; wrote {csv_path} and {png_path}')
    return rows


if __name__ == '__main__':
    main()
