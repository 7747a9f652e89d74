"""Draw every attention layer's maps over an image, per layer and head.

One forward pass of the config's model on one image, with every attention's recording
switched on (``mmcbsa.analysis.AttentionCapture``); the maps of docs/mechanisms.md §9,
each over the image:

* softmax attention (MHSA, MSSA, mmseg/mmpretrain ViTs): the CLS row of the ``N × N``
  attention (``mean row``: the mean over the patch queries, for layers without exactly
  one prefix token, e.g. decode heads whose prefix tokens are class embeddings);
* CBSA: the CLS row of ``AᵀA``, each representative's extraction row ``A[r]`` (``--num-rows``
  of them, evenly spaced) and the clustering ``argmax_r A[r, n]``;
* TSSA: the soft group assignment ``π`` per head and the hard groups;
* MiTA: the expert of every token and each expert's routed keys.

Writes ``attention_<layer>.png`` per layer (a row per head), ``attention_overview.png``
(layers × heads, the main map of each) and ``attention_maps.csv`` (per layer, head and map:
grid, value range, entropy, number of parts) into ``--out-dir``. Layers are named
``<group>.<i>`` (``backbone.3``, ``decode_head.0``). No checkpoint: the config's
initialisation.

Examples::

    python tools/analysis_tools/visualize_attention.py \\
        configs/depict/depict-sa_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py \\
        --checkpoint work_dirs/quickstart/iter_300.pth --out-dir work_dirs/attention
    python tools/analysis_tools/visualize_attention.py CONFIG --image cat.jpg \\
        --size 448 448 --layers backbone.-1 --heads 0 1 --out-dir work_dirs/attention
"""
import argparse
import os.path as osp
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

import mmcbsa  # noqa: F401  (registers modules and checkpoint safe globals)
from mmcbsa.analysis import AttentionCapture, LayerRecord
from mmcbsa.analysis.capture import layer_labels
from mmcbsa.analysis.plots import (heat_overlay, label_overlay, save_tile_grid, to_rgb_image,
                                   upsample_grid)
from mmcbsa.analysis.runtime import build_model, forward_tensor, single_image_batch
from mmcbsa.cli import (add_analysis_args, add_map_args, cli_main,
                        load_analysis_config, write_csv)

ROW_MAPS = ('cls', 'mean')  # token-to-token query rows
TITLES = {'cls': 'CLS row', 'mean': 'mean row', 'groups': 'group π', 'clusters': 'clusters',
          'reps': 'rep', 'routed_keys': 'keys of expert'}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_analysis_args(parser)
    src = parser.add_mutually_exclusive_group()
    src.add_argument('--image', default=None, help='an image file (the config\'s test '
                     'pipeline is applied, without annotations)')
    src.add_argument('--index', type=int, default=None,
                     help='index of an image of the config\'s test dataset (default: 0)')
    parser.add_argument('--split', choices=['test', 'val'], default='test')
    parser.add_argument('--size', type=int, nargs=2, default=None, metavar=('H', 'W'),
                        help='resize the image to exactly H x W instead of the pipeline\'s '
                        'resizing (the reference notebooks use 960 x 960)')
    parser.add_argument('--layers', nargs='+', default=None,
                        help='layers to draw: names (backbone.3, decode_head.-1) or indices '
                        'in forward order over all layers with maps (-1: the last); default '
                        'all')
    parser.add_argument('--heads', type=int, nargs='+', default=None,
                        help='heads to draw (default all)')
    parser.add_argument('--num-rows', type=int, default=6,
                        help='representatives / experts drawn per head (evenly spaced)')
    add_map_args(parser)
    return parser.parse_args(argv)


