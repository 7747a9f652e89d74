"""Training and inference throughput of segmentors and classifiers, against their
softmax-attention baselines, in one process.

Models (``--models``; each is compared with the baseline of its kind, which is always
added):

* segmentors at ``--img-size`` on a synthetic ADE20K: mmseg's own
  ``segmenter_vit-s_mask_8xb1-160k_ade20k-512x512`` (baseline ``segmenter-vit-s``), the CBT
  head and the DEPICT-SA head on that Segmenter ViT-S (``cbt-head-vit-s``,
  ``depict-sa-vit-s``) and the fully linear CBT-S encoder + CBT head (``cbt-s-cbt-head``);
* classifiers at ``--img-size`` on a synthetic ImageNet: mmpretrain's DeiT-S (baseline
  ``deit-s``) and CBT-S (``cbt-s``), DeiT-T and CBT-T (``deit-t``, ``cbt-t``, baseline
  ``deit-t``) — the paper's throughput comparison (CBT vs ViT at 512², docs/mechanisms.md).

``--mode train`` (default): the real config is loaded and changed only where a benchmark
must:

* data: synthetic images already of ``--img-size`` (``tools/misc/make_mini_dataset.py``;
  mmseg's ``ADE20KDataset`` / mmpretrain's ``ImageNet``; no download), loaded and packed
  without augmentation;
* data loading in the main process (``--workers 0``, the default): the step timer starts
  after the batch is loaded, so workers would not change the figures, but PyTorch waited
  about 5 s per worker to shut down the never-ending training iterator of each model
  (measured: 20 s of the 23-26 s "with building" per model on the H200 machine);
* ``--batch-size`` images per iteration, ``--warmup`` + ``--iters`` iterations of
  mmengine's ``IterBasedTrainLoop``, no validation, no checkpoints, no pretrained
  weights (random initialisation: speed does not depend on the weights);
* mixed precision through mmengine's optimizer wrappers (``--dtype``): ``bfloat16`` ->
  ``BF16AmpOptimWrapper`` (autocast, no loss scaling), ``float16`` ->
  ``AmpOptimWrapper`` with dynamic loss scaling (CUDA only), ``float32`` -> the
  config's ``OptimWrapper``;
* ``--compile``: mmengine's own switch (``cfg.compile = True``: the Runner compiles
  ``train_step`` with ``torch.compile``); the compilation happens in the warm-up
  iterations and is reported as ``first step (s)``.

A hook times each training step (``model.train_step``: forward, loss, backward,
optimizer step; data loading excluded) with CUDA synchronisation; the throughput is
``batch size × timed iterations / their total time``.

``--mode inference``: the model of the same config in eval mode, a random normalised
batch, ``model(inputs, mode='tensor')`` (logits before any resizing) under autocast:
batch-1 latency (median of ``--iters`` calls) and the images/s of
``--inference-batch`` images per call in eager mode and, with ``--compile``, the batch-1
latency compiled with ``torch.compile(mode='reduce-overhead')`` (CUDA graphs; the first
call's compilation time is reported).

``--cbsa-path auto torch`` times every model with CBSA modules once per core (``path``
of :class:`~mmcbsa.models.attentions.CBSA`: ``auto`` runs the Triton kernels on CUDA,
``torch`` the PyTorch path, i.e. cuBLAS), in this process, and the baseline once.

Every row has the ratio to the baseline of its kind in the same run, the CBSA path, the
peak CUDA memory and (training) the last loss.

Examples::

    python tools/analysis_tools/train_throughput.py                       # CUDA, bf16, 512²
    python tools/analysis_tools/train_throughput.py --mode inference --compile
    CUDA_VISIBLE_DEVICES= python tools/analysis_tools/train_throughput.py --device cpu \\
        --img-size 64 --batch-size 1 --warmup 1 --iters 1                  # a CPU smoke run
"""
import argparse
import csv
import os
import os.path as osp
import statistics
import sys
import time
from typing import Dict, List, Optional

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
BASELINE = 'segmenter-vit-s'  # the segmentation baseline (kept for the report's readers)
MODELS = {  # name: (config: a path in this repository or an mmseg::/mmpretrain:: config,
    #                 kind, baseline)
    BASELINE: ('mmseg::segmenter/segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py', 'seg',
               BASELINE),
    'cbt-head-vit-s': ('configs/cbt/cbt-head_vit-s_mask_8xb1-160k_ade20k-512x512.py', 'seg',
                       BASELINE),
    'depict-sa-vit-s': ('configs/depict/depict-sa_vit-s_mask_8xb1-160k_ade20k-512x512.py',
                        'seg', BASELINE),
    'cbt-s-cbt-head': ('configs/cbt/cbt-small_cbt-head_8xb1-160k_ade20k-512x512.py', 'seg',
                       BASELINE),
    'deit-s': ('mmpretrain::deit/deit-small_4xb256_in1k.py', 'cls', 'deit-s'),
    'cbt-s': ('configs/cbt/cbt-small_8xb32-lion-150e_in1k.py', 'cls', 'deit-s'),
    'deit-t': ('mmpretrain::deit/deit-tiny_4xb256_in1k.py', 'cls', 'deit-t'),
    'cbt-t': ('configs/cbt/cbt-tiny_8xb32-lion-150e_in1k.py', 'cls', 'deit-t'),
}
DEFAULT_MODELS = ['cbt-head-vit-s', 'depict-sa-vit-s', 'cbt-s-cbt-head', 'cbt-s']
DTYPES = ('bfloat16', 'float16', 'float32')


