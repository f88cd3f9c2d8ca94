"""Mixed precision: ResT v1's attention accurate under autocast (rest_mm.fused_attention,
forward and hand-written backward, CPU bfloat16 and float16), the whole backbones against
float64, and ``--amp`` on a CPU (rest_mm.cli.precision, rest_mm.cli.runner_setup)."""

import pytest
import torch

from rest_mm import ResT, ResTV2
from rest_mm.cli import runner_setup
from rest_mm.cli.precision import AMP_DTYPES, amp_dtype, cpu_bf16_note, run_network_in_amp
from rest_mm.fused_attention import MixedHeadAttentionFunction, mixed_head_attention
from rest_mm.torch_compat import cpu_autocast_supports

LOW_DTYPES = [torch.bfloat16, pytest.param(
    torch.float16, marks=pytest.mark.skipif(not cpu_autocast_supports(torch.float16),
                                            reason=f'no float16 CPU autocast in torch '
                                            f'{torch.__version__}'))]


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm()).item()


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _nearly_uniform_attention_inputs(dtype: torch.dtype):
    """q, k, v, mix of a nearly uniform attention map (logits spread ~0.1: v1's stages 3–4,
    and random weights) whose keys and values share a large common part, as after a
    LayerNorm; q, k, v already rounded to ``dtype``, as a low-precision linear gives them,
    so that the error measured is the kernel's own."""
    generator = torch.Generator().manual_seed(0)
    q = 0.01 * torch.randn(1, 4, 256, 32, generator=generator)
    k, v = (torch.randn(1, 4, 64, 32, generator=generator)
            + torch.randn(1, 4, 1, 32, generator=generator) for _ in range(2))
    mix = 0.3 * torch.randn(4, 4, generator=generator)
    inputs = [t.to(dtype).float() for t in (q, k, v)] + [mix]
    return [t.requires_grad_() for t in inputs]


@pytest.mark.parametrize('dtype', LOW_DTYPES, ids=str)
def test_attention_under_autocast_is_accurate_to_the_dtype(dtype):
    """Under autocast the kernel's output and its hand-written gradients are within a few
    units of ``dtype``'s rounding of the float64 ones on the same inputs. With the softmax
    rounded to ``dtype`` (as autocast leaves it on a CPU) the output was 18x (bfloat16) and
    20x (float16) farther, the values' gradient 20x, and float16 gradients were NaN
    (``rsqrt(var)³`` overflowed)."""
    inputs = _nearly_uniform_attention_inputs(dtype)
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    grad_out = torch.randn(1, 4, 256, 32, generator=torch.Generator().manual_seed(1))
    exact = MixedHeadAttentionFunction.apply(*exact_inputs, 100, 0., 1e-5)
    exact_grads = torch.autograd.grad(exact, exact_inputs, grad_out.double())
    with torch.autocast('cpu', dtype=dtype):
        out = MixedHeadAttentionFunction.apply(*inputs, 100, 0., 1e-5)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    assert out.dtype == dtype  # the output stays in the autocast dtype for what follows
    tolerance = 4 * _unit_roundoff(dtype)
    assert _relative_error(out, exact) < tolerance
    for name, grad, exact_grad in zip('q k v mix'.split(), grads, exact_grads):
        assert _relative_error(grad, exact_grad) < tolerance, name


