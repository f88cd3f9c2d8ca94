"""rest_mm/cli/runtime.py: CPU adaptation, the rank-0 metrics hook, clear errors for missing
inputs, and the rule that no output is or holds an input."""
import json

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import HOOKS

from rest_mm.cli import runtime

from testlib import REPO, needs_full_stack


@pytest.mark.skipif(torch.cuda.is_available(), reason='adaptation applies without CUDA')
def test_cpu_adaptation_for_distributed_runs():
    cfg = Config(dict(model=dict(backbone=dict(norm_cfg=dict(type='SyncBN')),
                                 heads=[dict(norm_cfg=dict(type='SyncBN', requires_grad=True))]),
                      env_cfg=dict(dist_cfg=dict(backend='nccl', timeout=60)), sync_bn='torch'))
    runtime.adapt_config_to_device(cfg, 'pytorch')
    assert cfg.model.backbone.norm_cfg.type == 'BN'
    assert cfg.model.heads[0].norm_cfg == dict(type='BN', requires_grad=True)
    assert cfg.env_cfg.dist_cfg == dict(backend='gloo', timeout=60)
    assert cfg.model_wrapper_cfg.device_ids is None
    assert cfg.model_wrapper_cfg.type == 'MMDistributedDataParallel'
    assert not cfg.sync_bn

    single = Config(dict(model=dict(norm_cfg=dict(type='SyncBN'))))
    runtime.adapt_config_to_device(single, 'none')
    assert single.model.norm_cfg.type == 'BN' and 'model_wrapper_cfg' not in single
    with pytest.raises(ValueError, match="launcher must be one of.*got 'slurmm'"):
        runtime.adapt_config_to_device(single, 'slurmm')


def test_test_metrics_json_is_written_by_rank_zero_only(tmp_path, monkeypatch):
    """Every rank used to dump the test metrics into one json file (corrupt in CI)."""
    cfg = Config(dict(default_hooks=dict(logger=dict(type='LoggerHook', interval=7))))
    hook_cfg = runtime.write_test_metrics_from_rank_zero(cfg).default_hooks.logger
    assert hook_cfg == dict(type='RankZeroLoggerHook', interval=7)
    custom = Config(dict(default_hooks=dict(logger=dict(type='MyLoggerHook'))))
    assert runtime.write_test_metrics_from_rank_zero(custom).default_hooks.logger.type == \
        'MyLoggerHook'

    class Runner:
        log_dir = str(tmp_path)
        test_dataloader = [None]

        class logger:
            info = staticmethod(lambda message: None)

        class log_processor:
            get_log_after_epoch = staticmethod(lambda *args, **kwargs: ({'mIoU': 1.5}, ''))

    hook = HOOKS.build(hook_cfg)
    hook.json_log_path = 'metrics.json'
    for main_process in (False, True):
        monkeypatch.setattr(runtime, 'is_main_process', lambda: main_process)
        hook.after_test_epoch(Runner())
        assert (tmp_path / 'metrics.json').exists() == main_process
    assert json.loads((tmp_path / 'metrics.json').read_text()) == {'mIoU': 1.5}


@needs_full_stack
def test_missing_dataset_names_path_and_remedy(tmp_path):
    cfg = Config.fromfile(str(REPO / 'configs' / 'toy' / 'retinanet_rest_small_toy.py'))
    cfg.train_dataloader.dataset.data_root = str(tmp_path / 'toy_coco')
    with pytest.raises(FileNotFoundError) as error:
        runtime.check_datasets(cfg, ['train_dataloader'])
    message = str(error.value)
    assert str(tmp_path / 'toy_coco' / 'annotations' / 'instances_train.json') in message
    assert 'tools/make_toy_data.py' in message

    coco = Config(dict(default_scope='mmdet', val_dataloader=dict(dataset=dict(
        type='RepeatDataset', dataset=dict(type='CocoDataset', data_root=str(tmp_path),
                                           ann_file='annotations/instances_val2017.json')))))
    with pytest.raises(FileNotFoundError, match='instances_val2017.json.*cocodataset.org'):
        runtime.check_datasets(coco, ['val_dataloader'])


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
    refuse = runtime.refuse_output_over_inputs
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
