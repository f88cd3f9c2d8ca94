"""Fast checks of the tools' runtime: checkpoint allow-list, CPU adaptation, clear errors
for bad input, and the toy data generator."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import HOOKS
from PIL import Image
from testlib import REPO

from rest_mm import runtime
from rest_mm.toy_data import CLASSES, ToyDataSpec, generate_toy_datasets, read_manifest

SMALL_SPEC = ToyDataSpec(num_train=6, num_val=3, height=48, width=64, min_size=10,
                         max_size=24, max_objects=3, seed=3)


@pytest.fixture(scope='module')
def train_tool(load_tool):
    return load_tool('train')


@pytest.fixture(scope='module')
def test_tool(load_tool):
    return load_tool('test')


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
        # a config whose recipe is mixed precision: a message, not mmengine's assertion
        v2_config = str(REPO / 'configs' / 'detection' / 'mask_rcnn_restv2_tiny_3x_coco.py')
        with pytest.raises(SystemExit, match='optim_wrapper.type=OptimWrapper'):
            train_tool.build_config(train_tool.parse_args(
                [v2_config, '--work-dir', str(tmp_path / 'amp')]))
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


def _fresh_toy_data(tmp_path) -> Path:
    generate_toy_datasets(str(tmp_path / 'data'), SMALL_SPEC)
    return tmp_path / 'data'


def _toy_options(data: Path, library: str) -> list:
    if library == 'mmdet':
        coco = f'{data}/toy_coco/'
        ann = f'{coco}annotations/instances_val.json'
        return ['--cfg-options', f'train_dataloader.dataset.data_root={coco}',
                f'val_dataloader.dataset.data_root={coco}',
                f'test_dataloader.dataset.data_root={coco}', f'val_evaluator.ann_file={ann}',
                f'test_evaluator.ann_file={ann}']
    ade = f'{data}/toy_ade/'
    return ['--cfg-options', f'train_dataloader.dataset.data_root={ade}',
            f'val_dataloader.dataset.data_root={ade}', f'test_dataloader.dataset.data_root={ade}']


def test_train_and_test_refuse_outputs_over_inputs(tmp_path, train_tool, test_tool):
    data = _fresh_toy_data(tmp_path)
    toy = REPO / 'configs' / 'toy' / 'retinanet_rest_small_toy.py'
    options = _toy_options(data, 'mmdet')
    checkpoint = tmp_path / 'model.pkl'
    checkpoint.write_bytes(b'weights')
    refused = [
        ([str(toy), str(checkpoint), '--out', str(checkpoint)], '--out .* is the checkpoint'),
        ([str(toy), str(checkpoint), '--show-dir', str(data / 'toy_coco' / 'val')],
         '--show-dir .* is the test_dataloader data'),
        ([str(toy), str(checkpoint), '--work-dir', str(toy.parent)],
         'work dir .* would write retinanet_rest_small_toy.py into the folder of the config'),
    ]
    for argv, message in refused:
        with pytest.raises(ValueError, match=message):
            test_tool.build_config(test_tool.parse_args(argv + options))
    # The checkpoint may live in the work dir: a test run writes a new timestamped folder.
    test_tool.build_config(test_tool.parse_args(
        [str(toy), str(checkpoint), '--work-dir', str(tmp_path)] + options))

    dumped = tmp_path / 'work' / 'retinanet_rest_small_toy.py'
    dumped.parent.mkdir()
    dumped.write_text(toy.read_text().replace("'../detection/", f"'{REPO}/configs/detection/"))
    with pytest.raises(ValueError, match='work dir .* would write retinanet_rest_small_toy.py'):
        train_tool.build_config(train_tool.parse_args(
            [str(dumped), '--work-dir', str(dumped.parent)] + options))
    epoch = tmp_path / 'work' / 'epoch_1.pth'
    epoch.write_bytes(b'weights')
    with pytest.raises(ValueError, match='would write epoch_1.pth into the folder of the '
                                         'load_from checkpoint'):
        train_tool.build_config(train_tool.parse_args(
            [str(toy), '--work-dir', str(tmp_path / 'work')] + options + [f'load_from={epoch}']))
    # Resuming continues in the work dir that holds the checkpoint.
    cfg = train_tool.build_config(train_tool.parse_args(
        [str(toy), '--work-dir', str(tmp_path / 'work'), '--resume', str(epoch)] + options))
    assert cfg.resume and cfg.load_from == str(epoch)
    with pytest.raises(ValueError, match='work dir .* is inside the train_dataloader data'):
        train_tool.build_config(train_tool.parse_args(
            [str(toy), '--work-dir', str(data / 'toy_coco' / 'train' / 'w')] + options))


def test_resume_needs_a_training_checkpoint(tmp_path, train_tool):
    """A text file used to end in ``IndexError: pop from empty list``, ImageNet weights in
    ``KeyError: 'meta'``, both after the Runner was built."""
    options = _toy_options(_fresh_toy_data(tmp_path), 'mmdet')
    toy = str(REPO / 'configs' / 'toy' / 'retinanet_rest_small_toy.py')
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint\n')
    imagenet = tmp_path / 'rest_small.pth'
    torch.save({'model': {'stem.conv1.weight': torch.zeros(1)}}, imagenet)
    work = tmp_path / 'work'
    for path, message in ((text, 'neither a torch checkpoint nor a pickle'),
                          (imagenet, r'not a training checkpoint .*meta\.epoch.*load_from=')):
        with pytest.raises(SystemExit, match=message):
            train_tool.main([toy, '--work-dir', str(work), '--resume', str(path)] + options)
    with pytest.raises(SystemExit, match='is a directory, not a file'):
        train_tool.main([toy, '--work-dir', str(work), '--resume', str(tmp_path)] + options)
    assert not work.exists()


def test_test_tool_loads_the_whole_model_strictly(tmp_path, test_tool):
    """A RetinaNet checkpoint with the UperNet config used to be tested (mIoU reported)
    after mmengine's warnings; and a refused start left a timestamped folder behind."""
    options = _toy_options(_fresh_toy_data(tmp_path), 'mmseg')
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
