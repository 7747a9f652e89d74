"""Time and memory of mmcbsa's attention mechanisms against softmax attention.

For every token count ``N`` and every mechanism (CBSA, AdaptedCBSA, MSSA, TSSA, MiTA,
PrimalAttention when registered, and MHSA — PyTorch SDPA — as the baseline) this
measures, in the same process and interleaved round-robin so that load on the
machine hits every mechanism alike:

* ``fwd``:     one forward call under ``torch.no_grad()`` (inference);
* ``fwd+bwd``: forward + backward of ``y.sum()`` with gradients for the input
  tokens and all parameters (a training step of the layer).

Timing: ``--warmup`` untimed calls, then ``--repeat`` timed calls per mechanism
(round-robin), median reported. CPU: ``time.perf_counter`` (``--timer process``:
CPU time instead); CUDA: ``torch.cuda.Event`` pairs (synchronised). The backward
pass gets a fixed dense random upstream gradient.

Peak memory: the largest amount of memory allocated *during* one call on top of
what was allocated before it (inputs and parameters are not counted; saved
activations, temporaries and gradients are). CUDA: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``. CPU: one extra, untimed call under
``torch.profiler`` with ``profile_memory=True``; every allocation and free of
PyTorch's CPU allocator is an event with a size, and the peak of their running sum
in time order is reported (exact for tensor memory; Python objects and BLAS
scratch space are not tensor memory and are not counted).

The input is ``B × (1 + h·w) × C``: one CLS token plus ``N = h·w`` patch tokens on
the most square grid (``N`` a power of 2 gives ``h = w`` or ``w = 2h``). Default
batch 1: a 16k-token image (e.g. 2048² at patch 16) is a single-sample batch on
one device; use ``--batch`` for more.

CPU wall times and other load: with more runnable processes than cores and OpenMP's
default *active* waiting, every parallel region waits for its spinning-then-descheduled
second thread, which penalises mechanisms made of many mid-sized kernels (CBSA, MiTA,
Primal) far more than one big SDPA kernel (ratios moved 3-10x on a loaded 2-core
machine). The tool therefore sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment
already sets it, and prints the load average and the policy with the table.
``--timer process`` with ``--threads 1`` gives numbers that are robust to other load.

Precision: ``--dtype float32`` (default) runs the modules in float32 (PyTorch's default:
no TF32 matrix products); ``bfloat16`` / ``float16`` run them under autocast to that dtype (the
way mmengine's AMP optimizer wrappers train), inputs and weights stay float32.

Reference line ``LinearFloor`` (not an mmcbsa module): the cheapest non-causal linear
attention with the same projections as MHSA, ``φ(q) (φ(k)ᵀ v) / (φ(q) Σ_n φ(k_n))`` with
``φ = elu + 1`` (Katharopoulos et al. 2020), in plain PyTorch: what any attention that is
linear in ``N`` costs at least in PyTorch operators; ``× floor`` columns compare with it.

Variants: ``--mechanisms MiTA MiTA:path=grouped`` measures a mechanism once more with
other constructor arguments (``NAME:key=value[,key=value]``, values as Python literals), as
its own row labelled with that text.

``--tokens-per-batch T``: the batch of each ``N`` is ``T // N`` (at least 1), so every
``N`` processes about the same number of tokens (how the GPU comparison of
docs/benchmark_attention.md is made: 65,536 tokens per batch).

Quadratic mechanisms (MHSA, MSSA) above ``--max-quadratic-n`` are skipped (a
16384-token softmax attention fwd+bwd on 2 CPU threads takes tens of seconds per
call); ratios against MHSA are then ``n/a``.

Outputs: a table on stdout, ``benchmark_attention.csv`` and
``benchmark_attention.png`` (log-log time vs N, fwd and fwd+bwd panels, one line
per mechanism, one row of panels per device) in ``--out-dir``.

Example::

    python tools/analysis_tools/benchmark_attention.py --threads 2 \\
        --n-list 196 256 1024 4096 16384 --out-dir work_dirs/benchmark_attention
"""
import argparse
import ast
import csv
import inspect
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

