"""Training throughput of segmentors through mmengine's Runner, against mmseg's Segmenter.

For each model (default: the CBT head and the DEPICT-SA head on mmseg's Segmenter ViT-S,
and mmseg's own ``segmenter_vit-s_mask_8xb1-160k_ade20k-512x512`` as the baseline) the
real config is loaded and changed only where a benchmark must:

* data: a synthetic ADE20K (``tools/misc/make_mini_dataset.py``, images already of
  ``--img-size``, read by mmseg's ``ADE20KDataset``; no download), loaded and packed
  without augmentation (``LoadImageFromFile``, ``LoadAnnotations``, ``PackSegInputs``);
* ``--batch-size`` images per iteration, ``--warmup`` + ``--iters`` iterations of
  mmengine's ``IterBasedTrainLoop``, no validation, no checkpoints, no pretrained
  weights (random initialisation: speed does not depend on the weights);
* mixed precision through mmengine's optimizer wrappers (``--dtype``): ``bfloat16`` ->
  ``BF16AmpOptimWrapper`` (autocast, no loss scaling), ``float16`` ->
  ``AmpOptimWrapper`` with dynamic loss scaling (CUDA only), ``float32`` -> the
  config's ``OptimWrapper``.

A hook times each training step (``model.train_step``: forward, loss, backward,
optimizer step; data loading excluded) with CUDA synchronisation; the throughput is
``batch size × timed iterations / their total time``, reported with the ratio to the
baseline of the same run, the peak CUDA memory and the last loss.

Examples::

    python tools/analysis_tools/train_throughput.py                       # CUDA, bf16, 512²
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
BASELINE = 'segmenter-vit-s'
MODELS = {  # name: config (a path in this repository or an mmseg:: config)
    BASELINE: 'mmseg::segmenter/segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py',
    'cbt-head-vit-s': 'configs/cbt/cbt-head_vit-s_mask_8xb1-160k_ade20k-512x512.py',
    'depict-sa-vit-s': 'configs/depict/depict-sa_vit-s_mask_8xb1-160k_ade20k-512x512.py',
}
DTYPES = ('bfloat16', 'float16', 'float32')


def parse_args(argv=None) -> argparse.Namespace:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(
        description='Training throughput (images/s) of segmentors through mmengine, '
        f'against {BASELINE}')
    parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS),
                        help=f'models to time; {BASELINE} (the baseline) is always added')
    parser.add_argument('--device', default='cuda', choices=('cuda', 'cpu'))
    parser.add_argument('--dtype', default='bfloat16', choices=DTYPES)
    parser.add_argument('--img-size', type=int, default=512, help='square crop size')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--warmup', type=int, default=5, help='untimed iterations')
    parser.add_argument('--iters', type=int, default=20, help='timed iterations')
    parser.add_argument('--num-images', type=int, default=16,
                        help='synthetic training images written once into --work-dir')
    parser.add_argument('--workers', type=int, default=4, help='data loader workers')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='key=value overrides applied to every model config, '
                        'e.g. model.backbone.num_layers=2 (a smaller smoke run)')
    parser.add_argument('--work-dir', default='work_dirs/train_throughput')
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Impossible requests end here with one line (``SystemExit``)."""
    import torch
    for name in ('img_size', 'batch_size', 'iters', 'num_images'):
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
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('train_throughput.py: CUDA is not available on this machine; '
                         'use --device cpu for a (slow) CPU run')
    if args.device == 'cpu' and torch.cuda.is_available():
        raise SystemExit('train_throughput.py: error: --device cpu with a visible GPU: '
                         'mmengine puts the model on the GPU whenever it sees one; hide it '
                         'with CUDA_VISIBLE_DEVICES=')


def make_data(args: argparse.Namespace) -> str:
    """The synthetic ADE20K at ``--img-size`` (written once, reused)."""
    root = osp.join(args.work_dir, f'data_ade20k_{args.img_size}')
    if not osp.isdir(osp.join(root, 'annotations', 'training')):
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            'make_mini_dataset', osp.join(REPO, 'tools', 'misc', 'make_mini_dataset.py'))
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        tool.main(['--dataset', 'ade20k', '--out', root, '--num-train', str(args.num_images),
                   '--num-val', '1', '--size', str(args.img_size), str(args.img_size)])
    return root


