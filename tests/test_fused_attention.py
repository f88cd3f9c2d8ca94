"""rest_mm.fused_attention: v1's mixed-head attention kernel and its hand-written backward."""
import pytest
import torch
import torch.nn.functional as F

from rest_mm import ResT
from rest_mm.fused_attention import MixedHeadAttentionFunction, mixed_head_attention


def test_mixed_head_variance_is_accurate_in_float32_on_large_maps():
    """At detection sizes a head's attention map has millions of elements; its variance,
    which the instance norm divides by, must keep float32 accuracy (a single float32
    accumulation over a block loses ~1e-4 of it, which moved real detectron2 boxes by
    pixels). Compared with the float64 computation of the same function."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16) for n in (4096, 1024, 1024))
    mix = torch.tensor([[1.0, -0.5], [0.3, 0.8]]) * 0.25
    rows = 4096  # one block of 4M map elements per head
    inv_std32 = mixed_head_attention(q, k, v, mix, rows, 0., 1e-5)[2]
    inv_std64 = mixed_head_attention(q.double(), k.double(), v.double(), mix.double(), rows,
                                      0., 1e-5)[2]
    relative = ((inv_std32.double() - inv_std64) / inv_std64).abs().max().item()
    assert relative < 1e-6, relative


@pytest.mark.parametrize('rows', [13, 4, 1])
def test_mixed_head_backward_is_the_gradient(rows):
    """The hand-written backward of v1's mixed-head attention: numerical gradients
    (gradcheck), and with attention dropout the gradients autograd takes through the
    same forward, same random mask."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, m, 5, dtype=torch.float64, requires_grad=True)
               for m in (13, 7, 7))
    mix = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: MixedHeadAttentionFunction.apply(*t, rows, 0., 1e-5), (q, k, v, mix))
    grad_out = torch.randn(2, 3, 13, 5, dtype=torch.float64)
    torch.manual_seed(1)
    ours = torch.autograd.grad(MixedHeadAttentionFunction.apply(q, k, v, mix, rows, 0.3, 1e-5),
                               (q, k, v, mix), grad_out)
    torch.manual_seed(1)
    expected = torch.autograd.grad(mixed_head_attention(q, k, v, mix, rows, 0.3, 1e-5)[0],
                                   (q, k, v, mix), grad_out)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mixed_head_backward_under_autocast():
    """Mixed precision (``--amp``): the backward runs in the forward's autocast state
    and agrees with autograd through the same forward to bfloat16 precision."""
    torch.manual_seed(0)
    inputs = [torch.randn(2, 4, m, 16, requires_grad=True) for m in (40, 12, 12)]
    inputs.append(torch.randn(4, 4, requires_grad=True))
    grad_out = torch.randn(2, 4, 40, 16)
    grads = []
    for attention in (lambda *t: MixedHeadAttentionFunction.apply(*t, 16, 0., 1e-5),
                      lambda *t: mixed_head_attention(*t, 16, 0., 1e-5)[0]):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = attention(*inputs)
        grads.append(torch.autograd.grad(out, inputs, grad_out))
    for ours, autograd in zip(*grads):
        assert ours.dtype == autograd.dtype and torch.isfinite(ours).all()
        scale = autograd.abs().max().item()
        torch.testing.assert_close(ours, autograd, rtol=0, atol=0.05 * scale)


def test_attention_dropout_is_dropout_of_the_normalised_map():
    """With attention dropout, ours drops entries of the instance-normalised map, as the
    op-by-op description does: same random mask, same result."""
    attn = ResT(arch='lite').stages[2].blocks[0].attn.double().train()
    attn.attn_drop = 0.3
    q, k, v = (torch.randn(1, 4, n, 64, dtype=torch.float64) for n in (40, 12, 12))
    torch.manual_seed(1)
    ours = attn._mixed_head_attention(q, k, v)
    torch.manual_seed(1)
    logits = torch.matmul(q, k.transpose(-2, -1)) * attn.scale
    normalised = F.instance_norm(attn.transform_conv(logits).softmax(-1), eps=1e-5)
    expected = torch.matmul(F.dropout(normalised, 0.3), v)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('rows', [40, 7, 1])
def test_mixed_head_inference_in_place_equals_the_recorded_computation(dtype, rows):
    """Inference in full precision computes each block's map in reused buffers, in place:
    the same ops on the same values as the computation autograd records, so the same
    result to the bit (several row blocks, a shorter last one, a batch of two)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, m, 8, dtype=dtype) for m in (40, 12, 12))
    mix = torch.randn(3, 3, dtype=dtype)
    with torch.no_grad():
        in_place = mixed_head_attention(q, k, v, mix, rows, 0., 1e-5)
    recorded = mixed_head_attention(*(t.clone().requires_grad_() for t in (q, k, v, mix)),
                                    rows, 0., 1e-5)
    assert recorded[0].grad_fn is not None and in_place[0].grad_fn is None
    for ours, expected in zip(in_place[:3], recorded[:3]):
        assert torch.equal(ours, expected.detach())


def test_compiled_attention_is_one_graph_over_several_row_blocks():
    """Under torch.compile the in-place inference path is not taken (dynamo breaks the
    graph at its ``out=`` views of the output): v1's attention compiles to one graph also
    when its map is split into several blocks of query rows, and computes what eager does."""
    attn = ResT(arch='lite').stages[1].blocks[0].attn.eval()  # 2 heads, keys reduced 4×4
    x = torch.randn(1, 16, 28, 128)  # 448 queries, 28 keys
    attn.map_block_elements = 100 * 2 * 28  # 100 query rows a block: five blocks
    try:
        with torch.no_grad():
            explanation = torch._dynamo.explain(attn)(x)
            compiled = torch.compile(attn, backend='eager')(x)
            eager = attn(x)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
