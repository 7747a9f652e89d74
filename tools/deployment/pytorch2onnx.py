"""Export the model of an mmseg or mmpretrain config, with a checkpoint, to ONNX.

The graph takes the normalised image batch ``input (B, 3, H, W)`` and returns
``logits`` and ``label`` (segmentors, whole-image inference at the input size) or
``logits`` and ``scores`` (classifiers); see docs/deployment.md. Needs the deploy extra:
``pip install -e ".[deploy]"``. The command line follows mmdeploy's ``torch2onnx``
(config, checkpoint, output, shape).

Examples::

    python tools/deployment/pytorch2onnx.py \\
        configs/depict/depict-sa_vit-tiny-p8_1xb8-300it_mini-ade20k-128x128.py \\
        work_dirs/quickstart/iter_300.pth --out work_dirs/quickstart/depict_sa.onnx \\
        --dynamic-shape --verify
    python tools/deployment/pytorch2onnx.py CONFIG CKPT --out model.onnx \\
        --shape 1024 2048 --benchmark 10
"""
import argparse
import os.path as osp
import sys

import torch

from mmcbsa.cli import add_allow_partial_arg, add_cfg_options_arg, cli_main

PROG = 'pytorch2onnx.py'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0])
    parser.add_argument('config', help='mmseg or mmpretrain config file')
    parser.add_argument('checkpoint', help='checkpoint file (weights_only; must fit the model)')
    parser.add_argument('--out', required=True, help='output .onnx file')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'), default=None,
                        help="traced input size; default: the config's crop size (mmseg) "
                        'or test crop (mmpretrain). Multiples of the patch size')
    parser.add_argument('--dynamic-shape', action='store_true',
                        help='batch, height and width symbolic in the graph (any batch; any '
                        'multiple of the patch size)')
    parser.add_argument('--batch', type=int, default=1, help='images in the traced batch')
    parser.add_argument('--opset', type=int, default=18,
                        help='ONNX opset version, 18 (default, the lowest the exporter '
                        'writes) up to the installed onnx\'s newest')
    parser.add_argument('--verify', action='store_true',
                        help="run onnxruntime on a test image of the config's dataset (or "
                        '--verify-image) resized to the traced size, and, with '
                        '--dynamic-shape, also at a second size and batch; print the max '
                        'abs error against PyTorch')
    parser.add_argument('--verify-image', default=None, metavar='IMG',
                        help="image file for --verify instead of the dataset's first test "
                        'image')
    parser.add_argument('--benchmark', type=int, default=0, metavar='N',
                        help='time N forwards in onnxruntime and in PyTorch eager on the CPU '
                        '(same process, same threads) and print both')
    add_allow_partial_arg(parser)
    add_cfg_options_arg(parser)
    return parser.parse_args(argv)


def _verify_batches(cfg, model, shape, dynamic: bool, batch: int, image, divisor: int):
    """The config's first test image (or ``image``) through its pipeline and the model's
    data preprocessor, at ``shape``; with ``dynamic`` also at a second size (one patch
    more in height, two in width) as a batch of ``batch + 1``."""
    from mmcbsa.analysis.runtime import single_image_batch
    sizes = [(tuple(shape), batch)]
    if dynamic:
        sizes.append(((shape[0] + divisor, shape[1] + 2 * divisor), batch + 1))
    batches = []
    for size, n in sizes:
        try:
            data = single_image_batch(cfg, image=image, size=size)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f'--verify needs a test image: {exc} (give one with '
                                    '--verify-image IMG, or set the dataset with '
                                    '--cfg-options test_dataloader.dataset.data_root=PATH)'
                                    ) from None
        except ValueError as exc:  # e.g. a file that is not an image
            raise ValueError(f'--verify: {exc}') from None
        with torch.no_grad():
            x = model.data_preprocessor(data, False)['inputs'].float()
        batches.append(x.expand(n, -1, -1, -1).contiguous())
    return batches


def _normalisation(cfg) -> str:
    """What a runtime must do to an image before the graph: the config's data
    preprocessor (channel order, mean, std)."""
    pre = cfg.model.get('data_preprocessor') or cfg.get('data_preprocessor') or {}
    mean, std = pre.get('mean'), pre.get('std')
    if mean is None or std is None:
        return 'input = the image as the data preprocessor of the config hands it over'
    rgb = pre.get('bgr_to_rgb', pre.get('to_rgb', False))
    return (f'input = ({"RGB" if rgb else "BGR (as read by OpenCV)"} image - mean) / std, '
            f'mean={list(mean)}, std={list(std)} (the config\'s data_preprocessor)')


@cli_main
def main(argv=None) -> dict:
    args = parse_args(argv)
    from mmcbsa.deployment import (check_shape, export_onnx, require_onnx, size_divisor,
                                   time_onnx_and_torch, verify_onnx)
    require_onnx()
    for path, what in ((args.config, 'config file'), (args.checkpoint, 'checkpoint')):
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what} not found: {path}')
    if args.verify_image is not None and not osp.isfile(args.verify_image):
        raise FileNotFoundError(f'--verify-image not found: {args.verify_image}')
    if args.benchmark < 0:
        raise ValueError(f'--benchmark must be >= 0, got {args.benchmark}')
    from mmengine.config import Config

    import mmcbsa  # noqa: F401  (registers mmcbsa's modules)
    from mmcbsa.analysis import input_shape_from_config
    from mmcbsa.analysis.runtime import build_model
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if 'model' not in cfg:
        raise ValueError(f'{args.config} defines no model')
    model = build_model(cfg, args.checkpoint, 'cpu', args.allow_partial)
    divisor = size_divisor(model)
    shape = check_shape(args.shape or input_shape_from_config(cfg), divisor)
    report = export_onnx(model, args.out, shape, batch=args.batch,
                         dynamic=args.dynamic_shape, opset=args.opset)
    layout = (f'(B, 3, H, W), any B, H and W multiples of {divisor}' if report.dynamic
              else str((report.batch, 3, *shape)))
    print(f'{PROG}: wrote {report.path} ({report.size_bytes / 2**20:.1f} MiB, '
          f'{report.seconds:.1f} s): {report.task} model, input {report.input_name} {layout}, '
          f'outputs {", ".join(report.output_names)}, opset {report.opset}')
    print(f'{PROG}: {_normalisation(cfg)}')
    result = dict(report=report)
    if args.verify:
        batches = _verify_batches(cfg, model, shape, args.dynamic_shape, args.batch,
                                  args.verify_image, divisor)
        result['verify'] = verify_onnx(args.out, model, batches)
        for row in result['verify']:
            second = (f"label mismatch {row['label_mismatch']:.2%}" if 'label_mismatch' in row
                      else f"scores max abs error {row['max_abs_error_scores']:.3g}")
            print(f"{PROG}: verify input {row['shape']}: logits max abs error "
                  f"{row['max_abs_error']:.3g}, {second} (onnxruntime vs PyTorch)")
    if args.benchmark:
        images = torch.randn(args.batch, 3, *shape, generator=torch.Generator().manual_seed(0))
        result['benchmark'] = time_onnx_and_torch(args.out, model, images, args.benchmark)
        b = result['benchmark']
        print(f"{PROG}: CPU latency at {(args.batch, 3, *shape)}, {torch.get_num_threads()} "
              f"threads, median of {args.benchmark}: onnxruntime {b['ort_ms']:.1f} ms, "
              f"PyTorch eager {b['torch_ms']:.1f} ms, ratio {b['ratio']:.2f}")
    sys.stdout.flush()
    return result


if __name__ == '__main__':
    main()
