"""MiTA's attention core as a compiled CPU kernel (``mita_cpu.c``), forward and backward.

Why it exists: PyTorch's operators can compute MiTA's routed logits only densely (all
``N × N`` products, then a gather) or by gathering per-expert key tables; at DeiT's size
(``N = 197``) either costs more than SDPA's fused kernel over all ``N`` keys (MiTA
fwd+bwd 1.77× ``MHSA``). The C kernel computes just the ``M + k'`` open logits of each
query — landmark pooling, routing (top-k, argmax), shared expert, one softmax and the
values in one pass per ``(batch, head)`` group, the backward likewise — so MiTA's
attention costs ``O(N·(M + k')·p)`` at every ``N``; the projections stay PyTorch GEMMs.
Measured (C=384, H=6, M=k=25, N=197, batch 1, 2 threads): kernel forward 0.41 ms +
backward 0.48 ms against 2.6 ms for SDPA's fwd+bwd; the whole MiTA module 0.93×
``MHSA`` (docs/benchmark_attention.md).

Inside: one OpenMP loop over the ``B·H`` groups (``torch.get_num_threads()`` threads;
each group on one thread, so results do not depend on the thread count); every
product is one of two register-blocked micro-kernels on AVX-512/AVX2 vectors (GCC
vector extensions): broadcast-FMA rows × panel (``mk``) and 4 × 4 dot-product blocks
with a shuffle reduction tree (``dk``), reading ``q, k, v`` and ``∂y`` in place in the
projection's ``(B, N, 3C)`` layout; top-k is a branch-free radix select on the float
bits; the exponentials use glibc's vector ``exp``.

Built at first use with the system C compiler (``$CC``, else ``cc``; compiled with ``-O3
-march=native -ffast-math -fopenmp``, then linked WITHOUT ``-ffast-math``: linking with
it adds the compiler's ``crtfastmath.o``, whose constructor switches the whole process to
flush-to-zero / denormals-are-zero when the library loads) into a cache directory
(``$MMCBSA_KERNEL_DIR``, else ``$XDG_CACHE_HOME/mmcbsa/kernels`` or
``~/.cache/mmcbsa/kernels``; if that is not writable, ``$TMPDIR/mmcbsa-kernels-<uid>``),
keyed by the source, the flags and the CPU, and loaded with ``ctypes`` (no PyTorch
headers: about a second to compile).

The cache is trusted only if it is ours: directories are created private (``0700``), and
a cache directory or library that belongs to another user, is writable by group or
others, or is a symbolic link is refused (one warning names it; the PyTorch paths run) —
otherwise another local user could plant a library in a world-writable ``$TMPDIR`` that
would then run as us. Without a compiler, when compilation fails, with a refused cache,
with a torch older than 2.4 (no ``torch.library.custom_op``) or with
``MMCBSA_MITA_KERNEL=0``, :func:`available` is False (one warning says why) and MiTA runs
its PyTorch paths, same results.
``-ffast-math`` reorders sums: results equal the PyTorch paths to ~2e-6 (float32) and
~1e-15 (float64), tests/test_mita.py.

Entry point :func:`mita_forward`: in eager mode an autograd Function, under
``torch.compile`` the custom op ``mmcbsa::mita_cpu_forward`` (backward and fake
tensors registered: one graph node). Supported: CPU, float32 and float64.
"""
import ctypes
import hashlib
import os
import os.path as osp
import platform
import shutil
import stat
import subprocess
import tempfile
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .once import warn_once

__all__ = ['available', 'unavailable_reason', 'mita_forward', 'DTYPES']

SOURCE = osp.join(osp.dirname(osp.abspath(__file__)), 'mita_cpu.c')
# 512-bit vectors where AVX-512 exists (x86 only; elsewhere the compiler's choice)
COMPILE_FLAGS = ('-O3', '-march=native', '-ffast-math', '-fopenmp', '-fPIC', '-std=c11') + (
    ('-mprefer-vector-width=512', ) if platform.machine() in ('x86_64', 'AMD64') else ())
# no -ffast-math here: it would link crtfastmath.o (flush-to-zero for the whole process)
LINK_FLAGS = ('-shared', '-fopenmp')
DTYPES = {torch.float32: 'f32', torch.float64: 'f64'}

