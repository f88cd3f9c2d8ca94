"""Evaluate a trained detector or segmentor with its config's ``test_evaluator`` (COCO
mAP, mIoU, ...).

The checkpoint is verified and must fit the whole model before the Runner loads it
(mmengine alone would test a partly random model after a warning); ``--allow-missing``
loads partially, by name.
``--out``, ``--show-dir`` and the work dir may not overwrite an input.
"""
import argparse
import os.path as osp

from mmengine.config import Config
from mmengine.registry import RUNNERS, init_default_scope
from mmengine.runner import Runner

from rest_mm.checkpoint import check_model_fits, read_checkpoint
from rest_mm.checkpoint_files import allow_mmengine_checkpoints
from rest_mm.cli import runtime
from rest_mm.detectron2 import check_preprocessing


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and evaluate) an mmdet or mmseg model')
    runtime.add_runner_arguments(parser, 'test', 'the file containing the metrics',
                                 'load', 'auxiliary_head.',
                                 'test_dataloader.batch_size=4')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='also dump the predictions to this .pkl file')
    parser.add_argument('--show', action='store_true', help='show predictions in a window')
    parser.add_argument('--show-dir', help='save pictures of the predictions in this dir '
                        '(mmdet: relative paths are under work_dir/<timestamp>/)')
    parser.add_argument('--wait-time', type=float, default=2,
                        help='seconds each picture stays on screen with --show')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation: the config's tta_pipeline and tta_model "
                        '(UperNet: multi-scale + flip, as the published ADE20K mIoU)')
    args = runtime.parse_runner_arguments(parser, argv)
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


def _refuse_outputs_over_inputs(cfg: Config, args):
    inputs = {'config': args.config, 'checkpoint': args.checkpoint,
              **runtime.dataset_inputs(cfg, ['test_dataloader'])}
    runtime.refuse_output_over_inputs(args.out, inputs, '--out')
    # mmdet puts a relative --show-dir under the run's new timestamped folder
    if args.show_dir and (cfg.default_scope != 'mmdet' or osp.isabs(args.show_dir)):
        runtime.refuse_output_over_inputs(args.show_dir, inputs, '--show-dir')
    # The Runner copies the config into the work dir; the rest goes to a new folder.
    runtime.refuse_output_over_inputs(cfg.work_dir, inputs, 'work dir',
                                      written=[osp.basename(args.config)])


def _use_tta(cfg: Config, config_path: str):
    """Test with the config's ``tta_pipeline`` and its ``tta_model`` wrapping the model, as
    mmdet's and mmseg's tools do."""
    missing = [key for key in ('tta_model', 'tta_pipeline') if key not in cfg]
    if missing:
        raise ValueError(f'--tta needs {" and ".join(missing)} in the config; {config_path} has '
                         "none (e.g. tta_model=dict(type='SegTTAModel') and a tta_pipeline with "
                         "a TestTimeAug transform, as configs/segmentation/ define them)")
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.tta_model.module = cfg.model
    cfg.model = cfg.tta_model


def _tested_model(model):
    """The model the checkpoint is for, inside DDP and a TTA model (as mmengine loads it)."""
    from mmengine.model import BaseTTAModel, is_model_wrapper
    while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
        model = model.module
    return model


def build_config(args) -> Config:
    cfg = runtime.load_config(args.config, args.launcher, args.cfg_options, args.work_dir)
    runtime.check_checkpoint(args.checkpoint)
    cfg.load_from = args.checkpoint
    if args.tta:
        _use_tta(cfg, args.config)
    if args.show or args.show_dir:
        _show_predictions(cfg, args)
    runtime.check_datasets(cfg, ['test_dataloader'])
    _refuse_outputs_over_inputs(cfg, args)
    runtime.write_test_metrics_from_rank_zero(cfg)
    return runtime.adapt_config_to_device(cfg, args.launcher)


def main(argv=None):
    args = parse_args(argv)
    allow_mmengine_checkpoints()
    try:
        cfg = build_config(args)
        checkpoint = read_checkpoint(args.checkpoint, mmap=True)  # verified; data mapped
        meta = checkpoint.get('meta') or {}
        if meta.get('source') == 'detectron2':  # the authors' detectors: their input format
            check_preprocessing(cfg, meta)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise SystemExit(f'tools/test.py: {error}')
    runtime.init_distributed(cfg, args.launcher)
    with runtime.removed_if_start_fails(cfg.work_dir, osp.basename(args.config)) as started:
        if 'runner_type' in cfg:
            init_default_scope(cfg.default_scope)
            runner = RUNNERS.build(cfg)
        else:
            runner = Runner.from_cfg(cfg)
        runner.register_hook(started)
        try:
            check_model_fits(_tested_model(runner.model), checkpoint, args.checkpoint,
                             args.allow_missing)
        except RuntimeError as error:
            raise SystemExit(f'tools/test.py: {error} To test a partly initialised model on '
                             f'purpose, name the parts: --allow-missing PREFIX ...')
        del checkpoint
        if args.out is not None:
            if cfg.default_scope == 'mmdet':
                from mmdet.evaluation import DumpDetResults as DumpResults
            else:
                from mmengine.evaluator import DumpResults
            runner.test_evaluator.metrics.append(DumpResults(out_file_path=args.out))
        metrics = runner.test()
    runtime.close_distributed()
    return metrics
