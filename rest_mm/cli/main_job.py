"""The main job (``make demo``): RetinaNet-ResT-Small learns the built-in shapes data on CPU.

Steps, each through the same code as ``tools/train.py`` and ``tools/test.py``:

1. generate ``data/toy_coco`` (and ``data/toy_ade``) if missing or stale;
2. evaluate the freshly initialised model with mmdet's COCO metric (the baseline);
3. train from scratch (progress and an ETA are logged every 10 iterations, the bbox mAP
   at each validation);
4. test the saved checkpoint, writing pictures of its predictions;
5. print the bbox mAP before and after, and save them to ``results.json``.

::

    python tools/main_job.py [--work-dir work_dirs/main_job] [--cfg-options ...]
"""
import argparse
import importlib.util
import json
import os.path as osp
import sys
import time

from mmengine.config import DictAction
from mmengine.runner import Runner

from rest_mm import runtime
from rest_mm.checkpoint_files import allow_mmengine_checkpoints
from rest_mm.toy_data import ToyDataSpec, generate_toy_datasets

TOOLS = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(TOOLS)
CONFIG = osp.join(REPO, 'configs', 'toy', 'retinanet_rest_small_toy.py')
METRICS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_75')


def _load_tool(name: str):
    """tools/<name>.py as a module (tools/ is no package, and ``test`` is a stdlib name)."""
    spec = importlib.util.spec_from_file_location(f'rest_mm_tool_{name}',
                                                  osp.join(TOOLS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--work-dir', default=osp.join('work_dirs', 'main_job'))
    parser.add_argument('--data-root', default='data',
                        help='where toy_coco/ is (generated if missing)')
    parser.add_argument('--epochs', type=int,
                        help='train this many epochs instead of the config\'s (the learning-'
                        'rate schedule, validation and checkpoint follow)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override settings of configs/toy/retinanet_rest_small_toy.py')
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


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    train_tool, test_tool = _load_tool('train'), _load_tool('test')
    allow_mmengine_checkpoints()

    _banner(f'1/4 toy data under {args.data_root}/')
    data = generate_toy_datasets(args.data_root, ToyDataSpec())
    print('generated' if data['generated'] == 'yes' else 'already there', flush=True)
    data_root = osp.join(data['coco'], '')
    overrides = {
        'train_dataloader.dataset.data_root': data_root,
        'val_dataloader.dataset.data_root': data_root,
        'test_dataloader.dataset.data_root': data_root,
        'val_evaluator.ann_file': osp.join(data_root, 'annotations', 'instances_val.json'),
        'test_evaluator.ann_file': osp.join(data_root, 'annotations', 'instances_val.json'),
        **(_schedule_overrides(args.epochs) if args.epochs else {}),
        **args.cfg_options}
    cli = [CONFIG, '--work-dir', args.work_dir, '--cfg-options'] + [
        f'{key}={value}' for key, value in overrides.items()]
    cfg = train_tool.build_config(train_tool.parse_args(cli))

    _banner('2/4 evaluating the untrained model (the baseline)')
    baseline_cfg = cfg.copy()
    baseline_cfg.experiment_name = 'untrained'
    baseline = Runner.from_cfg(baseline_cfg)
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
    trainer = Runner.from_cfg(cfg)
    trainer.train()
    checkpoint = osp.join(args.work_dir, f'epoch_{cfg.train_cfg.max_epochs}.pth')

    _banner(f'4/4 testing {checkpoint}, pictures of the predictions')
    pictures = osp.abspath(osp.join(args.work_dir, 'pictures'))
    test_cli = [CONFIG, checkpoint, '--work-dir', args.work_dir, '--show-dir', pictures,
                '--cfg-options'] + [f'{key}={value}' for key, value in overrides.items()] + [
                    'experiment_name=test']
    trained = test_tool.main(test_cli)

    results = dict(untrained={k: untrained[k] for k in METRICS},
                   trained={k: trained[k] for k in METRICS},
                   minutes=round((time.time() - started) / 60, 1),
                   checkpoint=checkpoint, pictures=pictures)
    with open(osp.join(args.work_dir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    _banner('result: RetinaNet-ResT-Small on the toy shapes (val, COCO metric)')
    for key in METRICS:
        print(f'  {key:18s} untrained {untrained[key]:.3f}   trained {trained[key]:.3f}')
    print(f'  {results["minutes"]} minutes; pictures of the predictions in {pictures}/; '
          f'checkpoint {checkpoint}', flush=True)
    return results


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
