"""The command-line layer (the top of mmcbsa: it may import every other part; nothing in
mmcbsa imports it). What tools/train.py and tools/test.py share: the runner-related
command-line options, loading a config with those options applied, and building mmengine's
Runner with the CPU (gloo) distributed path of :mod:`mmcbsa.engine.dist`; and what every
command-line tool shares: one error policy (:func:`user_errors`, :func:`cli_main`), one
``--cfg-options`` and, for the analysis tools, one command-line shape and CSV writing.
"""
import argparse
import contextlib
import csv
import functools
import os
import os.path as osp
import sys
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from .engine.dist import CPUDistributedRunner, setup_cpu_distributed

T = TypeVar('T')


class CfgOptionsAction(DictAction):
    """mmengine's ``DictAction`` (``key=value`` pairs; values: numbers, strings, lists,
    tuples) that turns what it cannot parse into one usage error instead of a traceback.
    Dicts cannot be written on the command line (``dict(...)`` sends mmengine's parser into
    endless recursion; ``{...}`` becomes a string): the error says so and points to
    ``tools/train.py --coding-rate-hook`` for the one hook users add this way."""

    HINT = ('values of --cfg-options are numbers, strings, lists or tuples; a dict (e.g. '
            "a hook's config) cannot be written on the command line: put it in a config "
            'file that inherits yours (_base_), or, for CodingRateHook, use '
            'tools/train.py --coding-rate-hook [INTERVAL]')

    def __call__(self, parser, namespace, values, option_string=None):
        if any('dict(' in v or '{' in v for v in values):
            parser.error(f'{option_string}: {self.HINT}')
        try:
            super().__call__(parser, namespace, values, option_string)
        except (RecursionError, ValueError, SyntaxError, TypeError) as exc:
            parser.error(f'{option_string}: cannot parse {" ".join(values)!r} '
                         f'({type(exc).__name__}); {self.HINT}')


def add_cfg_options_arg(parser: argparse.ArgumentParser,
                        example: str = 'model.decode_head.num_layers=3', **kwargs) -> None:
    """``--cfg-options key=value ...`` (the one definition every tool uses;
    :class:`CfgOptionsAction`). ``kwargs`` go to ``add_argument`` (e.g. ``default={}``)."""
    parser.add_argument('--cfg-options', nargs='+', action=CfgOptionsAction,
                        help=f'override settings of the config, key=value pairs (e.g. '
                        f'{example})', **kwargs)


