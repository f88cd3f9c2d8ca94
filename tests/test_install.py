"""The installed stack is the pinned one and has what the project relies on."""
import importlib.metadata as metadata

import pytest
import torch

from testlib import needs_full_stack

pytestmark = needs_full_stack

PINS = {'torch': '2.13.0', 'mmengine': '0.10.7', 'mmcv': '2.1.0', 'mmdet': '3.3.0',
        'mmsegmentation': '1.2.2'}


@pytest.mark.parametrize('package, version', PINS.items())
def test_pinned_versions(package, version):
    assert metadata.version(package).split('+')[0] == version


def test_mmcv_has_compiled_ops():
    from mmcv.ops import nms
    boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])
    _, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


@pytest.mark.parametrize('base, model_type', [
    ('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', 'RetinaNet'),
    ('mmseg::_base_/models/upernet_swin.py', 'EncoderDecoder'),
])
def test_library_config_lookup_works(tmp_path, base, model_type):
    """``mmdet::`` / ``mmseg::`` bases need pkg_resources (setuptools<82)."""
    from mmengine.config import Config
    config = tmp_path / 'cfg.py'
    config.write_text(f"_base_ = ['{base}']\n")
    assert Config.fromfile(str(config)).model.type == model_type
