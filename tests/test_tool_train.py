"""tools/train.py: clear errors for bad input, outputs never over inputs, resumable
checkpoints only; and, end to end on the built-in shapes data through the command-line
tools, training that beats the untrained model and an interrupted run that resumes.

The end-to-end sizes are cut to fit CI's CPU budget (small images and datasets, tens of
iterations); each run's learning is still measured against the same model untrained (and,
for segmentation, against predicting background everywhere).
"""
import importlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from PIL import Image

import rest_mm  # noqa: F401  (registers the backbones for _untrained_checkpoint)
from rest_mm.cli import test as test_tool
from rest_mm.cli import train as train_tool

from testlib import (
    REPO,
    TOOLS_DIR,
    TRAINING_TIMEOUT,
    data_options,
    fresh_toy_data,
    latest_metrics,
    needs_full_stack,
    run,
    toy_options,
)

pytestmark = needs_full_stack


def test_tools_reject_bad_input(tmp_path, capsys):
    toy = str(REPO / 'configs' / 'toy' / 'retinanet_rest_small_toy.py')
    if not torch.cuda.is_available():
        # a config whose recipe is mixed precision: a message, not mmengine's assertion
        v2_config = str(REPO / 'configs' / 'detection' / 'mask_rcnn_restv2_tiny_3x_coco.py')
        with pytest.raises(ValueError, match='optim_wrapper.type=OptimWrapper'):
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


def test_train_and_test_refuse_outputs_over_inputs(tmp_path):
    data = fresh_toy_data(tmp_path)
    toy = REPO / 'configs' / 'toy' / 'retinanet_rest_small_toy.py'
    options = toy_options(data, 'mmdet')
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


def test_resume_needs_a_training_checkpoint(tmp_path):
    """A text file used to end in ``IndexError: pop from empty list``, ImageNet weights in
    ``KeyError: 'meta'``, both after the Runner was built."""
    options = toy_options(fresh_toy_data(tmp_path), 'mmdet')
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


def test_non_finite_checkpoints_are_refused(tmp_path):
    """A whole-model checkpoint holding NaN used to be tested and trained from without a
    word (issue 16); --allow-non-finite loads it anyway, as the other tools' flag does."""
    options = toy_options(fresh_toy_data(tmp_path), 'mmdet')
    toy = str(REPO / 'configs' / 'toy' / 'retinanet_rest_small_toy.py')
    weights = {'backbone.stem.0.weight': torch.tensor([1.0, float('nan')]),
               'bbox_head.retina_cls.bias': torch.tensor([float('inf'), 0.0, 0.0])}
    path = tmp_path / 'diverged.pth'
    torch.save(dict(state_dict=weights, meta=dict(epoch=1, iter=1), message_hub={},
                    optimizer={}), path)
    message = (r'non-finite values in 2 tensor\(s\) of .*diverged.pth: '
               r'backbone.stem.0.weight \(1 NaN, 0 Inf of 2\), bbox_head.retina_cls.bias '
               r'\(0 NaN, 1 Inf of 3\).*pass --allow-non-finite')
    work = tmp_path / 'work'
    for main, argv in ((test_tool.main, [toy, str(path)]),
                       (train_tool.main, [toy, '--resume', str(path)]),
                       (train_tool.main, [toy])):
        extra = [f'load_from={path}'] if argv == [toy] else []
        with pytest.raises(SystemExit, match=message):
            main(argv + ['--work-dir', str(work)] + options + extra)
    assert not work.exists()
    # allowed, the file gets past that check to the next: it does not fit the model
    with pytest.raises(SystemExit, match='diverged.pth does not fit the RetinaNet'):
        test_tool.main([toy, str(path), '--allow-non-finite', '--work-dir', str(work)]
                       + options)


def _untrained_checkpoint(config: str, options: list, path: Path):
    """The config's model, initialised and untrained, saved as a checkpoint."""
    cfg = Config.fromfile(str(REPO / config))
    cfg.merge_from_dict(dict(o.split('=', 1) for o in options if o.startswith('model.')))
    registry = {'mmdet': 'mmdet.registry', 'mmseg': 'mmseg.registry'}[cfg.default_scope]
    torch.manual_seed(0)
    model = importlib.import_module(registry).MODELS.build(cfg.model)
    model.init_weights()
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), path)


def _test(config, checkpoint, work_dir, options, *extra) -> dict:
    run([sys.executable, TOOLS_DIR / 'test.py', config, checkpoint, '--work-dir', work_dir,
         *extra, '--cfg-options', *options])
    return latest_metrics(Path(work_dir))


