"""ResT v1's mixed-head attention, ``IN(softmax(mix(q·kᵀ))) @ v``, as one fused kernel.

``EMSA`` (rest_mm/rest.py) mixes the attention logits across heads with a 1×1 conv, takes
the softmax and instance-normalises each head's ``N×N'`` map. This computes the same
function with far fewer passes over memory:

* the 1×1 conv over heads is an ``n×n`` matrix product along the head axis (``mix``, the
  attention scale folded in); its bias, one constant per head, cancels in the softmax;
* after a softmax every row sums to 1, so each head's map has mean exactly ``1/N'``: the
  instance norm is ``(P - 1/N') * rsqrt(var + eps)``, and since the scale is one number
  per head it moves past ``@ v``; only the variance needs the whole map;
* the map is processed a block of query rows at a time, small enough to stay in cache,
  accumulating each head's sum of squared deviations, so the full map is never
  materialised;
* for training, a hand-written backward keeps only each block's softmax.

Mixed precision (``torch.autocast``, or a bfloat16/float16 model): the instance norm
divides by the spread of the map around ``1/N'``, which for a nearly uniform map (v1's
stages 3–4, and any map of random weights) is a tiny fraction of ``1/N'``. A softmax
rounded to bfloat16 (8 bits) loses that spread: its rounding error, about ``2⁻⁹/N'``,
is comparable with the deviations themselves, and the norm amplifies it (ResT-S with
random weights, worst stage against float64: 0.53 in bfloat16, 0.14 in float16). The
logits and the head mixing tolerate the low precision (their rounding is relative to the
logits, as in any attention), so the softmax, the centring, the variance and the scale
are float32 and only the centred map goes back to the low precision for ``@ v`` (0.14
and 0.020, the rounding of the rest of the network; tests/test_mixed_precision.py). The
backward keeps the same rule (in float16, ``rsqrt(var)³`` used to overflow), and two exact
rewrites spare it cancellations: the gradient of a softmax row ignores a constant added
to the row, so its products with the keys and values use them centred over the keys,
whose common part would otherwise dominate their rounding.
"""
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

from .torch_compat import autocast_state, is_compiling, is_tracing


def _row_blocks(x: torch.Tensor, rows: int) -> Sequence[torch.Tensor]:
    """``x`` (``B×n×N×d``) in blocks of ``rows`` query rows; no split op for one block, so
    that a traced graph keeps its sizes free."""
    return (x, ) if rows >= x.shape[2] else x.split(rows, dim=2)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, in float32 when ``x`` is of lower precision (module
    docstring, "Mixed precision"); float32 and float64 run unchanged."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.softmax(dim=-1, dtype=torch.float32)
    return x.softmax(dim=-1)


# Map elements per block of the in-place inference on the CPU (2 MiB in float32): its two
# buffers stay in the cache; measured fastest at 800×1344 (docs/performance.md).
CPU_INFERENCE_BLOCK_ELEMENTS = 1 << 19


