"""The converter maps every released checkpoint key and loading is strict."""
import json
import signal

import numpy as np
import pytest
import torch

from rest_mm import ResT, ResTV2, convert_checkpoint, load_pretrained
from rest_mm.presets import PRESET_NAMES, parse_preset_name
from rest_mm.rest import BACKBONES
from rest_mm.weights.backbone import convert_model_backbone, load_converted_state_dict

from testlib import randomised_detection_backbone


@pytest.fixture(scope='module')
def released_keys(reference_dir):
    return json.loads((reference_dir / 'reference_checkpoint_keys.json').read_text())


def _meta_state_dict(key_shapes):
    return {k: torch.empty(shape, device='meta') for k, shape in key_shapes.items()}


def _meta_model(cls, arch, **kwargs):
    with torch.device('meta'):
        return cls(arch=arch, **kwargs)


@pytest.mark.parametrize('release', PRESET_NAMES)
def test_converter_maps_every_released_key(released_keys, release):
    model_name, arch = parse_preset_name(release)
    cls = BACKBONES[model_name]
    released = _meta_state_dict(released_keys[release])
    converted = convert_checkpoint({'model': released})
    own = _meta_model(cls, arch).state_dict()
    fresh = {k for k in own if k.split('.')[0] in {f'norm{i}' for i in cls.fresh_norm_indices}}
    assert set(converted) == set(own) - fresh, 'nothing missing, nothing left over'
    for key, value in converted.items():
        assert value.shape == own[key].shape, key
    dropped = set(released) - {k for k in released if not k.startswith('head.')}
    assert dropped == {'head.weight', 'head.bias'} or cls is ResTV2
    # every released tensor but the classifier is used exactly once
    used = len(released) - 2 - (0 if cls is ResT else 2)
    assert len(converted) == used
    load_converted_state_dict(_meta_model(cls, arch), converted, source=release)


def test_converter_is_idempotent_and_accepts_every_layout(reference_dir):
    raw = torch.load(reference_dir / 'rest_v2_tiny.pt', weights_only=True)['state_dict']
    expected = convert_checkpoint(raw)
    assert list(convert_checkpoint(expected)) == list(expected)
    layouts = {
        'released': {'model': raw, 'epoch': 300},
        'state_dict wrapper': {'state_dict': raw, 'meta': {}},
        'DataParallel': {f'module.{k}': v for k, v in raw.items()},
        'detectron2': {**{f'backbone.bottom_up.{k}': v for k, v in raw.items()},
                       'backbone.fpn_lateral2.weight': torch.zeros(1)},
        'our detector': {'state_dict': {**{f'backbone.{k}': v for k, v in expected.items()},
                                        'neck.lateral_convs.0.conv.weight': torch.zeros(1),
                                        'bbox_head.retina_cls.bias': torch.zeros(1)}},
    }
    for name, checkpoint in layouts.items():
        converted = convert_checkpoint(checkpoint)
        assert list(converted) == list(expected), name
        assert all(converted[k] is expected[k] or torch.equal(converted[k], expected[k])
                   for k in expected), name
    # pure: the input is left as it was
    assert 'stem.proj.0.weight' in raw and 'head.weight' in raw


def test_wrong_variant_is_an_error_that_names_the_right_one(released_keys):
    base = convert_checkpoint(_meta_state_dict(released_keys['rest_base']))
    with pytest.raises(RuntimeError) as info:
        load_converted_state_dict(_meta_model(ResT, 'small'), base, source='rest_base.pth')
    message = str(info.value)
    assert 'shape mismatches' in message and "ResT(arch='base')" in message
    v2 = convert_checkpoint(_meta_state_dict(released_keys['restv2_small']))
    with pytest.raises(RuntimeError, match=r"ResTV2\(arch='small'\)"):
        load_converted_state_dict(_meta_model(ResT, 'small'), v2)


def test_missing_or_unexpected_keys_are_errors(released_keys):
    weights = convert_checkpoint(_meta_state_dict(released_keys['rest_lite']))
    incomplete = {k: v for k, v in weights.items() if k != 'stages.1.blocks.0.attn.q.weight'}
    with pytest.raises(RuntimeError, match=r'missing keys: stages\.1\.blocks\.0\.attn\.q\.weight'):
        load_converted_state_dict(_meta_model(ResT, 'lite'), incomplete)
    extra = dict(weights, **{'stages.1.blocks.0.attn.gamma': torch.empty(3, device='meta')})
    with pytest.raises(RuntimeError, match=r'unexpected keys: stages\.1\.blocks\.0\.attn\.gamma'):
        load_converted_state_dict(_meta_model(ResT, 'lite'), extra)
    with pytest.raises(RuntimeError, match='holds no ResT/ResTV2 backbone weights'):
        load_converted_state_dict(_meta_model(ResT, 'lite'), convert_checkpoint({'model': {}}))
    no_norm3 = {k: v for k, v in weights.items() if not k.startswith('norm3.')}
    with pytest.raises(RuntimeError, match='missing keys: norm3.weight'):
        load_converted_state_dict(_meta_model(ResT, 'lite'), no_norm3)


