"""rest_mm/cli/preflight.py: clear errors for missing inputs, and the rule that no output is
or holds an input."""
import pytest
from mmengine.config import Config

from rest_mm.cli import preflight

from testlib import REPO, needs_full_stack


@needs_full_stack
def test_missing_dataset_names_path_and_remedy(tmp_path):
    cfg = Config.fromfile(str(REPO / 'configs' / 'toy' / 'retinanet_rest_small_toy.py'))
    cfg.train_dataloader.dataset.data_root = str(tmp_path / 'toy_coco')
    with pytest.raises(FileNotFoundError) as error:
        preflight.check_datasets(cfg, ['train_dataloader'])
    message = str(error.value)
    assert str(tmp_path / 'toy_coco' / 'annotations' / 'instances_train.json') in message
    assert 'tools/make_toy_data.py' in message

    coco = Config(dict(default_scope='mmdet', val_dataloader=dict(dataset=dict(
        type='RepeatDataset', dataset=dict(type='CocoDataset', data_root=str(tmp_path),
                                           ann_file='annotations/instances_val2017.json')))))
    with pytest.raises(FileNotFoundError, match='instances_val2017.json.*cocodataset.org'):
        preflight.check_datasets(coco, ['val_dataloader'])


# ---------------------------------------------------------------------------------------
# No tool writes over what it reads (issue 10).
# ---------------------------------------------------------------------------------------
def test_outputs_may_not_be_or_hold_inputs(tmp_path, monkeypatch):
    images = tmp_path / 'images'
    images.mkdir()
    (images / 'a.png').write_bytes(b'png')
    config = tmp_path / 'configs' / 'model.py'
    config.parent.mkdir()
    config.write_text('model = None\n')
    inputs = {'input folder': str(images), 'config': str(config), 'checkpoint': None,
              'remote weights': 'https://example.com/w.pth'}
    refuse = preflight.refuse_output_over_inputs
    monkeypatch.chdir(tmp_path)
    refused = [
        (str(images), (), 'the output is the input folder'),
        ('images/../images/', (), 'the output is the input folder'),
        (str(images / 'vis'), (), 'the output is inside the input folder'),
        ('configs/model.py', (), 'the output is the config'),
        ('configs', ['*.py'], 'would write model.py into the folder of the config'),
    ]
    for output, written, message in refused:
        with pytest.raises(ValueError, match=message):
            refuse(output, inputs, '--out-dir', written=written)
    link = tmp_path / 'link'
    link.symlink_to(images)
    with pytest.raises(ValueError, match='is the input folder'):
        refuse(str(link), inputs, '--out-dir')
    hard = tmp_path / 'hard.py'
    hard.hardlink_to(config)
    with pytest.raises(ValueError, match='is the config'):
        refuse(str(hard), inputs, '--out')
    for output, written in ((str(tmp_path / 'vis'), ()), ('configs', ['*.png']),
                            (str(tmp_path), ['*.png']), (None, ())):
        refuse(output, inputs, '--out-dir', written=written)
