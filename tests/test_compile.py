"""``torch.compile`` computes what eager mode computes (issue 11, part 1).

* every attention of ``model_cases.ATTENTIONS`` compiled by **inductor** (C++ kernels on
  CPU, ``dynamic=False``): forward and all gradients equal eager within 1e-4 relative
  (``max|Δ| / max|eager|``); the ones without documented graph breaks compile to one
  graph (``fullgraph=True``), and ``torch._dynamo.explain`` finds no break that
  docs/compile_and_amp.md does not list;
* CBSA's hand-written backward is part of the compiled graph (not a fallback);
* Primal-Attention's sampled positions are ATen's integer ``linspace`` exactly, as
  Python ints (compiled code used to pick another position: issue 11);
* every model family of ``model_cases.FAMILIES`` compiled: forward (``mode='tensor'``)
  and all parameter gradients (plus the KSVD loss) equal eager within 1e-4 relative;
* mmengine's ``Runner(compile=...)`` trains a tiny segmentor with the same losses as
  the eager run.

Cost: inductor's C++ compilation dominates (per graph several seconds on 2 cores; the
FX graph cache under ``/tmp/torchinductor_$USER`` makes later runs much faster). The
attentions use inductor; the whole-model tests use dynamo + AOTAutograd with
inductor's decompositions and partitioner but without C++ code generation
(``aot_eager_decomp_partition``: the stage where inductor's integer ``linspace`` went
wrong) unless ``MMCBSA_COMPILE_BACKEND=inductor`` is set — with an empty inductor cache
on the 2-core development machine, the model and Runner tests took 8.1 minutes through
inductor instead of ~1.5 (docs/compile_and_amp.md).
"""
import copy
import os
import re
from fractions import Fraction

import pytest
import torch
from model_cases import (ATTENTIONS, FAMILIES, compare_runs, rel_err, run_attention,
                         run_model)
from torch._dynamo.backends.registry import lookup_backend

from mmcbsa.models.attentions.primal import linspace_positions, sample_positions

