"""Evaluate a checkpoint with an mmsegmentation or mmpretrain config.

The config's ``default_scope`` decides the flavour of the options:

* ``mmseg``: ``--out DIR`` writes the predicted label maps as PNG files (IoUMetric's
  ``output_dir``; ADE20K-style ``reduce_zero_label`` datasets get their labels shifted
  back to 1..150) while the metric is still computed; ``--show-dir DIR`` draws
  image + ground truth + prediction with ``SegLocalVisualizer`` into ``DIR``;
  ``--tta`` uses the config's ``tta_pipeline``/``tta_model``.
* ``mmpretrain``: ``--out FILE.pkl`` dumps the predictions (``DumpResults``);
  ``--show-dir DIR`` enables the classification ``VisualizationHook``; ``--tta`` uses the
  config's ``tta_model``/``tta_pipeline`` or flip averaging (``AverageClsScoreTTA``).

``compile`` in the config (mmengine's switch: ``True`` or ``torch.compile`` arguments,
e.g. ``--cfg-options compile.mode=reduce-overhead`` for CUDA graphs) compiles the model's
``test_step`` as mmengine's Runner compiles ``train_step`` for training.

Checkpoints are read with ``torch.load(weights_only=True)`` (torch's default); importing
:mod:`mmcbsa` allow-lists what mmengine stores besides the weights.
"""
import argparse
import os.path as osp

from mmengine.config import Config

import mmcbsa  # noqa: F401  (registers modules and checkpoint safe globals)
from mmcbsa.cli import (add_allow_partial_arg, add_runner_args, build_runner,
                        export_local_rank, load_config, missing_data, user_errors)
from mmcbsa.engine.weights import check_weights, class_count_problem


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (evaluate) a checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir', help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out',
        type=str,
        help='mmseg: directory for the predicted label PNGs; mmpretrain: a .pkl file for '
        'the dumped predictions')
    parser.add_argument('--show', action='store_true', help='show results in a window')
    parser.add_argument('--show-dir', help='directory where painted results are saved')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='interval of --show (seconds)')
    parser.add_argument('--tta', action='store_true', help='test time augmentation')
    add_allow_partial_arg(parser)  # a checkpoint that does not fit is refused otherwise
    add_runner_args(parser)  # --cfg-options, --launcher, --local-rank
    args = parser.parse_args(argv)
    export_local_rank(args)
    return args


def _seg_options(cfg: Config, args) -> None:
    if args.show or args.show_dir:
        hooks = cfg.default_hooks
        if 'visualization' not in hooks:
            raise RuntimeError('--show/--show-dir need a "visualization" entry '
                               '(SegVisualizationHook) in cfg.default_hooks')
        hooks.visualization.draw = True
        hooks.visualization.interval = 1
        if args.show:
            hooks.visualization.show = True
            hooks.visualization.wait_time = args.wait_time
        if args.show_dir:
            cfg.visualizer.save_dir = args.show_dir
    if args.out is not None:
        # IoUMetric writes <image name>.png label maps and still computes the metric.
        cfg.test_evaluator.output_dir = args.out
    if args.tta:
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model


def _pretrain_options(cfg: Config, args) -> None:
    if args.show or args.show_dir:
        hooks = cfg.default_hooks
        if 'visualization' not in hooks:
            raise RuntimeError('--show/--show-dir need a "visualization" entry '
                               '(VisualizationHook) in cfg.default_hooks')
        hooks.visualization.enable = True
        hooks.visualization.show = args.show
        hooks.visualization.wait_time = args.wait_time
        hooks.visualization.out_dir = args.show_dir
        hooks.visualization.interval = 1
    if args.tta:
        if args.show or args.show_dir:
            raise ValueError('--tta cannot be combined with --show/--show-dir for mmpretrain '
                             'configs (its VisualizationHook cannot draw TTA batches)')
        if 'tta_model' not in cfg:
            cfg.tta_model = dict(type='mmpretrain.AverageClsScoreTTA')
        if 'tta_pipeline' not in cfg:
            # Horizontal-flip averaging on top of the test pipeline.
            test_pipeline = list(cfg.test_dataloader.dataset.pipeline)
            cfg.tta_pipeline = test_pipeline[:-1] + [
                dict(type='TestTimeAug',
                     transforms=[[dict(type='RandomFlip', prob=0.),
                                  dict(type='RandomFlip', prob=1.)],
                                 [test_pipeline[-1]]])
            ]
        cfg.tta_model.module = cfg.model
        cfg.model = cfg.tta_model
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline


def build_cfg(args) -> Config:
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    cfg = load_config(args)  # launcher, --cfg-options, work_dir as in tools/train.py
    cfg.load_from = args.checkpoint

    scope = cfg.get('default_scope', 'mmseg')
    if scope == 'mmpretrain':
        if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out must be a .pkl file for mmpretrain configs')
        _pretrain_options(cfg, args)
    else:
        _seg_options(cfg, args)
    return cfg


def compile_test_step(runner, compile_cfg) -> None:
    """``runner.model.test_step = torch.compile(test_step, **compile_cfg)`` for the
    config's ``compile`` (``True``: torch's defaults; a dict: its arguments), the rule of
    mmengine's Runner for ``train_step``; nothing for ``None`` / ``False``."""
    if compile_cfg is None or compile_cfg is False:
        return
    if compile_cfg is True:
        compile_cfg = {}
    if not isinstance(compile_cfg, dict):
        raise ValueError(f'compile must be True, False or a dict of torch.compile '
                         f'arguments, got {compile_cfg!r}')
    import torch
    runner.model.test_step = torch.compile(runner.model.test_step, **compile_cfg)
    runner.logger.info(f'test_step compiled with torch.compile({compile_cfg}); the first '
                       'batches (and every new input shape) are slow')


def main(argv=None):
    args = parse_args(argv)
    with user_errors('test.py'):  # a mistake in the arguments / config: one line
        cfg = build_cfg(args)
    with missing_data('test.py'):
        with user_errors('test.py'):  # a model the config cannot build: one line
            runner = build_runner(cfg)  # gloo + CPU DDP when CUDA is unavailable
        with user_errors('test.py'):  # weights that do not fit: one line, exit status 2
            model = runner.model
            while hasattr(model, 'module'):  # DDP / test-time-augmentation wrappers
                model = model.module
            check_weights(model, args.checkpoint, args.allow_partial)
            problem = class_count_problem(cfg, model)  # else silently wrong metrics
            if problem:
                raise ValueError(problem)
            compile_test_step(runner, cfg.get('compile'))
        if args.out is not None and cfg.get('default_scope') == 'mmpretrain':
            from mmengine.evaluator import DumpResults
            runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
        runner.test()


if __name__ == '__main__':
    main()
