"""Our backbones, loaded through the converter from the authors' state dicts, reproduce
the stage outputs the authors' code computed (tests/data/reference)."""
import pytest
import torch
import torch.nn.functional as F

from rest_mm import ResT, ResTV2, convert_checkpoint
from rest_mm.checkpoint import load_converted_state_dict
from rest_mm.rest import EMSA

CASES = [
    ('rest_v1_tiny.pt', ResT, dict(apply_transform=True)),
    ('rest_v1_tiny_no_transform.pt', ResT, dict(apply_transform=False)),
    ('rest_v2_tiny.pt', ResTV2, {}),
]


def _load(reference_dir, name):
    return torch.load(reference_dir / name, weights_only=True)


def _build(cls, kwargs, reference_arch, state_dict):
    model = cls(arch=reference_arch, **kwargs).eval()
    load_converted_state_dict(model, convert_checkpoint(state_dict))
    return model


def _expected(model, stage_index, reference_map):
    """The reference map as our output presents it: a fresh output norm starts as an
    identity-affine LayerNorm over channels; v1's stage 4 is the checkpoint's norm."""
    if stage_index in model.fresh_norm_indices:
        return F.layer_norm(reference_map.permute(0, 2, 3, 1), reference_map.shape[1:2],
                            eps=model.norm_eps).permute(0, 3, 1, 2)
    return reference_map


def _tolerance(cls, kwargs, stage_index):
    # v1's instance-normalised attention maps have a tiny variance, which the norm divides
    # by: float32 rounding alone then moves the outputs of stages 2-4 by a few 1e-5 (the
    # authors' own op sequence in float32 is 1e-5..5e-5 from its float64 value, and the
    # reference file was computed in float32). test_instance_norm_reordering_is_exact
    # proves our reordering is the same function to 1e-12 in float64.
    if cls is ResT and kwargs['apply_transform'] and stage_index > 0:
        return 1e-4
    return 1e-5


@pytest.mark.parametrize('name, cls, kwargs', CASES, ids=[c[0] for c in CASES])
def test_stage_outputs_match_reference(reference_dir, reference_arch, name, cls, kwargs):
    reference = _load(reference_dir, name)
    model = _build(cls, kwargs, reference_arch, reference['state_dict'])
    for case in reference['cases']:
        with torch.no_grad():
            outputs = model(case['input'])
        assert len(outputs) == 4
        for i, (ours, theirs) in enumerate(zip(outputs, case['stages'])):
            expected = _expected(model, i, theirs)
            assert ours.shape == expected.shape
            error = (ours - expected).abs().max().item()
            assert error <= _tolerance(cls, kwargs, i), (
                f'{name} input {tuple(case["input"].shape)} stage {i + 1}: max error {error:.2e}')


def test_instance_norm_reordering_is_exact(reference_dir, reference_arch):
    """Our EMSA (norm moved past ``attn @ v``, mean known from the softmax) is the same
    function as the op-by-op description: logits, 1x1 conv over heads, softmax,
    InstanceNorm2d, ``@ v``."""

    def op_by_op(self, q, k, v):
        logits = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = self.transform_conv(logits).softmax(dim=-1)
        return torch.matmul(F.instance_norm(attn, eps=1e-5), v)

    reference = _load(reference_dir, 'rest_v1_tiny.pt')
    model = _build(ResT, dict(apply_transform=True), reference_arch, reference['state_dict'])
    model = model.double()
    x = reference['cases'][0]['input'].double()
    with torch.no_grad():
        ours = model(x)
        original = EMSA._mixed_head_attention
        try:
            EMSA._mixed_head_attention = op_by_op
            theirs = model(x)
        finally:
            EMSA._mixed_head_attention = original
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() < 1e-10
    # and the float64 result is within float32 rounding of the reference data
    for i, (a, ref_map) in enumerate(zip(ours, reference['cases'][0]['stages'])):
        expected = _expected(model, i, ref_map.double())
        assert (a - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize('name, cls, kwargs', CASES, ids=[c[0] for c in CASES])
def test_classifier_weights_are_not_loaded(reference_dir, reference_arch, name, cls, kwargs):
    """The head is dropped; only v1 keeps the classifier norm (as its stage-4 norm)."""
    converted = convert_checkpoint(_load(reference_dir, name)['state_dict'])
    assert not any(k.startswith('head.') for k in converted)
    assert ('norm3.weight' in converted) == (cls is ResT)