def select_layers(records: List[LayerRecord], labels: List[str],
                  wanted: Optional[List[str]]) -> List[int]:
    """Indices into ``records`` (those with maps) named by ``wanted``."""
    with_maps = [i for i, r in enumerate(records) if r.maps]
    if wanted is None:
        return with_maps
    chosen = []
    for item in wanted:
        try:
            k = int(item)
        except ValueError:
            group, _, idx = item.rpartition('.')
            try:
                k = int(idx)
            except ValueError:
                raise ValueError(f'--layers: {item!r} is neither an index nor a '
                                 '<group>.<i> name') from None
            members = [i for i in with_maps if records[i].group == group]
            if not -len(members) <= k < len(members):
                raise ValueError(f'--layers: {item!r} not found; layers with maps: '
                                 f'{[labels[i] for i in with_maps]}')
            chosen.append(members[k])
            continue
        if not -len(with_maps) <= k < len(with_maps):
            raise ValueError(f'--layers: index {k} out of range for {len(with_maps)} layers '
                             f'with maps')
        chosen.append(with_maps[k])
    return list(dict.fromkeys(chosen))


def _spaced(n: int, k: int) -> List[int]:
    return sorted(set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()))


def _entropy(t: Tensor) -> float:
    """Mean entropy (nats) of the maps ``(..., h, w)`` normalised to sum 1."""
    flat = t.flatten(-2).double().clamp_min(0)
    p = flat / flat.sum(-1, keepdim=True).clamp_min(1e-300)
    return float(-(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean())


def layer_tiles(rec: LayerRecord, heads: List[int], image: np.ndarray,
                input_shape: Tuple[int, int], num_rows: int):
    """Rows (one per head) of overlays for one layer, their column titles, CSV rows."""
    up = lambda g: upsample_grid(g, input_shape, image.shape[:2])  # noqa: E731
    columns: List[Tuple[str, str, int]] = []  # (kind, title, row index in the map)
    for kind, maps in rec.maps.items():
        k = maps.shape[2]
        picks = _spaced(k, num_rows) if kind in ('reps', 'routed_keys') else [0]
        columns += [(kind, f'{TITLES.get(kind, kind)} {r}' if len(picks) > 1 or k > 1
                     else TITLES.get(kind, kind), r) for r in picks]
    rows, csv_rows = [], []
    for h in heads:
        tiles = [image]
        for kind, _, r in columns:
            maps = rec.maps[kind][0]  # (H_map, K, h, w)
            hm = min(h, maps.shape[0] - 1)
            grid = maps[hm, r]
            if grid.dtype in (torch.int64, torch.int32):
                tiles.append(label_overlay(image, up(grid)))
            else:
                tiles.append(heat_overlay(image, up(grid.float())))
        rows.append(tiles)
        for kind, maps in rec.maps.items():
            m = maps[0, min(h, maps.shape[1] - 1)]  # (B, H_map, K, h, w): head h of image 0
            categorical = m.dtype in (torch.int64, torch.int32)
            csv_rows.append(dict(
                map=kind, head=h, rows=m.shape[0], grid_h=m.shape[-2], grid_w=m.shape[-1],
                min=f'{float(m.min()):.6g}', max=f'{float(m.max()):.6g}',
                mean=f'{float(m.double().mean()):.6g}',
                entropy='' if categorical else f'{_entropy(m):.6f}',
                parts=int(torch.unique(m).numel()) if categorical else ''))
    return rows, ['image'] + [c[1] for c in columns], csv_rows


def _legend(maps) -> List[str]:
    """What the colours mean, for the map kinds drawn."""
    lines = []
    if any(k in maps for k in ('clusters', 'groups', 'experts')):
        lines.append('clusters / groups / experts: one colour per part (categorical, no '
                     'scale).')
    if 'routed_keys' in maps:
        lines.append('routed keys: the tokens an expert routes to.')
    return lines


def primary_map(rec: LayerRecord) -> Optional[str]:
    """The map drawn in the overview: a query row, else groups, else clusters."""
    for kind in ROW_MAPS + ('groups', 'clusters'):
        if kind in rec.maps:
            return kind
    return None


@cli_main
def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.num_rows <= 0 or args.tile_size < 16:
        raise ValueError(f'--num-rows must be positive and --tile-size at least 16, got '
                         f'{args.num_rows} and {args.tile_size}')
    cfg = load_analysis_config(args)
    model = build_model(cfg, args.checkpoint, args.device, args.allow_partial)
    batch = single_image_batch(cfg, args.image, args.index, args.size, args.split)
    with AttentionCapture(model, projections=False, maps=True, ista=False,
                          query=args.query) as cap:
        data = forward_tensor(model, batch)
    records, labels = cap.layers, layer_labels(cap.layers)
    if not any(r.maps for r in records):
        types = sorted({r.type for r in records}) or ['none found']
        raise ValueError(f'no attention maps were recorded; attention types in the model: '
                         f'{types} (see mmcbsa.analysis.MECHANISMS)')
    chosen = select_layers(records, labels, args.layers)
    weights = (f'checkpoint {osp.basename(args.checkpoint)}' if args.checkpoint
               else 'untrained (the config\'s initialisation)')
    image = to_rgb_image(batch['inputs'][0])
    input_shape = tuple(data['inputs'].shape[-2:])
    csv_rows, overview, overview_rows = [], [], []
    max_heads = max(records[i].num_heads for i in chosen)
    for i in chosen:
        rec = records[i]
        heads = list(range(rec.num_heads)) if args.heads is None else args.heads
        bad = [h for h in heads if not 0 <= h < rec.num_heads]
        if bad:
            raise ValueError(f'--heads {bad}: layer {labels[i]} has {rec.num_heads} heads')
        rows, cols, stats = layer_tiles(rec, heads, image, input_shape, args.num_rows)
        path = osp.join(args.out_dir, f'attention_{labels[i]}.png')
        save_tile_grid(rows, path, [f'head {h}' for h in heads], cols,
                       f'{labels[i]} ({rec.type}, {rec.name}), {rec.hw_shape[0]}x'
                       f'{rec.hw_shape[1]} patches, {rec.num_prefix} prefix tokens; {weights}',
                       tile_px=args.tile_size, colour_scale=True,
                       legend=_legend(rec.maps))
        for s in stats:
            csv_rows.append(dict(layer=labels[i], module=rec.name, type=rec.type,
                                 query=rec.query, **s))
        kind = primary_map(rec)
        tiles = [image]
        for h in heads:
            maps = rec.maps[kind][0]
            grid = maps[min(h, maps.shape[0] - 1), 0]
            up = upsample_grid(grid, input_shape, image.shape[:2])
            tiles.append(label_overlay(image, up) if kind == 'clusters' else
                         heat_overlay(image, up.astype(np.float64)))
        overview.append(tiles)
        overview_rows.append(f'{labels[i]}\n{TITLES.get(kind, kind)}')
    heads = range(max_heads) if args.heads is None else args.heads
    cols = ['image'] + [f'head {h}' for h in heads]
    save_tile_grid(overview, osp.join(args.out_dir, 'attention_overview.png'), overview_rows,
                   cols, title=f'attention maps, one row per layer: {osp.basename(args.config)}'
                   f', {weights}', tile_px=args.tile_size, colour_scale=True,
                   legend=_legend({k: None for i in chosen for k in records[i].maps}))
    csv_path = osp.join(args.out_dir, 'attention_maps.csv')
    write_csv(csv_path, csv_rows)
    src = args.image or f'{args.split} image {0 if args.index is None else args.index}'
    print(f'{len(chosen)} layers drawn ({", ".join(labels[i] for i in chosen)}) for {src} '
          f'({image.shape[0]}x{image.shape[1]}); wrote {len(chosen)} attention_<layer>.png, '
          f'attention_overview.png and {csv_path}')
    return dict(records=records, labels=labels, chosen=chosen, image=image)


if __name__ == '__main__':
    main()