_lib: Optional[ctypes.CDLL] = None
_reason: Optional[str] = None  # why the kernel is unavailable (None: not tried yet)
_tried = False

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
# y, (B, N, W, H, P, 3 chunk offsets, 5 pooling numbers, K), routed, buffers, threads
_FWD_ARGS = [_PTR] + [_I64] * 14 + [_INT] + [_PTR] * 7 + [_INT]
_BWD_ARGS = [_PTR] + [_I64] * 14 + [_INT] + [_PTR] * 8 + [_INT]


def _cache_dir() -> str:
    root = os.environ.get('MMCBSA_KERNEL_DIR')
    if not root:
        base = os.environ.get('XDG_CACHE_HOME') or osp.join(osp.expanduser('~'), '.cache')
        root = osp.join(base, 'mmcbsa', 'kernels')
    return root


def _cpu_signature() -> str:
    """Machine and CPU feature flags (``-march=native`` binaries are CPU specific)."""
    sig = platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features', 'model name')):
                    sig += line
    except OSError:
        sig += platform.processor()
    return sig


class UnsafeCache(RuntimeError):
    """A cache directory or library that another user could have written."""


def _uid() -> int:
    return os.getuid() if hasattr(os, 'getuid') else -1


def _check_ours(path: str, what: str) -> None:
    """Raise :class:`UnsafeCache` unless ``path`` is ours, not a symbolic link and not
    writable by group or others."""
    st = os.lstat(path)
    uid = _uid()
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeCache(f'refused {what} {path}: a symbolic link')
    if uid >= 0 and st.st_uid != uid:
        raise UnsafeCache(f'refused {what} {path}: it belongs to uid {st.st_uid}, not to '
                          f'this user (uid {uid})')
    if st.st_mode & 0o022:
        raise UnsafeCache(f'refused {what} {path}: writable by other users (mode '
                          f'{oct(st.st_mode & 0o777)})')


def _build(cc: str, target: str) -> None:
    """Compile, then link, the source into ``target`` (atomically: concurrent processes
    may both build, the last rename wins; the library is created ``0600``)."""
    folder = osp.dirname(target)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=folder)
    os.close(fd)
    obj = tmp[:-3] + '.o'
    try:
        for cmd in ([cc, *COMPILE_FLAGS, '-c', '-o', obj, SOURCE],
                    [cc, *LINK_FLAGS, '-o', tmp, obj, '-lm']):
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f'{cc} failed: {res.stderr.strip()[-800:]}')
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, obj):
            if osp.exists(leftover):
                os.remove(leftover)


def _compile() -> ctypes.CDLL:
    cc = os.environ.get('CC') or 'cc'
    if shutil.which(cc) is None:
        raise RuntimeError(f'no C compiler ({cc!r} not found; set CC)')
    with open(SOURCE, 'rb') as f:
        src = f.read()
    key = hashlib.sha256(src + ' '.join((cc, ) + COMPILE_FLAGS + LINK_FLAGS).encode() +
                         _cpu_signature().encode()).hexdigest()[:16]
    name = f'mita_cpu_{key}.so'
    # an unwritable cache directory falls back to the temporary directory; a directory or
    # library that is not safely ours is refused (UnsafeCache, no fallback)
    roots = (_cache_dir(), osp.join(tempfile.gettempdir(), f'mmcbsa-kernels-{_uid()}'))
    for i, root in enumerate(roots):
        target = osp.join(root, name)
        try:
            os.makedirs(root, mode=0o700, exist_ok=True)
            _check_ours(root, 'the kernel cache directory')
            if osp.lexists(target):
                _check_ours(target, 'the cached kernel')
                break
            _build(cc, target)
            break
        except UnsafeCache:
            raise
        except OSError:  # not writable (permissions, read-only file system): next root
            if i == len(roots) - 1:
                raise
    lib = ctypes.CDLL(target)
    for suffix in DTYPES.values():
        fwd, bwd = getattr(lib, f'mita_forward_{suffix}'), getattr(lib, f'mita_backward_{suffix}')
        fwd.argtypes, bwd.argtypes = _FWD_ARGS, _BWD_ARGS
        fwd.restype = bwd.restype = _INT
    return lib


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _reason, _tried
    if not _tried:
        _tried = True
        if os.environ.get('MMCBSA_MITA_KERNEL', '1') == '0':
            _reason = 'disabled by MMCBSA_MITA_KERNEL=0'
        elif not hasattr(torch.library, 'custom_op'):
            _reason = f'torch {torch.__version__} has no torch.library.custom_op (needs 2.4+)'
        else:
            try:
                _lib = _compile()
                _register()  # before any torch.compile trace reaches the operator
            except (OSError, RuntimeError) as err:
                _lib = None
                _reason = (str(err) if isinstance(err, UnsafeCache)
                           else f'could not build {SOURCE}: {err}')
                warn_once('mita-cpu-kernel', f'MiTA: CPU kernel unavailable ({_reason}); '
                          'using the PyTorch paths (same results, slower)')
    return _lib