def test_output_norms_of_unused_stages_may_be_left_over(released_keys):
    weights = convert_checkpoint(_meta_state_dict(released_keys['rest_lite']))
    load_converted_state_dict(_meta_model(ResT, 'lite', out_indices=(1, 2)), weights)


def test_pretrained_init_cfg_loads_released_file(tmp_path, reference_dir, reference_arch):
    reference = torch.load(reference_dir / 'rest_v1_tiny.pt', weights_only=True)
    path = tmp_path / 'rest_tiny_imagenet.pth'
    torch.save({'model': reference['state_dict']}, path)
    model = ResT(arch=reference_arch, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    for key, value in convert_checkpoint(reference['state_dict']).items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_missing_and_corrupt_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_pretrained(ResT(), str(tmp_path / 'nope.pth'))
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'this is not a checkpoint')
    with pytest.raises(RuntimeError, match='could not be read'):
        load_pretrained(ResT(), str(corrupt))
    not_a_dict = tmp_path / 'tensor.pth'
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(RuntimeError, match='holds a Tensor'):
        load_pretrained(ResT(), str(not_a_dict))


def test_pretrained_prefix_selects_a_sub_model(tmp_path, reference_dir, reference_arch):
    reference = torch.load(reference_dir / 'rest_v2_tiny.pt', weights_only=True)['state_dict']
    path = tmp_path / 'distilled.pth'
    torch.save({'state_dict': {f'teacher.backbone.{k}': v for k, v in reference.items()}}, path)
    model = ResTV2(arch=reference_arch)
    load_pretrained(model, str(path), prefix='teacher.backbone.')
    torch.testing.assert_close(model.stem.norm.weight, reference['stem.norm.weight'])
    with pytest.raises(RuntimeError, match="no key starting with 'student.'"):
        load_pretrained(model, str(path), prefix='student.')


def test_backbone_loads_from_a_trained_detector_checkpoint(tmp_path, reference_dir,
                                                           reference_arch):
    """A Runner checkpoint pickles training state (HistoryBuffer, numpy); it still reads
    with ``weights_only`` loading."""
    from mmengine.logging import HistoryBuffer
    reference = torch.load(reference_dir / 'rest_v1_tiny.pt', weights_only=True)['state_dict']
    ours = convert_checkpoint(reference)
    buffer = HistoryBuffer()
    buffer.update(0.5)
    path = tmp_path / 'epoch_12.pth'
    torch.save({'meta': {'epoch': 12}, 'message_hub': {'log_scalars': {'loss': buffer},
                                                      'runtime_info': {'seed': np.int64(3)}},
                'state_dict': {**{f'backbone.{k}': v for k, v in ours.items()},
                               'neck.fpn_convs.0.conv.weight': torch.zeros(1)}}, path)
    model = ResT(arch=reference_arch)
    load_pretrained(model, str(path))
    torch.testing.assert_close(model.norm3.weight, ours['norm3.weight'])


def test_self_containing_checkpoint_is_an_error_not_a_hang(tmp_path, reference_arch):
    checkpoint = {'epoch': 3}
    checkpoint['model'] = checkpoint
    looped = {'state_dict': {}}
    looped['state_dict']['model'] = looped
    previous = signal.signal(signal.SIGALRM, _timed_out)
    signal.alarm(20)
    try:
        for cycle in (checkpoint, looped):
            with pytest.raises(ValueError, match='a cycle'):
                convert_checkpoint(cycle)
        path = tmp_path / 'cycle.pth'
        torch.save(checkpoint, path)
        with pytest.raises(ValueError, match='a cycle'):
            load_pretrained(ResTV2(arch=reference_arch), str(path))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _timed_out(signum, frame):
    raise TimeoutError('unwrapping the checkpoint did not end')