# Must precede the first `import torch` (libgomp reads it once). OpenMP's default active
# waiting spins between parallel regions; with other processes on the cores the spinning
# threads get descheduled and every region then waits a time slice for them, which
# penalises mechanisms made of many kernels (see the module docstring). Passive waiting
# removes that artefact; set OMP_WAIT_POLICY=ACTIVE in the environment to measure without.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import torch  # noqa: E402

from mmcbsa.cli import cli_main  # noqa: E402

BASELINE = 'MHSA'
FLOOR = 'LinearFloor'
CANDIDATES = ('CBSA', 'AdaptedCBSA', 'MSSA', 'TSSA', 'MiTA', 'PrimalAttention')
DTYPES = {'float32': None, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
QUADRATIC = ('MHSA', 'MSSA')
MODES = ('fwd', 'fwd+bwd')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Benchmark mmcbsa attentions (time, peak memory) against MHSA')
    parser.add_argument('--n-list', type=int, nargs='+',
                        default=[196, 256, 1024, 4096, 16384],
                        help='patch-token counts N (one CLS token is added); 196 is a '
                        '224x224 image at patch 16 (DeiT, MiTA-DeiT)')
    parser.add_argument('--embed-dims', type=int, default=384)
    parser.add_argument('--num-heads', type=int, default=6)
    parser.add_argument('--num-reps', type=str, default='64',
                        help="CBSA representatives: m (a square) or 'RxC', e.g. 8x8")
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--tokens-per-batch', type=int, default=None,
                        help='batch = max(1, T // N) for each N (overrides --batch)')
    parser.add_argument('--dtype', choices=list(DTYPES), default='float32',
                        help='float32, or autocast to bfloat16 / float16')
    parser.add_argument('--no-floor', action='store_true',
                        help=f'leave out the {FLOOR} reference line')
    parser.add_argument('--mechanisms', nargs='+', default=None,
                        help=f'subset of {CANDIDATES} (default: all registered; '
                        f'{BASELINE} and {FLOOR} are always measured); NAME:key=value[,...] '
                        'adds a variant with those constructor arguments, e.g. '
                        'MiTA:path=grouped')
    parser.add_argument('--devices', nargs='+', default=None,
                        help="'cpu' and/or 'cuda' (default: cpu, plus cuda when available)")
    parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads on CPU')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeat', type=int, default=5)
    parser.add_argument('--max-quadratic-n', type=int, default=4096,
                        help='skip MHSA/MSSA above this N (their ratios become n/a)')
    parser.add_argument('--timer', choices=('wall', 'process'), default='wall',
                        help="CPU clock: 'wall' (perf_counter, default) or 'process' "
                        '(CPU time of all threads; robust to other load on a shared '
                        'machine, but counts OpenMP spin-waiting)')
    parser.add_argument('--no-memory', action='store_true', help='skip the memory pass')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out-dir', default='work_dirs/benchmark_attention')
    return parser.parse_args(argv)


def grid_of(n: int) -> Tuple[int, int]:
    """Most square ``h × w = n`` with ``h <= w``."""
    h = math.isqrt(n)
    while n % h:
        h -= 1
    return h, n // h


