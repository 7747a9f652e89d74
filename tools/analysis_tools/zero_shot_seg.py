"""Emergent segmentation: foreground from attention maps alone, scored with mmseg's IoUMetric.

No decoder output is used (docs/mechanisms.md §9; ``mmcbsa.analysis.zero_shot``):

* ``attention-mass``: in one layer (default: the backbone's last layer with a CLS row),
  each head keeps the smallest set of patches holding ``--tau`` (0.6) of its query row's
  attention mass; the union over heads is the predicted foreground (CRATE / DINO);
* ``clusters`` (CBSA: ``argmax_r A[r, n]``; also MiTA's experts and TSSA's groups), per
  head: each part becomes foreground when most of its ground-truth pixels are
  foreground — the labelling looks at the ground truth, so this scores how well the
  parts follow the objects, not a prediction;
* ``grid-parts``: the same majority labelling of a regular grid with as many blocks as
  the clustering has parts (what the clusters must beat to show they follow objects);
* ``all-foreground``: everything foreground (the baseline the readings must beat).

Ground truth: the dataset's masks; foreground = every class not in
``--background-classes`` (names or indices; default: each image's most frequent class),
ignored pixels stay ignored. Each reading is scored by ``IoUMetric`` on two classes
(background, foreground). Classifier configs have no masks: pass ``--seg-data`` with an
mmseg config whose test dataset provides images and masks (the classifier sees those
images through its own data preprocessor).

Writes ``zero_shot_seg.csv`` (one row per reading), ``zero_shot_seg.png`` (the first
``--num-drawn`` images) and ``masks/<image>_<reading>.png`` (0 / 255) into ``--out-dir``.

Example::

    python tools/analysis_tools/zero_shot_seg.py \\
        configs/depict/depict-sa_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py \\
        --checkpoint work_dirs/quickstart/iter_300.pth --out-dir work_dirs/zero_shot \\
        --background-classes wall sky floor
"""
import argparse
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from mmengine.config import Config
from mmengine.utils import ProgressBar

import mmcbsa  # noqa: F401  (registers modules and checkpoint safe globals)
from mmcbsa.analysis import AttentionCapture, LayerRecord
from mmcbsa.analysis.capture import layer_labels
from mmcbsa.analysis.plots import label_overlay, mask_overlay, save_tile_grid, to_rgb_image
from mmcbsa.analysis.runtime import build_dataloader, build_model, forward_tensor, iter_batches
from mmcbsa.analysis.zero_shot import (binary_ground_truth, cls_foreground, grid_partition,
                                       grid_to_image, label_clusters_by_majority,
                                       score_binary_masks)
from mmcbsa.cli import (add_analysis_args, add_map_args, cli_main,
                        load_analysis_config, write_csv)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    add_analysis_args(parser)
    parser.add_argument('--num-images', type=int, default=None,
                        help='first images of the dataset (default: all)')
    parser.add_argument('--split', choices=['test', 'val'], default='test')
    parser.add_argument('--background-classes', nargs='+', default=None,
                        help='class names or indices that are background (default: each '
                        'image\'s most frequent class)')
    parser.add_argument('--tau', type=float, default=0.6,
                        help='attention mass kept per head (default 0.6)')
    parser.add_argument('--layer', default=None,
                        help='layer of the attention-mass reading, <group>.<i> (default: '
                        'the backbone\'s last layer with a CLS row)')
    parser.add_argument('--cluster-layer', default=None,
                        help='layer of the clustering reading (default: the backbone\'s last '
                        'layer with clusters, else the last layer with clusters)')
    parser.add_argument('--seg-data', default=None,
                        help='an mmseg config whose test dataset gives images and masks (for '
                        'classifier configs); --cfg-options apply to it too')
    parser.add_argument('--num-drawn', type=int, default=4,
                        help='images drawn in zero_shot_seg.png (default 4)')
    add_map_args(parser)
    return parser.parse_args(argv)


