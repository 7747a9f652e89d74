"""CUDA checks (issue 11, part 4); ``pytest -m cuda`` runs them (tools/gpu_check.sh),
tests/conftest.py skips them with the reason on machines without CUDA.

* every attention of ``model_cases.ATTENTIONS`` on CUDA in float32, and under
  bfloat16 / float16 autocast: forward, input and parameter gradients against the
  CPU float32 result;
* CBSA's hand-written backward on CUDA against autograd of its plain-op path;
* CBSA's input gradients under float16 autocast: most underflow to zero without loss
  scaling and survive with mmengine's ``AmpOptimWrapper(loss_scale='dynamic')``.

Tolerances (``max|Δ| / max|reference|``, :func:`model_cases.rel_err`): float32 1e-4,
float16 1e-2, bfloat16 5e-2 (8 significant bits). On the CPU, bf16 / fp16 autocast
stay below 2.2e-2 / 3.3e-3 for these cases. The same helpers run here on the CPU
(CPU autocast against CPU float32, a CPU ``GradScaler``), so their logic is
exercised on every machine.
"""
import copy
from typing import Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F
from model_cases import ATTENTIONS, compare_runs, rel_err, run_attention

DTYPES = {  # name: (autocast dtype or None, tolerance)
    'fp32': (None, 1e-4),
    'bf16': (torch.bfloat16, 5e-2),
    'fp16': (torch.float16, 1e-2),
}


@pytest.fixture
def no_tf32():
    """float32 means float32: no TensorFloat-32 matrix products or convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_against_cpu_fp32(case, device: str, dtype: Optional[torch.dtype],
                           tol: float) -> Dict[str, float]:
    """``case`` 's module on ``device`` (under autocast to ``dtype`` if given) against the
    same weights in float32 on the CPU: output, input and parameter gradients."""
    torch.manual_seed(0)
    reference = case.build('cpu')
    module = copy.deepcopy(reference).to(device)
    x = case.input()
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    expected = run_attention(reference, x, case.hw, grad_out)
    got = run_attention(module, x.to(device), case.hw, grad_out.to(device), dtype=dtype)
    assert got[0].device.type == device
    return compare_runs(got, expected, tol, f'{case.id} on {device} ({dtype or "fp32"})')


GRID = [(c, d) for c in ATTENTIONS for d in DTYPES]


@pytest.mark.cuda
@pytest.mark.parametrize('case,dtype', GRID, ids=[f'{c.id}-{d}' for c, d in GRID])
def test_attention_on_cuda_matches_cpu(case, dtype, no_tf32):
    check_against_cpu_fp32(case, 'cuda', *DTYPES[dtype])


LOW = [(c, d) for c in ATTENTIONS for d in ('bf16', 'fp16')]


@pytest.mark.parametrize('case,dtype', LOW, ids=[f'{c.id}-{d}' for c, d in LOW])
def test_device_check_with_cpu_autocast(case, dtype):
    """The CUDA check's helper on the CPU: CPU autocast against CPU float32."""
    errs = check_against_cpu_fp32(case, 'cpu', *DTYPES[dtype])
    assert errs['output'] > 0  # autocast really lowered the precision


def cbsa_backward_paths(device: str, dtype: Optional[torch.dtype]):
    """CBSA (pooled and learned representatives) on ``device``: the hand-written
    backward (training path) and autograd through the plain-op path (``fused=False``),
    same weights and inputs. Yields pairs of
    :func:`run_attention` results."""
    from mmcbsa.models.attentions.cbsa import CBSA
    for kwargs, hw in ((dict(num_reps=(2, 3)), (5, 7)),
                       (dict(num_reps=4, rep_mode='learned'), (4, 4))):
        torch.manual_seed(0)
        fused = CBSA(48, 3, **kwargs).to(device)
        plain = copy.deepcopy(fused)
        plain.fused = False
        x = torch.randn(2, 1 + hw[0] * hw[1], 48, device=device)
        grad_out = torch.randn(x.shape, device=device)
        yield (run_attention(fused, x, hw, grad_out, dtype),
               run_attention(plain, x, hw, grad_out, dtype))


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', list(DTYPES))
def test_cbsa_hand_written_backward_on_cuda(dtype, no_tf32):
    autocast, tol = DTYPES[dtype]
    for got, expected in cbsa_backward_paths('cuda', autocast):
        compare_runs(got, expected, tol, f'CBSA backward on cuda ({dtype})')


