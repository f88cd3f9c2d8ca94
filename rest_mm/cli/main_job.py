"""The main job (``make demo``): RetinaNet-ResT-Small learns the built-in shapes data on CPU.

It runs through the code of ``tools/train.py`` and ``tools/test.py``.

Steps: generate ``data/toy_coco`` (and ``data/toy_ade``) if missing or stale; evaluate the
freshly initialised model (the baseline); train from scratch; test the saved checkpoint,
writing pictures of its predictions; print the bbox mAP before and after and save them to
``results.json``.
"""
import argparse
import json
import os.path as osp
import time
from pathlib import Path

from mmengine.config import Config

from rest_mm.cli import errors
from rest_mm.cli import test as test_tool
from rest_mm.cli import train as train_tool
from rest_mm.cli.config_overrides import add_override_arguments, apply_overrides, option_texts
from rest_mm.cli.runner_setup import build_runner
from rest_mm.cli.safe_files import atomic_open, check_output_path, lock_work_dir
from rest_mm.cli.toy_data import ToyDataSpec, generate_toy_datasets
from rest_mm.weights.files import allow_mmengine_checkpoints

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / 'configs' / 'toy' / 'retinanet_rest_small_toy.py')
METRICS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work-dir', default=osp.join('work_dirs', 'main_job'))
    parser.add_argument('--data-root', default='data',
                        help='where toy_coco/ is (generated if missing)')
    parser.add_argument('--epochs', type=int,
                        help='train this many epochs instead of the config\'s (the learning-'
                        'rate schedule, validation and checkpoint follow)')
    add_override_arguments(parser, 'optim_wrapper.optimizer.lr=0.02 (settings of '
                           'configs/toy/retinanet_rest_small_toy.py)')
    errors.add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f'--epochs must be at least 1, got {args.epochs}')
    return args


def _schedule_overrides(epochs: int) -> dict:
    """Keys of the toy config that follow its number of epochs."""
    return {'train_cfg.max_epochs': epochs, 'train_cfg.val_interval': epochs,
            'param_scheduler.1.end': epochs, 'default_hooks.checkpoint.interval': epochs}


def _banner(text: str):
    print(f'\n==== {text}', flush=True)


@errors.handled
def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    # --cfg-options checked before any work (train's own check comes after the toy data)
    apply_overrides(Config.fromfile(CONFIG), args.cfg_options, args.cfg_new_keys, CONFIG)
    allow_mmengine_checkpoints()
    # before any work: a writable work dir that no other live run holds
    check_output_path(args.work_dir, 'dir', option='--work-dir')
    lock_work_dir(args.work_dir, 'tools/main_job.py')

    _banner(f'1/4 toy data under {args.data_root}/')
    data = generate_toy_datasets(args.data_root, ToyDataSpec())
    print('generated' if data['generated'] == 'yes' else 'already there', flush=True)
    data_root = osp.join(data['coco'], '')
    settings = {
        'train_dataloader.dataset.data_root': data_root,
        'val_dataloader.dataset.data_root': data_root,
        'test_dataloader.dataset.data_root': data_root,
        'val_evaluator.ann_file': osp.join(data_root, 'annotations', 'instances_val.json'),
        'test_evaluator.ann_file': osp.join(data_root, 'annotations', 'instances_val.json'),
        **(_schedule_overrides(args.epochs) if args.epochs else {})}
    # the user's options after ours: a later one wins
    overrides = [f'{key}={value}' for key, value in settings.items()] + option_texts(
        args.cfg_options)
    cli = [CONFIG, '--work-dir', args.work_dir, '--cfg-options', *overrides]
    if args.cfg_new_keys:
        cli += ['--cfg-new-keys', *args.cfg_new_keys]
    cfg = train_tool.build_config(train_tool.parse_args(cli))

    _banner('2/4 evaluating the untrained model (the baseline)')
    baseline_cfg = cfg.copy()
    baseline_cfg.experiment_name = 'untrained'
    baseline = build_runner(baseline_cfg)
    baseline.model.init_weights()
    untrained = baseline.test()
    if not untrained:
        # mmdet's CocoMetric returns nothing when no box clears the score threshold, which
        # is what an untrained RetinaNet (classification prior 0.01) gives: mAP 0.
        print('the untrained model detects nothing above the score threshold: mAP 0',
              flush=True)
        untrained = {key: 0.0 for key in METRICS}

    _banner('3/4 training from scratch')
    cfg.experiment_name = 'train'
    trainer = build_runner(cfg)
    trainer.train()
    checkpoint = osp.join(args.work_dir, f'epoch_{cfg.train_cfg.max_epochs}.pth')

    _banner(f'4/4 testing {checkpoint}, pictures of the predictions')
    pictures = osp.abspath(osp.join(args.work_dir, 'pictures'))
    test_cli = [CONFIG, checkpoint, '--work-dir', args.work_dir, '--show-dir', pictures,
                '--cfg-options', *overrides, 'experiment_name=test',
                '--cfg-new-keys', 'experiment_name', *args.cfg_new_keys]
    trained = test_tool.main(test_cli)

    results = dict(untrained={k: untrained[k] for k in METRICS},
                   trained={k: trained[k] for k in METRICS},
                   minutes=round((time.time() - started) / 60, 1),
                   checkpoint=checkpoint, pictures=pictures)
    with atomic_open(osp.join(args.work_dir, 'results.json')) as f:
        json.dump(results, f, indent=1)
    _banner('result: RetinaNet-ResT-Small on the toy shapes (val, COCO metric)')
    for key in METRICS:
        print(f'  {key:18s} untrained {untrained[key]:.3f}   trained {trained[key]:.3f}')
    print(f'  {results["minutes"]} minutes; pictures of the predictions in {pictures}/; '
          f'checkpoint {checkpoint}', flush=True)
    return results
