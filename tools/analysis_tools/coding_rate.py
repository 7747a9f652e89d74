"""Per-layer coding rate (and ISTA sparsity) of a model on its test images.

For every attention layer (backbone and decode head, in forward order) the coding rate
``Σ_h ½ logdet(I + p/(N·ε) Z_h Z_hᵀ)`` of its input projection is averaged over the first
``--num-images`` images of the config's test (or val) dataset (mean ± standard deviation),
and, where the block has ISTA (CBT, CRATE, ToST), the fraction of exact zeros of the ISTA
output (docs/mechanisms.md §9; ``mmcbsa.analysis.measure_compression``). Works for mmseg
segmentor and mmpretrain classifier configs.

Writes ``coding_rate.csv`` (one row per layer and weights) and ``coding_rate.png`` (curves
per part of the model) into ``--out-dir``; prints a one-line summary. With
``--training-log`` (a training work directory or its ``vis_data/scalars.json``) it also draws
what ``CodingRateHook`` logged during that training: ``coding_rate_training.png`` and
``coding_rate_training.csv`` (per layer, against the iteration).

Examples::

    python tools/analysis_tools/coding_rate.py \\
        configs/depict/depict-sa_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py \\
        --checkpoint work_dirs/quickstart/iter_300.pth --out-dir work_dirs/analysis \\
        --compare-init
"""
import argparse
import glob
import json
import os.path as osp
from typing import Dict, List, Optional

import numpy as np
from mmengine.utils import ProgressBar

import mmcbsa  # noqa: F401  (registers modules and checkpoint safe globals)
from mmcbsa.analysis import LayerCompression, measure_compression
from mmcbsa.analysis.plots import new_figure, set_title
from mmcbsa.analysis.runtime import build_dataloader, build_model, iter_batches
from mmcbsa.cli import (add_analysis_args, cli_main, load_analysis_config,
                        write_csv)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_analysis_args(parser)
    parser.add_argument('--num-images', type=int, default=16,
                        help='images of the dataset measured (the first ones; default 16)')
    parser.add_argument('--split', choices=['test', 'val'], default='test',
                        help='which dataloader of the config (default: test)')
    parser.add_argument('--eps', type=float, default=0.01,
                        help='the coding rate\'s ε, R = ½ logdet(I + p/(N·ε) Z Zᵀ); it is '
                        'CRATE\'s ε² (the CBSA reference code calls it eps and uses '
                        '0.01, the default: CRATE\'s ε = 0.1)')
    parser.add_argument('--compare-init', action='store_true',
                        help='also measure the config\'s initialisation (untrained weights) '
                        'on the same images and report what training changed per layer '
                        '(trained − init, mean ± std over the images)')
    parser.add_argument('--training-log', default=None,
                        help='a work directory (or its vis_data/scalars.json) of a training '
                        'run with CodingRateHook: also draw the logged values')
    return parser.parse_args(argv)


def read_training_log(path: str) -> Dict[str, List[tuple]]:
    """``{'coding_rate/<layer>' | 'sparsity/<layer>': [(step, value), ...]}`` from an
    mmengine ``scalars.json`` (the newest ``*/vis_data/scalars.json`` of a directory)."""
    if osp.isdir(path):
        found = sorted(glob.glob(osp.join(path, '*', 'vis_data', 'scalars.json')),
                       key=osp.getmtime)
        if not found:
            raise FileNotFoundError(f'--training-log: no */vis_data/scalars.json in {path}')
        path = found[-1]
    elif not osp.isfile(path):
        raise FileNotFoundError(f'--training-log: {path} not found')
    series: Dict[str, List[tuple]] = {}
    with open(path, errors='replace') as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                raise ValueError(f'--training-log: {path} is not an mmengine scalars.json '
                                 f'(line {number} is not JSON)') from None
            for key, value in record.items():
                if key.startswith(('coding_rate/', 'sparsity/')):
                    series.setdefault(key, []).append((int(record['step']), float(value)))
    if not series:
        raise ValueError(f'--training-log: {path} has no coding_rate/* scalars (was '
                         'CodingRateHook in custom_hooks?)')
    return series