def test_cbsa_backward_paths_on_cpu():
    for got, expected in cbsa_backward_paths('cpu', None):
        compare_runs(got, expected, 1e-5, 'CBSA backward on cpu')


def cbsa_fp16_input_gradients(device: str, backward: Callable[[torch.Tensor], float]):
    """CBSA (C = 384, 6 heads, 8×8 representatives, 16×16 patches + CLS) under float16
    autocast with an MSE loss: the input gradient with a plain ``loss.backward()``,
    with ``backward(loss)`` (a loss-scaling backward that returns its scale), and in
    float32. Returns ``(zero fraction unscaled, zero fraction scaled, rel. error of
    the scaled gradient against float32)``."""
    from mmcbsa.models.attentions.cbsa import CBSA
    torch.manual_seed(0)
    attn = CBSA(384, 6).to(device)
    x = torch.randn(2, 257, 384, device=device, requires_grad=True)

    def loss_of(autocast: bool):
        with torch.autocast(device, dtype=torch.float16, enabled=autocast):
            y = attn(x, hw_shape=(16, 16))
        return F.mse_loss(y.float(), torch.zeros(y.shape, device=device))

    loss_of(False).backward()
    reference, x.grad = x.grad, None
    loss_of(True).backward()
    unscaled, x.grad = x.grad, None
    scale = backward(loss_of(True))
    scaled = x.grad / scale
    zero = lambda g: (g == 0).float().mean().item()  # noqa: E731
    return zero(unscaled), zero(scaled), rel_err(scaled, reference)


@pytest.mark.cuda
def test_cbsa_fp16_gradients_need_and_get_dynamic_loss_scaling():
    from mmengine.optim import AmpOptimWrapper
    wrapper = AmpOptimWrapper(loss_scale='dynamic',
                              optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1))

    def scaled_backward(loss):
        wrapper.backward(loss)  # mmengine: loss_scaler.scale(loss).backward()
        return wrapper.loss_scaler.get_scale()

    zero_plain, zero_scaled, err = cbsa_fp16_input_gradients('cuda', scaled_backward)
    assert zero_plain > 0.5, zero_plain  # underflow without loss scaling
    assert zero_scaled < 1e-3 and err <= 1e-2, (zero_scaled, err)


def test_cbsa_fp16_gradients_with_a_cpu_grad_scaler():
    """The helper of the test above on the CPU (fp16 autocast, torch's CPU GradScaler)."""
    scaler = torch.amp.GradScaler('cpu')

    def scaled_backward(loss):
        scaler.scale(loss).backward()
        return scaler.get_scale()

    zero_plain, zero_scaled, err = cbsa_fp16_input_gradients('cpu', scaled_backward)
    assert zero_plain > 0.5, zero_plain
    assert zero_scaled < 1e-3 and err <= 1e-2, (zero_scaled, err)


@pytest.mark.cuda
@pytest.mark.parametrize('align_corners', [False, True])
def test_head_loss_resize_on_cuda(align_corners, no_tf32):
    """The heads' separable loss resize on CUDA equals the library's bilinear
    interpolation (values and gradient) at the training configs' sizes, under bfloat16
    autocast too (the resize stays float32)."""
    from mmcbsa.models.decode_heads.class_mask_head import resize_separable
    torch.manual_seed(0)
    x = torch.randn(2, 150, 32, 32, device='cuda', requires_grad=True)
    g = torch.randn(2, 150, 512, 512, device='cuda')
    ref = F.interpolate(x, (512, 512), mode='bilinear', align_corners=align_corners)
    (ref_grad, ) = torch.autograd.grad(ref, x, g)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = resize_separable(x, (512, 512), align_corners)
    (out_grad, ) = torch.autograd.grad(out, x, g)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5 and rel_err(out_grad, ref_grad) < 1e-5
