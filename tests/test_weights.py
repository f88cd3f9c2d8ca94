"""rest_mm.weights: one entry point that recognises each released layout. The whole-model
kinds are tested in depth in test_weights_detectron2.py and test_weights_mmseg0x.py; here,
the dispatch."""
import pytest
import torch

from rest_mm.weights import convert_released

from testlib import REFERENCE_BY_NAME, load_reference


@pytest.mark.parametrize('name, model_name', [('v1', 'ResT'), ('v2', 'ResTV2')])
def test_imagenet_release_becomes_backbone_weights(name, model_name):
    released = {'model': load_reference(REFERENCE_BY_NAME[name])['state_dict']}
    weights, meta = convert_released(released)
    assert meta == dict(kind='backbone', model=model_name, embed_dims=[16, 32, 64, 128],
                        depths=[1, 1, 2, 1])
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    assert not any(k.startswith('head.') for k in weights)
    assert convert_released(weights)[0].keys() == weights.keys()  # idempotent


def test_other_models_are_refused_clearly():
    with pytest.raises(ValueError, match='holds no ResT/ResTV2 backbone weights'):
        convert_released({'state_dict': {'conv1.weight': torch.zeros(64, 3, 7, 7)}})
