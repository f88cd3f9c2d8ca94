"""rest_mm/cli/config_overrides.py: ``--cfg-options`` keys checked against the config (issue
16: a typo was merged as a new key and ignored), values that arrive as written (a path with
a space lost it, one with a comma became a list, a dict ended in RecursionError)."""
import argparse

import pytest
from mmengine.config import Config
from PIL import Image

from rest_mm.cli import config_overrides, demo, main_job
from rest_mm.cli import test as test_tool
from rest_mm.cli import train as train_tool
from rest_mm.cli.config_overrides import OverrideError, apply_overrides, parse_value
from rest_mm.rest import BACKBONES

from testlib import REPO, needs_full_stack

TOY = str(REPO / 'configs' / 'toy' / 'retinanet_rest_small_toy.py')


def _config() -> Config:
    return Config(dict(
        model=dict(backbone=dict(type='ResT', arch='small', out_indices=(0, 1, 2, 3),
                                 init_cfg=dict(type='Pretrained', checkpoint='a.pth')),
                   neck=None),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        param_scheduler=[dict(type='LinearLR', end=500), dict(type='MultiStepLR', end=12)],
        load_from=None))


def _options(*texts):
    parser = argparse.ArgumentParser()
    config_overrides.add_override_arguments(parser, 'a=1')
    return parser.parse_args(['--cfg-options', *texts]).cfg_options


def test_unknown_keys_are_refused_with_the_nearest():
    for typo, near in (('optim_wraper.optimizer.lr', 'optim_wrapper.optimizer.lr'),
                       ('default_hooks.checkpoint.intervl', 'default_hooks.checkpoint.interval'),
                       ('param_scheduler.1.edn', 'param_scheduler.1.end')):
        cfg = _config()
        with pytest.raises(OverrideError, match=rf'{typo}: no such key in x.py; did you mean '
                                                rf'{near}\? .*--cfg-new-keys {typo}'):
            apply_overrides(cfg, _options(f'{typo}=0.5'), config='x.py')
        assert cfg.to_dict() == _config().to_dict()  # nothing merged
    # adding to a dict that takes any argument is new too; beyond a list's end does not exist
    for key in ('model.backbone.drop_path_rate', 'model.neck.type', 'param_scheduler.2.end',
                'model.backbone.arch.embed_dims'):
        with pytest.raises(OverrideError, match=f'{key}: no such key'):
            apply_overrides(_config(), _options(f'{key}=1'))
    with pytest.raises(OverrideError, match=r'out_indices is a tuple.*give the whole value'):
        apply_overrides(_config(), _options('model.backbone.out_indices.0=1'))


def test_new_keys_list_items_and_delete():
    cfg = _config()
    apply_overrides(cfg, _options('model.backbone.drop_path_rate=0.1', 'model.neck.type=FPN',
                                  'param_scheduler.1.end=3'),
                    new_keys=['model.backbone.drop_path_rate', 'model.neck'])
    assert cfg.model.backbone.drop_path_rate == 0.1 and cfg.model.neck == dict(type='FPN')
    assert cfg.param_scheduler[1] == dict(type='MultiStepLR', end=3)
    # _delete_ replaces the dict by the keys given under it, which need not exist
    cfg = _config()
    apply_overrides(cfg, _options('model.backbone._delete_=True', 'model.backbone.type=ResTV2',
                                  'model.backbone.arch=tiny'))
    assert cfg.model.backbone == dict(type='ResTV2', arch='tiny')
    with pytest.raises(OverrideError, match='model.bakbone: no such key'):
        apply_overrides(_config(), _options('model.bakbone._delete_=True'))


