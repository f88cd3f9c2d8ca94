"""Arguments and weights refused before the work (issue 16): empty ``--allow-missing``
prefixes, ``out_indices`` of the wrong type, NaN/Inf weights, and numeric tool options
that must be positive."""
import argparse

import pytest
import torch

from rest_mm import ResT, ResTV2, load_pretrained
from rest_mm.cli import benchmark, convert_weights, export_onnx, test, train, visualize
from rest_mm.cli.builders import positive_float, positive_int

from testlib import TOY_CONFIG_DIR

TOY_CONFIG = str(TOY_CONFIG_DIR / 'retinanet_rest_small_toy.py')


# --- --allow-missing -------------------------------------------------------------------
@pytest.mark.parametrize('tool', [train, test])
@pytest.mark.parametrize('prefix', ['', '   '])
def test_allow_missing_refuses_an_empty_prefix(capsys, tool, prefix):
    # An empty prefix starts every key: the check would accept another model's checkpoint.
    argv = [TOY_CONFIG] + (['some.pth'] if tool is test else [])
    with pytest.raises(SystemExit) as exit_info:
        tool.parse_args(argv + ['--allow-missing', 'roi_head.', prefix])
    assert exit_info.value.code == 2
    assert 'is no model key prefix' in capsys.readouterr().err


def test_allow_missing_keeps_real_prefixes():
    args = train.parse_args([TOY_CONFIG, '--allow-missing', 'bbox_head.', 'neck.'])
    assert args.allow_missing == ['bbox_head.', 'neck.']


# --- out_indices ------------------------------------------------------------------------
@pytest.mark.parametrize('cls', [ResT, ResTV2])
@pytest.mark.parametrize('out_indices', [True, False, (), [], (True, 2), (1.0, 2), '12',
                                         {1, 2}, None])
def test_out_indices_must_be_a_non_empty_sequence_of_ints(cls, out_indices):
    # True was taken as stage 1 (bool is an int) and () built a backbone with no output.
    with pytest.raises(ValueError, match='out_indices'):
        cls(arch='lite' if cls is ResT else 'tiny', out_indices=out_indices)


@pytest.mark.parametrize('out_indices, expected', [(2, (2, )), ([3, 0], (0, 3)),
                                                   ((-1, ), (3, ))])
def test_out_indices_accepts_an_int_a_list_or_a_tuple(out_indices, expected):
    assert ResT(arch='lite', out_indices=out_indices).out_indices == expected


def test_frozen_stages_refuses_a_bool():
    with pytest.raises(ValueError, match='frozen_stages'):
        ResT(arch='lite', frozen_stages=True)


# --- non-finite weights ------------------------------------------------------------------
NAN_KEY, INF_KEY = 'stages.0.blocks.0.attn.q.weight', 'stages.3.blocks.1.mlp.fc1.bias'


@pytest.fixture(scope='module')
def damaged_checkpoint(tmp_path_factory):
    """A ResT-lite checkpoint in the authors' wrapper with one NaN and two Infs."""
    state_dict = ResT(arch='lite').state_dict()
    state_dict[NAN_KEY][0, 0] = float('nan')
    state_dict[INF_KEY][:2] = float('inf')
    path = tmp_path_factory.mktemp('weights') / 'damaged.pth'
    torch.save({'model': state_dict}, path)
    return path


def test_non_finite_weights_are_refused_naming_the_tensors(damaged_checkpoint):
    model = ResT(arch='lite')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as error:
        load_pretrained(model, str(damaged_checkpoint))
    message = str(error.value)
    assert f'{NAN_KEY} (1 NaN, 0 Inf of' in message and f'{INF_KEY} (0 NaN, 2 Inf of' in message
    assert 'in 2 tensor(s) of' in message and 'allow_non_finite=True' in message
    # nothing was loaded
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_non_finite_weights_load_when_allowed(damaged_checkpoint):
    model = ResT(arch='lite')
    load_pretrained(model, str(damaged_checkpoint), allow_non_finite=True)
    assert torch.isnan(model.state_dict()[NAN_KEY][0, 0])


def test_pretrained_init_cfg_refuses_non_finite_weights_unless_allowed(damaged_checkpoint):
    init_cfg = dict(type='Pretrained', checkpoint=str(damaged_checkpoint))
    with pytest.raises(RuntimeError, match='non-finite'):
        ResT(arch='lite', init_cfg=init_cfg).init_weights()
    model = ResT(arch='lite', init_cfg=dict(init_cfg, allow_non_finite=True))
    model.init_weights()
    assert torch.isinf(model.state_dict()[INF_KEY][0])


def test_convert_weights_refuses_non_finite_weights_unless_allowed(damaged_checkpoint,
                                                                   tmp_path):
    dst = tmp_path / 'converted.pth'
    with pytest.raises(SystemExit) as exit_info:
        convert_weights.main([str(damaged_checkpoint), str(dst)])
    message = str(exit_info.value)
    assert exit_info.value.code == 2
    assert NAN_KEY in message and INF_KEY in message and '--allow-non-finite' in message
    assert not dst.exists()
    convert_weights.main([str(damaged_checkpoint), str(dst), '--allow-non-finite'])
    assert torch.isnan(torch.load(dst, weights_only=True)['state_dict'][NAN_KEY][0, 0])


# --- numeric tool options -----------------------------------------------------------------
@pytest.mark.parametrize('parse, argv, message', [
    (benchmark.parse_args, ['rest_lite', '--threads', '0'], 'must be at least 1'),
    (benchmark.parse_args, ['rest_lite', '--threads', '-2'], 'must be at least 1'),
    (export_onnx.parse_args, ['rest_lite', '--out', 'x.onnx', '--atol', '-1'],
     'must be a finite number above 0'),
    (export_onnx.parse_args, ['rest_lite', '--out', 'x.onnx', '--atol', '0'],
     'must be a finite number above 0'),
    (export_onnx.parse_args, ['rest_lite', '--out', 'x.onnx', '--atol', 'nan'],
     'must be a finite number above 0'),
    (visualize.parse_args, ['img.png', 'rest_lite', '--out', 'x.png', '--max-size', '0'],
     'must be at least 1'),
])
def test_tools_refuse_numbers_out_of_range(capsys, parse, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_export_onnx_refuses_a_negative_atol_before_exporting(tmp_path, capsys):
    out = tmp_path / 'model.onnx'
    with pytest.raises(SystemExit) as exit_info:
        export_onnx.main(['rest_lite', '--out', str(out), '--atol', '-1'])
    assert exit_info.value.code == 2 and '--atol' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('helper, text, value', [(positive_int, '3', 3),
                                                 (positive_float, '1e-4', 1e-4)])
def test_positive_helpers_accept_positive_numbers(helper, text, value):
    assert helper(text) == value


@pytest.mark.parametrize('helper, text', [(positive_int, '1.5'), (positive_int, 'x'),
                                          (positive_int, '0'), (positive_float, 'inf'),
                                          (positive_float, '-0.0'), (positive_float, 'x')])
def test_positive_helpers_refuse_the_rest(helper, text):
    with pytest.raises(argparse.ArgumentTypeError):
        helper(text)