def available() -> bool:
    """Whether the compiled kernel can be used (compiles it on the first call)."""
    return _load() is not None


def loaded() -> bool:
    """Whether the kernel is already loaded (never compiles: safe inside a
    ``torch.compile`` trace; :class:`MiTA` calls :func:`available` when built)."""
    return _lib is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _reason


def _ptr(t: Tensor) -> Optional[int]:
    return t.data_ptr() or None  # an empty tensor (routed mode) has no storage: NULL


def _geometry(y: Tensor, heads: int, head_dims: int, offsets: Sequence[int],
              pool: Sequence[int], topk: int, routed: bool) -> list:
    b, n, w = y.shape
    return [b, n, w, heads, head_dims, *offsets, *pool, topk, int(routed)]


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError('MiTA CPU kernel: out of memory for its per-group buffers')


def _empty_outputs(y: Tensor, heads: int, head_dims: int, pool: Sequence[int], topk: int,
                   routed: bool) -> Tuple[Tensor, ...]:
    b, n, _ = y.shape
    g, m = b * heads, pool[3] * pool[4]
    width = topk if routed else m + topk
    agent = (0, ) if routed else None
    return (y.new_empty(b, n, heads * head_dims),
            y.new_empty(g, m, topk, dtype=torch.long), y.new_empty(g, n, dtype=torch.long),
            y.new_empty(g, m, head_dims), y.new_empty(g, n, width),
            y.new_empty(agent or (g, m, n)), y.new_empty(agent or (g, m, head_dims)))


def _run_forward(y: Tensor, heads: int, head_dims: int, offsets: Sequence[int],
                 pool: Sequence[int], topk: int, routed: bool) -> Tuple[Tensor, ...]:
    """One call of the compiled forward: ``(out, key_idx, expert, r, wts, attn,
    agent_v)`` (``attn`` and ``agent_v`` empty in routed mode)."""
    y = y.contiguous()
    outs = _empty_outputs(y, heads, head_dims, pool, topk, routed)
    fn = getattr(_lib, f'mita_forward_{DTYPES[y.dtype]}')
    _check(fn(y.data_ptr(), *_geometry(y, heads, head_dims, offsets, pool, topk, routed),
              *(_ptr(t) for t in (outs[1], outs[2], outs[0], outs[3], outs[4], outs[5],
                                  outs[6])), torch.get_num_threads()))
    return outs


def _run_backward(y: Tensor, key_idx: Tensor, expert: Tensor, r: Tensor, wts: Tensor,
                  attn: Tensor, agent_v: Tensor, grad_out: Tensor, heads: int,
                  head_dims: int, offsets: Sequence[int], pool: Sequence[int], topk: int,
                  routed: bool) -> Tensor:
    """One call of the compiled backward: ``∂y`` (zero in chunks other than q, k, v)."""
    y, grad_out = y.contiguous(), grad_out.contiguous()
    grad_y = torch.empty_like(y)
    if y.shape[2] > 3 * heads * head_dims:  # chunks other than q, k, v (the gate)
        grad_y[..., 3 * heads * head_dims:].zero_()
    fn = getattr(_lib, f'mita_backward_{DTYPES[y.dtype]}')
    _check(fn(y.data_ptr(), *_geometry(y, heads, head_dims, offsets, pool, topk, routed),
              *(_ptr(t) for t in (key_idx, expert, r, wts, attn, agent_v, grad_out,
                                  grad_y)), torch.get_num_threads()))
    return grad_y


class _MiTAKernel(torch.autograd.Function):
    """The eager entry point: the compiled forward and backward as an autograd Function
    (the custom op's dispatch costs ≈ 0.15 ms per training step more at N = 197)."""

    @staticmethod
    def forward(ctx, y, heads, head_dims, offsets, pool, topk, routed):
        outs = _run_forward(y, heads, head_dims, offsets, pool, topk, routed)
        ctx.save_for_backward(y, *outs[1:])
        ctx.args = (heads, head_dims, offsets, pool, topk, routed)
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad_out, *_):
        return (_run_backward(*ctx.saved_tensors, grad_out, *ctx.args), None, None, None,
                None, None, None)


