"""FLOP counting for ResT and ResTv2 with mmengine's analyser.

mmengine's ``FlopAnalyzer`` (and ``get_model_complexity_info``, which mmdet's and
mmseg's ``get_flops`` tools use) counts only the operators it has a handle for, and
counts the rest as zero. Two operators that carry most of ResT's attention arithmetic
have none: ``scaled_dot_product_attention`` (every attention of v2 and every one-head
attention of v1) and ``baddbmm`` (v1's mixing of attention maps across heads). The
handles here count them the way mmengine counts the rest: one multiply-accumulate is
one FLOP, element-wise work (softmax, scaling, bias) is not counted.

``register_flop_handles()`` adds them to mmengine's defaults, so that every analyser
created afterwards (in our tools or in mmdet's and mmseg's) counts them.
"""
import math
from typing import Any, Dict, List, Optional

import torch
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``softmax(q·kᵀ)·v`` with ``q`` ``…×L×E``, ``k`` ``…×S×E``, ``v`` ``…×S×Ev``:
    ``L·S·E`` for the logits plus ``L·S·Ev`` for the weighted sum, per batch element."""
    q_shape, k_shape, v_shape = (get_shape(v) for v in inputs[:3])
    batch = math.prod(torch.broadcast_shapes(tuple(q_shape[:-2]), tuple(k_shape[:-2])))
    length, embed = q_shape[-2:]
    source = k_shape[-2]
    return batch * length * source * (embed + v_shape[-1])


def baddbmm_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``input + batch1 @ batch2``: the batched product's multiply-accumulates."""
    batch, rows, inner = get_shape(inputs[1])
    columns = get_shape(inputs[2])[-1]
    return batch * rows * inner * columns


FLOP_HANDLES = {
    'aten::scaled_dot_product_attention': sdpa_flop_jit,
    'aten::baddbmm': baddbmm_flop_jit,
}


def register_flop_handles() -> None:
    """Add the handles to mmengine's defaults (idempotent)."""
    from mmengine.analysis import complexity_analysis
    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS.update(FLOP_HANDLES)


def flop_analyzer(model: torch.nn.Module, inputs: Any,
                  extra_handles: Optional[Dict[str, Any]] = None) -> FlopAnalyzer:
    """A ``FlopAnalyzer`` for ``model(*inputs)`` that counts our attention operators.

    Warnings about operators counted as zero are silenced: they are element-wise
    (activations, softmax, norms of the attention map, reshapes), which mmengine's
    convention does not count.
    """
    analyzer = FlopAnalyzer(model, inputs).set_op_handle(**FLOP_HANDLES, **(extra_handles or {}))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return analyzer