def test_values_that_are_not_tensors_are_clear_errors(released_keys):
    weights = convert_checkpoint(_meta_state_dict(released_keys['rest_lite']))
    weights['stages.0.blocks.0.attn.q.weight'] = 'not a tensor'
    with pytest.raises(RuntimeError, match=r'not tensors: stages\.0\.blocks\.0\.attn\.q\.weight '
                                           r'\(str\)'):
        load_converted_state_dict(_meta_model(ResT, 'lite'), weights)


def test_weights_of_another_model_are_named_as_such():
    """A ResNet's weights used to get the hint "these weights fit ResTV2 with
    embed_dims=(None, None, None, None)"."""
    resnet = {'conv1.weight': torch.zeros(64, 3, 7, 7), 'bn1.weight': torch.zeros(64),
              'layer1.0.conv1.weight': torch.zeros(64, 64, 1, 1),
              'fc.weight': torch.zeros(10, 2048)}
    with pytest.raises(RuntimeError, match='holds no ResT/ResTV2 backbone weights') as info:
        load_converted_state_dict(ResT(arch='lite'), convert_checkpoint({'state_dict': resnet}),
                                  source='resnet50.pth')
    assert 'None' not in str(info.value) and 'conv1.weight' in str(info.value)


def test_output_norm_conversion_is_idempotent_and_keeps_trained_norms(reference_arch):
    """The authors' trained output norms land on ours (none dropped, none mixed up with the
    ImageNet ``norm``), and converting our own layout again changes nothing."""
    theirs = randomised_detection_backbone(1, reference_arch).state_dict()
    converted = convert_checkpoint({f'backbone.bottom_up.{k}': v for k, v in theirs.items()})
    for i, key in enumerate(('norm1', 'norm2', 'norm3', 'norm')):
        torch.testing.assert_close(converted[f'norm{i}.weight'], theirs[f'{key}.weight'])
    again = convert_checkpoint({'state_dict': {f'backbone.{k}': v for k, v in converted.items()}})
    assert list(again) == list(converted)
    assert all(again[k] is converted[k] for k in converted)
    mmseg0x = {f'norm_{i + 1}.{p}': torch.full((8, ), float(i)) for i in range(4)
               for p in ('weight', 'bias')}
    mmseg0x['stage1.0.norm1.weight'] = torch.ones(8)
    renamed = convert_checkpoint(mmseg0x)
    assert [renamed[f'norm{i}.weight'][0].item() for i in range(4)] == [0., 1., 2., 3.]


def test_whole_model_backbones_account_for_every_key(released_keys):
    """The detectron2 and mmseg 0.x converters' one backbone check: keys the converter would
    drop, keys the preset's model lacks or has, and weights that fit no preset."""
    imagenet = _meta_state_dict(released_keys['restv2_tiny'])
    backbone = {k: v for k, v in imagenet.items() if not k.startswith(('head.', 'norm.'))}
    for i, dim in enumerate((96, 192, 384, 768)):  # mmseg 0.x's output norms, from 1
        backbone.update({f'norm_{i + 1}.{p}': torch.empty(dim, device='meta')
                         for p in ('weight', 'bias')})
    weights, model_name, arch = convert_model_backbone(backbone, 'backbone.', 'test', BACKBONES)
    assert (model_name, arch) == ('ResTV2', 'tiny') and 'norm3.weight' in weights

    with pytest.raises(ValueError, match=r"unexplained keys \['backbone\.head\.weight'\]"):
        convert_model_backbone(dict(backbone, **{'head.weight': imagenet['head.weight']}),
                               'backbone.', 'test', BACKBONES)
    no_norm = {k: v for k, v in backbone.items() if not k.startswith('norm_3.')}
    with pytest.raises(ValueError, match=r"missing \(our names\) \['backbone\.norm2\.weight'"):
        convert_model_backbone(no_norm, 'backbone.', 'test', BACKBONES, out_indices=(0, 1, 2, 3))
    mis_shaped = dict(backbone, **{'norm_1.bias': torch.empty(3, device='meta')})
    with pytest.raises(ValueError, match=r"shape mismatches \['backbone\.norm_1\.bias \(3,\)'"):
        convert_model_backbone(mis_shaped, 'backbone.', 'test', BACKBONES)
    shallower = {k: v for k, v in backbone.items() if not k.startswith('stage3.5.')}
    with pytest.raises(ValueError, match=r'the test backbone: these weights fit ResTV2 with '
                                         r'embed_dims=\(96, 192, 384, 768\) and depths='
                                         r'\(1, 2, 5, 2\), which is no preset'):
        convert_model_backbone(shallower, 'backbone.', 'test', BACKBONES)