def rows_per_block(q: torch.Tensor, k: torch.Tensor, block_elements: int) -> int:
    """How many query rows of ``q`` (``B×n×N×d``) give a map block of at most
    ``block_elements`` elements against ``k`` (``B×n×N'×d``): at least one, at most ``N``
    (an empty batch has no elements per row and still one block)."""
    B, n, N, _ = q.shape
    return max(1, min(N, block_elements // max(1, B * n * k.shape[2])))


def _overwritable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix: torch.Tensor) -> bool:
    """Whether the attention may compute in place: full precision without autocast (where
    dtypes change between ops), no autograd graph to record, no graph being traced or
    compiled (dynamo breaks the graph at an ``out=`` view that is not contiguous)."""
    if is_tracing() or is_compiling():
        # First: under torch.compile the later checks may break the graph, and torch 2.1
        # then runs this function eagerly, where it would say nothing is being compiled.
        return False
    tensors = (q, k, v, mix)
    return (q.dtype in (torch.float32, torch.float64)
            and all(t.dtype == q.dtype for t in tensors)
            and not autocast_state(q.device.type)['enabled']
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _mixed_head_inference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mix: torch.Tensor, rows: int, eps: float):
    """:func:`mixed_head_attention` without dropout, the same ops on the same values
    (equal results), for inference in full precision: each block's logits and map go into
    two buffers reused by every block (no fresh memory per op, and a working set that
    stays in cache), the softmax and the centring overwrite the map, and the products
    with ``v`` are written into the output."""
    B, n, N, _ = q.shape
    num_keys = k.shape[2]
    batch_mix = mix.expand(B, n, n)
    keys_t = k.transpose(-2, -1)
    rows = min(rows, rows_per_block(q, k, CPU_INFERENCE_BLOCK_ELEMENTS) if q.is_cpu else N)
    logits_buffer = q.new_empty(B * n * rows * num_keys)
    map_buffer = torch.empty_like(logits_buffer)
    unscaled = q.new_empty(B, n, N, v.shape[-1])
    sum_sq = 0.
    for start in range(0, N, rows):
        size = min(rows, N - start)
        # the first elements of a buffer: contiguous also for a shorter last block
        logits = logits_buffer[:B * n * size * num_keys].view(B, n, size, num_keys)
        torch.matmul(q[:, :, start:start + size], keys_t, out=logits)
        centered = map_buffer[:logits.numel()].view_as(logits)
        torch.bmm(batch_mix, logits.flatten(2), out=centered.flatten(2))
        torch.softmax(centered, dim=-1, out=centered).sub_(1. / num_keys)
        sum_sq = sum_sq + torch.linalg.vector_norm(centered, dim=-1).square().sum(dim=-1)
        torch.matmul(centered, v, out=unscaled[:, :, start:start + size])
    inv_std = torch.rsqrt(sum_sq / (N * num_keys) + eps).view(B, n, 1, 1)
    return unscaled * inv_std, unscaled, inv_std, []


def mixed_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mix: torch.Tensor, rows: int, drop: float, eps: float,
                          keep_for_backward: bool = False):
    """v1's mixed-head attention, ``rows`` query rows at a time.

    Returns the output, what it is before the per-head scale, that scale
    ``rsqrt(var + eps)``, and, with ``keep_for_backward``, each block's softmax map and
    dropout mask (already divided by the keep probability). The maps, the variance and
    the scale are float32 or float64 (module docstring, "Mixed precision"); the products
    with ``v`` and the output are in ``v``'s dtype. Inference in full precision computes
    in place (:func:`_mixed_head_inference`).
    """
    if drop == 0 and not keep_for_backward and _overwritable(q, k, v, mix):
        return _mixed_head_inference(q, k, v, mix, rows, eps)
    B, n, N, _ = q.shape
    num_keys = k.shape[2]
    batch_mix = mix.expand(B, n, n)
    keys_t = k.transpose(-2, -1)
    blocks, kept, sum_sq = [], [], 0.
    for q_rows in _row_blocks(q, rows):
        logits = torch.matmul(q_rows, keys_t)
        probs = _softmax(torch.bmm(batch_mix, logits.flatten(2)).view_as(logits))
        centered = probs - 1. / num_keys
        # a norm per row, then a sum over rows: one float32 accumulation over a whole
        # block (millions of elements) loses ~1e-4 of the variance, and the norm divides by it
        sum_sq = sum_sq + torch.linalg.vector_norm(centered, dim=-1).square().sum(dim=-1)
        keep = None
        if drop > 0:
            # dropout of the normalised map: the per-head scale commutes with it
            keep = torch.empty_like(centered).bernoulli_(1 - drop).div_(1 - drop)
            centered = centered * keep
        blocks.append(torch.matmul(centered.to(v.dtype), v))
        if keep_for_backward:
            kept += [probs, keep]
    inv_std = torch.rsqrt(sum_sq / (N * num_keys) + eps).view(B, n, 1, 1)
    unscaled = torch.cat(blocks, dim=2)
    return unscaled * inv_std.to(unscaled.dtype), unscaled, inv_std, kept