def background_ids(names: Optional[Sequence[str]], classes: Sequence[str]) -> Optional[List[int]]:
    """``--background-classes`` -> class indices (names, or integers)."""
    if names is None:
        return None
    ids = []
    lower = [c.lower() for c in classes]
    for item in names:
        if item.lstrip('-').isdigit():
            k = int(item)
            if not 0 <= k < len(classes):
                raise ValueError(f'--background-classes: index {k} is out of range for '
                                 f'{len(classes)} classes')
            ids.append(k)
        elif item.lower() in lower:
            ids.append(lower.index(item.lower()))
        else:
            raise ValueError(f'--background-classes: unknown class {item!r}; the dataset has '
                             f'{list(classes)[:20]}{" ..." if len(classes) > 20 else ""}')
    return ids


def pick_layer(records: List[LayerRecord], labels: List[str], wanted: Optional[str],
               kinds: Sequence[str], prefer_group: Optional[str], what: str) -> Optional[int]:
    """Index of the layer for a reading: ``wanted`` (a label), else the last layer with
    one of ``kinds`` in ``prefer_group`` (if any there), else anywhere."""
    has = [i for i, r in enumerate(records) if any(k in r.maps for k in kinds)]
    if wanted is not None:
        if wanted not in labels:
            raise ValueError(f'{what}: no layer {wanted!r}; layers: {labels}')
        i = labels.index(wanted)
        if i not in has:
            raise ValueError(f'{what}: layer {wanted!r} ({records[i].type}) has no '
                             f'{"/".join(kinds)} map; layers with one: '
                             f'{[labels[j] for j in has]}')
        return i
    preferred = [i for i in has if records[i].group == prefer_group]
    return (preferred or has or [None])[-1]


def cluster_parts(rec: LayerRecord) -> int:
    """Number of parts a layer's clustering can have: representatives (CBSA), experts
    (MiTA), groups (TSSA: one per head)."""
    for kind in ('reps', 'routed_keys'):
        if kind in rec.maps:
            return int(rec.maps[kind].shape[2])
    if 'groups' in rec.maps:
        return int(rec.maps['groups'].shape[1])
    return int(rec.maps['clusters'].max()) + 1


def _map_name(reading: str, rec: Optional[LayerRecord]) -> str:
    """The CSV's ``map`` column: which map of the layer a reading used."""
    if rec is None:
        return ''
    if reading == 'attention-mass':
        return _row_kind(rec)
    if reading == 'grid-parts':
        return f'{cluster_parts(rec)} blocks'
    return 'clusters'


def _row_kind(rec: LayerRecord) -> str:
    return 'cls' if 'cls' in rec.maps else 'mean'