def parse_reps(text: str):
    """``'64'`` -> 64, ``'8x8'`` -> ``(8, 8)`` (``ValueError`` naming ``--num-reps``)."""
    try:
        values = [int(v) for v in text.lower().split('x')]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"--num-reps must be a positive m or 'RxC', got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def split_variant(text: str) -> Tuple[str, dict]:
    """``'MiTA:path=grouped,topk=49'`` -> ``('MiTA', {'path': 'grouped', 'topk': 49})``
    (values are Python literals, else strings; ``ValueError`` naming ``--mechanisms``)."""
    name, colon, spec = text.partition(':')
    extra = {}
    for item in filter(None, spec.split(',')):
        key, eq, value = item.partition('=')
        if not eq or not key.isidentifier():
            raise ValueError(f'--mechanisms: {text!r}: expected NAME:key=value[,key=value], '
                             f'got {item!r}')
        try:
            extra[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[key] = value
    if colon and not extra:
        raise ValueError(f'--mechanisms: {text!r}: no key=value after the colon')
    return name, extra


def available_mechanisms(requested: Optional[List[str]], floor: bool = True) -> List[str]:
    """The mechanisms to measure: the baseline, the registered candidates (or those
    requested, variants after their mechanism, in registration order), the floor."""
    import mmcbsa  # noqa: F401  (registers the attentions)
    from mmseg.registry import MODELS
    names = [BASELINE] + [n for n in CANDIDATES if MODELS.get(n) is not None]
    if requested:
        missing = [n for n in requested if split_variant(n)[0] not in names + [FLOOR]]
        if missing:
            raise ValueError(f'--mechanisms: not registered in MODELS: {missing}; '
                             f'available: {names}')
        for text in requested:
            name, extra = split_variant(text)
            if not extra:
                continue
            if name in (BASELINE, FLOOR):
                raise ValueError(f'--mechanisms: {text!r}: the reference lines {BASELINE} '
                                 f'and {FLOOR} take no arguments')
            unknown = sorted(set(extra) - set(inspect.signature(MODELS.get(name)).parameters))
            if unknown:
                raise ValueError(f'--mechanisms: {text!r}: {name} has no argument {unknown}')
        names = [BASELINE] + [r for n in names[1:] for r in dict.fromkeys(requested)
                              if split_variant(r)[0] == n and r != BASELINE]
    return names + [FLOOR] * floor


class LinearFloor(torch.nn.Module):
    """``φ(q) (φ(k)ᵀ v) / (φ(q) Σ_n φ(k_n))``, ``φ = elu + 1``, per head, between
    MHSA's projections: the reference line of the benchmark (module docstring)."""

    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = torch.nn.Linear(embed_dims, 3 * embed_dims)
        self.proj = torch.nn.Linear(embed_dims, embed_dims)

    def forward(self, x: torch.Tensor, hw_shape=None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q = torch.nn.functional.elu(q) + 1
        k = torch.nn.functional.elu(k) + 1
        kv = k.transpose(-1, -2) @ v  # (B, H, p, p)
        norm = q @ k.sum(2, keepdim=True).transpose(-1, -2)  # (B, H, N, 1)
        out = (q @ kv) / norm
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def build(name: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """Through mmseg's MODELS (the registry users' configs go through)."""
    from mmseg.registry import MODELS
    if name == FLOOR:
        return LinearFloor(args.embed_dims, args.num_heads).to(device)
    name, extra = split_variant(name)
    cfg = dict(type=name, embed_dims=args.embed_dims, num_heads=args.num_heads)
    if name in ('CBSA', 'AdaptedCBSA'):
        cfg['num_reps'] = parse_reps(args.num_reps)
    return MODELS.build(dict(cfg, **extra)).to(device)


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def make_call(module: torch.nn.Module, x: torch.Tensor, hw: Tuple[int, int],
              mode: str, dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    """One forward (``'fwd'``, no autograd) or forward + backward, under autocast to
    ``dtype`` when given."""
    def run():
        with torch.autocast(x.device.type, dtype=dtype or torch.float32,
                            enabled=dtype is not None):
            return module(x, hw_shape=hw)

    def fwd():
        with torch.no_grad():
            run()

    grad_y = torch.randn_like(x)  # a dense upstream gradient (not the expanded one of .sum())

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        x.grad = None
        run().backward(grad_y)

    return fwd if mode == 'fwd' else fwd_bwd


def time_once(call: Callable[[], None], device: torch.device, timer: str = 'wall') -> float:
    """Seconds of one call (``timer='process'``: CPU seconds of all threads)."""
    if device.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    clock = time.process_time if timer == 'process' else time.perf_counter
    t0 = clock()
    call()
    return clock() - t0


def peak_memory(call: Callable[[], None], device: torch.device) -> float:
    """Peak bytes allocated during one call above the allocation at its start."""
    if device.type == 'cuda':
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == '[memory]' and 'CPU' in str(e.device_type())]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return float(peak)


def batch_of(n: int, args: argparse.Namespace) -> int:
    """The batch at ``N = n`` tokens (``--tokens-per-batch`` or ``--batch``)."""
    return max(1, args.tokens_per_batch // n) if args.tokens_per_batch else args.batch


def bench_device(device: torch.device, names: List[str], args: argparse.Namespace) -> List[dict]:
    rows = []
    dtype = DTYPES[args.dtype]
    for n in args.n_list:
        hw = grid_of(n)
        batch = batch_of(n, args)
        active = [m for m in names if not (m in QUADRATIC and n > args.max_quadratic_n)]
        torch.manual_seed(args.seed)
        modules, inputs = {}, {}
        for name in active:
            try:
                modules[name] = build(name, args, device)
            except Exception as err:  # report and go on with the others
                print(f'[{device.type}] N={n}: cannot build {name}: {err}', file=sys.stderr)
                continue
            inputs[name] = torch.randn(batch, 1 + n, args.embed_dims, device=device,
                                       requires_grad=True)
        for mode in MODES:
            calls = {k: make_call(modules[k], inputs[k], hw, mode, dtype) for k in modules}
            times: Dict[str, List[float]] = {k: [] for k in calls}
            for _ in range(args.warmup):
                for call in calls.values():
                    call()
            sync(device)
            for _ in range(args.repeat):
                for k, call in calls.items():
                    times[k].append(time_once(call, device, args.timer))
            mem = {} if args.no_memory else {k: peak_memory(c, device) for k, c in calls.items()}
            for name in names:
                row = dict(device=device.type, mechanism=name, n=n, grid=f'{hw[0]}x{hw[1]}',
                           mode=mode, batch=batch, dtype=args.dtype, time_ms=None,
                           peak_mem_mb=None)
                if name in times:
                    row['time_ms'] = statistics.median(times[name]) * 1e3
                    if name in mem:
                        row['peak_mem_mb'] = mem[name] / 2 ** 20
                rows.append(row)
            print(f'[{device.type}] N={n} {mode}: ' + ', '.join(
                f'{k} {statistics.median(v) * 1e3:.1f} ms' for k, v in times.items()),
                file=sys.stderr, flush=True)
        del modules, inputs
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    # ratios against the baseline (and the floor) of the same device, N and mode
    base = {(r['device'], r['n'], r['mode']): r for r in rows if r['mechanism'] == BASELINE}
    floor = {(r['device'], r['n'], r['mode']): r for r in rows if r['mechanism'] == FLOOR}
    for r in rows:
        key3 = (r['device'], r['n'], r['mode'])
        b, f = base.get(key3), floor.get(key3)
        for key, out in (('time_ms', 'time_ratio'), ('peak_mem_mb', 'mem_ratio')):
            ok = b is not None and r[key] is not None and b[key]
            r[out] = r[key] / b[key] if ok else None
        ok = f is not None and r['time_ms'] is not None and f['time_ms']
        r['floor_ratio'] = r['time_ms'] / f['time_ms'] if ok else None
    return rows


def fmt(value: Optional[float], spec: str) -> str:
    return 'n/a' if value is None else format(value, spec)


def table(rows: List[dict]) -> str:
    head = ('| device | dtype | N | batch | mode | mechanism | time (ms) | × MHSA | × floor '
            '| peak mem (MiB) | × MHSA |\n'
            '|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|')
    lines = [head]
    for r in rows:
        lines.append(f"| {r['device']} | {r['dtype']} | {r['n']} | {r['batch']} | {r['mode']} "
                     f"| {r['mechanism']} | {fmt(r['time_ms'], '.2f')} | "
                     f"{fmt(r['time_ratio'], '.3f')} | {fmt(r['floor_ratio'], '.2f')} | "
                     f"{fmt(r['peak_mem_mb'], '.1f')} | {fmt(r['mem_ratio'], '.3f')} |")
    return '\n'.join(lines)


def write_csv(rows: List[dict], path: str) -> None:
    keys = ['device', 'dtype', 'mechanism', 'n', 'grid', 'batch', 'mode', 'time_ms',
            'time_ratio', 'floor_ratio', 'peak_mem_mb', 'mem_ratio']
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ('' if r[k] is None else r[k]) for k in keys})


def plot(rows: List[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    devices = sorted({r['device'] for r in rows})
    fig, axes = plt.subplots(len(devices), 2, figsize=(11, 4.2 * len(devices)), squeeze=False)
    for i, dev in enumerate(devices):
        for j, mode in enumerate(MODES):
            ax = axes[i][j]
            mechs = [r['mechanism'] for r in rows if r['device'] == dev and r['mode'] == mode]
            for mech in dict.fromkeys(mechs):
                pts = sorted((r['n'], r['time_ms']) for r in rows
                             if r['device'] == dev and r['mode'] == mode
                             and r['mechanism'] == mech and r['time_ms'] is not None)
                if pts:
                    ax.plot(*zip(*pts), marker='o', label=mech,
                            linestyle={BASELINE: '--', FLOOR: ':'}.get(mech, '-'),
                            color='black' if mech == FLOOR else None)
            ax.set_xscale('log', base=2)
            ax.set_yscale('log')
            ax.set_xlabel('patch tokens N')
            ax.set_ylabel('time per call (ms)')
            ax.set_title(f'{dev}: {mode}')
            ax.grid(True, which='both', alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_args(args: argparse.Namespace) -> None:
    """Impossible requests end here, naming the option (``ValueError``)."""
    for name in ('batch', 'threads', 'repeat', 'embed_dims', 'num_heads'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got '
                             f'{getattr(args, name)}')
    for name in ('warmup', 'max_quadratic_n'):
        if getattr(args, name) < 0:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 0, got '
                             f'{getattr(args, name)}')
    if args.tokens_per_batch is not None and args.tokens_per_batch < 1:
        raise ValueError('--tokens-per-batch must be >= 1')
    if min(args.n_list) < 1:
        raise ValueError(f'--n-list: token counts must be >= 1, got {args.n_list}')
    if args.embed_dims % args.num_heads:
        raise ValueError(f'--embed-dims {args.embed_dims} is not a multiple of --num-heads '
                         f'{args.num_heads}')
    parse_reps(args.num_reps)
    unknown = sorted(set(args.devices or []) - {'cpu', 'cuda'})
    if unknown:
        raise ValueError(f"--devices: {unknown} unknown; use 'cpu' and/or 'cuda'")


@cli_main
def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    check_args(args)
    torch.set_num_threads(args.threads)
    names = available_mechanisms(args.mechanisms, floor=not args.no_floor)
    for name in (n for n in names if ':' in n):  # a variant's values, checked once, early
        try:
            build(name, args, torch.device('cpu'))
        except (TypeError, ValueError, AssertionError) as err:
            raise ValueError(f'--mechanisms: {name!r}: {err}') from None
    devices = args.devices or (['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
    load_before = os.getloadavg() if hasattr(os, 'getloadavg') else None
    rows = []
    for dev in devices:
        if dev == 'cuda' and not torch.cuda.is_available():
            print('cuda requested but not available; skipped', file=sys.stderr)
            continue
        rows += bench_device(torch.device(dev), names, args)
    if not rows:
        raise ValueError(f'nothing to measure: none of the devices {devices} is available')
    os.makedirs(args.out_dir, exist_ok=True)
    batch = (f'{args.tokens_per_batch} tokens per batch' if args.tokens_per_batch
             else f'B={args.batch}')
    title = (f'C={args.embed_dims}, H={args.num_heads}, CBSA m={args.num_reps}, {batch}, '
             f'{args.dtype}, CPU threads={args.threads}, {args.timer} time, '
             f'median of {args.repeat}')
    print(f'# attention benchmark: {title}; torch {torch.__version__}')
    if load_before is not None:  # other work on the machine distorts CPU wall times
        print('# 1-min load average before / after: '
              f'{load_before[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; '
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(table(rows))
    write_csv(rows, os.path.join(args.out_dir, 'benchmark_attention.csv'))
    plot(rows, os.path.join(args.out_dir, 'benchmark_attention.png'), title)
    print(f'\nwrote {args.out_dir}/benchmark_attention.csv and .png')
    return rows


if __name__ == '__main__':
    main()