@pytest.mark.parametrize('dtype', LOW_DTYPES, ids=str)
@pytest.mark.parametrize('drop', [0., 0.3])
def test_hand_written_backward_matches_autograd_under_autocast(dtype, drop):
    """The hand-written backward under autocast against autograd through the same forward
    (same inputs, same dropout mask), to ``dtype``'s rounding: both compute the map in
    float32 and the products in ``dtype``."""
    inputs = _nearly_uniform_attention_inputs(dtype)
    grad_out = torch.randn(1, 4, 256, 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for attention in (lambda *t: MixedHeadAttentionFunction.apply(*t, 100, drop, 1e-5),
                      lambda *t: mixed_head_attention(*t, 100, drop, 1e-5)[0]):
        torch.manual_seed(2)
        with torch.autocast('cpu', dtype=dtype):
            out = attention(*inputs)
        grads.append(torch.autograd.grad(out, inputs, grad_out.to(out.dtype)))
    for name, ours, autograd in zip('q k v mix'.split(), *grads):
        assert ours.dtype == autograd.dtype and torch.isfinite(ours).all(), name
        assert _relative_error(ours, autograd.double()) < 8 * _unit_roundoff(dtype), name


def test_attention_of_a_bfloat16_model_without_autocast():
    """A model cast to bfloat16 (no autocast) gets the same float32 map: forward and
    backward run (no mixed-dtype product) and are as accurate as under autocast."""
    inputs = [t.detach().to(torch.bfloat16).requires_grad_()
              for t in _nearly_uniform_attention_inputs(torch.bfloat16)]
    exact_inputs = [t.detach().double().requires_grad_() for t in inputs]
    out = MixedHeadAttentionFunction.apply(*inputs, 100, 0., 1e-5)
    exact = MixedHeadAttentionFunction.apply(*exact_inputs, 100, 0., 1e-5)
    assert out.dtype == torch.bfloat16
    assert _relative_error(out, exact) < 4 * _unit_roundoff(torch.bfloat16)
    grads = torch.autograd.grad(out.float().sum(), inputs)
    exact_grads = torch.autograd.grad(exact.sum(), exact_inputs)
    for grad, exact_grad in zip(grads, exact_grads):
        assert grad.dtype == torch.bfloat16
        # the mixing weights are rounded to bfloat16 here, not only inside the products
        assert _relative_error(grad, exact_grad) < 16 * _unit_roundoff(torch.bfloat16)


# Worst stage error of ResT-S (random weights, 1×3×256×320) under CPU autocast against
# float64: the targets of issue 18. Measured (torch 2.13, CPU): 0.14 and 0.020; with the
# softmax in the autocast dtype 0.53 and 0.14. ResTV2-T: 0.015 and 0.0018.
STAGE_ERROR_BOUNDS = {torch.bfloat16: 0.3, torch.float16: 0.03}
# The same for the gradients w.r.t. the input and all parameters (measured 0.18 and 0.029;
# before, 0.63 and NaN).
GRADIENT_ERROR_BOUNDS = {torch.bfloat16: 0.4, torch.float16: 0.05}


@pytest.fixture(scope='module')
def rest_small_float64():
    """ResT-S with random weights, an input, and its float64 stage outputs and gradients
    (of a fixed random projection of the outputs, w.r.t. the input and the parameters)."""
    torch.manual_seed(0)
    model = ResT(arch='small')
    model.init_weights()
    model.eval()
    image = torch.randn(1, 3, 256, 320)
    reference = _outputs_and_gradients(model.double(), image.double())
    model.float()
    return model, image, reference


def _outputs_and_gradients(model, image, projections=None):
    image = image.clone().requires_grad_()
    outs = model(image)
    if projections is None:
        generator = torch.Generator().manual_seed(1)
        projections = [torch.randn(o.shape, generator=generator, dtype=torch.float64)
                       for o in outs]
    model.zero_grad(set_to_none=True)
    sum((o.double() * p).sum() for o, p in zip(outs, projections)).backward()
    params = torch.cat([p.grad.double().flatten() for p in model.parameters()
                        if p.grad is not None])
    return dict(outs=[o.detach().double() for o in outs], projections=projections,
                input_grad=image.grad.double(), param_grad=params)


@pytest.mark.slow
@pytest.mark.parametrize('dtype', LOW_DTYPES, ids=str)
def test_rest_small_under_autocast_against_float64(rest_small_float64, dtype):
    """ResT-S under CPU autocast: every stage within the issue's bound of float64, and the
    gradients through the hand-written backward within theirs."""
    model, image, reference = rest_small_float64
    with torch.autocast('cpu', dtype=dtype):
        ours = _outputs_and_gradients(model, image, reference['projections'])
    errors = [_relative_error(o, r) for o, r in zip(ours['outs'], reference['outs'])]
    print(f'ResT-S {dtype} stage errors {[f"{e:.2e}" for e in errors]}')
    assert all(o.dtype == torch.float64 for o in ours['outs'])  # (converted for comparison)
    assert max(errors) <= STAGE_ERROR_BOUNDS[dtype], errors
    for key in ('input_grad', 'param_grad'):
        assert torch.isfinite(ours[key]).all(), key
        error = _relative_error(ours[key], reference[key])
        print(f'ResT-S {dtype} {key} error {error:.2e}')
        assert error <= GRADIENT_ERROR_BOUNDS[dtype], key


@pytest.mark.slow
def test_restv2_tiny_under_autocast_for_comparison():
    """ResTV2-T, whose attention has no instance norm, under the same conditions: an order
    of magnitude below ResT-S's bound (its worst stage: 0.015 in bfloat16)."""
    torch.manual_seed(0)
    model = ResTV2(arch='tiny')
    model.init_weights()
    model.eval()
    image = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        reference = [o.double() for o in model.double()(image.double())]
        model.float()
        for dtype in filter(cpu_autocast_supports, STAGE_ERROR_BOUNDS):
            with torch.autocast('cpu', dtype=dtype):
                outs = model(image)
            errors = [_relative_error(o, r) for o, r in zip(outs, reference)]
            assert max(errors) <= STAGE_ERROR_BOUNDS[dtype] / 10, (dtype, errors)


# ---------------------------------------------------------------------------------------
# --amp on a CPU
# ---------------------------------------------------------------------------------------
def test_amp_dtypes():
    assert amp_dtype('cpu') == torch.bfloat16 and amp_dtype('cuda') == torch.float16
    with pytest.raises(ValueError, match="not on 'mps'"):
        amp_dtype('mps')
    assert set(AMP_DTYPES) == {'cpu', 'cuda'}


def test_cpu_bf16_note_reads_the_flags(tmp_path):
    with_amx = tmp_path / 'amx'
    with_amx.write_text('processor : 0\nflags : fpu sse2 avx2 amx_bf16 amx_tile\n')
    without = tmp_path / 'plain'
    without.write_text('processor : 0\nflags : fpu sse2 avx2 fma\n')
    assert 'native here (amx_bf16)' in cpu_bf16_note(str(with_amx))
    assert 'NOT native' in cpu_bf16_note(str(without))
    assert 'NOT native' in cpu_bf16_note(str(tmp_path / 'missing'))


class _Recorder(torch.nn.Module):
    """Passes its input on and notes its dtype."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.dtype)
        return x


class _Detector(torch.nn.Module):
    """A stand-in for an mmdet model: a backbone and a head, called as module and as
    method (mmseg's heads call ``self.forward``), and post-processing after them."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(4, 8), _Recorder())
        self.bbox_head = torch.nn.Sequential(torch.nn.Linear(8, 2), _Recorder())
        self.post = []

    def test_step(self, data):
        scores = self.bbox_head.forward(self.backbone(data))
        anchors = torch.full((1, 2), 1000.)
        self.post.append(scores.dtype)
        return (anchors + scores) @ torch.eye(2)  # a product outside the network: float32


def test_network_in_amp_runs_low_and_post_processes_in_float32():
    model = _Detector()
    data = torch.randn(3, 4)
    expected = model.test_step(data)
    assert run_network_in_amp(model, 'cpu') == torch.bfloat16
    result = model.test_step(data)
    # inside the backbone and the head: autocast's dtype; after them: float32
    assert model.backbone[1].seen == model.bbox_head[1].seen == [torch.float32, torch.bfloat16]
    assert model.post == [torch.float32, torch.float32] and result.dtype == torch.float32
    # bfloat16 would round 1000 + score to a multiple of 4
    torch.testing.assert_close(result, expected, rtol=0, atol=0.05)
    with pytest.raises(RuntimeError, match='already runs in mixed precision'):
        run_network_in_amp(model, 'cpu')
    with pytest.raises(ValueError, match='has none'):
        run_network_in_amp(torch.nn.Linear(2, 2), 'cpu')


@pytest.mark.skipif(torch.cuda.is_available(), reason='--amp on a CPU')
def test_cpu_amp_optim_wrapper_trains_in_bfloat16():
    """The forward under ``optim_context`` runs in bfloat16; parameters, gradients and the
    optimizer's state stay float32; the state dict is a plain optimizer's."""
    from mmengine.registry import OPTIM_WRAPPERS
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    wrapper = OPTIM_WRAPPERS.build(dict(type='CPUAmpOptimWrapper',
                                        optimizer=torch.optim.AdamW(model.parameters(), 1e-2)))
    assert isinstance(wrapper, runner_setup.CPUAmpOptimWrapper)
    before = model.weight.detach().clone()
    with wrapper.optim_context(model):
        out = model(torch.randn(5, 8))
    assert out.dtype == torch.bfloat16
    wrapper.update_params(out.float().square().mean())
    assert model.weight.dtype == torch.float32 and not torch.equal(model.weight, before)
    assert set(wrapper.state_dict()) == {'state', 'param_groups'}


@pytest.mark.skipif(torch.cuda.is_available(), reason='--amp on a CPU')
def test_use_amp_on_a_cpu_converts_cuda_amp_configs():
    from mmengine.config import Config
    cfg = Config(dict(optim_wrapper=dict(type='AmpOptimWrapper', loss_scale=512.,
                                         optimizer=dict(type='SGD', lr=0.1))))
    runner_setup.use_amp(cfg)
    assert cfg.optim_wrapper == dict(type='CPUAmpOptimWrapper',
                                     optimizer=dict(type='SGD', lr=0.1))
    cfg = Config(dict(optim_wrapper=dict(type='OptimWrapper', dtype='float16')))
    with pytest.raises(ValueError, match='computes in bfloat16'):
        runner_setup.use_amp(cfg)
