"""rest_mm.rest: the deprecated ``pretrained`` argument, which mmseg's segmentors pass on
from ``model.pretrained``. A checkpoint path becomes ``init_cfg`` (the same strict loading);
another zoo's model name, a non-string, or both arguments are clear errors."""
import warnings

import pytest
import torch

from rest_mm import ResT, ResTV2, convert_checkpoint

from testlib import REFERENCE_BY_NAME, load_reference

BACKBONES = [(ResT, 'v1'), (ResTV2, 'v2')]
BACKBONE_IDS = ['ResT', 'ResTV2']
SMALLEST_PRESET = {ResT: 'lite', ResTV2: 'tiny'}


@pytest.fixture(params=BACKBONES, ids=BACKBONE_IDS)
def released(request, tmp_path):
    """``(cls, path, authors' state dict)``: a reference model written as the authors
    release ImageNet weights."""
    cls, name = request.param
    state_dict = load_reference(REFERENCE_BY_NAME[name])['state_dict']
    path = tmp_path / f'{cls.__name__}_imagenet.pth'
    torch.save({'model': state_dict}, path)
    return cls, path, state_dict


@pytest.mark.parametrize('cls', [ResT, ResTV2], ids=BACKBONE_IDS)
def test_none_changes_nothing_and_warns_nothing(cls, reference_arch):
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        model = cls(arch=reference_arch, pretrained=None)
    assert model.init_cfg is None and model.pretrained_cfg is None


def test_a_path_becomes_init_cfg_and_loads_strictly(released, reference_arch):
    cls, path, state_dict = released
    with pytest.warns(FutureWarning, match='pretrained is deprecated; use init_cfg'):
        model = cls(arch=reference_arch, pretrained=str(path))
    assert model.init_cfg == dict(type='Pretrained', checkpoint=str(path))
    model.init_weights()
    for key, value in convert_checkpoint(state_dict).items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_a_path_of_other_weights_is_refused_by_the_strict_loader(released):
    cls, path, _ = released
    with pytest.warns(FutureWarning):
        model = cls(arch=SMALLEST_PRESET[cls], pretrained=str(path))
    with pytest.raises(RuntimeError, match='does not fit'):
        model.init_weights()


@pytest.mark.parametrize('name', [
    'open-mmlab://resnet50_v1c', 'openmmlab://msra/hrnetv2_w18', 'torchvision://resnet50',
    'modelzoo://resnet50', 'mmcls://mobilenet_v2', 'OPEN-MMLAB://resnet101_v1c'])
@pytest.mark.parametrize('cls', [ResT, ResTV2], ids=BACKBONE_IDS)
def test_another_zoos_model_name_is_a_clear_error(cls, name):
    with pytest.raises(ValueError, match=r'another architecture.*set model\.pretrained=None '
                                         r'and load .*init_cfg=dict\(type=.Pretrained'):
        cls(pretrained=name)


@pytest.mark.parametrize('value', [True, 3, '', ['a.pth'], dict(checkpoint='a.pth')])
def test_a_value_that_is_no_path_is_a_clear_error(value):
    with pytest.raises(ValueError, match=r'pretrained must be a checkpoint path or URL.*'
                                         r'set model\.pretrained=None'):
        ResT(pretrained=value)


def test_pretrained_and_init_cfg_together_are_refused():
    with pytest.raises(ValueError, match='got both pretrained=.*give only init_cfg'):
        ResTV2(pretrained='a.pth', init_cfg=dict(type='Pretrained', checkpoint='b.pth'))


def test_urls_are_paths_not_zoo_names():
    """A checkpoint at an http(s) address may be a ResT file; it goes to init_cfg."""
    url = 'https://example.com/rest_small.pth'
    with pytest.warns(FutureWarning):
        model = ResT(arch='lite', pretrained=url)
    assert model.pretrained_cfg == dict(type='Pretrained', checkpoint=url)