def _register() -> None:
    """Define the two operators used under ``torch.compile`` (once per process)."""
    if hasattr(torch.ops.mmcbsa, 'mita_cpu_forward'):
        return

    @torch.library.custom_op('mmcbsa::mita_cpu_forward', mutates_args=(), device_types='cpu')
    def forward_op(y: Tensor, heads: int, head_dims: int, offsets: List[int],
                   pool: List[int], topk: int, routed: bool
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return _run_forward(y, heads, head_dims, offsets, pool, topk, routed)

    @forward_op.register_fake
    def _(y, heads, head_dims, offsets, pool, topk, routed):
        return _empty_outputs(y, heads, head_dims, pool, topk, routed)

    @torch.library.custom_op('mmcbsa::mita_cpu_backward', mutates_args=(), device_types='cpu')
    def backward_op(y: Tensor, key_idx: Tensor, expert: Tensor, r: Tensor, wts: Tensor,
                    attn: Tensor, agent_v: Tensor, grad_out: Tensor, heads: int,
                    head_dims: int, offsets: List[int], pool: List[int], topk: int,
                    routed: bool) -> Tensor:
        return _run_backward(y, key_idx, expert, r, wts, attn, agent_v, grad_out, heads,
                             head_dims, offsets, pool, topk, routed)

    @backward_op.register_fake
    def _(y, key_idx, expert, r, wts, attn, agent_v, grad_out, heads, head_dims, offsets,
          pool, topk, routed):
        return torch.empty_like(y)

    def setup_context(ctx, inputs, output):
        y, heads, head_dims, offsets, pool, topk, routed = inputs
        _, key_idx, expert, r, wts, attn, agent_v = output
        ctx.save_for_backward(y, key_idx, expert, r, wts, attn, agent_v)
        ctx.args = (heads, head_dims, offsets, pool, topk, routed)
        ctx.mark_non_differentiable(key_idx, expert, r, wts, attn, agent_v)

    def backward(ctx, grad_out, *_):
        grad_y = torch.ops.mmcbsa.mita_cpu_backward(*ctx.saved_tensors, grad_out, *ctx.args)
        return grad_y, None, None, None, None, None, None

    forward_op.register_autograd(backward, setup_context=setup_context)


def mita_forward(y: Tensor, heads: int, head_dims: int, pool: Sequence[int], topk: int,
                 routed: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """MiTA's attention on the input projection ``y (B, N, W)`` (chunks ``q, k, v`` at
    columns ``0, C, 2C``; ``C = heads·head_dims``; further chunks get a zero gradient
    here).

    Args:
        heads, head_dims: ``H`` and ``p``.
        pool: ``(start, h, w, s_h, s_w)``: the ``h × w`` patch tokens from token
            ``start`` are pooled onto ``s_h × s_w`` landmarks.
        topk: routed keys per expert ``k'``, ``1 <= k' <= N``.
        routed: no shared expert (``mode='routed'``).

    Returns:
        ``out (B, N, C)`` (differentiable w.r.t. ``y``), ``key_idx (B·H, M, k')``,
        ``expert (B·H, N)``.

    Eager calls go through an autograd Function, ``torch.compile`` sees the custom op
    ``mmcbsa::mita_cpu_forward`` (one graph node, backward registered); both run the
    same compiled functions.
    """
    if _lib is None and (torch.compiler.is_compiling() or _load() is None):
        raise RuntimeError(f'MiTA CPU kernel unavailable: {_reason or "not loaded"}')
    b, n, width = y.shape
    c = heads * head_dims
    start, h, w, sh, sw = pool
    if y.dtype not in DTYPES or y.device.type != 'cpu' or width < 3 * c:
        raise ValueError(f'MiTA CPU kernel: needs a float32/float64 CPU projection of width '
                         f'>= 3*{c}, got {y.dtype} on {y.device} of width {width}')
    if not 1 <= topk <= n or start < 0 or start + h * w > n or min(h, w, sh, sw) < 1:
        raise ValueError(f'MiTA CPU kernel: inconsistent sizes N={n}, topk={topk}, '
                         f'pool={tuple(pool)}')
    args = (heads, head_dims, [0, c, 2 * c], [int(i) for i in pool], int(topk), bool(routed))
    if torch.compiler.is_compiling():
        out, key_idx, expert, *_ = torch.ops.mmcbsa.mita_cpu_forward(y, *args)
    else:
        out, key_idx, expert, *_ = _MiTAKernel.apply(y, *args)
    return out, key_idx, expert
