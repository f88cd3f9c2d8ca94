"""rest_mm/cli/toy_data.py: exact, deterministic shapes data, and the toy configs that train
on it."""
import json

import numpy as np
import pytest
from mmengine.config import Config
from PIL import Image

from rest_mm.cli.toy_data import (
    CLASSES,
    SEG_CLASSES,
    ToyDataSpec,
    generate_toy_datasets,
    read_manifest,
)

from testlib import REPO, SMALL_SPEC, TOY_CONFIG_DIR, needs_full_stack


def test_toy_data_is_exact_and_deterministic(tmp_path):
    first = generate_toy_datasets(str(tmp_path / 'a'), SMALL_SPEC)
    second = generate_toy_datasets(str(tmp_path / 'b'), SMALL_SPEC)
    assert first['generated'] == second['generated'] == 'yes'
    assert generate_toy_datasets(str(tmp_path / 'a'), SMALL_SPEC)['generated'] == 'no'
    assert read_manifest(str(tmp_path / 'a'))['num_train'] == SMALL_SPEC.num_train

    coco_a = json.loads((tmp_path / 'a/toy_coco/annotations/instances_train.json').read_text())
    coco_b = json.loads((tmp_path / 'b/toy_coco/annotations/instances_train.json').read_text())
    assert coco_a == coco_b
    assert [c['name'] for c in coco_a['categories']] == list(CLASSES)
    assert len(coco_a['images']) == SMALL_SPEC.num_train
    labels_seen = set()
    for image in coco_a['images']:
        name = image['file_name'].replace('.jpg', '.png')
        label_map = np.asarray(Image.open(tmp_path / 'a/toy_ade/annotations/training' / name))
        same = np.asarray(Image.open(tmp_path / 'b/toy_ade/annotations/training' / name))
        assert np.array_equal(label_map, same)
        assert label_map.shape == (SMALL_SPEC.height, SMALL_SPEC.width)
        anns = [a for a in coco_a['annotations'] if a['image_id'] == image['id']]
        assert 1 <= len(anns) <= SMALL_SPEC.max_objects
        # Every box encloses exactly its shape's pixels in the label map.
        for ann in anns:
            x, y, w, h = ann['bbox']
            inside = label_map[y:y + h, x:x + w] == ann['category_id']
            assert inside.sum() == ann['area'] > 0
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() \
                and inside[:, -1].any()
            labels_seen.add(ann['category_id'])
        assert (label_map > 0).sum() == sum(a['area'] for a in anns)
    assert labels_seen == {1, 2, 3}

    changed = ToyDataSpec(**{**SMALL_SPEC.__dict__, 'seed': 4})
    assert generate_toy_datasets(str(tmp_path / 'a'), changed)['generated'] == 'yes'
    with pytest.raises(ValueError, match='max_size 100 does not fit a 48x64 image'):
        ToyDataSpec(height=48, width=64, max_size=100)


@needs_full_stack
@pytest.mark.parametrize('name', ['retinanet_rest_small_toy', 'mask_rcnn_rest_small_toy',
                                  'upernet_restv2_tiny_toy'])
def test_toy_configs_only_swap_data_and_schedule(name):
    toy = Config.fromfile(str(REPO / 'configs' / 'toy' / f'{name}.py'))
    real_name = {'retinanet_rest_small_toy': 'detection/retinanet_rest_small_coco',
                 'mask_rcnn_rest_small_toy': 'detection/mask_rcnn_rest_small_coco',
                 'upernet_restv2_tiny_toy': 'segmentation/upernet_restv2_tiny_ade20k'}[name]
    real = Config.fromfile(str(REPO / 'configs' / f'{real_name}.py'))
    assert toy.model.backbone.init_cfg is None
    toy_backbone = {k: v for k, v in toy.model.backbone.items() if k != 'init_cfg'}
    assert toy_backbone == {k: v for k, v in real.model.backbone.items() if k != 'init_cfg'}
    assert toy.model.get('neck') == real.model.get('neck')
    assert toy.optim_wrapper.paramwise_cfg == real.optim_wrapper.paramwise_cfg
    assert toy.optim_wrapper.optimizer.type == real.optim_wrapper.optimizer.type
    assert 'SyncBN' not in toy.pretty_text


@needs_full_stack
def test_toy_configs_name_the_generated_classes():
    """The configs' class names are the generator's, in its label order (COCO category ids
    from 1; ADE label values with 0 as background): the data's one definition."""
    for path in sorted(TOY_CONFIG_DIR.glob('*.py')):
        cfg = Config.fromfile(str(path))
        expected = SEG_CLASSES if cfg.default_scope == 'mmseg' else CLASSES
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
            metainfo = cfg[loader].dataset.metainfo
            assert tuple(metainfo['classes']) == expected, (path.name, loader)
            assert len(metainfo['palette']) == len(expected), (path.name, loader)