TOL = 1e-4
MODEL_BACKEND = os.environ.get('MMCBSA_COMPILE_BACKEND', 'aot_eager_decomp_partition')


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it compiles (so a silent
    fallback to eager code cannot pass) and hands them to the named backend."""

    def __init__(self, name: str) -> None:
        self.name, self.graphs = name, []
        self.inner = lookup_backend(name)

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.inner(gm, example_inputs)


REGISTERED_NAME = 'mmcbsa_tests_counting'


def _registered_counting_backend() -> CountingBackend:
    """A :class:`CountingBackend` of ``MODEL_BACKEND`` registered with dynamo as
    ``REGISTERED_NAME`` (once per process)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend
    if REGISTERED_NAME not in _COMPILER_FNS:
        register_backend(CountingBackend(MODEL_BACKEND), name=REGISTERED_NAME)
    return _COMPILER_FNS[REGISTERED_NAME]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty dynamo caches (no recompilation limit carried over
    from other tests, no reuse of another test's guards)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ attentions
@pytest.mark.parametrize('case', ATTENTIONS, ids=[c.id for c in ATTENTIONS])
def test_attention_compiled_equals_eager(case):
    torch.manual_seed(0)
    eager = case.build()
    compiled_module = copy.deepcopy(eager)
    backend = CountingBackend('inductor')
    compiled = torch.compile(compiled_module, backend=backend, dynamic=False,
                             fullgraph=not case.graph_breaks)
    x = case.input()
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    expected = run_attention(eager, x, case.hw, grad_out)
    for _ in range(2):  # the second call runs the cached compiled code
        got = run_attention(compiled, x, case.hw, grad_out)
        compare_runs(got, expected, TOL, f'{case.id} compiled')
    assert backend.graphs, 'nothing was compiled'
    if not case.graph_breaks:
        assert len(backend.graphs) == 1


def _explain(case):
    torch.manual_seed(0)
    module, x = case.build(), case.input().requires_grad_(True)
    return torch._dynamo.explain(module)(x, hw_shape=case.hw)


@pytest.mark.parametrize('case', ATTENTIONS, ids=[c.id for c in ATTENTIONS])
def test_attention_graph_breaks_are_the_documented_ones(case):
    """Every graph break has a reason listed in the case (and in
    docs/compile_and_amp.md); a new, unexplained break fails here."""
    report = _explain(case)
    reasons = [b.reason for b in report.break_reasons]
    undocumented = [r.splitlines()[0] for r in reasons
                    if not any(known in r for known in case.graph_breaks)]
    assert not undocumented, f'{case.id}: undocumented graph breaks {undocumented}'
    if not case.graph_breaks:
        assert report.graph_count == 1 and report.graph_break_count == 0


@pytest.mark.parametrize('kwargs', [dict(num_reps=4), dict(num_reps=(1, 3), rep_mode='learned')],
                         ids=['pool', 'learned'])
def test_cbsa_compiled_graph_contains_the_hand_written_backward(kwargs):
    """Dynamo captures CBSA's three ``autograd.Function`` s (input projection,
    extract/contract/broadcast, output projection) with their own backward bodies:
    the pooling gradient that the hand-written backward adds in place is in the
    compiled backward, and the gradients are those of eager mode."""
    from mmcbsa.models.attentions.cbsa import CBSA
    torch.manual_seed(0)
    eager = CBSA(16, 2, **kwargs)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(copy.deepcopy(eager), backend=capture, fullgraph=True)
    x = torch.randn(2, 1 + 5 * 3, 16)
    grad_out = torch.randn(x.shape)
    got = run_attention(compiled, x, (5, 3), grad_out)
    compare_runs(got, run_attention(eager, x, (5, 3), grad_out), TOL, 'captured CBSA')
    assert len(graphs) == 1
    applies = [n for n in graphs[0].graph.nodes
               if n.op == 'call_function' and 'autograd_function_apply' in str(n.target)]
    assert len(applies) == 3
    backward_code = '\n'.join(m.code for name, m in graphs[0].named_children()
                              if name.startswith('bwd_body'))
    if kwargs.get('rep_mode') != 'learned':  # _GridPool.backward_into
        assert '_adaptive_avg_pool2d_backward' in backward_code
    assert '_softmax_backward_data' in backward_code  # softmax_backward


# ------------------------------------------------------------ Primal-Attention's positions
def _fma_linspace(num_tokens: int, num_samples: int):
    """ATen's integer ``linspace(0, N-1, n)`` written out with exact rationals:
    ``step = fl((N-1)/(n-1))``; ``i < n//2``: ``trunc(fl(step·i))``; otherwise
    ``trunc(fl(N-1 − step·(n-1-i)))`` rounded once (fused multiply-add)."""
    if num_samples == 1:
        return [0]
    last = num_tokens - 1
    step = Fraction(last / (num_samples - 1))  # the float64 step, exactly
    out = []
    for i in range(num_samples):
        exact = step * i if i < num_samples // 2 else last - step * (num_samples - 1 - i)
        out.append(int(float(exact)))  # float(Fraction) is correctly rounded
    return out


def test_linspace_positions_hand_checked():
    # N = 257, n = 197: step·49 is 64 in exact arithmetic, just below 64 in float64 ->
    # 63 (what the reference and eager torch give; compiled linspace gave 64)
    assert float(Fraction(256 / 196) * 49) < 64
    assert linspace_positions(257, 197)[49] == 63
    # N = 3, n = 151: position 75 is 2 − step·75 with one rounding: just below 1 -> 0
    assert linspace_positions(3, 151)[75] == 0
    assert linspace_positions(5, 5) == (0, 1, 2, 3, 4)  # N == n: every token
    assert linspace_positions(9, 1) == (0, )
    assert linspace_positions(1, 3) == (0, 0, 0)
    for n_tok in range(1, 40):
        for n_smp in range(1, 40):
            assert list(linspace_positions(n_tok, n_smp)) == _fma_linspace(n_tok, n_smp)


def test_linspace_positions_equal_aten_integer_linspace():
    """Equal to ``torch.linspace(0, N-1, n, dtype=torch.int64)`` for every
    ``N, n <= 100`` and, for the models' ``n`` (197, 200), every ``N <= 1100`` and every
    square grid + CLS up to 64×64 patches."""
    if torch.linspace(0, 2, 151, dtype=torch.int64)[75].item() != 0:
        pytest.skip('this torch build computes integer linspace on the CPU without a fused '
                    'multiply-add (e.g. ATEN_CPU_CAPABILITY=default); its positions differ at '
                    'exact ties from CUDA and AVX2/AVX512 builds, which mmcbsa follows')
    pairs = [(a, b) for a in range(1, 101) for b in range(1, 101)]
    pairs += [(a, b) for b in (197, 200)
              for a in list(range(1, 1101)) + [k * k + 1 for k in range(34, 65)]]
    bad = [(a, b) for a, b in pairs
           if not torch.equal(sample_positions(a, b),
                              torch.linspace(0, a - 1, b, dtype=torch.int64))]
    assert not bad, f'differs from torch.linspace for (N, n) in {bad[:10]}'


def test_sampled_positions_are_constants_of_the_compiled_graph():
    """Compiled, the positions are the eager ones. Inductor's decomposition of an
    integer ``linspace`` (applied by ``aot_eager_decomp_partition`` as by inductor)
    computes in float32 and picks position 64 at index 49 for ``N = 257, n = 197``:
    what made compiled Primal-Attention differ (issue 11)."""
    def take(x):
        return x.index_select(1, sample_positions(x.shape[1], 197, x.device))

    def take_linspace(x):
        return x.index_select(1, torch.linspace(0, x.shape[1] - 1, 197, dtype=torch.int64))

    x = torch.arange(257.).view(1, 257, 1)
    backend = CountingBackend('aot_eager_decomp_partition')
    got = torch.compile(take, backend=backend, dynamic=False, fullgraph=True)(x)
    assert len(backend.graphs) == 1
    assert torch.equal(got.view(-1).long(), torch.tensor(linspace_positions(257, 197)))
    decomposed = torch.compile(take_linspace, backend=backend, dynamic=False)(x)
    assert decomposed.view(-1)[49].item() == 64  # the float32 decomposition
    assert take_linspace(x).view(-1)[49].item() == 63  # eager ATen


# -------------------------------------------------------------------------------- families
@pytest.mark.parametrize('case', FAMILIES, ids=[f.id for f in FAMILIES])
def test_model_family_compiled_equals_eager(case):
    torch.manual_seed(0)
    eager = case.build().train()
    twin = copy.deepcopy(eager)
    backend = CountingBackend(MODEL_BACKEND)
    compiled = torch.compile(lambda img: twin(img, mode='tensor'), backend=backend,
                             dynamic=False)
    images = case.images()
    expected, grad_out = run_model(eager, lambda img: eager(img, mode='tensor'), images)
    got, _ = run_model(twin, compiled, images, grad_out)
    errs = compare_runs(got, expected, TOL, f'{case.id} compiled ({MODEL_BACKEND})')
    assert backend.graphs, 'nothing was compiled'
    assert len(errs) > 3  # the output and the gradients of the parameters were compared


@pytest.mark.parametrize('case', FAMILIES, ids=[f.id for f in FAMILIES])
def test_model_family_traces_as_one_graph(case):
    """Backbone, attention and head of every family trace as ONE graph (no graph break)
    in training and in eval mode: what ``torch.compile`` needs to fuse them and, for
    inference, to replay them as a CUDA graph (``mode='reduce-overhead'``)."""
    torch.manual_seed(0)
    model = case.build()
    for training in (True, False):
        model.train(training)
        torch._dynamo.reset()
        report = torch._dynamo.explain(lambda img: model(img, mode='tensor'))(case.images())
        reasons = [str(r.reason).splitlines()[0] for r in report.break_reasons]
        assert report.graph_count == 1 and report.graph_break_count == 0, (training, reasons)


def test_runner_compile_trains_like_eager(tmp_path):
    """mmengine's ``Runner`` with ``compile=dict(...)`` (``torch.compile`` of
    ``model.train_step``) on a tiny CBT-head segmentor: the losses of 2 SGD iterations
    (the second after a compiled optimizer step) equal those of the eager run with the
    same seed."""
    from model_cases import tiny_seg_runner_cfg
    from mmengine.runner import Runner
    losses = {}
    for mode in ('eager', 'compiled'):
        torch._dynamo.reset()
        cfg = tiny_seg_runner_cfg(tmp_path, mode, max_iters=2)
        backend = _registered_counting_backend()
        backend.graphs.clear()
        if mode == 'compiled':  # a name: the Runner writes its config to the log as text
            cfg.compile = dict(backend=REGISTERED_NAME, dynamic=False)
        runner = Runner.from_cfg(cfg)
        runner.train()
        if mode == 'compiled':
            assert backend.graphs, 'Runner(compile=...) compiled nothing'
            log = (tmp_path / mode).rglob('*.log')
            assert any('Model has been "compiled"' in p.read_text() for p in log)
        values, counts = runner.message_hub.get_scalar('train/loss').data
        losses[mode] = torch.tensor(values, dtype=torch.float64)
    assert losses['eager'].numel() == 2 and torch.isfinite(losses['eager']).all()
    assert rel_err(losses['compiled'], losses['eager']) <= TOL, losses


def test_rel_err_by_hand():
    a, b = torch.tensor([1.0, -2.0, 4.0]), torch.tensor([1.0, -2.5, 5.0])
    assert rel_err(a, b) == pytest.approx(1.0 / 5.0)
    assert rel_err(torch.zeros(2), torch.zeros(2)) == 0.0
    assert rel_err(torch.tensor([1e-3]), torch.zeros(1)) == pytest.approx(1e-3)
    with pytest.raises(AssertionError, match=re.escape('relative errors above')):
        compare_runs((a, None, {}), (b, None, {}), 0.1, 'x')


def test_size_warning_under_compile_is_given_without_a_graph_break():
    """A size warning inside an attention's forward (CBSA with more representatives than
    patches) is given while dynamo traces, not by a graph break (which made dynamo
    recompile the rest of the forward with dynamic shapes, and inductor then failed on
    the adaptive pooling), in training and in inference."""
    import warnings

    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    from mmcbsa.ops import once
    from mmcbsa.registry import build_model
    for training in (True, False):
        once._WARNED.clear()
        torch._dynamo.reset()
        counters.clear()
        model = build_model(dict(type='CBSA', embed_dims=16, num_heads=2,
                                 num_reps=36)).train(training)
        x = torch.randn(2, 17, 16, requires_grad=training)
        counter = CompileCounter()
        compiled = torch.compile(lambda t: model(t, hw_shape=(4, 4)), backend=counter)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            out = compiled(x)
            compiled(x)
        breaks = dict(counters['graph_break'])
        assert not breaks and counter.frame_count == 1, (training, breaks)
        messages = [str(w.message) for w in caught if 'representatives' in str(w.message)]
        assert len(messages) == 1 and 'num_reps' in messages[0], messages
        torch.testing.assert_close(out, model(x, hw_shape=(4, 4)))
