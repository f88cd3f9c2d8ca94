"""Generic checks run over every preset of both models."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from rest_mm import ResT, ResTV2

PRESETS = [(ResT, arch) for arch in ResT.arch_zoo] + [(ResTV2, arch) for arch in ResTV2.arch_zoo]
PRESET_IDS = [f'{cls.__name__}-{arch}' for cls, arch in PRESETS]
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
    # the head-mixing bias cancels in the softmax (tests/test_speed_tools.py): frozen
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
@pytest.mark.parametrize('out_indices, expected', [((1, 2, 3), (1, 2, 3)), ((-1, 0), (0, 3)), (2, (2, ))])
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
])
def test_bad_input_tensors_are_refused_clearly(x, message):
    with pytest.raises(ValueError, match=message):
        ResTV2()(x)


def test_custom_arch_dict():
    arch = dict(embed_dims=(32, 64, 96, 128), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4),
                sr_ratios=(4, 2, 2, 1), mlp_ratio=2.)
    outputs = ResT(arch=arch).eval()(torch.randn(1, 3, 50, 70))
    assert [o.shape[1] for o in outputs] == [32, 64, 96, 128]
