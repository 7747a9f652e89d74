"""Train a model from an mmsegmentation or mmpretrain config with mmengine's Runner.

The config's ``default_scope`` (``'mmseg'`` or ``'mmpretrain'``) decides which library's
registries are used. Importing :mod:`mmcbsa` registers mmcbsa's modules, allow-lists the
globals of mmengine checkpoints for ``torch.load(weights_only=True)`` (needed by
``--resume`` on torch>=2.6) and provides the CPU (gloo) distributed path used when
``--launcher`` is not ``none`` and CUDA is unavailable.

Examples::

    python tools/train.py configs/depict/<config>.py --work-dir work_dirs/run
    python tools/train.py <config> --resume            # latest checkpoint in work_dir
    python tools/train.py <config> --resume work_dirs/run/iter_200.pth
    python tools/train.py <config> --amp    # GPU: fp16 + dynamic loss scale; CPU: bf16
    python tools/train.py <config> --cfg-options compile=True   # torch.compile(train_step)
    python tools/train.py <config> --coding-rate-hook 50   # log per-layer coding rate
    bash tools/dist_train.sh <config> 2                # torchrun, 2 processes
"""
import argparse
from typing import Optional, Tuple

from mmengine.config import Config

import mmcbsa  # noqa: F401  (registers modules and checkpoint safe globals)
from mmcbsa.engine import configure_amp, load_weights_only
from mmcbsa.cli import (add_runner_args, build_runner, export_local_rank, load_config,
                        missing_data, user_errors)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a segmentor or classifier')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the directory to save logs and models')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume training: without a value, from the latest checkpoint in the work '
        'directory; with a value, from that checkpoint file')
    parser.add_argument(
        '--amp', action='store_true', default=False,
        help='automatic mixed precision: float16 autocast with dynamic loss scaling '
        '(AmpOptimWrapper) on a GPU, bfloat16 autocast (BF16AmpOptimWrapper) on a CPU')
    parser.add_argument(
        '--coding-rate-hook', nargs='?', type=int, const=50, default=None,
        metavar='INTERVAL',
        help='attach mmcbsa\'s CodingRateHook: log each attention layer\'s coding rate '
        '(and ISTA sparsity) on the first validation images every INTERVAL iterations '
        '(default 50) and before training; replaces one already in the config')
    parser.add_argument('--coding-rate-images', type=int, default=4, metavar='N',
                        help='images CodingRateHook measures (default 4)')
    add_runner_args(parser)  # --cfg-options, --launcher, --local-rank
    args = parser.parse_args(argv)
    export_local_rank(args)
    return args


def build_cfg(args) -> Tuple[Config, Optional[str]]:
    """Load the config and apply the command-line options to it.

    Returns the config and a line saying which mixed precision was chosen (``None``
    without AMP)."""
    # launcher, --cfg-options; work_dir: command line > config > ./work_dirs/<config name>
    cfg = load_config(args)

    # --amp, and `-amp-` configs on machines without CUDA (mmcbsa.engine.amp)
    amp_note = configure_amp(cfg, args.amp)

    if args.coding_rate_hook is not None:  # checked here: a bad value is one line
        from mmcbsa.analysis import CodingRateHook
        CodingRateHook(args.coding_rate_hook, args.coding_rate_images)
        hooks = [h for h in cfg.get('custom_hooks', None) or []
                 if h.get('type') != 'CodingRateHook']
        cfg.custom_hooks = hooks + [dict(type='CodingRateHook', interval=args.coding_rate_hook,
                                         num_images=args.coding_rate_images)]

    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        cfg.resume = True
        cfg.load_from = args.resume
    if cfg.get('load_from') and '://' not in str(cfg.load_from):
        # a local checkpoint that is missing, corrupt or not weights-only: one line now,
        # not a traceback from mmengine after the runner is built
        load_weights_only(str(cfg.load_from))
    return cfg, amp_note


def main(argv=None):
    args = parse_args(argv)
    with user_errors('train.py'):  # a mistake in the config / options: one line
        cfg, amp_note = build_cfg(args)
    with missing_data('train.py'):
        # CPU-only machines: gloo process group + DDP without device ids (no-op with CUDA)
        with user_errors('train.py'):  # a model the config cannot build: one line
            runner = build_runner(cfg)
        if amp_note is not None:
            runner.logger.info(amp_note)
        runner.train()


if __name__ == '__main__':
    main()