class MixedHeadAttentionFunction(torch.autograd.Function):
    """``mixed_head_attention`` with a hand-written backward that keeps one map per block
    (the softmax) instead of autograd's three (logits, softmax, centred map): a third of
    the training memory of v1's attention, at the same speed (README, "Performance"). The
    logits are recomputed block by block for the mixing's gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, mix, rows, drop, eps):
        out, unscaled, inv_std, kept = mixed_head_attention(q, k, v, mix, rows, drop, eps,
                                                             keep_for_backward=True)
        ctx.rows, ctx.drop = rows, drop
        # mixed precision: the backward runs under the forward's autocast state, as
        # torch.amp.custom_bwd would do for one fixed device type
        device = q.device.type
        ctx.autocast = autocast_state(device)
        ctx.save_for_backward(q, k, v, mix, unscaled, inv_std, *kept)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(**ctx.autocast):
            return MixedHeadAttentionFunction._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        q, k, v, mix, unscaled, inv_std, *kept = ctx.saved_tensors
        B, n, N, _ = q.shape
        num_keys = k.shape[2]
        # the products run in the output's dtype (autocast's), the maps in float32 or more
        low, wide = grad_out.dtype, inv_std.dtype
        grad = grad_out * inv_std.to(low)
        # through var = Σ(P - 1/N')² / (N·N'): each map gets ``coef · (P - 1/N')``; the
        # constant part is the same along a softmax row, which the softmax's backward removes
        d_inv_std = (grad_out.to(wide) * unscaled.to(wide)).sum(dim=(-2, -1), keepdim=True)
        coef = d_inv_std * inv_std.pow(3) * (-1. / (N * num_keys))
        # centred over the keys: exact, as the rows of the softmax's gradient sum to zero
        # (the values' mean only adds a constant to a row of ``d_probs`` without dropout)
        keys_c = k - k.mean(dim=2, keepdim=True)
        values_ct = (v - v.mean(dim=2, keepdim=True) if ctx.drop == 0 else v).transpose(-2, -1)
        mix_t = mix.t().to(low).expand(B, n, n)
        d_q, d_mix = [], torch.zeros_like(mix)
        d_k, d_v = torch.zeros_like(k, dtype=wide), torch.zeros_like(v, dtype=wide)
        # in full precision the centring of the values' gradient is one subtraction at the
        # end; in lower precision it must precede the rounding of the map (module docstring)
        center_late = ctx.drop == 0 and low == wide
        blocks = zip(_row_blocks(q, ctx.rows), _row_blocks(grad, ctx.rows), kept[0::2], kept[1::2])
        for q_rows, grad_rows, probs, keep in blocks:
            if center_late:
                d_v += torch.matmul(probs.transpose(-2, -1), grad_rows)
            else:  # each op writes its result in ``low`` directly: no pass only to convert
                centered = torch.sub(probs, 1. / num_keys, out=torch.empty_like(probs, dtype=low))
                if keep is not None:
                    torch.mul(centered, keep, out=centered)
                d_v += torch.matmul(centered.transpose(-2, -1), grad_rows)
            d_probs = torch.matmul(grad_rows, values_ct)
            if keep is not None:
                d_probs = d_probs * keep
            # out of place: the sum is ``wide`` (type promotion), ``d_probs`` may be ``low``
            d_probs = torch.addcmul(d_probs, probs, coef)
            d_mixed = torch._softmax_backward_data(d_probs, probs, -1, wide).to(low)
            logits = torch.matmul(q_rows, keys_c.transpose(-2, -1))
            d_mix += torch.bmm(d_mixed.flatten(2), logits.flatten(2).transpose(1, 2)).sum(0)
            d_logits = torch.bmm(mix_t, d_mixed.flatten(2)).view_as(logits)
            d_q.append(torch.matmul(d_logits, keys_c))
            d_k += torch.matmul(d_logits.transpose(-2, -1), q_rows)
        if center_late:  # the centring, ``- 1/N'``, applied to the values' gradient at once
            d_v -= grad.sum(dim=2, keepdim=True) / num_keys
        return (torch.cat(d_q, dim=2), d_k.to(k.dtype), d_v.to(v.dtype), d_mix,
                None, None, None)
