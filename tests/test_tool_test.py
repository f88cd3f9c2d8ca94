"""tools/test.py: multi-scale + flip testing, and strict loading of the whole model."""
import pytest
import torch
from mmengine.config import Config

import rest_mm  # noqa: F401  (the configs import it too, through custom_imports)
from rest_mm.cli import test as test_tool

from testlib import CONFIG_DIR, REPO, fresh_toy_data, needs_full_stack, toy_options

pytestmark = needs_full_stack

UPERNET_TINY = 'segmentation/upernet_restv2_tiny_ade20k.py'


# --- tools/test.py --tta -------------------------------------------------------------
def test_tta_flag_wraps_the_model_and_swaps_the_pipeline():
    cfg = Config.fromfile(str(CONFIG_DIR / UPERNET_TINY)).copy()
    model = cfg.model.copy()
    test_tool._use_tta(cfg, UPERNET_TINY)
    assert cfg.model.type == 'SegTTAModel' and cfg.model.module == model
    assert cfg.test_dataloader.dataset.pipeline == cfg.tta_pipeline


def test_tta_flag_on_a_config_without_tta_fails_clearly():
    # mmdet's configs have no TTA
    cfg = Config.fromfile(str(CONFIG_DIR / 'detection/mask_rcnn_rest_small_coco.py')).copy()
    with pytest.raises(ValueError, match='--tta needs tta_model and tta_pipeline'):
        test_tool._use_tta(cfg, 'detection/mask_rcnn_rest_small_coco.py')


# --- strict loading ------------------------------------------------------------------
def test_test_tool_loads_the_whole_model_strictly(tmp_path):
    """A RetinaNet checkpoint with the UperNet config used to be tested (mIoU reported)
    after mmengine's warnings; and a refused start left a timestamped folder behind."""
    options = toy_options(fresh_toy_data(tmp_path), 'mmseg')
    config = str(REPO / 'configs' / 'toy' / 'upernet_restv2_tiny_toy.py')
    retinanet = tmp_path / 'retinanet.pth'
    torch.save({'meta': {}, 'state_dict': {
        'backbone.stem.proj.0.weight': torch.zeros(24, 3, 3, 3),
        'bbox_head.retina_cls.weight': torch.zeros(27, 256, 3, 3)}}, retinanet)
    work = tmp_path / 'work'
    argv = [config, str(retinanet), '--work-dir', str(work)]
    # mmengine keeps one visualizer per name in a process (a CLI run is one per process)
    options += ['visualizer.name=strict_loading_first']
    with pytest.raises(SystemExit) as info:
        test_tool.main(argv + options)
    message = str(info.value)
    assert 'does not fit the EncoderDecoder built from the config' in message
    assert 'unexpected (bbox_head.retina_cls.weight)' in message and ' missing (' in message
    assert 'mis-shaped (backbone.stem.proj.0.weight' in message
    assert '--allow-missing' in message
    assert not work.exists()  # nothing left of the refused start
    work.mkdir()
    (work / 'earlier.log').write_text('kept')
    with pytest.raises(SystemExit, match='does not fit'):
        test_tool.main(argv + options[:-1] + ['visualizer.name=strict_loading_second'])
    assert sorted(p.name for p in work.iterdir()) == ['earlier.log']

    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint\n')
    with pytest.raises(SystemExit, match='neither a torch checkpoint nor a pickle'):
        test_tool.main([config, str(text)] + options)
