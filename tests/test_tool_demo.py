"""tools/demo.py: clear errors and never drawing over its inputs; run as a user would
(slow), on generated images of odd sizes: pictures of the input's size with detections,
masks or a class overlay, and a folder that goes on past what it cannot run."""
import subprocess
import sys
from pathlib import Path

import mmcv
import numpy as np
import pytest
import torch

from rest_mm.cli import demo as demo_tool

from testlib import DET_CONFIG, SEG_CONFIG, TOOLS_DIR, needs_full_stack, run, write_image

pytestmark = needs_full_stack


def test_demo_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match='holds no image files'):
        demo_tool.list_images(str(tmp_path))
    (tmp_path / 'notes.txt').write_text('not an image')
    with pytest.raises(ValueError, match='is not an image file'):
        demo_tool.list_images(str(tmp_path / 'notes.txt'))
    with pytest.raises(FileNotFoundError, match='neither an image file nor a folder'):
        demo_tool.list_images(str(tmp_path / 'missing.jpg'))
    # A folder named like an image is not one (it used to end in IndexError).
    (tmp_path / 'x.png').mkdir()
    write_image(tmp_path / 'b.png', 8, 8)
    assert demo_tool.list_images(str(tmp_path)) == [tmp_path / 'b.png']
    # a config of another library: the tools' one check, naming the config
    config = tmp_path / 'classifier.py'
    config.write_text("default_scope = 'mmpretrain'\nmodel = dict(type='ImageClassifier')\n")
    with pytest.raises(SystemExit, match=f"{config}: default_scope is 'mmpretrain'"):
        demo_tool.main([str(tmp_path / 'b.png'), str(config), '--out-dir',
                        str(tmp_path / 'out')])


def test_demo_never_draws_over_its_inputs(tmp_path):
    """``--out-dir`` equal to the image folder used to overwrite the pictures."""
    folder = tmp_path / 'photos'
    folder.mkdir()
    write_image(folder / 'a.png', 16, 16)
    cases = [
        ([str(folder), '--out-dir', str(folder)], 'the output is the input folder'),
        ([str(folder), '--out-dir', str(folder / 'drawn')], 'is inside the input folder'),
        ([str(folder / 'a.png'), '--out-dir', str(folder)],
         'would write a.png into the folder of the input image'),
    ]
    for (inputs, *out), message in cases:
        with pytest.raises(SystemExit, match=message):
            demo_tool.main([inputs, str(SEG_CONFIG), *out])
    assert sorted(p.name for p in folder.iterdir()) == ['a.png']


def _detector_checkpoint(path: Path, classes):
    """Mask R-CNN weights (random) whose classifier calls every region ``classes[0]``,
    saved as mmengine's Runner saves them (message hub included)."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.logging import MessageHub
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    cfg = Config.fromfile(str(DET_CONFIG))
    cfg.model.backbone.init_cfg = None
    detector = MODELS.build(cfg.model)
    state_dict = detector.state_dict()
    state_dict['roi_head.bbox_head.fc_cls.bias'][0] = 30.0
    hub = MessageHub('usage_test_hub')
    hub.update_scalar('train/loss', 1.0)
    torch.save(dict(meta=dict(dataset_meta=dict(classes=classes)), state_dict=state_dict,
                    message_hub=hub.state_dict()), path)


@pytest.mark.slow
def test_demo_draws_detections_and_masks(tmp_path):
    image = write_image(tmp_path / 'street.png', 237, 351)
    checkpoint = tmp_path / 'detector.pth'
    classes = tuple(['widget'] + [f'class{i}' for i in range(1, 80)])
    _detector_checkpoint(checkpoint, classes)
    stdout = run([sys.executable, TOOLS_DIR / 'demo.py', tmp_path / 'street.png', DET_CONFIG,
                  checkpoint, '--out-dir', tmp_path / 'out', '--device', 'cpu'],
                 cwd=tmp_path, timeout=900).stdout
    assert 'RANDOM' not in stdout
    # The checkpoint's class names are used, and its classifier finds "widgets".
    assert 'objects with score >= 0.3: widget 1.00' in stdout
    drawn = mmcv.imread(str(tmp_path / 'out' / 'street.png'))
    assert drawn.shape == image.shape
    changed = np.abs(drawn.astype(int) - image).max(axis=-1) > 30
    assert changed.mean() > 0.01  # boxes, masks and labels are drawn on the picture


@pytest.mark.slow
def test_demo_segments_a_folder_with_random_weights(tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    images = {'wide.png': write_image(folder / 'wide.png', 121, 317),
              'tall.jpg': write_image(folder / 'tall.jpg', 150, 97)}
    (folder / 'readme.txt').write_text('skipped: not an image')
    stdout = run([sys.executable, TOOLS_DIR / 'demo.py', folder, SEG_CONFIG, '--out-dir',
                  tmp_path / 'out'], cwd=tmp_path, timeout=900).stdout
    assert 'the weights are RANDOM' in stdout
    for name, image in images.items():
        assert f'{name}: classes by area: ' in stdout
        drawn = mmcv.imread(str(tmp_path / 'out' / name))
        assert drawn.shape == image.shape
        # The class overlay covers the picture.
        assert (np.abs(drawn.astype(int) - image).max(axis=-1) > 10).mean() > 0.5
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == sorted(images)


@pytest.mark.slow
def test_demo_skips_what_it_cannot_run_and_says_so(tmp_path):
    """An unreadable file used to stop the folder at the first failure; a 1x1 image
    (README: any size) crashed mmseg's visualiser. Now: reported, the others processed,
    exit status 1 at the end."""
    folder = tmp_path / 'images'
    folder.mkdir()
    write_image(folder / 'a_good.png', 45, 61)
    (folder / 'b_broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    write_image(folder / 'c_tiny.png', 1, 1)
    write_image(folder / 'd_good.png', 30, 20)
    (folder / 'e_folder.png').mkdir()
    result = subprocess.run([sys.executable, str(TOOLS_DIR / 'demo.py'), str(folder),
                             str(SEG_CONFIG), '--out-dir', str(tmp_path / 'out')],
                            capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'b_broken.jpg: could not be read as an image' in result.stderr
    assert '1 of 4 images failed and were skipped: b_broken.jpg' in result.stderr
    for name in ('a_good.png', 'c_tiny.png', 'd_good.png'):
        assert f'{name}: classes by area: ' in result.stdout
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == [
        'a_good.png', 'c_tiny.png', 'd_good.png']
    assert mmcv.imread(str(tmp_path / 'out' / 'c_tiny.png')).shape == (1, 1, 3)