def add_runner_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--cfg-options``, ``--launcher`` and ``--local-rank``/``--local_rank``."""
    add_cfg_options_arg(parser, 'model.decode_head.num_layers=3 '
                        '"default_hooks.logger.interval=10"')
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
    ``./work_dirs/<config file name without .py>``). A missing config file is a
    ``FileNotFoundError`` naming it."""
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config file not found: {args.config}')
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
    runner is :class:`~mmcbsa.engine.dist.CPUDistributedRunner` (mmengine's ``Runner``
    whose start-up log reports the world size as CPU processes, not ``GPU number``).

    Raises:
        ValueError: the config cannot be built (an unknown keyword, a failed argument
            check of a library class: ``TypeError`` / ``AssertionError`` while building).
    """
    cpu_dist = setup_cpu_distributed(cfg)
    try:
        if 'runner_type' not in cfg:
            return (CPUDistributedRunner if cpu_dist else Runner).from_cfg(cfg)
        return RUNNERS.build(cfg)
    except (TypeError, AssertionError) as exc:
        raise ValueError(f'the config cannot be built: {type(exc).__name__}: '
                         f'{exc or "an argument check failed"}') from exc


@contextlib.contextmanager
def user_errors(prog: str):
    """Turn a user's mistake (a missing file, an impossible value, an unknown name) into
    one line ``PROG: error: ...`` on stderr and exit status 2 (argparse's status for a
    usage error) instead of a traceback::

        with user_errors('get_flops.py'):
            ...
    """
    try:
        yield
    except (FileNotFoundError, ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f'{prog}: error: {msg}', file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def missing_data(prog: str):
    """While a runner builds its data loaders and runs: a missing file or directory
    (usually a ``data_root`` or ann file of the config that is not on this machine) is
    one line ``PROG: error: ...`` and exit status 2. Only ``FileNotFoundError``: any
    other error during training or testing keeps its traceback."""
    try:
        yield
    except FileNotFoundError as exc:
        print(f'{prog}: error: {exc} (check the data_root / ann_file of the config\'s data '
              'loaders, e.g. --cfg-options test_dataloader.dataset.data_root=PATH)',
              file=sys.stderr)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------
# analysis tools (tools/analysis_tools/{coding_rate,visualize_attention,zero_shot_seg,
# perturb_robustness}.py): one command-line shape and one error policy
# ---------------------------------------------------------------------------------------


def add_analysis_args(parser: argparse.ArgumentParser) -> None:
    """``CONFIG [--checkpoint CKPT] --out-dir DIR [--device D] [--cfg-options ...]``."""
    parser.add_argument('config', help='mmseg or mmpretrain config')
    parser.add_argument('--checkpoint', default=None,
                        help='weights; without it, the config\'s initialisation (seeded), '
                        'e.g. to compare trained against untrained. A checkpoint that does '
                        'not fit the model is refused (exit status 2)')
    add_allow_partial_arg(parser)
    parser.add_argument('--out-dir', required=True, help='directory for the CSV and PNG files')
    parser.add_argument('--device', default='cpu',
                        help="'cpu' (default), 'cuda' / 'cuda:N', or 'auto' (CUDA if present)")
    add_cfg_options_arg(parser, 'test_dataloader.dataset.data_root=data/mini_ade20k')


def add_allow_partial_arg(parser: argparse.ArgumentParser) -> None:
    """``--allow-partial``: load a checkpoint that does not fit the model (only the
    tensors with the model's names and shapes; :mod:`mmcbsa.engine.weights`)."""
    parser.add_argument('--allow-partial', action='store_true',
                        help='load only the tensors of the checkpoint that fit the model '
                        '(same name and shape), warn about the rest, instead of refusing')


def add_map_args(parser: argparse.ArgumentParser) -> None:
    """``--query MODE --tile-size PX``: the arguments of the tools that draw attention maps
    over the image (``visualize_attention.py``, ``zero_shot_seg.py``)."""
    from mmcbsa.analysis.capture import QUERY_MODES
    parser.add_argument('--query', choices=QUERY_MODES, default='auto',
                        help='row of the token-to-token maps: cls (token 0), mean (over '
                        'patch queries), auto (cls when the layer has one prefix token)')
    parser.add_argument('--tile-size', type=int, default=112,
                        help='pixels of the longer side of each drawn tile (default 112)')


def load_analysis_config(args: argparse.Namespace) -> Config:
    """The config of an analysis tool with ``--cfg-options`` applied; checks that the
    config and ``--checkpoint`` exist and creates ``--out-dir``."""
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config file not found: {args.config}')
    if getattr(args, 'checkpoint', None) and not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    if osp.exists(args.out_dir) and not osp.isdir(args.out_dir):
        raise ValueError(f'--out-dir {args.out_dir} is a file, not a directory')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as exc:  # e.g. a file on the way, no permission
        raise ValueError(f'--out-dir {args.out_dir} cannot be created: '
                         f'{exc.strerror or exc}') from None
    return cfg


def write_csv(path: str, rows: List[Dict[str, object]]) -> None:
    """Rows (dicts with the same keys, in order) -> a CSV file with a header line."""
    if not rows:
        raise ValueError(f'nothing to write to {path}')
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def cli_main(fn: Callable[[Optional[Sequence[str]]], T]) -> Callable[..., T]:
    """Decorate a tool's ``main(argv)`` with :func:`user_errors` (the program name is
    the tool's file name)."""

    @functools.wraps(fn)
    def wrapper(argv: Optional[Sequence[str]] = None) -> T:
        with user_errors(osp.basename(fn.__code__.co_filename)):
            return fn(argv)

    return wrapper