def parse_args(argv=None) -> argparse.Namespace:
    from mmcbsa.cli import add_cfg_options_arg
    parser = argparse.ArgumentParser(
        description='Training (mmengine Runner) or inference throughput of segmentors and '
        'classifiers against their softmax baselines (Segmenter ViT-S, DeiT)')
    parser.add_argument('--models', nargs='+', default=DEFAULT_MODELS, choices=list(MODELS),
                        help='models to time; the baseline of each one\'s kind is added')
    parser.add_argument('--mode', default='train', choices=('train', 'inference'))
    parser.add_argument('--compile', action='store_true',
                        help='train: mmengine\'s compile switch; inference: also time '
                        'torch.compile(mode="reduce-overhead")')
    parser.add_argument('--inference-batch', type=int, default=32,
                        help='images per call of the inference throughput')
    parser.add_argument('--cbsa-path', nargs='+', default=['auto'],
                        choices=('auto', 'torch', 'triton'),
                        help="the CBSA core of every CBSA module (its path: 'auto' = Triton "
                        "on CUDA, 'torch' = the PyTorch path); several values time each "
                        'model with CBSA once per path, in this process (the baseline once)')
    parser.add_argument('--device', default='cuda', choices=('cuda', 'cpu'))
    parser.add_argument('--dtype', default='bfloat16', choices=DTYPES)
    parser.add_argument('--img-size', type=int, default=512, help='square crop size')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--warmup', type=int, default=5, help='untimed iterations')
    parser.add_argument('--iters', type=int, default=20, help='timed iterations')
    parser.add_argument('--num-images', type=int, default=16,
                        help='synthetic training images written once into --work-dir')
    parser.add_argument('--workers', type=int, default=0,
                        help='data loader workers (default 0: loading is not timed, and '
                        'each worker cost about 5 s per model when the never-ending '
                        'training iterator was shut down)')
    add_cfg_options_arg(parser, 'model.backbone.num_layers=2, applied to every model '
                        'config: a smaller smoke run', default={})
    parser.add_argument('--work-dir', default='work_dirs/train_throughput')
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Impossible requests end here with one line (``SystemExit``)."""
    import torch
    for name in ('img_size', 'batch_size', 'iters', 'num_images', 'inference_batch'):
        if getattr(args, name) < 1:
            raise SystemExit(f'train_throughput.py: error: --{name.replace("_", "-")} must '
                             f'be >= 1, got {getattr(args, name)}')
    if args.warmup < 0 or args.workers < 0:
        raise SystemExit('train_throughput.py: error: --warmup and --workers must be >= 0')
    if args.img_size % 16:
        raise SystemExit(f'train_throughput.py: error: --img-size must be a multiple of the '
                         f'patch size 16, got {args.img_size}')
    if args.device == 'cpu' and args.dtype == 'float16':
        raise SystemExit('train_throughput.py: error: float16 training needs loss scaling '
                         'on a GPU; use --dtype bfloat16 or float32 on the CPU')
    if args.device == 'cpu' and 'triton' in args.cbsa_path:
        raise SystemExit("train_throughput.py: error: --cbsa-path triton needs --device cuda "
                         "(on the CPU CBSA runs its PyTorch path; 'auto' and 'torch' are the "
                         'same there)')
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('train_throughput.py: CUDA is not available on this machine; '
                         'use --device cpu for a (slow) CPU run')
    if args.device == 'cpu' and torch.cuda.is_available():
        raise SystemExit('train_throughput.py: error: --device cpu with a visible GPU: '
                         'mmengine puts the model on the GPU whenever it sees one; hide it '
                         'with CUDA_VISIBLE_DEVICES=')


def make_data(kind: str, args: argparse.Namespace) -> str:
    """The synthetic ADE20K (``kind='seg'``) or ImageNet (``'cls'``) at ``--img-size``
    (written once, reused)."""
    dataset = 'ade20k' if kind == 'seg' else 'imagenet'
    root = osp.join(args.work_dir, f'data_{dataset}_{args.img_size}')
    done = osp.join(root, 'annotations', 'training') if kind == 'seg' else osp.join(
        root, 'meta', 'train.txt')
    if not osp.exists(done):
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            'make_mini_dataset', osp.join(REPO, 'tools', 'misc', 'make_mini_dataset.py'))
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        num = args.num_images if kind == 'seg' else max(1, args.num_images // 2)
        extra = [] if kind == 'seg' else ['--num-classes', '2']  # num: images per class
        tool.main(['--dataset', dataset, '--out', root, '--num-train', str(num),
                   '--num-val', '1', '--size', str(args.img_size), str(args.img_size)] + extra)
    return root


def load_cfg(name: str, args: argparse.Namespace):
    """The model's own config (through a two-line wrapper that imports mmcbsa)."""
    from mmengine.config import Config
    path = MODELS[name][0]
    base = path if '::' in path else osp.join(REPO, path)
    os.makedirs(args.work_dir, exist_ok=True)
    wrapper = osp.join(args.work_dir, f'{name}.py')
    with open(wrapper, 'w') as f:
        f.write(f"_base_ = [{base!r}]\n"
                "custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)\n")
    cfg = Config.fromfile(wrapper)
    size = (args.img_size, args.img_size)
    cfg.model.pop('pretrained', None)
    cfg.model.backbone.init_cfg = None
    cfg.model.backbone.img_size = size if MODELS[name][1] == 'seg' else args.img_size
    if MODELS[name][1] == 'seg':
        cfg.model.data_preprocessor.size = size
    cfg.merge_from_dict(args.cfg_options)
    return cfg


