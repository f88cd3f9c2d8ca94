"""rest_mm.rest: ResT and ResTV2. Generic checks over every preset (shapes at any size,
gradients, checkpointing, freezing), arguments, and the numbers: the authors' reference
outputs and the straightforward model's function, outputs and gradients."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from rest_mm import ResT, ResTV2, convert_checkpoint
from rest_mm.presets import PRESET_NAMES, parse_preset_name
from rest_mm.rest import BACKBONES, EMSA
from rest_mm.testing import straightforward
from rest_mm.weights.backbone import load_converted_state_dict

from testlib import (
    REFERENCE_ARCH,
    REFERENCE_BY_NAME,
    REFERENCE_IDS,
    REFERENCES,
    as_ours,
    load_reference,
    ours_from_reference,
    randomised_detection_backbone,
    straightforward_from_reference,
)

# every published architecture, as (class, arch), named as on the command line
PRESETS = [(BACKBONES[model_name], arch)
           for model_name, arch in map(parse_preset_name, PRESET_NAMES)]
PRESET_IDS = list(PRESET_NAMES)
STRIDES = (4, 8, 16, 32)


def _expected_shapes(cls, arch, batch, height, width):
    dims = cls.arch_zoo[arch]['embed_dims']
    return [(batch, dims[i], math.ceil(height / s), math.ceil(width / s))
            for i, s in enumerate(STRIDES)]


@pytest.mark.parametrize('cls, arch', PRESETS, ids=PRESET_IDS)
def test_shapes_at_any_size_without_interpolation_or_padding(cls, arch, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError('the backbone must not interpolate or pad')

    monkeypatch.setattr(F, 'interpolate', forbidden)
    monkeypatch.setattr(F, 'pad', forbidden)
    model = cls(arch=arch).eval()
    for height, width in ((33, 47), (112, 137), (511, 511), (512, 683)):
        with torch.no_grad():
            outputs = model(torch.randn(1, 3, height, width))
        assert [tuple(o.shape) for o in outputs] == _expected_shapes(cls, arch, 1, height, width)
        assert all(torch.isfinite(o).all() for o in outputs)


@pytest.mark.parametrize('cls, arch', PRESETS, ids=PRESET_IDS)
def test_gradient_reaches_every_parameter_and_checkpointing_matches(cls, arch):
    x = torch.randn(2, 3, 33, 49)
    model = cls(arch=arch, drop_path_rate=0.)
    model.init_weights()
    model.train()
    outputs = model(x)
    sum(o.square().mean() for o in outputs).backward()
    # frozen: the head-mixing bias cancels in the softmax (see
    # test_head_mixing_bias_cancels_in_the_softmax)
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == {
        name for name, _ in model.named_parameters() if name.endswith('transform_conv.bias')}
    grads = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, name
            continue
        assert param.grad is not None, f'{name} gets no gradient'
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f'{name} gets an all-zero gradient'
        grads[name] = param.grad.clone()

    checkpointed = cls(arch=arch, with_cp=True)
    checkpointed.load_state_dict(model.state_dict())
    checkpointed.train()
    cp_outputs = checkpointed(x)
    sum(o.square().mean() for o in cp_outputs).backward()
    for a, b in zip(outputs, cp_outputs):
        torch.testing.assert_close(a, b)
    for name, param in checkpointed.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize('cls', [ResT, ResTV2])
@pytest.mark.parametrize('out_indices, expected',
                         [((1, 2, 3), (1, 2, 3)), ((-1, 0), (0, 3)), (2, (2, ))])
def test_out_indices_select_stages_and_their_norms(cls, out_indices, expected):
    model = cls(out_indices=out_indices).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 64))
    dims = model.embed_dims
    assert [o.shape[1] for o in outputs] == [dims[i] for i in expected]
    assert sorted(n for n, _ in model.named_children() if n.startswith('norm')) == [
        f'norm{i}' for i in expected]


@pytest.mark.parametrize('cls', [ResT, ResTV2])
def test_frozen_stages_stay_frozen_after_train(cls):
    model = cls(frozen_stages=2)
    # frozen in __init__ already
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert model.train() is model
    frozen = [model.stem, model.stages[0], model.stages[1], model.norm0, model.norm1]
    for module in frozen:
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    for module in (model.stages[2], model.stages[3], model.norm2, model.norm3):
        assert module.training
        assert all(p.requires_grad for name, p in module.named_parameters()
                   if not name.endswith('transform_conv.bias'))
    before = {k: v.clone() for k, v in model.stem.state_dict().items()}
    model(torch.randn(2, 3, 64, 64))  # BN statistics of a frozen stem must not move
    for key, value in model.stem.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)


@pytest.mark.parametrize('cls', [ResT, ResTV2])
def test_norm_eval_keeps_batch_norms_in_eval(cls):
    model = cls(norm_eval=True).train()
    batch_norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert batch_norms and not any(m.training for m in batch_norms)
    assert model.stages[0].training
    assert all(m.training for m in cls(norm_eval=False).train().modules())


def test_drop_path_is_active_only_in_training():
    model = ResTV2(drop_path_rate=0.3)
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[3], model(x)[3])
        model.train()
        assert not torch.allclose(model(x)[3], model(x)[3])


@pytest.mark.parametrize('kwargs, message', [
    (dict(arch='huge'), "unknown arch 'huge'"),
    (dict(arch=dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 2, 2))), 'missing keys'),
    (dict(arch=dict(ResT.arch_zoo['lite'], window=7)), "unknown keys ['window']"),
    (dict(arch=dict(ResT.arch_zoo['lite'], depths=(2, 2, 2))), 'one value per stage'),
    (dict(out_indices=(0, 4)), 'out_indices'),
    (dict(out_indices=(1, -3)), 'names a stage twice'),
    (dict(frozen_stages=5), 'frozen_stages'),
    (dict(arch=dict(ResT.arch_zoo['lite'], depths=(-1, 1, 1, 1))), "arch['depths'] must be"),
    (dict(arch=dict(ResT.arch_zoo['lite'], depths=(2, 0, 2, 2))), "arch['depths'] must be"),
    (dict(arch=dict(ResT.arch_zoo['lite'], depths=(2, 2.5, 2, 2))), "arch['depths'] must be"),
    (dict(arch=dict(ResT.arch_zoo['lite'], num_heads=(0, 2, 4, 8))), "arch['num_heads'] must"),
    (dict(arch=dict(ResT.arch_zoo['lite'], sr_ratios=(8, 4, 2, 0))), "arch['sr_ratios'] must"),
    (dict(arch=dict(ResT.arch_zoo['lite'], sr_ratios=(8, 4, -1, 1))), "arch['sr_ratios'] must"),
    (dict(arch=dict(ResT.arch_zoo['lite'], mlp_ratio=0)), "arch['mlp_ratio'] must be"),
    (dict(arch=dict(ResT.arch_zoo['lite'], mlp_ratio=-2.)), "arch['mlp_ratio'] must be"),
    (dict(attn_drop_rate=1.0), 'attn_drop_rate must be a number in [0, 1)'),
    (dict(drop_rate=-0.1), 'drop_rate must be a number in [0, 1)'),
    (dict(drop_path_rate=1.0), 'drop_path_rate must be a number in [0, 1)'),
    (dict(init_cfg=dict(type='Pretrained')), "has no 'checkpoint'"),
    (dict(init_cfg=[dict(type='Pretrained'), dict(type='Constant', val=1, layer='Linear')]),
     "has no 'checkpoint'"),
])
def test_bad_arguments_are_refused_clearly(kwargs, message):
    with pytest.raises((KeyError, ValueError, TypeError)) as info:
        ResT(**kwargs)
    assert message in str(info.value)


def test_init_cfg_may_be_a_list_with_a_pretrained_entry(tmp_path):
    source = ResT(arch='lite')
    path = tmp_path / 'lite.pth'
    torch.save({'state_dict': source.state_dict()}, path)
    model = ResT(arch='lite', init_cfg=[dict(type='Pretrained', checkpoint=str(path))])
    model.init_weights()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)


@pytest.mark.parametrize('cls', [ResT, ResTV2])
def test_empty_batch_gives_empty_maps(cls):
    model = cls().eval()
    with torch.no_grad():
        outputs = model(torch.randn(0, 3, 64, 96))
    assert [tuple(o.shape) for o in outputs] == [
        (0, model.embed_dims[i], 64 // s, 96 // s) for i, s in enumerate(STRIDES)]


def test_norm_in_path_feeds_the_normalised_map_on():
    """With ``norm_in_path`` stage i+1 consumes what stage i outputs; without it, the
    un-normalised map (the output norms then are side branches)."""
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    model = ResT(arch='lite', norm_in_path=True).double().eval()
    with torch.no_grad():
        outputs = model(x)
        stage2 = model.stages[1](outputs[0].permute(0, 2, 3, 1))
        torch.testing.assert_close(outputs[1], model.norm1(stage2).permute(0, 3, 1, 2))
        side = ResT(arch='lite').double().eval()
        side.load_state_dict(model.state_dict())
        side_outputs = side(x)
    torch.testing.assert_close(side_outputs[0], outputs[0])
    assert not torch.allclose(side_outputs[1], outputs[1], atol=1e-3)


@pytest.mark.parametrize('x, message', [
    (torch.randn(3, 64, 64), 'B×C×H×W'),
    (torch.randn(1, 1, 64, 64), 'built for 3 input channels, got a tensor with 1'),
    (torch.randn(1, 3, 0, 64), r'any size from 1×1 up, got an empty one \(shape \(1, 3, 0, 64\)\)'),
    (torch.randn(2, 3, 64, 0), r'got an empty one \(shape \(2, 3, 64, 0\)\)'),
])
@pytest.mark.parametrize('cls', [ResT, ResTV2])
def test_bad_input_tensors_are_refused_clearly(cls, x, message):
    with pytest.raises(ValueError, match=message):
        cls()(x)


def test_custom_arch_dict():
    arch = dict(embed_dims=(32, 64, 96, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                sr_ratios=(4, 2, 2, 1), mlp_ratio=2.)
    outputs = ResT(arch=arch).eval()(torch.randn(1, 3, 50, 70))
    assert [o.shape[1] for o in outputs] == [32, 64, 96, 128]


@pytest.mark.parametrize('ref', REFERENCES, ids=REFERENCE_IDS)
def test_stage_outputs_match_reference(ref, float32_tolerance):
    """Within float32 rounding of the authors' float32 run, derived from this input's
    float32 error (conftest.float32_tolerance), so that it holds on any CPU. v1's
    instance-normalised attention maps have a tiny variance, which the norm divides by:
    float32 rounding alone moves its stages 2-4 by a few 1e-5, and the bound follows.
    test_instance_norm_reordering_is_exact proves our reordering is the same function in
    float64."""
    reference = load_reference(ref)
    model = ours_from_reference(ref, reference['state_dict'])
    for case in reference['cases']:
        with torch.no_grad():
            outputs = model(case['input'])
        assert len(outputs) == 4
        bounds = float32_tolerance(model, case['input'])
        for i, (ours, theirs) in enumerate(zip(outputs, case['stages'])):
            expected = as_ours(model, case['stages'])[i]
            assert ours.shape == expected.shape
            error = (ours - expected).abs().max().item()
            assert error <= bounds[i], (f'{ref.file} input {tuple(case["input"].shape)} stage '
                                        f'{i + 1}: max error {error:.2e} > {bounds[i]:.2e}')


def test_instance_norm_reordering_is_exact():
    """Our EMSA (norm moved past ``attn @ v``, mean known from the softmax) is the same
    function as the op-by-op description: logits, 1x1 conv over heads, softmax,
    InstanceNorm2d, ``@ v``."""

    def op_by_op(self, q, k, v):
        logits = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = self.transform_conv(logits).softmax(dim=-1)
        return torch.matmul(F.instance_norm(attn, eps=1e-5), v)

    ref = REFERENCE_BY_NAME['v1']
    reference = load_reference(ref)
    model = ours_from_reference(ref, reference['state_dict']).double()
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
    stages = [m.double() for m in reference['cases'][0]['stages']]
    for a, expected in zip(ours, as_ours(model, stages)):
        assert (a - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize('ref', REFERENCES, ids=REFERENCE_IDS)
def test_classifier_weights_are_not_loaded(ref):
    """The head is dropped; only v1 keeps the classifier norm (as its stage-4 norm)."""
    converted = convert_checkpoint(load_reference(ref)['state_dict'])
    assert not any(k.startswith('head.') for k in converted)
    assert ('norm3.weight' in converted) == (ref.cls is ResT)


@pytest.mark.parametrize('cls, version', [(ResT, 1), (ResTV2, 2)])
def test_detectron2_backbones_are_reproduced(reference_arch, cls, version):
    """The authors' detectron2 backbones (their output norms numbered from 1, under
    ``backbone.bottom_up.``; v1's in the main path) equal ours after conversion: v1 with
    ``norm_in_path=True``, v2 as it is. Float64, odd input size."""
    theirs = randomised_detection_backbone(version, reference_arch)
    checkpoint = {'model': {f'backbone.bottom_up.{k}': v for k, v in theirs.state_dict().items()}}
    kwargs = dict(norm_in_path=True) if cls is ResT else {}
    ours = cls(arch=reference_arch, **kwargs).double().eval()
    load_converted_state_dict(ours, convert_checkpoint(checkpoint))
    x = torch.randn(2, 3, 61, 83, dtype=torch.float64)
    with torch.no_grad():
        expected, outputs = theirs(x), ours(x)
    for i, (a, b) in enumerate(zip(outputs, expected)):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-10, f'stage {i + 1}'
    if cls is ResT:  # the same weights with side-branch norms are another function
        side = cls(arch=reference_arch).double().eval()
        side.load_state_dict(ours.state_dict())
        with torch.no_grad():
            side_outputs = side(x)
        assert (side_outputs[0] - expected[0]).abs().max().item() < 1e-10
        for a, b in zip(side_outputs[1:], expected[1:]):
            assert (a - b).abs().max().item() > 1e-2


def _ours_from(straightforward_model, cls, arch, kwargs):
    model = cls(arch=arch, **kwargs).eval()
    load_converted_state_dict(model, convert_checkpoint(straightforward_model.state_dict()))
    return model


@pytest.mark.parametrize('ref', REFERENCES, ids=REFERENCE_IDS)
def test_ours_is_the_straightforward_function(ref, float32_tolerance):
    """Same weights, same outputs and same gradients: exact in float64 (where rounding
    cannot hide a difference), and in float32 within float32 rounding."""
    plain = straightforward_from_reference(ref, load_reference(ref)['state_dict'])
    ours = _ours_from(plain, ref.cls, REFERENCE_ARCH, ref.kwargs)
    x = torch.randn(2, 3, 72, 104)  # not multiples of 32: sizes come from the tensors
    with torch.no_grad():
        for a, b, bound in zip(ours(x), as_ours(ours, plain(x)), float32_tolerance(ours, x)):
            assert (a - b).abs().max().item() <= bound
    ours, plain = ours.double().train(), plain.double().train()
    x = x.double()
    for model, outputs in ((ours, ours(x)), (plain, as_ours(ours, plain(x)))):
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
            for o in outputs).backward()
        model.outputs = outputs
    for a, b in zip(ours.outputs, plain.outputs):
        assert (a - b).abs().max().item() < 1e-10
    plain_grads = convert_checkpoint({k: p.grad for k, p in plain.named_parameters()})
    for key, param in ours.named_parameters():
        if not param.requires_grad:  # the head-mixing bias: zero up to rounding in theirs
            assert plain_grads[key].abs().max().item() < 1e-10, key
        elif key in plain_grads:  # fresh output norms have no counterpart
            torch.testing.assert_close(param.grad, plain_grads[key], rtol=1e-8, atol=1e-10,
                                       msg=key)


def test_head_mixing_bias_cancels_in_the_softmax():
    """The 1×1 conv's bias adds one constant per head to every logit; the softmax removes
    it, in the authors' model too. So ours leaves it out and keeps it frozen."""
    torch.manual_seed(0)
    plain = straightforward.build('rest_lite').double().eval()
    ours = _ours_from(plain, ResT, 'lite', {}).double()
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        before = plain(x)
        for module in plain.modules():
            if hasattr(module, 'transform_conv'):
                module.transform_conv.bias.add_(3.)
        for a, b in zip(before, plain(x)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for a, b in zip(ours(x), as_ours(ours, plain(x))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    biases = [m.transform_conv.bias for m in ours.modules() if hasattr(m, 'transform_conv')]
    assert biases and not any(b.requires_grad for b in biases)


@pytest.mark.parametrize('cls', [ResT, ResTV2])
def test_blocked_rows_give_the_same_outputs_and_gradients(cls, monkeypatch):
    """At detection sizes the attention maps and the MLP's hidden layer are computed a
    block of rows at a time; tiny blocks here force many blocks at a small size."""
    from rest_mm import fused_attention, rest
    torch.manual_seed(0)
    model = cls(arch='lite' if cls is ResT else 'tiny').double().train()
    x = torch.randn(2, 3, 70, 98, dtype=torch.float64)

    def outputs_and_grads():
        model.zero_grad()
        outputs = model(x)
        sum((o * o.flip(-1)).sum() for o in outputs).backward()
        return outputs, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    whole, whole_grads = outputs_and_grads()
    calls = []  # what ran blocked: ('Mlp', 1) per MLP block, ('EMSA', blocks) per call
    original_mlp, original_row_blocks = rest.Mlp._mlp, fused_attention._row_blocks

    def mlp_block(module, tokens):
        calls.append(('Mlp', 1))
        return original_mlp(module, tokens)

    def row_blocks(tensor, rows):
        blocks = original_row_blocks(tensor, rows)
        calls.append(('EMSA', len(blocks)))
        return blocks

    monkeypatch.setattr(rest.Mlp, '_mlp', mlp_block)
    monkeypatch.setattr(fused_attention, '_row_blocks', row_blocks)
    monkeypatch.setattr(rest.Mlp, 'hidden_block_elements', 1000)
    monkeypatch.setattr(rest.EMSA, 'map_block_elements', 1000)
    blocked, blocked_grads = outputs_and_grads()
    monkeypatch.undo()
    assert calls  # the blocked paths ran
    mlps = sum(isinstance(m, rest.Mlp) for m in model.modules())
    assert sum(n for what, n in calls if what == 'Mlp') > mlps
    assert any(what == 'EMSA' and n > 1 for what, n in calls) == (cls is ResT)
    for a, b in zip(whole, blocked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # rounding scale: some gradients are exactly zero in theory (a conv bias before BN)
    scale = max(grad.abs().max().item() for grad in whole_grads.values())
    for name, grad in whole_grads.items():
        torch.testing.assert_close(blocked_grads[name], grad, rtol=1e-10, atol=1e-11 * scale,
                                   msg=name)


@pytest.mark.slow
@pytest.mark.parametrize('cls', [ResT, ResTV2])
def test_torch_compile_gives_the_same_output(cls, reference_arch):
    model = cls(arch=reference_arch).double().eval()
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        eager, compiled = model(x), torch.compile(model)(x)
    for a, b in zip(eager, compiled):
        assert (a - b).abs().max().item() < 1e-9
