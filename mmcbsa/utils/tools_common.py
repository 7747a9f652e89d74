"""What tools/train.py and tools/test.py share: the runner-related command-line options,
loading a config with those options applied, and building mmengine's Runner with the
CPU (gloo) distributed path of :mod:`mmcbsa.utils.dist`, and :func:`user_errors`
(one-line errors for the command-line tools).
"""
import argparse
import contextlib
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .dist import CPUDistributedRunner, setup_cpu_distributed


def add_runner_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--cfg-options``, ``--launcher`` and ``--local-rank``/``--local_rank``."""
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, key=value pairs (e.g. '
        'model.decode_head.num_layers=3 "default_hooks.logger.interval=10")')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank (torch>=2.0) or --local_rank
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def export_local_rank(args: argparse.Namespace) -> None:
    """Set ``$LOCAL_RANK`` from ``--local-rank`` unless the launcher already set it."""
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)


def load_config(args: argparse.Namespace) -> Config:
    """``Config.fromfile(args.config)`` with ``--launcher``, ``--cfg-options`` and the
    work directory applied (priority: ``--work-dir`` > the config's ``work_dir`` >
    ``./work_dirs/<config file name without .py>``)."""
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def build_runner(cfg: Config) -> Runner:
    """The config's runner (``runner_type`` if given, else mmengine's ``Runner``).

    On CPU-only machines a distributed launcher first gets a gloo process group and
    DDP without device ids (:func:`setup_cpu_distributed`; a no-op with CUDA), and the
    runner is :class:`~mmcbsa.utils.dist.CPUDistributedRunner` (mmengine's ``Runner``
    whose start-up log reports the world size as CPU processes, not ``GPU number``).
    """
    cpu_dist = setup_cpu_distributed(cfg)
    if 'runner_type' not in cfg:
        return (CPUDistributedRunner if cpu_dist else Runner).from_cfg(cfg)
    return RUNNERS.build(cfg)


@contextlib.contextmanager
def user_errors(prog: str):
    """Turn a user's mistake (missing file, impossible value, unknown registry name)
    into one clear line on stderr and exit status 1 instead of a traceback::

        with user_errors('get_flops.py'):
            ...
    """
    try:
        yield
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise SystemExit(f'{prog}: error: {msg}') from None
