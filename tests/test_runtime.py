"""Fast checks of the tools' runtime: checkpoint allow-list, CPU adaptation, clear errors
for bad input, and the toy data generator."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.registry import HOOKS
from PIL import Image

from rest_mm import runtime
from rest_mm.toy_data import CLASSES, ToyDataSpec, generate_toy_datasets, read_manifest

REPO = Path(__file__).resolve().parents[1]
SMALL_SPEC = ToyDataSpec(num_train=6, num_val=3, height=48, width=64, min_size=10,
                         max_size=24, max_objects=3, seed=3)


@pytest.fixture(scope='module')
def train_tool(load_tool):
    return load_tool('train')


@pytest.fixture(scope='module')
def test_tool(load_tool):
    return load_tool('test')


@pytest.fixture
def restored_safe_globals():
    """Run a test from torch's default allow-list and put the session's back afterwards."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(saved)


def _mmengine_like_checkpoint():
    """What mmengine's Runner saves: a message hub of HistoryBuffers, numpy scalars, a
    MultiStepLR state with a Counter, and tensors."""
    hub = MessageHub('runtime_test_hub')
    for step in range(3):
        hub.update_scalar('train/loss', 1.0 / (step + 1))
    hub.update_info('eta', np.float64(12.5))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[8, 11])
    return dict(meta=dict(epoch=1, iter=3, dataset_meta=dict(classes=('a', 'b'))),
                state_dict=model.state_dict(), message_hub=hub.state_dict(),
                optimizer=optimizer.state_dict(), param_schedulers=[scheduler.state_dict()])


def test_allow_list_reads_mmengine_checkpoints(tmp_path, restored_safe_globals):
    path = tmp_path / 'epoch_1.pth'
    saved = _mmengine_like_checkpoint()
    torch.save(saved, path)
    with pytest.raises(pickle.UnpicklingError, match='HistoryBuffer|numpy|Counter'):
        torch.load(path, weights_only=True)  # torch >= 2.6's default refuses it

    runtime.allow_mmengine_checkpoints()
    loaded = torch.load(path, weights_only=True)
    buffer = loaded['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer)
    np.testing.assert_allclose(buffer.data[0], [1.0, 0.5, 1 / 3])
    assert buffer.mean() == pytest.approx((1 + 0.5 + 1 / 3) / 3)  # methods restored
    assert loaded['param_schedulers'][0]['milestones'] == {8: 1, 11: 1}
    assert loaded['optimizer']['state'][0]['step'] == saved['optimizer']['state'][0]['step']
    assert torch.equal(loaded['state_dict']['weight'], saved['state_dict']['weight'])


class _Smuggler:
    """Pickles as getattr(HistoryBuffer, '__init__'): not a statistics method."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, '__init__')


def test_allow_list_does_not_allow_getattr(tmp_path, restored_safe_globals):
    path = tmp_path / 'evil.pth'
    torch.save({'x': _Smuggler()}, path)
    runtime.allow_mmengine_checkpoints()
    with pytest.raises(Exception, match='only HistoryBuffer statistics methods'):
        torch.load(path, weights_only=True)


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


def test_tools_reject_bad_input(tmp_path, train_tool, test_tool, capsys):
    toy = str(REPO / 'configs' / 'toy' / 'retinanet_rest_small_toy.py')
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            train_tool.parse_args([toy, '--amp'])
        assert '--amp needs a CUDA GPU' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_tool.parse_args([str(tmp_path / 'nope.py')])
    assert 'nope.py' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        test_tool.parse_args([toy, 'x.pth', '--out', 'results.json'])
    assert '--out must name a .pkl file' in capsys.readouterr().err

    missing = str(tmp_path / 'epoch_3.pth')
    with pytest.raises(FileNotFoundError, match=f'--resume checkpoint {missing!r} does not'):
        train_tool.build_config(train_tool.parse_args([toy, '--resume', missing]))
    with pytest.raises(FileNotFoundError, match=f'checkpoint {missing!r} does not exist'):
        test_tool.build_config(test_tool.parse_args([toy, missing]))
    with pytest.raises(FileNotFoundError, match='is a directory'):
        test_tool.build_config(test_tool.parse_args([toy, str(tmp_path)]))

    no_data = ['--cfg-options', f'train_dataloader.dataset.data_root={tmp_path}/',
               f'test_dataloader.dataset.data_root={tmp_path}/']
    with pytest.raises(FileNotFoundError, match='make_toy_data'):
        train_tool.build_config(train_tool.parse_args([toy, '--work-dir', str(tmp_path)]
                                                      + no_data))
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')
    with pytest.raises(FileNotFoundError, match='test_dataloader.*make_toy_data'):
        test_tool.build_config(test_tool.parse_args([toy, str(checkpoint)] + no_data))

    other = tmp_path / 'other_scope.py'
    other.write_text("default_scope = 'mmpretrain'\n")
    with pytest.raises(ValueError, match="default_scope is 'mmpretrain'"):
        train_tool.build_config(train_tool.parse_args([str(other)]))


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


def test_make_toy_data_cli(tmp_path, capsys, load_tool):
    tool = load_tool('make_toy_data')
    tool.main(['--out-dir', str(tmp_path), '--num-train', '2', '--num-val', '1', '--height',
               '40', '--width', '40', '--min-size', '8', '--max-size', '16'])
    assert 'toy data generated' in capsys.readouterr().out
    assert len(list((tmp_path / 'toy_ade/images/training').glob('*.jpg'))) == 2
    with pytest.raises(SystemExit, match='min_size <= max_size'):
        tool.main(['--out-dir', str(tmp_path), '--min-size', '30', '--max-size', '20'])


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