def build_cfg(name: str, data_root: str, args: argparse.Namespace):
    """The model's config with the training benchmark's changes (module docstring)."""
    from mmcbsa.engine import configure_amp
    cfg = load_cfg(name, args)
    cfg.work_dir = osp.join(args.work_dir, name)
    cfg.log_level = 'WARNING'
    if MODELS[name][1] == 'seg':
        dataset = dict(type='ADE20KDataset', data_root=data_root,
                       data_prefix=dict(img_path='images/training',
                                        seg_map_path='annotations/training'),
                       pipeline=[dict(type='LoadImageFromFile'),
                                 dict(type='LoadAnnotations', reduce_zero_label=True),
                                 dict(type='PackSegInputs')])
    else:
        dataset = dict(type='ImageNet', data_root=data_root, split='train',
                       pipeline=[dict(type='LoadImageFromFile'), dict(type='PackInputs')])
        cfg.model.train_cfg = None  # no Mixup/CutMix batch augments (DeiT's recipe has them)
    cfg.train_dataloader = dict(
        batch_size=args.batch_size, num_workers=args.workers,
        persistent_workers=args.workers > 0,
        sampler=dict(type='InfiniteSampler', shuffle=True), dataset=dataset)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=args.warmup + args.iters,
                         val_interval=10 ** 9)
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator', 'test_dataloader', 'test_cfg',
                'test_evaluator'):
        cfg[key] = None
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=10 ** 9)
    cfg.custom_hooks = []  # e.g. DeiT's EMA: not part of a training step's speed
    cfg.randomness = dict(seed=0)
    if args.dtype == 'bfloat16':
        cfg.optim_wrapper.type = 'BF16AmpOptimWrapper'
        cfg.optim_wrapper.pop('loss_scale', None)
    elif args.dtype == 'float16':
        configure_amp(cfg, True, cuda=True)
    if args.compile:
        cfg.compile = True  # mmengine's switch: Runner compiles model.train_step
    return cfg