@cli_main
def main(argv=None) -> Dict[str, Dict[str, float]]:
    args = parse_args(argv)
    if not 0 < args.tau <= 1:
        raise ValueError(f'--tau must be in (0, 1], got {args.tau}')
    if args.num_drawn <= 0 or args.tile_size < 16:
        raise ValueError(f'--num-drawn must be positive and --tile-size at least 16, got '
                         f'{args.num_drawn} and {args.tile_size}')
    cfg = load_analysis_config(args)
    if args.seg_data is not None:
        if not osp.isfile(args.seg_data):
            raise FileNotFoundError(f'--seg-data config not found: {args.seg_data}')
        data_cfg = Config.fromfile(args.seg_data)
        if args.cfg_options:
            data_cfg.merge_from_dict(args.cfg_options)
    elif cfg.get('default_scope') == 'mmpretrain':
        raise ValueError(f'{args.config} is a classification (mmpretrain) config: zero-shot '
                         'segmentation needs ground-truth masks; pass --seg-data with an '
                         'mmseg config whose test dataset provides them')
    else:
        data_cfg = cfg
    model = build_model(cfg, args.checkpoint, args.device, args.allow_partial)
    loader = build_dataloader(data_cfg, args.split, args.num_images)
    classes = loader.dataset.metainfo.get('classes') or ()
    bg = background_ids(args.background_classes, classes)
    ignore = int((data_cfg.get(f'{args.split}_evaluator') or {}).get('ignore_index', 255))
    mask_dir = osp.join(args.out_dir, 'masks')
    os.makedirs(mask_dir, exist_ok=True)

    total = len(loader.dataset)
    print(f'[zero_shot_seg] {total} images')
    bar = ProgressBar(total)
    preds: Dict[str, List[torch.Tensor]] = {}
    gts: List[torch.Tensor] = []
    drawn: List[list] = []
    mass_i = cluster_i = None
    with AttentionCapture(model, projections=False, maps=True, ista=False,
                          query=args.query) as cap:
        for batch in iter_batches(loader, args.num_images):
            cap.clear()
            data = forward_tensor(model, batch)
            records, labels = cap.layers, layer_labels(cap.layers)
            if not gts:  # first batch: which layers are read
                mass_i = pick_layer(records, labels, args.layer, ('cls', 'mean'), 'backbone',
                                    '--layer')
                cluster_i = pick_layer(records, labels, args.cluster_layer, ('clusters', ),
                                       'backbone', '--cluster-layer')
                if mass_i is None and cluster_i is None:
                    raise ValueError('no attention map to read: the model has no layer with '
                                     'a CLS/mean row or clusters (attention types: '
                                     f'{sorted({r.type for r in records})})')
            input_shape = data['inputs'].shape[-2:]
            for b, sample in enumerate(data['data_samples']):
                gt_full = sample.gt_sem_seg.data[0].cpu()
                img_shape = sample.metainfo.get('img_shape', input_shape)
                gt = binary_ground_truth(gt_full, bg, ignore)
                gts.append(gt)
                to_img = lambda g: grid_to_image(g.cpu(), input_shape, img_shape,  # noqa
                                                 gt.shape)
                stem = osp.splitext(osp.basename(sample.metainfo.get('img_path',
                                                                     f'{len(gts):06d}')))[0]
                current = {'all-foreground': torch.ones_like(gt)}
                cluster_tiles = []
                if mass_i is not None:
                    rec = records[mass_i]
                    fg = cls_foreground(rec.maps[_row_kind(rec)][b:b + 1], args.tau)[0]
                    current['attention-mass'] = to_img(fg.long())
                if cluster_i is not None:
                    maps = records[cluster_i].maps['clusters'][b]  # (H, 1, h, w)
                    blocks = grid_partition(*maps.shape[-2:], cluster_parts(records[cluster_i]))
                    current['grid-parts'] = label_clusters_by_majority(to_img(blocks), gt,
                                                                       ignore)
                    for h in range(maps.shape[0]):
                        parts = to_img(maps[h, 0])
                        current[f'clusters/head{h}'] = label_clusters_by_majority(
                            parts, gt, ignore)
                        cluster_tiles.append(parts)
                for name, mask in current.items():
                    preds.setdefault(name, []).append(mask)
                    if name not in ('all-foreground', 'grid-parts'):
                        cv2.imwrite(osp.join(mask_dir, f'{stem}_{name.replace("/", "-")}.png'),
                                    (mask.numpy() * 255).astype(np.uint8))
                if len(drawn) < args.num_drawn:
                    drawn.append([to_rgb_image(batch['inputs'][b]), gt, current,
                                  cluster_tiles])
                bar.update()
    print()
    results = {name: score_binary_masks(p, gts, ignore) for name, p in preds.items()}
    rows = []
    for name, res in results.items():
        layer_i = mass_i if name == 'attention-mass' else (
            cluster_i if name.startswith(('clusters', 'grid-parts')) else None)
        rec = records[layer_i] if layer_i is not None else None
        rows.append({'reading': name.split('/')[0],
                     'head': name.split('head')[-1] if '/head' in name else 'all',
                     'layer': labels[layer_i] if rec else '', 'module': rec.name if rec else '',
                     'type': rec.type if rec else '',
                     'map': _map_name(name, rec), 'images': len(gts),
                     **{k: f'{v:.4f}' for k, v in res.items()}})
    csv_path = osp.join(args.out_dir, 'zero_shot_seg.csv')
    write_csv(csv_path, rows)
    png_path = osp.join(args.out_dir, 'zero_shot_seg.png')
    weights = (f'checkpoint {osp.basename(args.checkpoint)}' if args.checkpoint
               else 'untrained (the config\'s initialisation)')
    read = []
    if mass_i is not None:
        read.append(f'attention mass from {labels[mass_i]} ({records[mass_i].type}, '
                    f'tau={args.tau})')
    if cluster_i is not None:
        read.append(f'clusters from {labels[cluster_i]} ({records[cluster_i].type})')
    title = (f'zero-shot foreground, {osp.basename(args.config)}, {weights}: '
             + '; '.join(read) + f'; IoU over {len(gts)} images')
    _draw(drawn, results, png_path, ignore, args.tile_size, title)
    best = max((n for n in results if n.startswith('clusters')),
               key=lambda n: results[n]['IoU.foreground'], default=None)
    parts = []
    if mass_i is not None:
        parts.append(f'attention-mass ({labels[mass_i]}, {records[mass_i].type}, '
                     f'tau={args.tau}) {results["attention-mass"]["IoU.foreground"]:.2f}')
    if best is not None:
        parts.append(f'clusters ({labels[cluster_i]}, {records[cluster_i].type}, best '
                     f'{best.split("/")[1]}) {results[best]["IoU.foreground"]:.2f}')
    if 'grid-parts' in results:
        parts.append(f'grid of as many parts {results["grid-parts"]["IoU.foreground"]:.2f}')
    parts.append(f'all-foreground {results["all-foreground"]["IoU.foreground"]:.2f}')
    print(f'zero-shot foreground IoU on {len(gts)} images: ' + ', '.join(parts)
          + f'; wrote {csv_path}, {png_path} and {mask_dir}/')
    return results


