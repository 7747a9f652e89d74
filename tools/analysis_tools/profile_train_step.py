"""Where a training step's time goes: ``torch.profiler`` over training iterations of one
or more models of ``train_throughput.py`` (same configs, data and precision), run
through mmengine's Runner; prints the operators with the most device (or CPU) time.

Example::

    python tools/analysis_tools/profile_train_step.py --models cbt-s-cbt-head deit-s
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import train_throughput as tt  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=['segmenter-vit-s', 'cbt-s-cbt-head'],
                        choices=list(tt.MODELS))
    parser.add_argument('--rows', type=int, default=25, help='operators listed per model')
    parser.add_argument('--profile-iters', type=int, default=2)
    own, rest = parser.parse_known_args(argv)
    args = tt.parse_args(rest + ['--iters', str(own.profile_iters)])
    tt.check_args(args)
    import torch
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    import mmcbsa  # noqa: F401
    cuda = args.device == 'cuda'

    class Profile(Hook):
        priority = 'LOWEST'

        def __init__(self) -> None:
            acts = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            self.prof = torch.profiler.profile(activities=acts)

        def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
            if batch_idx == args.warmup:
                self.prof.__enter__()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            if batch_idx == args.warmup + args.iters - 1:
                if cuda:
                    torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)

    for name in own.models:
        root = tt.make_data(tt.MODELS[name][1], args)
        runner = Runner.from_cfg(tt.build_cfg(name, root, args))
        hook = Profile()
        runner.register_hook(hook, priority='LOWEST')
        runner.train()
        key = 'self_cuda_time_total' if cuda else 'self_cpu_time_total'
        print(f'## {name}: {args.iters} training steps, batch {args.batch_size}, '
              f'{args.img_size}², {args.dtype}')
        print(hook.prof.key_averages().table(sort_by=key, row_limit=own.rows,
                                             max_name_column_width=60))
        sys.stdout.flush()
        del runner


if __name__ == '__main__':
    main()
