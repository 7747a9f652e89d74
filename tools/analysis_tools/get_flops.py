"""Parameters and FLOPs of the model of any mmseg or mmpretrain config.

The config's ``default_scope`` decides the registry. Counting is
:func:`mmcbsa.analysis.model_complexity` (mmengine's ``FlopAnalyzer`` plus handles for
SDPA, ``nn.MultiheadAttention``'s fused path and ``baddbmm``): one multiply-add = one
FLOP, as in OpenMMLab's metafiles; papers that report 2 x multiply-adds (the CBSA
paper) correspond to the printed ``2 x MACs``. mmseg segmentors are counted on
``forward(inputs, mode='tensor')`` at the given size (encoder + decode head; no
auxiliary head, no slide inference, no resizing of the logits); mmpretrain
classifiers on backbone + neck + head. Operators the count skips are listed.

Examples::

    python tools/analysis_tools/get_flops.py configs/cbt/cbt-small_8xb32-lion-150e_in1k.py
    python tools/analysis_tools/get_flops.py \\
        configs/depict/depict-sa_vit-s_mask_8xb1-160k_ade20k-512x512.py --shape 512 512
    python tools/analysis_tools/get_flops.py CONFIG --shape 1024 2048 --table 2 \\
        --cfg-options model.decode_head.num_layers=2
"""
import argparse
import os.path as osp

import torch
from mmengine.config import Config

from mmcbsa.analysis import (FLOPS_CONVENTION, build_model_from_config,
                             input_shape_from_config, model_complexity)
from mmcbsa.cli import add_cfg_options_arg, user_errors

PROG = 'get_flops.py'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='mmseg or mmpretrain config file')
    parser.add_argument('--shape', type=int, nargs='+', metavar='SIZE',
                        help='input size "H W" (or one number for a square); default: '
                        "the config's crop size (mmseg: model.data_preprocessor.size, "
                        'mmpretrain: the test pipeline crop)')
    parser.add_argument('--channels', type=int, default=3, help='input channels')
    parser.add_argument('--table', type=int, nargs='?', const=3, default=None,
                        metavar='DEPTH', help='also print the per-module table (mmengine '
                        'complexity_stats_table) down to DEPTH (default 3)')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the random weights and input')
    add_cfg_options_arg(parser)
    return parser.parse_args(argv)


def _shape(args: argparse.Namespace, cfg: Config):
    if args.shape is None:
        return input_shape_from_config(cfg)
    if len(args.shape) == 1:
        return args.shape[0], args.shape[0]
    if len(args.shape) == 2:
        return tuple(args.shape)
    raise ValueError(f'--shape takes H W or one size, got {args.shape}')


def _fmt_ops(ops: dict) -> str:
    return ', '.join(f'{op.replace("aten::", "")} x{n}' for op, n in ops.items()) or 'none'


def main(argv=None) -> dict:
    args = parse_args(argv)
    with user_errors(PROG):
        if not osp.isfile(args.config):
            raise FileNotFoundError(f'config file not found: {args.config}')
        import mmcbsa  # noqa: F401  (registers mmcbsa's modules)
        cfg = Config.fromfile(args.config)
        if args.cfg_options is not None:
            cfg.merge_from_dict(args.cfg_options)
        h, w = _shape(args, cfg)
        if h <= 0 or w <= 0 or args.channels <= 0:
            raise ValueError(f'--shape/--channels must be positive, got {(args.channels, h, w)}')
        torch.manual_seed(args.seed)
        model = build_model_from_config(cfg)
        result = model_complexity(model, (args.channels, h, w), seed=args.seed,
                                  table_depth=args.table)
    scope = cfg.get('default_scope')
    print(f'config:  {args.config} (default_scope={scope}, model={type(model).__name__})')
    print(f'input:   1x{args.channels}x{h}x{w}')
    print(f"params:  {result['params']} ({result['params'] / 1e6:.3f} M)")
    print(f"FLOPs:   {result['flops']} ({result['flops'] / 1e9:.3f} G multiply-adds; "
          f"2 x MACs = {2 * result['flops'] / 1e9:.3f} G)")
    print(f'convention: {FLOPS_CONVENTION}')
    known = {k: v for k, v in result['uncounted'].items() if k not in result['unknown']}
    print(f'not counted (no multiply-adds by the convention): {_fmt_ops(known)}')
    print(f"unknown operators (no FLOP handle, NOT counted): {_fmt_ops(result['unknown'])}")
    if args.table is not None:
        print(result['table'])
    return result


if __name__ == '__main__':
    main()