def plot_training(series: Dict[str, List[tuple]], path: str, title: str) -> None:
    """Coding rate (and sparsity) of every layer against the training iteration, one
    panel per part of the model."""
    groups = list(dict.fromkeys(k.split('/')[1].split('.')[0] for k in series))
    kinds = [k for k in ('coding_rate', 'sparsity') if any(s.startswith(k) for s in series)]
    fig = new_figure(3.6 * len(groups), 3.2 * len(kinds) + 0.6)
    axes = fig.subplots(len(kinds), len(groups), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, group in enumerate(groups):
            ax = axes[i][j]
            for key, points in series.items():
                if key.startswith(f'{kind}/{group}.'):
                    steps, values = zip(*sorted(points))
                    ax.plot(steps, values, marker='.', label=key.split('/')[1])
            ax.set_title(group, fontsize=9)
            ax.set_xlabel('iteration', fontsize=8)
            ax.set_ylabel('coding rate  Σ_h R(Z_h)' if kind == 'coding_rate'
                          else 'ISTA sparsity', fontsize=8)
            ax.grid(linestyle='--', alpha=0.5)
            # below the axes: the curves start together at the initialisation, where a
            # legend inside would cover them
            ax.legend(fontsize=6, loc='upper center', bbox_to_anchor=(0.5, -0.28),
                      ncol=2, frameon=False)
    set_title(fig, title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def _measure(cfg, checkpoint: Optional[str], args, what: str) -> List[LayerCompression]:
    model = build_model(cfg, checkpoint, args.device, args.allow_partial)
    loader = build_dataloader(cfg, args.split, args.num_images)
    total = min(args.num_images, len(loader.dataset))
    print(f'[coding_rate] {what}: {total} images')
    bar = ProgressBar(total)

    def batches():
        for batch in iter_batches(loader, args.num_images):
            yield batch
            for _ in batch['inputs']:
                bar.update()

    layers = measure_compression(model, batches(), args.eps)
    print()
    if not layers:
        raise ValueError(f'{args.config}: no attention layer with a known input projection '
                         'was found (see mmcbsa.analysis.MECHANISMS)')
    return layers


def learned(trained: List[LayerCompression],
            init: List[LayerCompression]) -> Dict[str, tuple]:
    """``{layer: (mean, std)}`` over the images of the per-image difference of coding
    rates, trained − init (the same images in the same order): the part of a layer's
    coding rate that training changed. (An untrained white-box decoder already lowers the
    coding rate from layer to layer; only this difference is learned compression.)"""
    out = {}
    for t, i in zip(trained, init):
        diff = np.asarray(t.coding_rate, np.float64) - np.asarray(i.coding_rate, np.float64)
        out[t.label] = (float(diff.mean()), float(diff.std()))
    return out


def _rows(layers: List[LayerCompression], weights: str,
          change: Optional[Dict[str, tuple]] = None) -> List[Dict[str, object]]:
    rows = []
    for layer in layers:
        cr, cr_std = layer.coding_rate_mean_std
        sp, sp_std = layer.sparsity_mean_std
        d = (change or {}).get(layer.label)
        rows.append(dict(weights=weights, layer=layer.label, module=layer.name,
                         type=layer.type, heads=layer.num_heads, tokens=layer.num_tokens,
                         images=len(layer.coding_rate), coding_rate_mean=f'{cr:.6f}',
                         coding_rate_std=f'{cr_std:.6f}',
                         learned_mean='' if d is None else f'{d[0]:.6f}',
                         learned_std='' if d is None else f'{d[1]:.6f}',
                         sparsity_mean='' if not layer.sparsity else f'{sp:.6f}',
                         sparsity_std='' if not layer.sparsity else f'{sp_std:.6f}',
                         ista_module=layer.ista_name or ''))
    return rows


def plot(results: Dict[str, List[LayerCompression]], path: str, title: str,
         change: Optional[Dict[str, tuple]] = None) -> None:
    """One column per part of the model (backbone, decode_head, ...): coding rate per
    layer (mean ± std), below it what training changed (trained − init) when both were
    measured, and the ISTA sparsity where there is one."""
    first = next(iter(results.values()))
    groups = list(dict.fromkeys(layer.label.split('.')[0] for layer in first))
    has_sparsity = any(layer.sparsity for layers in results.values() for layer in layers)
    rows = 1 + bool(change) + has_sparsity
    sparsity_row = rows - 1
    fig = new_figure(3.4 * len(groups), 2.6 * rows + 0.4)
    axes = fig.subplots(rows, len(groups), squeeze=False)
    styles = {'checkpoint': dict(marker='o', linestyle='-'),
              'init': dict(marker='s', linestyle='--', alpha=0.7)}
    names = {'checkpoint': 'trained (checkpoint)', 'init': 'untrained (initialisation)'}
    for j, group in enumerate(groups):
        for weights, layers in results.items():
            sel = [layer for layer in layers if layer.label.split('.')[0] == group]
            x = np.arange(1, len(sel) + 1)
            mean = [layer.coding_rate_mean_std[0] for layer in sel]
            std = [layer.coding_rate_mean_std[1] for layer in sel]
            axes[0][j].errorbar(x, mean, yerr=std, capsize=3, label=names[weights],
                                **styles.get(weights, {}))
            axes[0][j].set_xticks(x)
            if has_sparsity:
                ss = [(i + 1, layer.sparsity_mean_std) for i, layer in enumerate(sel)
                      if layer.sparsity]
                if ss:
                    axes[sparsity_row][j].errorbar(
                        [s[0] for s in ss], [s[1][0] for s in ss], yerr=[s[1][1] for s in ss],
                        capsize=3, label=names[weights], **styles.get(weights, {}))
        if change:
            sel = [layer.label for layer in first if layer.label.split('.')[0] == group]
            x = np.arange(1, len(sel) + 1)
            ax = axes[1][j]
            ax.errorbar(x, [change[k][0] for k in sel], yerr=[change[k][1] for k in sel],
                        capsize=3, marker='o', color='tab:red', label='trained − init')
            ax.axhline(0, color='gray', linewidth=0.8)
            ax.set_xticks(x)
            ax.set_ylabel('learned change of Σ_h R', fontsize=8)
            ax.set_xlabel('layer', fontsize=8)
            ax.grid(linestyle='--', alpha=0.5)
            ax.legend(fontsize=7, loc='best')
        types = sorted({layer.type for layer in first if layer.label.split('.')[0] == group})
        axes[0][j].set_title(f'{group} ({", ".join(types)})', fontsize=9)
        axes[0][j].set_ylabel('coding rate  Σ_h R(Z_h)', fontsize=8)
        axes[0][j].set_xlabel('layer', fontsize=8)
        axes[0][j].grid(linestyle='--', alpha=0.5)
        axes[0][j].legend(fontsize=7)
        if has_sparsity:
            axes[sparsity_row][j].set_ylabel('ISTA sparsity (fraction of zeros)', fontsize=8)
            axes[sparsity_row][j].set_xlabel('layer', fontsize=8)
            axes[sparsity_row][j].grid(linestyle='--', alpha=0.5)
    set_title(fig, title + ' (mean ± std over the images)')
    fig.tight_layout()
    fig.savefig(path, dpi=80)


@cli_main
def main(argv=None) -> Dict[str, List[LayerCompression]]:
    args = parse_args(argv)
    if args.num_images <= 0:
        raise ValueError(f'--num-images must be positive, got {args.num_images}')
    series = read_training_log(args.training_log) if args.training_log else None  # first
    cfg = load_analysis_config(args)
    results = {}
    weights = 'checkpoint' if args.checkpoint else 'init'
    results[weights] = _measure(cfg, args.checkpoint, args, weights)
    if args.compare_init and args.checkpoint:
        results['init'] = _measure(cfg, None, args, 'init')
    change = learned(results['checkpoint'], results['init']) if len(results) == 2 else None
    rows = [row for w, layers in results.items()
            for row in _rows(layers, w, change if w == 'checkpoint' else None)]
    csv_path = osp.join(args.out_dir, 'coding_rate.csv')
    png_path = osp.join(args.out_dir, 'coding_rate.png')
    write_csv(csv_path, rows)
    plot(results, png_path, f'{osp.basename(args.config)}: coding rate of each attention '
         f'layer\'s input projection, ε = {args.eps:g} ({rows[0]["images"]} images)', change)
    parts = []
    for w, layers in results.items():
        groups = dict.fromkeys(layer.label.split('.')[0] for layer in layers)
        desc = []
        for g in groups:
            sel = [layer.coding_rate_mean_std[0] for layer in layers
                   if layer.label.split('.')[0] == g]
            desc.append(f'{g} {sel[0]:.1f} -> {sel[-1]:.1f}')
        sp = [layer.sparsity_mean_std[0] for layer in layers if layer.sparsity]
        if sp:
            desc.append(f'ISTA sparsity {sp[0]:.3f} -> {sp[-1]:.3f}')
        parts.append(f'{w}: ' + ', '.join(desc))
    if change:
        parts.append('learned (trained − init, mean ± std over images): ' + ', '.join(
            f'{k} {m:+.1f} ± {s:.1f}' for k, (m, s) in change.items()))
    written = f'{csv_path} and {png_path}'
    if series is not None:
        write_csv(osp.join(args.out_dir, 'coding_rate_training.csv'),
                  [dict(scalar=k, step=s, value=f'{v:.6f}')
                   for k, points in series.items() for s, v in sorted(points)])
        plot_training(series, osp.join(args.out_dir, 'coding_rate_training.png'),
                      f'coding rate logged by CodingRateHook during training '
                      f'({args.training_log}; mean over the hook\'s images)')
        written += ', coding_rate_training.csv/.png'
    print(f'coding rate, first -> last layer ({rows[0]["images"]} images): '
          + '; '.join(parts) + f'; wrote {written}')
    return results


if __name__ == '__main__':
    main()