def _step_timer(warmup: int, device: str):
    """An mmengine hook timing ``train_step`` of the iterations after ``warmup``."""
    import torch
    from mmengine.hooks import Hook

    class StepTimer(Hook):
        priority = 'LOWEST'

        def __init__(self) -> None:
            self.times: List[float] = []
            self.first: Optional[float] = None
            self.loss: Optional[float] = None
            self._start = 0.0

        def _sync(self) -> None:
            if device == 'cuda':
                torch.cuda.synchronize()

        def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
            if batch_idx == warmup and device == 'cuda':
                torch.cuda.reset_peak_memory_stats()
            self._sync()
            self._start = time.perf_counter()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            self._sync()
            if batch_idx >= warmup:
                self.times.append(time.perf_counter() - self._start)
            elif batch_idx == 0:
                self.first = time.perf_counter() - self._start
            if outputs is not None and 'loss' in outputs:
                self.loss = float(outputs['loss'])

    return StepTimer()


def _row(name: str, args: argparse.Namespace, **values) -> Dict:
    config, kind, baseline = MODELS[name]
    return dict(model=name, kind=kind, baseline=baseline, config=config, mode=args.mode,
                dtype=args.dtype, device=args.device, img_size=args.img_size, **values)


def set_cbsa_path(model, path: str) -> int:
    """Set ``path`` on every :class:`~mmcbsa.models.attentions.CBSA` of ``model``;
    returns how many there are."""
    from mmcbsa.models.attentions import CBSA
    found = [m for m in model.modules() if isinstance(m, CBSA)]
    for m in found:
        m.path = path
    return len(found)


def _peak_gib(device: str) -> Optional[float]:
    import torch
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device == 'cuda' else None


def run_model(name: str, data_root: str, args: argparse.Namespace,
              path: str = 'auto') -> List[Dict]:
    """Training throughput of one model through mmengine's Runner (one row), its CBSA
    modules on ``path``."""
    import torch
    from mmengine.runner import Runner
    cfg = build_cfg(name, data_root, args)
    runner = Runner.from_cfg(cfg)
    with_cbsa = set_cbsa_path(runner.model, path)
    timer = _step_timer(args.warmup, args.device)
    runner.register_hook(timer, priority='LOWEST')
    runner.train()
    total = sum(timer.times)
    row = _row(name, args, compiled=bool(args.compile), batch_size=args.batch_size,
               iters=len(timer.times), images_per_s=args.batch_size * len(timer.times) / total,
               step_ms=statistics.median(timer.times) * 1e3, first_s=timer.first,
               loss=timer.loss, peak_mem_gib=_peak_gib(args.device),
               cbsa_path=path if with_cbsa else 'n/a')
    del runner
    if args.device == 'cuda':
        torch.cuda.empty_cache()
    return [row]