def _train_then_test(tmp_path, config, options, metric_key):
    """Untrained and trained values of ``metric_key`` on the toy val set."""
    work_dir = tmp_path / 'work'
    # The timeout catches a hang, not slowness: Mask R-CNN's run takes ~5 minutes on an idle
    # 2-core machine and must still pass on a loaded one.
    run([sys.executable, TOOLS_DIR / 'train.py', config, '--work-dir', work_dir,
         '--cfg-options', *options], timeout=TRAINING_TIMEOUT)
    checkpoint = Path((work_dir / 'last_checkpoint').read_text().strip())
    assert checkpoint.is_file()
    trained = _test(config, checkpoint, tmp_path / 'test_trained', options)
    untrained_ckpt = tmp_path / 'untrained.pth'
    _untrained_checkpoint(config, options, untrained_ckpt)
    untrained = _test(config, untrained_ckpt, tmp_path / 'test_untrained', options)
    return untrained.get(metric_key, 0.0), trained[metric_key]


@pytest.mark.slow
def test_mask_rcnn_learns_masks(tmp_path, toy_root):
    options = data_options(toy_root, 'mmdet') + [
        'train_cfg.max_epochs=10', 'train_cfg.val_interval=10', 'param_scheduler.1.end=10',
        'default_hooks.checkpoint.interval=10']
    untrained, trained = _train_then_test(
        tmp_path, 'configs/toy/mask_rcnn_rest_small_toy.py', options, 'coco/segm_mAP_50')
    print(f'Mask R-CNN segm mAP@50: untrained {untrained:.3f}, trained {trained:.3f}')
    assert trained > max(untrained, 0.0) + 0.05


@pytest.mark.slow
def test_upernet_learns_segmentation(tmp_path, toy_root):
    options = data_options(toy_root, 'mmseg') + [
        'train_cfg.max_iters=40', 'train_cfg.val_interval=40',
        'param_scheduler.1.end=40', 'default_hooks.checkpoint.interval=40']
    untrained, trained = _train_then_test(
        tmp_path, 'configs/toy/upernet_restv2_tiny_toy.py', options, 'mIoU')
    # Predicting background everywhere: IoU = background share for background, 0 for shapes.
    labels = [np.asarray(Image.open(p)) for p in
              sorted((toy_root / 'toy_ade/annotations/validation').glob('*.png'))]
    background_share = np.mean([(label == 0).mean() for label in labels])
    all_background = 100 * background_share / 4  # mmseg reports mIoU in percent
    print(f'UperNet mIoU: untrained {untrained:.1f}, all-background {all_background:.1f}, '
          f'trained {trained:.1f}')
    assert trained > max(untrained, all_background) + 10


@pytest.mark.slow
def test_interrupted_training_resumes(tmp_path, toy_root):
    """Kill a run after its first epoch's checkpoint; --resume continues from there with
    the saved optimizer state (AdamW's step count runs on, it does not restart)."""
    config = 'configs/toy/retinanet_rest_small_toy.py'
    options = data_options(toy_root, 'mmdet') + [
        'train_dataloader.dataset.indices=16', 'train_dataloader.batch_size=4',
        'train_cfg.max_epochs=3', 'train_cfg.val_interval=10', 'param_scheduler.1.end=3',
        'default_hooks.checkpoint.interval=1', 'default_hooks.checkpoint.max_keep_ckpts=3',
        'default_hooks.logger.interval=1']
    work_dir = tmp_path / 'work'
    command = [sys.executable, TOOLS_DIR / 'train.py', config, '--work-dir', work_dir,
               '--cfg-options', *options, '--cfg-new-keys', 'train_dataloader.dataset.indices']
    first = subprocess.Popen([str(a) for a in command], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (work_dir / 'last_checkpoint').exists():
            assert first.poll() is None, 'training ended before its first checkpoint'
            assert time.time() < deadline, 'no checkpoint after 10 minutes'
            time.sleep(0.1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert (work_dir / 'epoch_1.pth').is_file() and not (work_dir / 'epoch_2.pth').exists()
    saved = torch.load(work_dir / 'epoch_1.pth', weights_only=False)
    assert saved['meta']['epoch'] == 1 and saved['meta']['iter'] == 4

    resumed = run(command + ['--resume'])
    log = resumed.stdout + resumed.stderr
    assert 'resumed epoch: 1, iter: 4' in log
    pattern = r'Epoch\(train\)\s+\[(\d+)\]\[(\d+)/4\]'
    logged = [(int(epoch), int(step)) for epoch, step in re.findall(pattern, log)]
    assert logged == [(2, 1), (2, 2), (2, 3), (2, 4), (3, 1), (3, 2), (3, 3), (3, 4)], logged
    final = torch.load(work_dir / 'epoch_3.pth', weights_only=False)
    assert final['meta']['epoch'] == 3 and final['meta']['iter'] == 12
    steps = {float(state['step']) for state in final['optimizer']['state'].values()}
    assert steps == {12.0}, steps  # 4 steps before the kill + 8 after, one optimizer
