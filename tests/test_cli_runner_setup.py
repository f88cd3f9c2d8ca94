"""rest_mm/cli/runner_setup.py: CPU adaptation, the rank-0 metrics hook, build_runner."""
import json

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import HOOKS

from rest_mm.cli import runner_setup

from testlib import TOY_CONFIG_DIR, needs_full_stack


@pytest.mark.skipif(torch.cuda.is_available(), reason='adaptation applies without CUDA')
def test_cpu_adaptation_for_distributed_runs():
    cfg = Config(dict(model=dict(backbone=dict(norm_cfg=dict(type='SyncBN')),
                                 heads=[dict(norm_cfg=dict(type='SyncBN', requires_grad=True))]),
                      env_cfg=dict(dist_cfg=dict(backend='nccl', timeout=60)), sync_bn='torch'))
    runner_setup.adapt_config_to_device(cfg, 'pytorch')
    assert cfg.model.backbone.norm_cfg.type == 'BN'
    assert cfg.model.heads[0].norm_cfg == dict(type='BN', requires_grad=True)
    assert cfg.env_cfg.dist_cfg == dict(backend='gloo', timeout=60)
    assert cfg.model_wrapper_cfg.device_ids is None
    assert cfg.model_wrapper_cfg.type == 'MMDistributedDataParallel'
    assert not cfg.sync_bn

    single = Config(dict(model=dict(norm_cfg=dict(type='SyncBN'))))
    runner_setup.adapt_config_to_device(single, 'none')
    assert single.model.norm_cfg.type == 'BN' and 'model_wrapper_cfg' not in single
    with pytest.raises(ValueError, match="launcher must be one of.*got 'slurmm'"):
        runner_setup.adapt_config_to_device(single, 'slurmm')


def test_test_metrics_json_is_written_by_rank_zero_only(tmp_path, monkeypatch):
    """Every rank used to dump the test metrics into one json file (corrupt in CI)."""
    cfg = Config(dict(default_hooks=dict(logger=dict(type='LoggerHook', interval=7))))
    hook_cfg = runner_setup.write_test_metrics_from_rank_zero(cfg).default_hooks.logger
    assert hook_cfg == dict(type='RankZeroLoggerHook', interval=7)
    custom = Config(dict(default_hooks=dict(logger=dict(type='MyLoggerHook'))))
    assert runner_setup.write_test_metrics_from_rank_zero(custom).default_hooks.logger.type == \
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
        monkeypatch.setattr(runner_setup, 'is_main_process', lambda: main_process)
        hook.after_test_epoch(Runner())
        assert (tmp_path / 'metrics.json').exists() == main_process
    assert json.loads((tmp_path / 'metrics.json').read_text()) == {'mIoU': 1.5}


@needs_full_stack
def test_runners_of_one_process_have_their_own_visualizers(tmp_path):
    """As the main job builds them: a second Runner from a copy of the same config must not
    get the first one's visualizer (mmengine's get_instance by name), nor the caller's
    config a changed name."""
    cfg = Config.fromfile(TOY_CONFIG_DIR / 'retinanet_rest_small_toy.py')
    cfg.work_dir = str(tmp_path)
    name = cfg.visualizer.name
    runners = []
    for experiment in ('first', 'second'):
        run_cfg = cfg.copy()
        run_cfg.experiment_name = experiment
        runners.append(runner_setup.build_runner(run_cfg))
    first, second = (runner.visualizer for runner in runners)
    assert first is not second
    assert first.instance_name != second.instance_name
    for runner in runners:
        assert runner.visualizer._vis_backends, 'no backend: nothing would be written'
        for backend in runner.visualizer._vis_backends.values():
            assert backend._save_dir.startswith(runner.log_dir)
    assert cfg.visualizer.name == name
