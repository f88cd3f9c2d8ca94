"""Evaluate a trained detector or segmentor from an mmdet or mmseg config.

::

    python tools/test.py CONFIG CHECKPOINT [--show-dir DIR] [--out results.pkl]
    bash tools/dist_test.sh CONFIG CHECKPOINT 8

The metric is the config's ``test_evaluator`` (COCO bbox/segm mAP, mIoU, ...).
"""
import argparse
import os
import os.path as osp

from mmengine.config import Config, DictAction
from mmengine.registry import RUNNERS, init_default_scope
from mmengine.runner import Runner

from rest_mm import runtime


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and evaluate) an mmdet or mmseg model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the dir to save the file containing the metrics '
                        '(default: work_dirs/<config name>)')
    parser.add_argument('--out', help='also dump the predictions to this .pkl file')
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument('--show-dir', help='save pictures of the predictions in this dir '
                        '(mmdet: relative paths are under work_dir/<timestamp>/)')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='seconds each picture stays on screen with --show')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config settings, key=value pairs, e.g. test_dataloader.batch_size=4')
    parser.add_argument('--launcher', choices=runtime.LAUNCHERS, default='none',
                        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    if not osp.isfile(args.config):
        parser.error(f'config {args.config!r} does not exist')
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out must name a .pkl file, got {args.out!r}')
    return args


def _show_predictions(cfg: Config, args):
    """Switch on the config's visualization hook, as mmdet's and mmseg's tools do."""
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        raise ValueError('--show/--show-dir need a visualization hook in default_hooks, e.g. '
                         "visualization=dict(type='DetVisualizationHook')")
    hook['draw'] = True
    if args.show:
        hook['show'], hook['wait_time'] = True, args.wait_time
    if args.show_dir:
        if cfg.default_scope == 'mmdet':
            hook['test_out_dir'] = args.show_dir
        else:  # mmseg's hook hands pictures to the visualizer's backends
            cfg.visualizer['save_dir'] = args.show_dir


def build_config(args) -> Config:
    cfg = runtime.load_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    runtime.check_checkpoint(args.checkpoint)
    cfg.load_from = args.checkpoint
    if args.show or args.show_dir:
        _show_predictions(cfg, args)
    runtime.check_datasets(cfg, ['test_dataloader'])
    runtime.write_test_metrics_from_rank_zero(cfg)
    return runtime.adapt_config_to_device(cfg, args.launcher)


def main(argv=None):
    args = parse_args(argv)
    runtime.allow_mmengine_checkpoints()
    cfg = build_config(args)
    runtime.init_distributed(cfg, args.launcher)
    if 'runner_type' in cfg:
        init_default_scope(cfg.default_scope)
        runner = RUNNERS.build(cfg)
    else:
        runner = Runner.from_cfg(cfg)
    if args.out is not None:
        if cfg.default_scope == 'mmdet':
            from mmdet.evaluation import DumpDetResults as DumpResults
        else:
            from mmengine.evaluator import DumpResults
        runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
    metrics = runner.test()
    runtime.close_distributed()
    return metrics


if __name__ == '__main__':
    main()
