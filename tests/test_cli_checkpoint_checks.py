"""rest_mm.cli.checkpoint_checks: whole-model checkpoints are refused unless they fit."""
import re

import pytest
import torch

from rest_mm.cli import errors
from rest_mm.cli.checkpoint_checks import check_model_fits, load_whole_model


def _toy_detector():
    detector = torch.nn.Module()
    detector.backbone = torch.nn.Linear(2, 2)
    detector.neck = torch.nn.Linear(2, 3)
    detector.head = torch.nn.Linear(3, 4)
    return detector


def test_whole_model_check_refuses_anything_partial():
    detector = _toy_detector()
    own = detector.state_dict()
    check_model_fits(detector, {'state_dict': own, 'meta': {}}, 'ok.pth')
    check_model_fits(detector, {f'module.{k}': v for k, v in own.items()}, 'ddp.pth')

    backbone_only = {'stem.conv1.weight': torch.zeros(1), 'stages.0.x': torch.zeros(1)}
    with pytest.raises(RuntimeError, match='looks like a backbone or ImageNet checkpoint'):
        check_model_fits(detector, {'model': backbone_only}, 'b.pth')
    detectron2 = {f'backbone.bottom_up.{k}': v for k, v in backbone_only.items()}
    with pytest.raises(RuntimeError, match='tools/convert_weights.py'):
        check_model_fits(detector, detectron2, 'model_final.pth')
    partial = {k: v for k, v in own.items() if not k.startswith('head.')}
    with pytest.raises(RuntimeError, match=r'2 missing \(head\.weight, head\.bias\)'):
        check_model_fits(detector, {'state_dict': partial}, 'p.pth')
    other = dict(own, **{'roi_head.fc.weight': torch.zeros(1)})
    other['head.weight'] = torch.zeros(5, 3)
    with pytest.raises(RuntimeError) as info:
        check_model_fits(detector, {'state_dict': other}, 'other.pth')
    assert '1 unexpected (roi_head.fc.weight)' in str(info.value)
    assert '1 mis-shaped (head.weight (checkpoint (5, 3), model (4, 3)))' in str(info.value)
    broken = dict(own, **{'head.bias': [0.0] * 4})
    with pytest.raises(RuntimeError, match=r'1 not tensors \(head\.bias \(list\)\)'):
        check_model_fits(detector, broken, 'broken.pth')

    # Partial loading only by name: the named parts may be missing, left over or mis-shaped.
    check_model_fits(detector, {'state_dict': partial}, 'p.pth', allow_missing=['head.'])
    check_model_fits(detector, {'state_dict': other}, 'o.pth',
                     allow_missing=['head.', 'roi_head.'])
    with pytest.raises(RuntimeError, match='2 missing'):
        check_model_fits(detector, {'state_dict': partial}, 'p.pth', allow_missing=['neck.'])


def test_whole_model_loads_or_says_why_into_what(tmp_path):
    detector, trained = _toy_detector(), _toy_detector()
    path = tmp_path / 'trained.pth'
    torch.save({'state_dict': trained.state_dict(), 'meta': {}}, path)
    load_whole_model(detector, str(path), 'the toy detector')
    assert torch.equal(detector.head.weight, trained.head.weight)

    torch.save({'state_dict': {k: v for k, v in trained.state_dict().items()
                               if not k.startswith('head.')}}, path)
    with pytest.raises(errors.UserError, match=f'{re.escape(str(path))} does not load into the '
                                               f'toy detector: .*2 missing'):
        load_whole_model(detector, str(path), 'the toy detector')
    with pytest.raises(errors.UserError, match='does not load into the toy detector: .*does '
                                               'not exist'):
        load_whole_model(detector, str(tmp_path / 'absent.pth'), 'the toy detector')