def _timed(call, iters: int, device: str) -> List[float]:
    """Seconds of each of ``iters`` calls (synchronised on CUDA)."""
    import torch
    times = []
    for _ in range(iters):
        if device == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        if device == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def run_inference(name: str, args: argparse.Namespace, path: str = 'auto') -> List[Dict]:
    """Batch-1 latency and batch-``--inference-batch`` throughput of one model, eager
    and (``--compile``, first ``--cbsa-path`` only: compiled code always traces CBSA's
    PyTorch path) compiled with CUDA graphs."""
    import torch
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS as CLS_MODELS
    from mmseg.registry import MODELS as SEG_MODELS
    cfg = load_cfg(name, args)
    seg = MODELS[name][1] == 'seg'
    init_default_scope('mmseg' if seg else 'mmpretrain')
    model = (SEG_MODELS if seg else CLS_MODELS).build(cfg.model).to(args.device).eval()
    with_cbsa = set_cbsa_path(model, path)
    first_path = path == args.cbsa_path[0]
    dtype = getattr(torch, args.dtype)
    rows = []
    variants = [('eager', model)]
    if args.compile and first_path:
        variants.append(('compiled', torch.compile(model, mode='reduce-overhead')))
    for label, fn in variants:
        # compiled: batch 1 only (each batch size is another compilation, ~1 min on a GPU)
        for batch in (1, ) if label == 'compiled' else dict.fromkeys((1, args.inference_batch)):
            x = torch.randn(batch, 3, args.img_size, args.img_size, device=args.device)

            def call(fn=fn, x=x):
                with torch.no_grad(), torch.autocast(args.device, dtype=dtype,
                                                     enabled=dtype != torch.float32):
                    fn(x, mode='tensor')

            if args.device == 'cuda':
                torch.cuda.reset_peak_memory_stats()
            first = _timed(call, 1, args.device)[0]
            _timed(call, args.warmup, args.device)
            times = _timed(call, args.iters, args.device)
            median = statistics.median(times)
            rows.append(_row(name, args, compiled=label == 'compiled', batch_size=batch,
                             iters=len(times), images_per_s=batch / median,
                             step_ms=median * 1e3, first_s=first, loss=None,
                             peak_mem_gib=_peak_gib(args.device),
                             cbsa_path=path if with_cbsa else 'n/a'))
            print(f'[train_throughput] {name} {label} batch {batch} (CBSA path {path}): '
                  f'{median * 1e3:.2f} ms per call (first call {first:.1f} s)',
                  file=sys.stderr, flush=True)
    del model, variants
    if args.device == 'cuda':
        torch.cuda.empty_cache()
    return rows


def add_ratios(rows: List[Dict]) -> None:
    """``ratio``: images/s over the baseline's with the same kind, batch and compilation
    (``None`` where the baseline has no such row)."""
    base = {(r['model'], r['batch_size'], r['compiled']): r['images_per_s'] for r in rows
            if r['model'] == r['baseline']}
    for r in rows:
        b = base.get((r['baseline'], r['batch_size'], r['compiled']))
        r['ratio'] = r['images_per_s'] / b if b else None


def _fmt(value, spec: str) -> str:
    return 'n/a' if value is None else format(value, spec)


def table(rows: List[Dict]) -> str:
    lines = ['| mode | model | baseline | compiled | CBSA path | dtype | img | batch | images/s '
             '| × baseline | ms per step / call (median) | first (s) | peak mem (GiB) '
             '| last loss |', '|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['model']} | {r['baseline']} | "
            f"{'yes' if r['compiled'] else 'no'} | {r['cbsa_path']} | {r['dtype']} | "
            f"{r['img_size']} | {r['batch_size']} | {r['images_per_s']:.1f} | "
            f"{_fmt(r['ratio'], '.2f')} | "
            f"{r['step_ms']:.2f} | {_fmt(r['first_s'], '.1f')} | "
            f"{_fmt(r['peak_mem_gib'], '.2f')} | {_fmt(r['loss'], '.3f')} |")
    return '\n'.join(lines)


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    check_args(args)
    import mmcbsa  # noqa: F401  (registers modules and the AMP wrapper)
    names = list(dict.fromkeys(n for m in args.models for n in (MODELS[m][2], m)))
    rows = []
    roots: Dict[str, str] = {}
    without_cbsa = set()  # models timed once: their rows say CBSA path 'n/a'
    for name in names:
        for path in dict.fromkeys(args.cbsa_path):
            if name in without_cbsa:
                continue
            t0 = time.perf_counter()
            if args.mode == 'train':
                kind = MODELS[name][1]
                if kind not in roots:
                    roots[kind] = make_data(kind, args)
                new = run_model(name, roots[kind], args, path)
            else:
                new = run_inference(name, args, path)
            rows += new
            if new[-1]['cbsa_path'] == 'n/a':
                without_cbsa.add(name)
            print(f'[train_throughput] {name} (CBSA path {path}): '
                  f'{new[-1]["images_per_s"]:.1f} images/s '
                  f'({time.perf_counter() - t0:.0f} s with building)', file=sys.stderr,
                  flush=True)
    add_ratios(rows)
    out = table(rows)
    print(out)
    stem = 'train_throughput' if args.mode == 'train' else 'inference_throughput'
    os.makedirs(args.work_dir, exist_ok=True)
    with open(osp.join(args.work_dir, f'{stem}.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(osp.join(args.work_dir, f'{stem}.md'), 'w') as f:
        f.write(out + '\n')
    return rows


if __name__ == '__main__':
    main()