def build_cfg(name: str, data_root: str, args: argparse.Namespace):
    """The model's config with the benchmark's changes (module docstring)."""
    from mmengine.config import Config

    from mmcbsa.engine import configure_amp
    path = MODELS[name]
    base = path if path.startswith('mmseg::') else osp.join(REPO, path)
    os.makedirs(args.work_dir, exist_ok=True)
    wrapper = osp.join(args.work_dir, f'{name}.py')
    with open(wrapper, 'w') as f:
        f.write(f"_base_ = [{base!r}]\n"
                "custom_imports = dict(imports=['mmcbsa'], allow_failed_imports=False)\n")
    cfg = Config.fromfile(wrapper)
    size = (args.img_size, args.img_size)
    cfg.work_dir = osp.join(args.work_dir, name)
    cfg.log_level = 'WARNING'
    cfg.model.pretrained = None
    cfg.model.backbone.init_cfg = None
    cfg.model.data_preprocessor.size = size
    cfg.model.backbone.img_size = size
    cfg.train_dataloader = dict(
        batch_size=args.batch_size, num_workers=args.workers,
        persistent_workers=args.workers > 0,
        sampler=dict(type='InfiniteSampler', shuffle=True),
        dataset=dict(type='ADE20KDataset', data_root=data_root,
                     data_prefix=dict(img_path='images/training',
                                      seg_map_path='annotations/training'),
                     pipeline=[dict(type='LoadImageFromFile'),
                               dict(type='LoadAnnotations', reduce_zero_label=True),
                               dict(type='PackSegInputs')]))
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=args.warmup + args.iters,
                         val_interval=10 ** 9)
    for key in ('val_dataloader', 'val_cfg', 'val_evaluator', 'test_dataloader', 'test_cfg',
                'test_evaluator'):
        cfg[key] = None
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=10 ** 9)
    cfg.randomness = dict(seed=0)
    if args.dtype == 'bfloat16':
        cfg.optim_wrapper.type = 'BF16AmpOptimWrapper'
    elif args.dtype == 'float16':
        configure_amp(cfg, True, cuda=True)
    cfg.merge_from_dict(args.cfg_options)
    return cfg


def _step_timer(warmup: int, device: str):
    """An mmengine hook timing ``train_step`` of the iterations after ``warmup``."""
    import torch
    from mmengine.hooks import Hook

    class StepTimer(Hook):
        priority = 'LOWEST'

        def __init__(self) -> None:
            self.times: List[float] = []
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
            if outputs is not None and 'loss' in outputs:
                self.loss = float(outputs['loss'])

    return StepTimer()


def run_model(name: str, data_root: str, args: argparse.Namespace) -> Dict:
    import torch
    from mmengine.runner import Runner
    cfg = build_cfg(name, data_root, args)
    runner = Runner.from_cfg(cfg)
    timer = _step_timer(args.warmup, args.device)
    runner.register_hook(timer, priority='LOWEST')
    runner.train()
    total = sum(timer.times)
    row = dict(model=name, config=MODELS[name], dtype=args.dtype, device=args.device,
               img_size=args.img_size, batch_size=args.batch_size, iters=len(timer.times),
               images_per_s=args.batch_size * len(timer.times) / total,
               step_ms=statistics.median(timer.times) * 1e3, loss=timer.loss,
               peak_mem_gib=(torch.cuda.max_memory_allocated() / 2 ** 30
                             if args.device == 'cuda' else None))
    del runner
    if args.device == 'cuda':
        torch.cuda.empty_cache()
    return row


def table(rows: List[Dict]) -> str:
    base = next((r['images_per_s'] for r in rows if r['model'] == BASELINE), None)
    lines = ['| model | dtype | img | batch | images/s | × Segmenter ViT-S | step (ms, median) '
             '| peak mem (GiB) | last loss |',
             '|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        ratio = r['images_per_s'] / base if base else None
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['img_size']} | {r['batch_size']} | "
            f"{r['images_per_s']:.1f} | {'n/a' if ratio is None else f'{ratio:.2f}'} | "
            f"{r['step_ms']:.1f} | "
            f"{'n/a' if r['peak_mem_gib'] is None else format(r['peak_mem_gib'], '.2f')} | "
            f"{r['loss']:.3f} |")
    return '\n'.join(lines)


def main(argv=None) -> List[Dict]:
    args = parse_args(argv)
    check_args(args)
    import mmcbsa  # noqa: F401  (registers modules and the AMP wrapper)
    names = [BASELINE] + [m for m in args.models if m != BASELINE]
    data_root = make_data(args)
    rows = []
    for name in names:
        t0 = time.perf_counter()
        rows.append(run_model(name, data_root, args))
        print(f'[train_throughput] {name}: {rows[-1]["images_per_s"]:.1f} images/s '
              f'({time.perf_counter() - t0:.0f} s with building)', file=sys.stderr, flush=True)
    out = table(rows)
    print(out)
    with open(osp.join(args.work_dir, 'train_throughput.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(osp.join(args.work_dir, 'train_throughput.md'), 'w') as f:
        f.write(out + '\n')
    return rows


if __name__ == '__main__':
    main()
