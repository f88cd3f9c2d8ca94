"""tools/test.py: multi-scale + flip testing."""

import pytest

import rest_mm  # noqa: F401  (the configs import it too, through custom_imports)


# --- tools/test.py --tta -------------------------------------------------------------
def test_tta_flag_wraps_the_model_and_swaps_the_pipeline(load_tool):
    test_tool = load_tool('test')
    cfg = Config.fromfile(str(CONFIG_DIR / UPERNET_TINY)).copy()
    model = cfg.model.copy()
    test_tool._use_tta(cfg, UPERNET_TINY)
    assert cfg.model.type == 'SegTTAModel' and cfg.model.module == model
    assert cfg.test_dataloader.dataset.pipeline == cfg.tta_pipeline
from mmengine.config import Config
from testlib import CONFIG_DIR

UPERNET_TINY = 'segmentation/upernet_restv2_tiny_ade20k.py'


def test_tta_flag_on_a_config_without_tta_fails_clearly(load_tool):
    test_tool = load_tool('test')
    cfg = Config.fromfile(str(CONFIG_DIR / 'detection/mask_rcnn_rest_small_coco.py')).copy()  # mmdet's has none
    with pytest.raises(ValueError, match='--tta needs tta_model and tta_pipeline'):
        test_tool._use_tta(cfg, 'detection/mask_rcnn_rest_small_coco.py')