def _draw(drawn: list, results: Dict[str, Dict[str, float]], path: str, ignore: int,
          tile_size: int, title: str) -> None:
    """The first images, one row each: image, ground-truth foreground, each reading (with
    its IoU over all images in the column title); a legend says which readings use the
    ground truth."""
    best = max((n for n in results if n.startswith('clusters')),
               key=lambda n: results[n]['IoU.foreground'], default=None)
    tiles = []
    for image, gt, current, cluster_tiles in drawn:
        ign = gt.numpy() == ignore
        row = [image, mask_overlay(image, gt.numpy() == 1, ign)]
        if 'attention-mass' in current:
            row.append(mask_overlay(image, current['attention-mass'].numpy() == 1))
        if best is not None:
            h = int(best.split('head')[-1])
            row.append(label_overlay(image, cluster_tiles[h].numpy()))
            row.append(mask_overlay(image, current[best].numpy() == 1))
        tiles.append(row)
    iou = lambda name: results[name]['IoU.foreground']  # noqa: E731
    cols = ['image', 'ground-truth foreground']
    legend = ['green: foreground, grey: pixels the metric ignores; IoU = foreground IoU '
              'over all images (mmseg IoUMetric).']
    if drawn and 'attention-mass' in drawn[0][2]:
        cols.append(f'attention mass (no labels used), IoU {iou("attention-mass"):.1f} %')
    if best is not None:
        head = best.split('/')[1]
        cols += [f'clusters ({head}): one colour per cluster',
                 f'clusters -> foreground by ground-truth majority, IoU {iou(best):.1f} %']
        legend.append('"clusters -> foreground" USES THE GROUND TRUTH: each cluster takes the '
                      'majority label of its pixels, an upper bound for that clustering, not a '
                      f'zero-shot reading (baseline: a grid of as many parts, IoU '
                      f'{iou("grid-parts"):.1f} %).')
    save_tile_grid(tiles, path, None, cols, title=title, tile_px=tile_size, legend=legend)


if __name__ == '__main__':
    main()
