"""FLOP counting for ResT and ResTv2 with mmengine's analyser.

mmengine's ``FlopAnalyzer`` (and ``get_model_complexity_info``, which mmdet's and
mmseg's ``get_flops`` tools use) counts only the operators it has a handle for, and
counts the rest as zero. The operator that carries most of ResT's attention arithmetic
has none: ``scaled_dot_product_attention`` (every attention of v2 and every one-head
attention of v1; v1's mixed-head attention uses ``matmul`` and ``bmm``, which mmengine
counts). The handle here counts it the way mmengine counts the rest: one
multiply-accumulate is one FLOP, element-wise work (softmax, scaling) is not counted.

``flop_analyzer`` builds mmengine's analyser with that handle.
"""
import math
from typing import Any, List

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


FLOP_HANDLES = {
    'aten::scaled_dot_product_attention': sdpa_flop_jit,
}


def flop_analyzer(model: torch.nn.Module, inputs: Any) -> FlopAnalyzer:
    """A ``FlopAnalyzer`` for ``model(*inputs)`` that counts our attention operators.

    Warnings about operators counted as zero are silenced: they are element-wise
    (activations, softmax, norms of the attention map, reshapes), which mmengine's
    convention does not count.
    """
    analyzer = FlopAnalyzer(model, inputs).set_op_handle(**FLOP_HANDLES)
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return analyzer
