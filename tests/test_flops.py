"""rest_mm.flops: mmengine's FLOP counter with handles for attention."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rest_mm import ResT, ResTV2
from rest_mm.flops import flop_analyzer
from rest_mm.testing import straightforward


def test_sdpa_handle_counts_multiply_accumulates():

    class Attention(nn.Module):

        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 3, 50, 16), torch.randn(2, 3, 20, 16), torch.randn(2, 3, 20, 8)
    assert flop_analyzer(Attention(), (q, k, v)).total() == 2 * 3 * 50 * 20 * (16 + 8)


@pytest.mark.parametrize('name', ['rest_small', 'restv2_tiny'])
def test_flops_equal_the_straightforward_count(name):
    """mmengine counts the straightforward model's explicit ops with its own handles; ours
    (SDPA, head mixing by bmm) must come to the same total."""
    from mmengine.analysis import FlopAnalyzer
    x = torch.randn(1, 3, 224, 224)
    plain = FlopAnalyzer(straightforward.build(name).eval(), (x, ))
    plain.unsupported_ops_warnings(False)
    # mmengine counts the straightforward instance norm's element-wise work, which ours
    # does as plain element-wise ops (not counted): leave it out to compare like for like
    plain_total = plain.total() - plain.by_operator().get('instance_norm', 0)
    family, _, arch = name.partition('_')
    model = (ResT if family == 'rest' else ResTV2)(arch=arch).eval()
    ours = flop_analyzer(model, (x, ))
    # ours adds the fresh output norms of the dense-prediction releases
    norms = sum(ours.total(f'norm{i}') for i in model.fresh_norm_indices)
    assert ours.total() - norms == plain_total