def test_values_arrive_as_written():
    cfg = _config()
    apply_overrides(cfg, _options('model.backbone.init_cfg.checkpoint=/tmp/a b/c,d.pth',
                                  'load_from=/tmp/x y/e,f.pth', 'model.backbone.arch=base',
                                  'optim_wrapper.optimizer.lr=2e-3',
                                  "default_hooks.checkpoint.type='My Hook'"))
    assert cfg.model.backbone.init_cfg.checkpoint == '/tmp/a b/c,d.pth'
    assert cfg.load_from == '/tmp/x y/e,f.pth'
    assert cfg.model.backbone.arch == 'base' and cfg.optim_wrapper.optimizer.lr == 2e-3
    assert cfg.default_hooks.checkpoint.type == 'My Hook'
    assert parse_value('k', 'None', 'x') is None and parse_value('k', 'false', 1) is False
    assert parse_value('k', '0,1,2', (0, 1)) == [0, 1, 2]  # mmengine's list form
    assert parse_value('k', '[a,b]', 'x') == ['a', 'b'] and parse_value('k', '(1, 2)') == (1, 2)
    assert parse_value('k', 'a,b', 'x') == 'a,b'  # a string setting keeps its text
    assert parse_value('k', 'inf', 1.0) == float('inf') and parse_value('k', 'my run') == 'my run'
    assert parse_value('k', '512', 'dynamic') == 512  # a number where a name was (loss_scale)

    # an arch dict replaces the preset name (DictAction recursed until RecursionError)
    arch = "{'embed_dims': [64, 128, 256, 512], 'depths': [1, 1, 1, 1]}"
    cfg = _config()
    apply_overrides(cfg, _options(f'model.backbone.arch={arch}'))
    assert cfg.model.backbone.arch == dict(embed_dims=[64, 128, 256, 512], depths=[1, 1, 1, 1])
    full = ("{'embed_dims': [32, 64, 128, 256], 'depths': [1, 1, 1, 1], 'num_heads': [1, 2, 4, "
            "8], 'mlp_ratio': 4, 'sr_ratios': [8, 4, 2, 1]}")
    cfg = _config()
    apply_overrides(cfg, _options(f'model.backbone.arch={full}'))
    assert BACKBONES['ResT'](arch=cfg.model.backbone.arch).embed_dims == (32, 64, 128, 256)
    with pytest.raises(OverrideError, match='a dict must be a Python literal with quoted keys'):
        apply_overrides(_config(), _options('model.backbone.arch={embed_dims:[64,128]}'))
    # a dict merged into a dict: its keys are checked as if given one by one
    with pytest.raises(OverrideError, match='model.backbone.init_cfg.chekpoint: no such key'):
        apply_overrides(_config(), _options("model.backbone.init_cfg={'chekpoint': 'b.pth'}"))


def test_option_without_equals_is_refused(capsys):
    with pytest.raises(SystemExit):
        _options('optim_wrapper.optimizer.lr')
    assert "'optim_wrapper.optimizer.lr' is not KEY=VALUE" in capsys.readouterr().err


@needs_full_stack
def test_tools_refuse_unknown_keys_before_any_work(tmp_path):
    typo = ['--cfg-options', 'default_hooks.checkpoint.intervl=1']
    message = 'did you mean default_hooks.checkpoint.interval?'
    work = tmp_path / 'work'
    with pytest.raises(ValueError, match=message):
        train_tool.build_config(train_tool.parse_args([TOY, '--work-dir', str(work), *typo]))
    with pytest.raises(ValueError, match=message):
        test_tool.build_config(test_tool.parse_args([TOY, 'x.pth', '--work-dir', str(work),
                                                     *typo]))
    image = tmp_path / 'image.png'
    Image.new('RGB', (32, 32)).save(image)
    for main, argv in ((train_tool.main, [TOY, '--work-dir', str(work)]),
                       (demo.main, [str(image), TOY, '--out-dir', str(tmp_path / 'pictures')]),
                       (main_job.main, ['--work-dir', str(work), '--data-root',
                                        str(tmp_path / 'data')])):
        with pytest.raises(SystemExit, match=message):
            main(argv + typo)
    assert not work.exists() and not (tmp_path / 'data').exists()
    # named new, a key passes; a path with a space arrives whole (the data is missing)
    spaced = tmp_path / 'a b, c'
    with pytest.raises(FileNotFoundError, match=f"dataset path '{spaced}/annotations"):
        train_tool.build_config(train_tool.parse_args(
            [TOY, '--work-dir', str(work), '--cfg-options', 'optim_wrapper.clip_grad.max_norm=1',
             f'train_dataloader.dataset.data_root={spaced}/',
             '--cfg-new-keys', 'optim_wrapper.clip_grad']))
